"""Silero VAD, a model no one here wrote, runs through an engine spec inside the node.

launch/vad.toml is used as shipped, with its microphone replaced at the edge by a WAV file
through the same driver path: silence (low noise), speech synthesised by espeak-ng, silence.
Its speech probability on pred.vad must be high in the speech and low in the silences.
`scripts/setup.sh --test` installs both the `silero-vad` wheel (without its torch dependency)
and espeak-ng.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from fusion_node.alignment import AudioInput
from fusion_node.config import DriverConfig, load_config
from fusion_node.node import Node
from fusion_node.protocol import Prediction
from tests.conftest import Collector

LAUNCH = Path(__file__).parents[2] / "launch" / "vad.toml"
SR = 16_000
SILENCE_S = 1.2
# Probabilities this close to a speech/silence boundary are not judged (the model's own
# onset and hang-over, and the 36 ms window).
MARGIN_S = 0.3

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("silero_vad") is None,
                       reason="silero-vad is not installed (scripts/setup.sh --test installs it)"),
    pytest.mark.skipif(shutil.which("espeak-ng") is None,
                       reason="espeak-ng is not installed (scripts/setup.sh --test installs it)"),
]


def _speech(tmp_path: Path) -> np.ndarray:
    """espeak-ng speech (22,050 Hz) resampled to 16 kHz, float32 in [-1, 1]."""
    raw = tmp_path / "espeak.wav"
    subprocess.run(["espeak-ng", "-v", "en", "-s", "150", "-w", str(raw),
                    "pick up the red block and go home"], check=True, timeout=30)
    with wave.open(str(raw)) as file:
        rate = file.getframerate()
        samples = np.frombuffer(file.readframes(file.getnframes()), "<i2") / 32768.0
    # Low-pass below the new Nyquist frequency (windowed sinc), then interpolate.
    taps = np.arange(-64, 65)
    cutoff = 7_500 / rate
    kernel = 2 * cutoff * np.sinc(2 * cutoff * taps) * np.hamming(len(taps))
    filtered = np.convolve(samples, kernel / kernel.sum(), mode="same")
    times = np.arange(int(len(filtered) * SR / rate)) * rate / SR
    return np.interp(times, np.arange(len(filtered)), filtered).astype(np.float32)


def _write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(SR)
        file.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


async def test_silero_vad_speech_probability_follows_the_speech(tmp_path):
    speech = _speech(tmp_path)
    rng = np.random.default_rng(0)
    silence = (rng.standard_normal(int(SILENCE_S * SR)) * 1e-3).astype(np.float32)
    _write_wav(tmp_path / "speech.wav", np.concatenate([silence, speech, silence]))
    speech_s = (SILENCE_S, SILENCE_S + len(speech) / SR)
    total_s = 2 * SILENCE_S + len(speech) / SR

    config = load_config(LAUNCH)
    microphone = config.drivers[0]
    wav = DriverConfig(kind="wav", stream=microphone.stream, process=False, endpoint=None,
                       config={"path": str(tmp_path / "speech.wav"), "chunk_ms": 10},
                       capacity=1024)  # keep the whole file, to map predictions onto it
    node = Node(dataclasses.replace(config, drivers=(wav,), pub="tcp://127.0.0.1:*"))
    stop = asyncio.Event()
    task = asyncio.create_task(node.run(stop))
    await asyncio.wait_for(node.ready.wait(), 30)
    collector = Collector(node.pub_endpoint)
    try:
        await asyncio.sleep(total_s + 0.3)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        collector.close()

    predictions = [m for m in collector.on("pred.vad") if isinstance(m, Prediction)]
    assert len(predictions) > 0.6 * total_s * 31.25
    assert node.health()["engines"]["vad"]["errors"] == 0
    # Where in the file each window ended: the driver numbers samples from the file's start.
    probe = (AudioInput(microphone.stream, 1, SR),)
    span = node.buffer.window(predictions[-1].t_ref_ns, probe).data[microphone.stream]
    origin_ns = span.newest.t_capture_ns - span.newest.sample_index * 10**9 // SR
    in_speech, in_silence = [], []
    for msg in predictions:
        t_s = (msg.t_ref_ns - origin_ns) / 1e9
        probability = msg.fields["speech_probability"]
        assert msg.fields["speech"] == (probability > 0.5)
        if speech_s[0] + MARGIN_S < t_s < speech_s[1] - MARGIN_S:
            in_speech.append(probability)
        elif MARGIN_S < t_s < speech_s[0] - MARGIN_S or speech_s[1] + MARGIN_S < t_s:
            in_silence.append(probability)
    assert len(in_speech) > 20 and len(in_silence) > 20
    # Words have gaps between them, so judge the speech by its median.
    assert np.median(in_speech) > 0.8, np.round(in_speech, 2)
    assert max(in_silence) < 0.2, np.round(in_silence, 2)
