"""Choose and build an engine backend by name: "tensorrt", "onnxruntime", "torch" or "auto".

"auto" takes TensorRT where it is usable (it imports, a CUDA GPU is present, and it can build
the requested precision) and ONNX Runtime otherwise. Each backend module is imported only
when chosen, so the node needs neither torch nor TensorRT unless they are asked for.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from engines.base import Engine
from engines.cache import EngineCache
from fusion_node.errors import LOAD_FAILURES, ConfigError, EngineError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
_FALLBACKS_LOGGED: set[str] = set()
PRECISIONS = ("fp32", "fp16", "int8")


def tensorrt_unavailable(precision: str = "fp32") -> str | None:
    """Why TensorRT cannot build a `precision` engine here, or None if it can."""
    try:
        from engines import tensorrt_backend
    except LOAD_FAILURES as exc:  # OSError: bindings present, libraries missing
        return f"tensorrt does not import ({type(exc).__name__}: {exc})"
    return tensorrt_backend.unavailable(precision)


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
