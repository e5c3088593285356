"""The `Engine` protocol every backend implements, and the tensor specs it declares."""

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of fixed shape; `dtype` is a numpy dtype name such as "float32"."""

    name: str
    shape: tuple[int, ...]
    dtype: str


class Engine(Protocol):
    """A compiled model with declared inputs and outputs.

    `model_hash` is the first 16 hex digits of the SHA-256 of the ONNX file's bytes, so every
    backend built from one ONNX file reports the same hash.
    """

    name: str
    model_hash: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once on `feeds` (input name -> array), blocking; outputs by name.

        Called from one worker thread per engine, never concurrently with itself.
        """
        ...

    def warm_up(self, iterations: int = 3) -> None:
        """Run `iterations` inferences on all-zero feeds so the first live call is not slow."""
        ...
