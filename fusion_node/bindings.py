"""Bindings of the reference models: which window each needs, how it becomes model feeds,
and how model outputs become prediction fields."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from engines.preprocess import LogMel, image_tensor, mouth_crop
from engines.vocabulary import COMMANDS
from fusion_node.alignment import (
    AudioInput,
    AudioSpan,
    FrameStack,
    InputSpec,
    InterpolatedJoints,
    JointsInput,
    LatestInput,
    VideoInput,
    Window,
)
from fusion_node.errors import EngineError
from fusion_node.protocol import Frame, Prediction

SPEECH_SAMPLE_RATE = 16_000
SPEECH_MEL_FRAMES = 64
SPEECH_VIDEO_FRAMES = 16
SPEECH_VIDEO_PERIOD_NS = 40_000_000  # the model sees mouth video at 25 fps
ACTION_HORIZON = 20
ACTION_STEP_NS = 20_000_000
ACTION_JOINTS = 3


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


class _FrameCache:
    """Per-frame preprocessing done once: a frame stays in several consecutive windows."""

    def __init__(self, convert: Callable[[Frame], np.ndarray], size: int = 64) -> None:
        self._convert = convert
        self._items: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._size = size

    def __call__(self, frame: Frame) -> np.ndarray:
        key = (frame.t_capture_ns, frame.seq)
        item = self._items.get(key)
        if item is None:
            item = self._convert(frame)
            self._items[key] = item
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        return item


class SpeechBinding:
    """Audio (required) + mouth video (optional) → voice activity, active speaker, command."""

    def __init__(self, audio_stream: str, video_stream: str,
                 mouth_roi: tuple[int, int, int, int]) -> None:
        self.audio_stream = audio_stream
        self.video_stream = video_stream
        self.logmel = LogMel(sample_rate=SPEECH_SAMPLE_RATE)
        samples = self.logmel.samples_for(SPEECH_MEL_FRAMES)
        self.spec: tuple[InputSpec, ...] = (
            AudioInput(audio_stream, samples, SPEECH_SAMPLE_RATE, required=True),
            VideoInput(video_stream, SPEECH_VIDEO_FRAMES, SPEECH_VIDEO_PERIOD_NS,
                       required=False, max_age_ns=2 * SPEECH_VIDEO_PERIOD_NS),
        )
        self._crop = _FrameCache(lambda f: mouth_crop(f.image, f.encoding, mouth_roi))
        self._blank = np.zeros((48, 48), np.float32)

    def feeds(self, window: Window) -> dict[str, np.ndarray]:
        span: AudioSpan = window.data[self.audio_stream]
        mono = span.samples.mean(axis=1) if span.samples.shape[1] > 1 else span.samples[:, 0]
        mel = self.logmel(mono)
        audio_valid = self.logmel.frame_valid(span.valid).astype(np.float32)
        stack: FrameStack | None = window.data.get(self.video_stream)
        if stack is None:
            video = np.zeros((SPEECH_VIDEO_FRAMES, 48, 48), np.float32)
            video_valid = np.zeros(SPEECH_VIDEO_FRAMES, np.float32)
        else:
            video = np.stack([self._blank if f is None else self._crop(f)
                              for f in stack.frames])
            video_valid = stack.valid.astype(np.float32)
        return {"audio_mel": mel[None], "audio_valid": audio_valid[None],
                "video": video[None], "video_valid": video_valid[None]}

    def decode(self, outputs: dict[str, np.ndarray],
               window: Window) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        vad = _sigmoid(outputs["vad_logits"][0]).astype(np.float32)
        speaker = _sigmoid(outputs["speaker_logits"][0]).astype(np.float32)
        posterior = _softmax(outputs["command_logits"][0]).astype(np.float32)
        best = int(posterior.argmax())
        fields = {
            "voice_activity": float(vad[-1]), "voice_active": bool(vad[-1] > 0.5),
            "active_speaker": float(speaker[-1]), "speaker_visible_talking":
                bool(speaker[-1] > 0.5),
            "command": COMMANDS[best], "command_index": best,
            "command_confidence": float(posterior[best]),
            "frame_period_ns": SPEECH_VIDEO_PERIOD_NS,
        }
        return fields, {"voice_activity": vad, "active_speaker": speaker,
                        "command_posterior": posterior}


class ActionBinding:
    """Camera image (optional) + joint state (required) + command posterior (optional)
    → a chunk of future joint targets."""

    def __init__(self, image_stream: str, joints_stream: str, command_stream: str,
                 command_delay_ns: int) -> None:
        self.image_stream = image_stream
        self.joints_stream = joints_stream
        self.command_stream = command_stream
        self.spec: tuple[InputSpec, ...] = (
            VideoInput(image_stream, 1, required=False),
            JointsInput(joints_stream, required=True),
            LatestInput(command_stream, delay_ns=command_delay_ns, required=False),
        )
        self._image = _FrameCache(lambda f: image_tensor(f.image, f.encoding), size=8)

    def feeds(self, window: Window) -> dict[str, np.ndarray]:
        joints: InterpolatedJoints = window.data[self.joints_stream]
        if len(joints.names) != ACTION_JOINTS:
            raise EngineError(f"action model needs {ACTION_JOINTS} joints, stream "
                              f"{self.joints_stream!r} has {len(joints.names)}: {joints.names}")
        stack: FrameStack | None = window.data.get(self.image_stream)
        frame = stack.frames[-1] if stack is not None else None
        image = (self._image(frame) if frame is not None
                 else np.zeros((3, 96, 96), np.float32))
        command_msg = window.data.get(self.command_stream)
        if isinstance(command_msg, Prediction) and "command_posterior" in command_msg.arrays:
            command = np.asarray(command_msg.arrays["command_posterior"], np.float32)
            command_valid = 1.0
        else:
            command = np.zeros(len(COMMANDS), np.float32)
            command_valid = 0.0
        state = np.concatenate([joints.position, joints.velocity]).astype(np.float32)
        return {"image": image[None], "image_valid": np.array([[float(frame is not None)]],
                                                               np.float32),
                "joints": state[None], "command": command[None],
                "command_valid": np.array([[command_valid]], np.float32)}

    def decode(self, outputs: dict[str, np.ndarray],
               window: Window) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        actions = np.asarray(outputs["actions"][0], np.float32)
        joints: InterpolatedJoints = window.data[self.joints_stream]
        steps = window.t_ref_ns + ACTION_STEP_NS * np.arange(1, ACTION_HORIZON + 1,
                                                             dtype=np.int64)
        fields = {"joint_names": list(joints.names), "horizon": ACTION_HORIZON,
                  "step_period_ns": ACTION_STEP_NS}
        return fields, {"actions": actions, "step_times_ns": steps}
