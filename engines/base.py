"""The `Engine` protocol every backend implements, and the tensor specs it declares."""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fusion_node.errors import EngineError


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of fixed shape; `dtype` is a numpy dtype name such as "float32"."""

    name: str
    shape: tuple[int, ...]
    dtype: str


class Engine(Protocol):
    """A compiled model with declared inputs and outputs.

    `model_hash` is the first 16 hex digits of the SHA-256 of the ONNX file's bytes, so every
    backend built from one ONNX file reports the same hash. `backend` names the runtime
    ("onnxruntime", "tensorrt", "torch").
    """

    name: str
    model_hash: str
    backend: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once on `feeds` (input name -> array), blocking; outputs by name.

        Called from one worker thread per engine, never concurrently with itself.
        """
        ...

    def warm_up(self, iterations: int = 3) -> None:
        """Run `iterations` inferences on the engine's example feeds (all zeros unless given
        when the engine was built) so the first live call is not slow."""
        ...

    def close(self) -> None:
        """Free what the engine holds outside Python's reach (GPU buffers, streams); the
        engine is unusable afterwards. Safe to call twice."""
        ...


def fixed_shape(
    where: str, name: str, declared: Iterable[object], override: tuple[int, ...] | None
) -> tuple[int, ...]:
    """A model tensor's fixed shape: `declared` (dims are ints, or None / names / -1 where
    dynamic) with its dynamic dims taken from `override`, which must agree on every fixed dim."""
    dims = list(declared)
    if override is not None:
        if len(override) != len(dims) or any(
            isinstance(d, int) and d > 0 and d != o for d, o in zip(dims, override, strict=True)
        ):
            raise EngineError(f"{where}: tensor {name!r} is {dims}, cannot fix it to {override}")
        if not all(isinstance(o, int) and o > 0 for o in override):
            raise EngineError(f"{where}: tensor {name!r}: shape {override} must be positive ints")
        return tuple(override)
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise EngineError(
            f"{where}: tensor {name!r} has dynamic shape {dims}; fixed shapes are required for "
            "fixed latency (give them in the engine spec's `shape`, or fix the file with "
            "`python -m onnxruntime.tools.make_dynamic_shape_fixed`)"
        )
    return tuple(int(d) for d in dims)  # type: ignore[call-overload]


def example_feeds(
    where: str, inputs: tuple[TensorSpec, ...], given: dict[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    """Feeds for warm-up: `given` values (cast and broadcast to each input's spec) and zeros
    for the rest. Some models need non-zero values to run at all (a sample-rate input)."""
    given = given or {}
    unknown = sorted(given.keys() - {s.name for s in inputs})
    if unknown:
        raise EngineError(f"{where}: example feeds name unknown inputs {unknown}")
    feeds = {}
    for spec in inputs:
        if spec.name not in given:
            feeds[spec.name] = np.zeros(spec.shape, spec.dtype)
            continue
        try:
            value = np.asarray(given[spec.name], spec.dtype)
            feeds[spec.name] = np.broadcast_to(value, spec.shape).copy()
        except ValueError as exc:
            raise EngineError(f"{where}: example feed {spec.name!r}: {exc}") from None
    return feeds


def check_feeds(
    engine: str, inputs: tuple[TensorSpec, ...], feeds: dict[str, np.ndarray]
) -> None:
    """Raise EngineError unless `feeds` has exactly `inputs`, each with its shape and dtype."""
    specs = {spec.name: spec for spec in inputs}
    missing = sorted(specs.keys() - feeds.keys())
    if missing:
        raise EngineError(f"engine {engine!r}: missing inputs {missing}")
    unknown = sorted(feeds.keys() - specs.keys())
    if unknown:
        raise EngineError(
            f"engine {engine!r}: unknown inputs {unknown}; expected {sorted(specs)}"
        )
    for name, spec in specs.items():
        array = feeds[name]
        if not isinstance(array, np.ndarray):
            raise EngineError(
                f"engine {engine!r} input {name!r}: expected numpy array, "
                f"got {type(array).__name__}"
            )
        if array.shape != spec.shape:
            raise EngineError(
                f"engine {engine!r} input {name!r}: shape {array.shape}, expected {spec.shape}"
            )
        if array.dtype != spec.dtype:
            raise EngineError(
                f"engine {engine!r} input {name!r}: dtype {array.dtype}, expected {spec.dtype}"
            )
