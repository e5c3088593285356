"""The speech model's own lip-to-voice delay, measured on in-sync synthetic speech.

`calibrate av-offset --method sync` finds the shift that best aligns the voice activity the
speech model hears with what it sees on the lips. A model trained on speech whose lips lead
the voice (as real lips do) answers a little earlier from the lips than from the voice, so
even a perfectly synchronised recording shows a constant offset. This module records such
recordings (the corpus's validation voices and faces, the corpus's mean lip lead) and
measures that constant, which the sync method subtracts; it is stored in the model file:

    python -m training.sync_bias engines/models/speech.onnx
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drivers.sim.simulated import FRAME_HEIGHT, FRAME_WIDTH, MOUTH_ROI
from fusion_node.clock import MonotonicClock
from fusion_node.logs.recorder import Recorder
from fusion_node.protocol import AudioChunk, Frame
from training.speech_corpus import CLIP_S, SAMPLE_RATE, Generator

FPS = 30
CHUNK = SAMPLE_RATE // 100  # 10 ms audio chunks
T0_NS = 5_000_000_000_000  # monotonic stamps far from zero, as on a robot
CLIPS = 5
# The delay varies from clip to clip: one log of 12 clips measured 14-30 ms with the same
# model, so the bias is the mean over several logs.
BIAS_CLIPS = 12
BIAS_LOGS = 5
LIP_LEAD_S = 0.020  # training.speech_corpus: uniform in 0-40 ms
BIAS_KEY = "av_sync_bias_ms"
BIAS_SEED = 9_000  # clips apart from the ones the tests use


@dataclass
class Speech:
    """Several target clips back to back with silences: mono audio and, per camera frame,
    the mouth region the camera sees."""

    audio: np.ndarray
    mouths: list[np.ndarray]


def in_sync_speech(first_seed: int = 4_000, clips: int = CLIPS) -> Speech:
    generator = Generator("validation")
    rng = np.random.default_rng(7)
    audio, segments = [], []
    start_s = 0.0
    for k in range(clips):
        clip = generator.clip(first_seed + k, mode="target", clean=True)
        # The corpus draws how far the lips lead the voice (0-40 ms, as in real speech); its
        # mean stands for "in sync" here, so the offset a log is written with is the truth.
        clip = dataclasses.replace(clip, mouth=(*clip.mouth[:3], LIP_LEAD_S))
        # A silence after each clip: the microphone's noise floor, the mouth at rest.
        silence = round(rng.uniform(0.3, 0.8) * SAMPLE_RATE)
        audio += [clip.audio, rng.normal(0, 1e-4, silence).astype(np.float32)]
        segments.append((start_s, clip))
        start_s += CLIP_S + silence / SAMPLE_RATE
    signal = np.concatenate(audio)
    mouths = []
    for t_s in np.arange(0, len(signal) / SAMPLE_RATE, 1 / FPS):
        clip_start_s, clip = next(s for s in reversed(segments) if s[0] <= t_s)
        mouths.append(clip.frame_at(float(t_s - clip_start_s)))
    return Speech(signal, mouths)


def write_speech_log(path: Path, speech: Speech, offset_ms: float, audio: bool = True,
                     video: bool = True) -> None:
    """Record `speech` through the project's Recorder: 640x480 rgb8 frames at 30 fps with
    the mouth at MOUTH_ROI, 16 kHz audio in 10 ms chunks stamped `offset_ms` late."""
    background = np.full((FRAME_HEIGHT, FRAME_WIDTH, 3), (186, 140, 120), np.uint8)
    x, y, w, h = MOUTH_ROI
    events: list[tuple[int, Frame | AudioChunk]] = []
    if video:
        for seq, mouth in enumerate(speech.mouths):
            image = background.copy()
            image[y:y + h, x:x + w] = mouth
            t_ns = T0_NS + seq * 1_000_000_000 // FPS
            events.append((t_ns, Frame("camera.front", seq, t_ns, image, "rgb8")))
    if audio:
        offset_ns = round(offset_ms * 1e6)
        for seq, start in enumerate(range(0, len(speech.audio) - CHUNK + 1, CHUNK)):
            t_ns = T0_NS + start * 1_000_000_000 // SAMPLE_RATE + offset_ns
            samples = speech.audio[start:start + CHUNK, None].copy()
            events.append((t_ns, AudioChunk("audio.mic0", seq, t_ns, SAMPLE_RATE, start,
                                            samples)))
    recorder = Recorder(str(path), MonotonicClock(), preview_hz=0)
    recorder.start()
    try:
        for t_ns, msg in sorted(events, key=lambda e: e[0]):
            # The recorder drops rather than block when its queue is full: leave it room.
            while recorder.stats()["queued_mb"] > 32:
                time.sleep(0.01)
            if not recorder.offer(msg, t_ns + 5_000_000):
                raise RuntimeError(f"recorder refused a message: {recorder.stats()}")
    finally:
        recorder.close()
    if recorder.stats()["dropped"]:
        raise RuntimeError(f"recorder dropped messages: {recorder.stats()['dropped']}")


def measure_bias(model: str | Path, clips: int = BIAS_CLIPS, logs: int = BIAS_LOGS) -> float:
    """The offset (ms) the sync method reports for in-sync speech with `model`: the mean
    over `logs` logs of `clips` clips each, all unlike the clips the tests use."""
    import tempfile

    from fusion_node.av_sync import SyncScorer, estimate_sync_offset

    scorer = SyncScorer(model, bias_ms=0.0)
    offsets_ms = []
    with tempfile.TemporaryDirectory(prefix="fusion-node-bias-") as tmp:
        for k in range(logs):
            path = Path(tmp) / f"in_sync{k}.mcap"
            write_speech_log(path, in_sync_speech(BIAS_SEED + 1_000 * k, clips), 0.0)
            offsets_ms.append(estimate_sync_offset(str(path), scorer=scorer).offset_ns / 1e6)
    return float(np.mean(offsets_ms))


def store_bias(path: Path) -> float:
    """Measure the model file's lip-to-voice delay and write it into the file's metadata
    (training does this on every export: the sync method reads it from there)."""
    import onnx

    bias_ms = round(measure_bias(path), 1)
    model = onnx.load(path)
    props = {p.key: p.value for p in model.metadata_props}
    props[BIAS_KEY] = str(bias_ms)
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return bias_ms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.sync_bias",
                                     description="measure a speech model's lip-to-voice "
                                     "delay and store it in the model file")
    parser.add_argument("model", type=Path)
    args = parser.parse_args(argv)
    print(f"{args.model}: {BIAS_KEY} = {store_bias(args.model)}")


if __name__ == "__main__":
    main()
