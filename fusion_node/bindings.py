"""Bindings of the reference models: which window each needs, how it becomes model feeds,
and how model outputs become prediction fields."""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from engines.base import TensorSpec
from engines.command_latch import CommandLatch
from engines.preprocess import LogMel, image_tensor, mouth_crop
from engines.spec import (
    AudioSource,
    ConstantSource,
    EngineSpec,
    ImageSource,
    JointsSource,
    StateSource,
    ValidSource,
)
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
from fusion_node.errors import LOAD_FAILURES, ConfigError, EngineError, load_failure
from fusion_node.protocol import Frame, Prediction

SPEECH_SAMPLE_RATE = 16_000
SPEECH_MEL_FRAMES = 64
SPEECH_VIDEO_FRAMES = 16
SPEECH_VIDEO_PERIOD_NS = 40_000_000  # the model sees mouth video at 25 fps
ACTION_HORIZON = 20
ACTION_STEP_NS = 20_000_000
ACTION_JOINTS = 3

FACE_REMEDY = ("the face models are engines/models/face/*.onnx, run on ONNX Runtime "
               "(`python -m training.face_onnx` remakes them); or give mouth_roi as [x, y, w, h]")


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
    """Audio (required) + mouth video (optional) → voice activity, active speaker, command.

    `mouth_roi` is a fixed (x, y, w, h) pixel region, or "landmarks": a face landmark model
    (engines.face) finds the mouth in every frame, and frames without a face are invalid.
    """

    def __init__(self, audio_stream: str, video_stream: str,
                 mouth_roi: tuple[int, int, int, int] | str) -> None:
        self.audio_stream = audio_stream
        self.video_stream = video_stream
        self.logmel = LogMel(sample_rate=SPEECH_SAMPLE_RATE)
        samples = self.logmel.samples_for(SPEECH_MEL_FRAMES)
        self.spec: tuple[InputSpec, ...] = (
            AudioInput(audio_stream, samples, SPEECH_SAMPLE_RATE, required=True),
            VideoInput(video_stream, SPEECH_VIDEO_FRAMES, SPEECH_VIDEO_PERIOD_NS,
                       required=False, max_age_ns=2 * SPEECH_VIDEO_PERIOD_NS),
        )
        self._blank = np.zeros((48, 48), np.float32)
        # Returned (and cached) for frames where no face is found; identity marks them invalid.
        self._no_face = np.zeros((48, 48), np.float32)
        # Frames the landmarker found a mouth in, or not (each frame is converted once).
        self.mouth_found = self.mouth_missed = 0
        self._tracking = mouth_roi == "landmarks"
        if mouth_roi == "landmarks":
            try:  # two models on the engine backends: loaded only when asked for
                from engines.face import MouthTracker

                tracker = MouthTracker()
            except LOAD_FAILURES as exc:
                raise load_failure("speech binding: mouth_roi = 'landmarks': the face "
                                   "landmarker", exc, FACE_REMEDY) from None

            def tracked_crop(frame: Frame) -> np.ndarray:
                # The cache converts each frame once, in capture order, as tracking needs.
                roi = tracker(frame.image, frame.encoding)
                crop = self._no_face
                if roi is not None:
                    try:
                        crop = mouth_crop(frame.image, frame.encoding, roi)
                    except EngineError:  # the mouth lies wholly outside the frame
                        pass
                if crop is self._no_face:
                    self.mouth_missed += 1
                else:
                    self.mouth_found += 1
                return crop

            self._crop = _FrameCache(tracked_crop)
        elif isinstance(mouth_roi, str):
            raise ConfigError(f"speech binding: mouth_roi must be [x, y, w, h] or "
                              f"'landmarks', got {mouth_roi!r}")
        else:
            fixed_roi = mouth_roi
            self._crop = _FrameCache(lambda f: mouth_crop(f.image, f.encoding, fixed_roi))

    def health(self) -> dict[str, Any]:
        """For node.health: how often the landmarker found the mouth."""
        if not self._tracking:
            return {}
        return {"mouth_landmarks": {"found": self.mouth_found, "missed": self.mouth_missed}}

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
            crops = [self._blank if f is None else self._crop(f) for f in stack.frames]
            video = np.stack(crops)
            video_valid = stack.valid.astype(np.float32) * np.array(
                [c is not self._no_face for c in crops], np.float32)
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
    """Camera image (optional) + joint state (required) + the command latched from the
    speech engine's posteriors (`engines.command_latch`) → a chunk of future joint targets."""

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
        # The robot's task state: the last command heard, kept after the word has passed.
        self.latch = CommandLatch()
        self._last_command_ns = -1

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
        # Each speech prediction is taken once, however many action ticks see it.
        if (isinstance(command_msg, Prediction) and "command_posterior" in command_msg.arrays
                and command_msg.t_ref_ns > self._last_command_ns):
            self._last_command_ns = command_msg.t_ref_ns
            try:
                self.latch.update(command_msg.arrays["command_posterior"])
            except ValueError as exc:
                raise EngineError(f"{self.command_stream}: {exc}") from None
        command, command_valid = self.latch.feeds()
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


