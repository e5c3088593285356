"""`calibrate av-offset --method sync`: the speech model's audio-visual synchrony on logs of
the synthetic corpus recorded with known audio-video offsets.

These run the shipped engines/models/speech.onnx. Its synchrony is only as good as its
training: an untrained placeholder gives no correlation peak, and the accuracy test fails.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from drivers.simulated import FRAME_HEIGHT, FRAME_WIDTH, MOUTH_ROI
from engines.speech_corpus import CLIP_S, SAMPLE_RATE, Generator
from fusion_node.av_sync import (
    DEFAULT_SPEECH_MODEL,
    SyncScorer,
    estimate_sync_offset,
    recorded_mouth_roi,
)
from fusion_node.cli import main
from fusion_node.clock import MonotonicClock
from fusion_node.config import parse_config
from fusion_node.protocol import AudioChunk, Frame
from fusion_node.recording import RECORDING_METADATA, Recorder, node_metadata

FPS = 30
CHUNK = SAMPLE_RATE // 100  # 10 ms audio chunks
T0_NS = 5_000_000_000_000  # monotonic stamps far from zero, as on a robot
CLIPS = 5
LIP_LEAD_S = 0.020  # engines.speech_corpus: uniform in 0-40 ms


@dataclass
class Speech:
    """Several target clips back to back with silences: mono audio and, per camera frame,
    the mouth region the camera sees."""

    audio: np.ndarray
    mouths: list[np.ndarray]


@pytest.fixture(scope="module")
def speech() -> Speech:
    generator = Generator("validation")
    rng = np.random.default_rng(7)
    audio, segments = [], []
    start_s = 0.0
    for k in range(CLIPS):
        clip = generator.clip(4_000 + k, mode="target", clean=True)
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
            assert recorder.offer(msg, t_ns + 5_000_000), recorder.stats()
    finally:
        recorder.close()
    assert recorder.stats()["dropped"] == {}


@pytest.fixture(scope="module")
def scorer() -> SyncScorer:
    return SyncScorer(DEFAULT_SPEECH_MODEL)


@pytest.mark.parametrize("offset_ms", [-80, -40, 0, 40, 80])
def test_sync_offset_of_speech_logs(tmp_path, speech, scorer, offset_ms):
    path = tmp_path / "speech.mcap"
    write_speech_log(path, speech, offset_ms)
    estimate = estimate_sync_offset(str(path), scorer=scorer)
    error_ms = estimate.offset_ns / 1e6 - offset_ms
    print(f"sync av offset {offset_ms:+d} ms: estimated {estimate.offset_ns / 1e6:+.1f} ms, "
          f"error {error_ms:+.1f} ms, confidence {estimate.confidence}, correlation "
          f"{estimate.correlation} ({estimate.frames} video, {estimate.audio_windows} audio "
          f"windows, model {estimate.model})")
    assert (estimate.audio, estimate.video) == ("audio.mic0", "camera.front")
    assert estimate.mouth_roi == MOUTH_ROI
    assert abs(error_ms) <= 10


def test_sync_cli_reports_and_writes_the_offset(tmp_path, speech, capsys):
    path = tmp_path / "speech.mcap"
    write_speech_log(path, speech, 40)
    out = tmp_path / "calibration.yaml"
    assert main(["calibrate", "av-offset", str(path), "--method", "sync",
                 "--mouth-roi", *map(str, MOUTH_ROI), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    print(report)
    assert report["method"] == "sync" and report["mouth_roi"] == list(MOUTH_ROI)
    assert report["video_windows"] > 1000 and report["audio_windows"] > 2000
    assert "correlation" in report and "confidence" in report
    # What is stored is what was reported, under the calibration file's sign convention.
    assert f"offset_ms: {report['offset_ms']}" in out.read_text()


@pytest.mark.parametrize("audio, video, message", [
    (False, True, "has no audio stream"), (True, False, "has no video stream")])
def test_sync_log_without_audio_or_video(tmp_path, speech, capsys, audio, video, message):
    path = tmp_path / "half.mcap"
    write_speech_log(path, speech, 0, audio=audio, video=video)
    assert main(["calibrate", "av-offset", str(path), "--method", "sync"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_sync_mouth_roi_outside_the_frame_is_a_clear_error(tmp_path, speech, capsys):
    path = tmp_path / "speech.mcap"
    write_speech_log(path, speech, 0)
    assert main(["calibrate", "av-offset", str(path), "--method", "sync",
                 "--mouth-roi", "700", "500", "64", "64"]) == 1
    err = capsys.readouterr().err
    assert "lies outside the 640x480 image" in err and "Traceback" not in err


def test_sync_with_a_model_that_is_not_a_speech_model(tmp_path, speech, capsys):
    path = tmp_path / "speech.mcap"
    write_speech_log(path, speech, 0, video=True)
    action = Path(DEFAULT_SPEECH_MODEL).with_name("action.onnx")
    assert main(["calibrate", "av-offset", str(path), "--method", "sync",
                 "--model", str(action)]) == 1
    assert "is not a speech model" in capsys.readouterr().err


def test_the_mouth_roi_comes_from_the_recording_nodes_launch_config():
    text = resources.files("fusion_node").joinpath("default.toml").read_text()
    config = parse_config(text.replace("mouth_roi = [256, 272, 128, 96]",
                                       "mouth_roi = [200, 100, 96, 96]"), "test")
    metadata = {RECORDING_METADATA: node_metadata(config, [])}
    assert recorded_mouth_roi(metadata, "camera.front") == (200, 100, 96, 96)
    assert recorded_mouth_roi(metadata, "camera.rear") is None  # not the speech engine's camera
    assert recorded_mouth_roi({}, "camera.front") is None  # a log not recorded by the node
