"""Choose and build an engine backend by name: "tensorrt", "onnxruntime", "torch" or "auto".

"auto" takes TensorRT where it is usable (a GPU, a driver the cuda-python bindings fit, and
TensorRT >= 10 that can build the requested precision) and ONNX Runtime otherwise, logging
why once; the node shows the same reason per engine in `node.health`. Each backend module is
imported only when chosen, so the node needs neither torch nor TensorRT unless asked for.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from engines.base import Engine
from engines.cache import EngineCache
from engines.tensorrt_compat import tensorrt_unavailable
from fusion_node.errors import LOAD_FAILURES, ConfigError, EngineError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
_FALLBACKS_LOGGED: set[str] = set()
PRECISIONS = ("fp32", "fp16", "int8")


__all__ = ["BACKENDS", "create_engine", "resolve_backend", "tensorrt_unavailable",
           "tensorrt_unused"]


def resolve_backend(backend: str, precision: str = "fp32") -> str:
    """The concrete backend `backend` names; "auto" is logged with the reason for its pick."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {BACKENDS}")
    if backend != "auto":
        return backend
    reason = tensorrt_unavailable(precision)
    if reason is None:
        return "tensorrt"
    if reason not in _FALLBACKS_LOGGED:  # once per process, not once per engine
        _FALLBACKS_LOGGED.add(reason)
        log.info("backend auto: ONNX Runtime, since TensorRT is unusable: %s", reason)
    return "onnxruntime"


def tensorrt_unused(asked: str, chosen: str, precision: str) -> str | None:
    """Why an engine asked to run on `asked` did not get TensorRT (for `node.health`), or None
    where it did or was never meant to."""
    if asked != "auto" or chosen == "tensorrt":
        return None
    return tensorrt_unavailable(precision)


def create_engine(
    path: str | Path,
    *,
    backend: str = "auto",
    name: str | None = None,
    precision: str = "fp16",
    intra_op_threads: int = 1,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    example_feeds: dict[str, np.ndarray] | None = None,
    calibration: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> Engine:
    """Build the engine for the ONNX file `path` on `backend`.

    `precision` applies on a GPU (TensorRT; torch on CUDA takes fp32/fp16); the CPU backends
    always run the file's own fp32. `intra_op_threads` applies to the CPU backends.
    `input_shapes` fix dynamic input dims; `example_feeds` are warm-up values for inputs that
    must not be zero. `calibration` (.npz) and `cache_dir` are for TensorRT.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"engine {name or path}: precision {precision!r} is not one of "
                          f"{PRECISIONS}")
    chosen = resolve_backend(backend, precision)
    if chosen == "tensorrt":
        reason = tensorrt_unavailable(precision)
        if reason is not None:
            raise EngineError(f"engine {name or path}: backend 'tensorrt' asked for, but "
                              f"TensorRT unusable: {reason}")
        try:
            from engines.tensorrt_backend import TensorRTEngine
        except LOAD_FAILURES as exc:
            raise EngineError(f"engine {name or path}: backend 'tensorrt' asked for, but "
                              f"tensorrt does not import ({exc})") from exc
        return TensorRTEngine(path, name, precision=precision, input_shapes=input_shapes,
                              example_feeds=example_feeds, calibration=calibration,
                              cache=EngineCache(cache_dir))
    if chosen == "torch":
        from engines.torch_backend import TorchEngine

        if input_shapes:
            raise ConfigError(f"engine {name or path}: the torch backend runs the module the "
                              "file was exported from, whose shapes are fixed already")
        cuda = _torch_cuda()
        return TorchEngine.from_onnx(
            path, name, device="cuda" if cuda else "cpu",
            precision=precision if cuda and precision == "fp16" else "fp32",
            threads=None if cuda else intra_op_threads, example_feeds=example_feeds)
    from engines.onnxruntime_backend import OnnxRuntimeEngine

    return OnnxRuntimeEngine(path, name, intra_op_threads=intra_op_threads,
                             input_shapes=input_shapes, example_feeds=example_feeds)


def _torch_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())