def _image_feature(frame: Frame, size: int) -> np.ndarray:
    return image_tensor(frame.image, frame.encoding, size)


class SpecBinding:
    """A user's model bound by an engine spec (`engines.spec`): windows become feeds as the
    spec says, bound outputs become prediction fields, and `state` inputs carry the previous
    call's outputs from tick to tick.

    `streams` maps the spec's roles to stream names; `inputs` are the engine's tensor specs
    (shapes and dtypes the feeds are cast to). State restarts from its initial value when the
    previous tick produced nothing (missing data, an error) or was longer than 1.5 periods
    ago, so a recurrent model never carries state across a gap.
    """

    def __init__(self, spec: EngineSpec, streams: dict[str, str],
                 inputs: tuple[TensorSpec, ...], period_ns: int, where: str) -> None:
        missing = sorted(spec.roles() - streams.keys())
        if missing:
            raise ConfigError(f"{where}: the spec reads roles {missing}, not in its inputs "
                              f"table {sorted(streams)}")
        self._spec = spec
        self._streams = streams
        self._tensors = {t.name: t for t in inputs}
        self._max_gap_ns = period_ns * 3 // 2
        self._last_t_ref_ns: int | None = None
        self._state: dict[str, np.ndarray] = {}
        self._images: dict[str, _FrameCache] = {}
        wanted: dict[str, InputSpec] = {}
        for item in spec.inputs.values():
            source = item.source
            if isinstance(source, AudioSource):
                window: InputSpec = AudioInput(streams[source.stream], source.samples,
                                               source.sample_rate, required=source.required)
            elif isinstance(source, ImageSource):
                window = VideoInput(streams[source.stream], 1, required=source.required)
                self._images[item.name] = _FrameCache(
                    functools.partial(_image_feature, size=source.size), size=8)
            elif isinstance(source, JointsSource):
                window = JointsInput(streams[source.stream], required=True)
            else:
                continue
            if wanted.setdefault(window.stream, window) != window:
                raise ConfigError(f"{where}: stream {window.stream!r} is read twice with "
                                  "different settings")
        self.spec: tuple[InputSpec, ...] = tuple(wanted.values())

    def feeds(self, window: Window) -> dict[str, np.ndarray]:
        t_ref = window.t_ref_ns
        if self._last_t_ref_ns is None or t_ref - self._last_t_ref_ns > self._max_gap_ns:
            self._state.clear()
        feeds = {}
        for name, item in self._spec.inputs.items():
            tensor = self._tensors[name]
            value = self._value(item.source, name, tensor, window)
            feeds[name] = np.asarray(value, tensor.dtype).reshape(tensor.shape)
        return feeds

    def _value(self, source: object, name: str, tensor: TensorSpec,
               window: Window) -> np.ndarray:
        if isinstance(source, AudioSource):
            span: AudioSpan | None = window.data.get(self._streams[source.stream])
            if span is None:
                return np.zeros(source.count(), np.float32)
            return source.features(span.samples)
        if isinstance(source, ImageSource):
            stack: FrameStack | None = window.data.get(self._streams[source.stream])
            frame = stack.frames[-1] if stack is not None else None
            if frame is None:
                return np.zeros(source.count(), np.float32)
            return self._images[name](frame)
        if isinstance(source, JointsSource):
            joints: InterpolatedJoints = window.data[self._streams[source.stream]]
            return np.concatenate([getattr(joints, f) for f in source.fields])
        if isinstance(source, ValidSource):
            target = self._spec.inputs[source.of].source
            assert isinstance(target, (AudioSource, ImageSource, JointsSource))  # parse_spec
            present = window.data.get(self._streams[target.stream])
            if isinstance(target, AudioSource):
                if present is None:
                    return np.zeros(target.frames(), np.float32)
                return target.valid(present.valid)
            if isinstance(present, FrameStack):
                return np.array(present.frames[-1] is not None, np.float32)
            return np.array(present is not None, np.float32)
        if isinstance(source, StateSource):
            state = self._state.get(source.output)
            return state if state is not None else np.full(tensor.shape, source.initial)
        assert isinstance(source, ConstantSource)
        return np.broadcast_to(np.asarray(source.value, tensor.dtype), tensor.shape)

    def decode(self, outputs: dict[str, np.ndarray],
               window: Window) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        for item in self._spec.inputs.values():
            if isinstance(item.source, StateSource):
                self._state[item.source.output] = outputs[item.source.output]
        self._last_t_ref_ns = window.t_ref_ns
        fields: dict[str, Any] = {}
        arrays: dict[str, np.ndarray] = {}
        for name, output in self._spec.outputs.items():
            output.decode(outputs[name], fields, arrays)
        return fields, arrays
