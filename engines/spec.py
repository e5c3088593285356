"""Engine specs: what a model's inputs are made from and what its outputs publish.

A spec is data, so a user runs their own ONNX model in the node by writing one instead of
code (the format is documented in docs/engines.md). Each model input is bound to one source:

- `audio`: the newest `samples` samples of an audio stream at `sample_rate`, mono, as a
  waveform in [-1, 1] or as log-mel frames (`transform = "log_mel"`);
- `image`: the newest camera frame as RGB CHW in [0, 1], resized to `size`;
- `joints`: joint `position` and/or `velocity` interpolated to t_ref, concatenated;
- `valid`: 1/0 masks saying which parts of another input are real data;
- `state`: a model output of the previous call (recurrent state, e.g. Silero VAD's `stateN`),
  `initial` at the first call and after any gap in the ticks;
- `constant`: a fixed value (a sample rate, a mode flag).

Streams are named by role (`stream = "audio"`), and the engine's `inputs` table in the launch
file maps roles to stream names, so one spec serves any robot. Each bound output publishes
a prediction field: its last element, the whole array, or the arg-max label.

This module is numpy only: it turns raw samples into feeds and outputs into fields; the node
(`fusion_node.bindings.SpecBinding`) takes the windows and the state from tick to tick.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import TensorSpec
from fusion_node.errors import ConfigError
from fusion_node.tables import Table

INPUT_KINDS = ("audio", "image", "joints", "valid", "state", "constant")
TRANSFORMS = ("waveform", "log_mel")
PUBLISH = ("last", "array", "argmax")
ACTIVATIONS = ("none", "sigmoid", "softmax")
JOINT_FIELDS = ("position", "velocity", "effort")


@dataclass(frozen=True)
class AudioSource:
    """`samples` samples of audio ending at t_ref, as a waveform or log-mel frames."""

    stream: str
    samples: int
    sample_rate: int
    transform: str = "waveform"
    n_mels: int = 40
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    required: bool = True

    def count(self) -> int:
        """Values in the features: samples, or frames x mel bands."""
        return self.frames() * (self.n_mels if self.transform == "log_mel" else 1)

    def frames(self) -> int:
        """Values in a validity mask: samples, or log-mel frames."""
        if self.transform == "waveform":
            return self.samples
        return int(self._log_mel.frames_for(self.samples))

    def features(self, samples: np.ndarray) -> np.ndarray:
        """float32 [samples, channels] -> the waveform (mono) or [frames, n_mels] log-mel."""
        mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
        if self.transform == "waveform":
            return mono.astype(np.float32, copy=False)
        return self._log_mel(mono)

    def valid(self, sample_valid: np.ndarray) -> np.ndarray:
        """Per-sample validity -> 1/0 per sample (waveform) or per frame (log-mel)."""
        if self.transform == "waveform":
            return sample_valid.astype(np.float32)
        return self._log_mel.frame_valid(sample_valid)

    @cached_property
    def _log_mel(self) -> Any:
        from engines.preprocess import LogMel  # OpenCV, only for specs that use log-mel

        return LogMel(self.sample_rate, self.n_fft, self.win_length, self.hop_length,
                      self.n_mels)


@dataclass(frozen=True)
class ImageSource:
    """The newest frame at or before t_ref as RGB CHW in [0, 1], `size` x `size`."""

    stream: str
    size: int
    required: bool = False

    def count(self) -> int:
        return 3 * self.size * self.size


@dataclass(frozen=True)
class JointsSource:
    """Joint state interpolated to t_ref: the `fields` concatenated, in that order."""

    stream: str
    fields: tuple[str, ...] = ("position", "velocity")


@dataclass(frozen=True)
class ValidSource:
    """1/0 mask of the input `of`: per sample or frame for audio, one value for an image or
    joints (1 when the stream was present)."""

    of: str


@dataclass(frozen=True)
class StateSource:
    """The model output `output` of the previous call; `initial` before the first call and
    after a gap (a tick that produced nothing), so state never spans missing data."""

    output: str
    initial: float = 0.0


@dataclass(frozen=True)
class ConstantSource:
    value: Any


Source = AudioSource | ImageSource | JointsSource | ValidSource | StateSource | ConstantSource


@dataclass(frozen=True)
class SpecInput:
    name: str
    source: Source
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class SpecOutput:
    """How model output `name` is published: `publish` "last" puts its last element in
    `field` (and `flag` = last > `threshold` if given), "array" the whole array (batch axis
    dropped) in the prediction's arrays, "argmax" the label of the largest element with
    `<field>_index` and `<field>_confidence` (after `activation`)."""

    name: str
    field: str
    publish: str = "last"
    activation: str = "none"
    threshold: float | None = None
    flag: str | None = None
    labels: tuple[str, ...] = ()

    def decode(self, value: np.ndarray, fields: dict[str, Any],
               arrays: dict[str, np.ndarray]) -> None:
        flat: np.ndarray = np.asarray(value, np.float32).reshape(-1)
        if self.activation == "sigmoid":
            flat = 1.0 / (1.0 + np.exp(-flat))
        elif self.activation == "softmax":
            exp = np.exp(flat - flat.max())
            flat = exp / exp.sum()
        if self.publish == "last":
            fields[self.field] = float(flat[-1])
            if self.flag is not None and self.threshold is not None:
                fields[self.flag] = bool(flat[-1] > self.threshold)
        elif self.publish == "array":
            shape = value.shape[1:] if value.ndim > 1 and value.shape[0] == 1 else value.shape
            arrays[self.field] = flat.reshape(shape)
        else:
            best = int(flat.argmax())
            fields[self.field] = self.labels[best]
            fields[f"{self.field}_index"] = best
            fields[f"{self.field}_confidence"] = float(flat[best])


@dataclass(frozen=True)
class EngineSpec:
    """A parsed spec: model inputs by name and the outputs that become prediction fields."""

    inputs: dict[str, SpecInput]
    outputs: dict[str, SpecOutput] = field(default_factory=dict)

    def roles(self) -> set[str]:
        """The stream roles the spec reads (keys the engine's `inputs` table must have)."""
        return {i.source.stream for i in self.inputs.values()
                if isinstance(i.source, (AudioSource, ImageSource, JointsSource))}

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes the spec fixes (for models with dynamic dims)."""
        return {name: i.shape for name, i in self.inputs.items() if i.shape is not None}

    def example_feeds(self) -> dict[str, Any]:
        """Warm-up values that must not be zero: constants and initial states."""
        feeds: dict[str, Any] = {}
        for name, item in self.inputs.items():
            if isinstance(item.source, ConstantSource):
                feeds[name] = item.source.value
            elif isinstance(item.source, StateSource):
                feeds[name] = item.source.initial
        return feeds

    def check(self, where: str, inputs: tuple[TensorSpec, ...],
              outputs: tuple[TensorSpec, ...]) -> None:
        """Raise ConfigError unless the spec binds exactly the model's inputs, with sizes that
        fit their shapes, and its outputs and states name real outputs."""
        by_name = {s.name: s for s in inputs}
        out_by_name = {s.name: s for s in outputs}
        unbound = sorted(by_name.keys() - self.inputs.keys())
        if unbound:
            raise ConfigError(f"{where}: model inputs {unbound} have no binding in the spec")
        unknown = sorted(self.inputs.keys() - by_name.keys())
        if unknown:
            raise ConfigError(f"{where}: spec binds {unknown}, which are not model inputs "
                              f"({sorted(by_name)})")
        for name, item in self.inputs.items():
            size = math.prod(by_name[name].shape)
            expected = self._size(item, out_by_name, where)
            if expected is not None and expected != size:
                raise ConfigError(f"{where}: input {name!r} is {by_name[name].shape} "
                                  f"({size} values) but the spec makes {expected}")
        for name, out in self.outputs.items():
            if name not in out_by_name:
                raise ConfigError(f"{where}: spec publishes {name!r}, which is not a model "
                                  f"output ({sorted(out_by_name)})")
            count = math.prod(out_by_name[name].shape)
            if out.publish == "argmax" and len(out.labels) != count:
                raise ConfigError(f"{where}: output {name!r} has {count} values but "
                                  f"{len(out.labels)} labels")

    def _size(self, item: SpecInput, outputs: dict[str, TensorSpec], where: str) -> int | None:
        source = item.source
        if isinstance(source, (AudioSource, ImageSource)):
            return source.count()
        if isinstance(source, ValidSource):
            target = self.inputs[source.of].source
            return target.frames() if isinstance(target, AudioSource) else 1
        if isinstance(source, StateSource):
            if source.output not in outputs:
                raise ConfigError(f"{where}: state {item.name!r} comes from {source.output!r}, "
                                  f"which is not a model output ({sorted(outputs)})")
            return math.prod(outputs[source.output].shape)
        return None  # joints (known per robot), constants (broadcast)


def load_spec_table(value: Any, where: str) -> dict[str, Any]:
    """The spec table a launch file's `spec` value names (inline, or a TOML file's path),
    checked by parsing it. The plain table is what configs keep, so a launch config stored
    as JSON (in a recorded log) still holds the whole spec."""
    if isinstance(value, str):
        try:
            data = tomllib.loads(Path(value).read_text())
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read spec file {value!r}: {exc.strerror}") \
                from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: spec file {value!r} is not valid TOML ({exc})") \
                from None
        parse_spec(data, f"{where} spec {value}")
        return data
    parse_spec(value, f"{where} spec")
    return dict(value)


def parse_spec(data: Any, where: str) -> EngineSpec:
    """Parse and check a spec table (`inputs`, `outputs`); ConfigError names what is wrong."""
    root = Table(data, where)
    inputs_table = root.get("inputs", dict)
    outputs_table = root.get("outputs", dict, {})
    root.done()
    inputs = {name: _input(name, value, f"{where}.inputs.{name}")
              for name, value in inputs_table.items()}
    outputs = {name: _output(name, value, f"{where}.outputs.{name}")
               for name, value in outputs_table.items()}
    for name, item in inputs.items():
        if isinstance(item.source, ValidSource):
            target = inputs.get(item.source.of)
            if target is None or not isinstance(
                    target.source, (AudioSource, ImageSource, JointsSource)):
                raise ConfigError(f"{where}.inputs.{name}: `of` = {item.source.of!r} is not an "
                                  "audio, image or joints input of this spec")
    fields = [o.field for o in outputs.values()] + [o.flag for o in outputs.values() if o.flag]
    duplicated = sorted({f for f in fields if fields.count(f) > 1})
    if duplicated:
        raise ConfigError(f"{where}: fields {duplicated} are published more than once")
    return EngineSpec(inputs, outputs)


def _input(name: str, data: Any, where: str) -> SpecInput:
    table = Table(data, where)
    kind = table.choice("kind", INPUT_KINDS)
    shape_value = table.get("shape", list, None)
    source: Source
    if kind == "audio":
        transform = table.choice("transform", TRANSFORMS, "waveform")
        mel = {}
        if transform == "log_mel":
            mel = {key: table.positive(key, default) for key, default in
                   (("n_mels", 40), ("n_fft", 512), ("win_length", 400), ("hop_length", 160))}
        source = AudioSource(table.get("stream", str), table.positive("samples"),
                             table.positive("sample_rate"), transform,
                             required=table.get("required", bool, True), **mel)
        if source.count() == 0:
            raise ConfigError(f"{where}: {source.samples} samples make no log-mel frame")
    elif kind == "image":
        source = ImageSource(table.get("stream", str), table.positive("size", 96),
                             table.get("required", bool, False))
    elif kind == "joints":
        names = table.get("fields", list, ["position", "velocity"])
        if not names or not all(isinstance(f, str) and f in JOINT_FIELDS for f in names):
            raise ConfigError(f"{where}.fields = {names!r}: each must be one of {JOINT_FIELDS}")
        # Always required: joint vectors have no size to fill with zeros until seen.
        source = JointsSource(table.get("stream", str), tuple(names))
    elif kind == "valid":
        source = ValidSource(table.get("of", str))
    elif kind == "state":
        source = StateSource(table.get("output", str), table.get("initial", float, 0.0))
    else:
        value = table.get("value", (int, float, list))
        try:
            np.asarray(value, np.float64)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.value = {value!r} is not a number or a numeric array") \
                from None
        source = ConstantSource(value)
    table.done()
    shape = None
    if shape_value is not None:
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                   for d in shape_value):
            raise ConfigError(f"{where}.shape = {shape_value!r} must be a list of positive ints")
        shape = tuple(shape_value)
    return SpecInput(name, source, shape)


def _output(name: str, data: Any, where: str) -> SpecOutput:
    table = Table(data, where)
    out = SpecOutput(
        name=name, field=table.get("field", str),
        publish=table.choice("publish", PUBLISH, "last"),
        activation=table.choice("activation", ACTIVATIONS, "none"),
        threshold=table.get("threshold", float, None), flag=table.get("flag", str, None),
        labels=tuple(table.get("labels", list, [])))
    table.done()
    if (out.threshold is None) != (out.flag is None):
        raise ConfigError(f"{where}: `threshold` and `flag` go together")
    if out.flag is not None and out.publish != "last":
        raise ConfigError(f"{where}: `flag` needs publish = 'last'")
    if out.publish == "argmax" and not all(isinstance(label, str) for label in out.labels):
        raise ConfigError(f"{where}: argmax needs `labels`, a list of strings")
    return out
