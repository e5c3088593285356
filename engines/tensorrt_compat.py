"""What decides whether and how the TensorRT backend may run, without importing TensorRT.

Every rule here is plain Python over version strings, error names and tensor descriptions,
so it is tested on machines without a GPU; `engines/tensorrt_backend.py` feeds it the real
values. The rules come from NVIDIA's own sources (cuda-python's install, support and release
notes; TensorRT's `NvInferRuntime.h`, `pyCore.cpp`, `pyInt8.cpp`).

`tensorrt_unavailable()` probes in an order that keeps each failure in words a user can act
on: cuda-python missing, no driver, bindings too new for the driver, no GPU, bindings too old
(they hold the GIL), TensorRT missing or older than 10.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from fusion_node.errors import LOAD_FAILURES, EngineError

log = logging.getLogger(__name__)

MIN_TENSORRT = (10, 0)
# 12.9.1 and 13.0.0 are the first cuda-bindings that release the GIL around every CUDA call
# (release notes; backport NVIDIA/cuda-python#922); before, a stream synchronise stalls the
# receiver, the publisher and the other engines for the whole GPU inference.
MIN_CUDA_BINDINGS = (12, 9, 1)
EXTRA_HINT = "pip install 'fusion-node[tensorrt]' (cuda-python>=12.9.1,<13 for a CUDA 12 driver)"


def parse_version(text: str) -> tuple[int, ...]:
    """(10, 3, 0) from "10.3.0.30" or "12.9.1rc1": the leading numeric fields."""
    numbers = []
    for field in str(text).split("."):
        match = re.match(r"\d+", field)
        if match is None:
            break
        numbers.append(int(match.group()))
        if match.end() != len(field):
            break
    return tuple(numbers)


def driver_cuda(raw: int) -> tuple[int, int]:
    """(major, minor) of `cudaDriverGetVersion`'s 1000 * major + 10 * minor."""
    return raw // 1000, (raw % 1000) // 10


def cuda_problem(bindings_version: str, driver_raw: int) -> str | None:
    """Why cuda-python `bindings_version` cannot serve this driver well, or None."""
    if driver_raw <= 0:
        return "no NVIDIA driver (cudaDriverGetVersion reports none): no GPU to run TensorRT on"
    bindings = parse_version(bindings_version)
    driver = driver_cuda(driver_raw)
    if bindings and bindings[0] > driver[0]:
        return (f"cuda-python {bindings_version} is built for CUDA {bindings[0]}, but this "
                f"driver supports CUDA {driver[0]}.{driver[1]} (the driver is too old for the "
                f"bindings): {EXTRA_HINT}, or update the driver")
    if bindings < MIN_CUDA_BINDINGS:
        return (f"cuda-python {bindings_version} holds the GIL during CUDA calls, stalling the "
                f"node while the GPU works (fixed in 12.9.1): {EXTRA_HINT}")
    return None


def device_problem(error_name: str, count: int | None) -> str | None:
    """Why `cudaGetDeviceCount`'s (error, count) leaves no GPU to run on, or None."""
    if error_name == "cudaErrorInsufficientDriver":
        return ("the NVIDIA driver is older than the CUDA runtime cuda-python was built for "
                f"(cudaErrorInsufficientDriver): {EXTRA_HINT}, or update the driver")
    if error_name in ("cudaErrorNoDevice", "cudaSuccess") and not count:
        return "no CUDA GPU (the driver sees 0 devices)"
    if error_name != "cudaSuccess":
        return f"CUDA cannot list the GPUs ({error_name})"
    return None


def tensorrt_version_problem(tensorrt_version: str) -> str | None:
    """Why TensorRT `tensorrt_version` cannot run this backend, or None."""
    if parse_version(tensorrt_version)[:2] < MIN_TENSORRT:
        return (f"TensorRT {tensorrt_version} is older than 10, which this backend is written "
                "for (JetPack 6 or newer, or tensorrt-cu12 >= 10)")
    return None


def precision_problem(tensorrt_version: str, precision: str, has_flag: bool,
                      has_calibrator: bool) -> str | None:
    """Why TensorRT `tensorrt_version` cannot build `precision`, or None."""
    if precision not in ("fp32", "fp16", "int8"):
        return f"unknown precision {precision!r}; expected fp32, fp16 or int8"
    if precision != "fp32" and not has_flag:
        return (f"TensorRT {tensorrt_version} builds strongly typed networks only (no "
                f"BuilderFlag.{precision.upper()}): export the ONNX file in {precision} and "
                "build it as precision 'fp32'")
    if precision == "int8" and not has_calibrator:
        return f"TensorRT {tensorrt_version} has no int8 calibrator; use a Q/DQ ONNX model"
    return None


def error_name(cudart: Any, err: Any) -> str:
    _, name = cudart.cudaGetErrorName(err)
    return name.decode() if isinstance(name, bytes) else str(name)


def tensorrt_unavailable(precision: str = "fp32") -> str | None:
    """Why TensorRT cannot build a `precision` engine here, or None if it can.

    The GPU is looked for first, so a machine without one hears that, not which package
    it lacks."""
    try:
        import cuda.bindings  # type: ignore[import-not-found]
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
    except ImportError:
        return f"cuda-python is not installed: {EXTRA_HINT}, and TensorRT from NVIDIA"
    except LOAD_FAILURES as exc:
        return f"cuda-python does not load ({type(exc).__name__}: {exc})"
    _, driver_raw = cudart.cudaDriverGetVersion()
    problem = cuda_problem(str(getattr(cuda.bindings, "__version__", "0")), int(driver_raw or 0))
    if problem is not None:
        return problem
    err, count = cudart.cudaGetDeviceCount()
    problem = device_problem(error_name(cudart, err), count)
    if problem is not None:
        return problem
    try:
        import tensorrt  # type: ignore[import-not-found]
    except ImportError:
        return ("TensorRT is not installed (JetPack, or `pip install tensorrt-cu12` with "
                "NVIDIA's index reachable)")
    except LOAD_FAILURES as exc:  # OSError: bindings present, libraries missing
        return f"TensorRT does not load ({type(exc).__name__}: {exc})"
    problem = tensorrt_version_problem(str(getattr(tensorrt, "__version__", "0")))
    if problem is not None:
        return problem
    try:
        from engines import tensorrt_backend
    except LOAD_FAILURES as exc:
        return f"the TensorRT backend does not load ({type(exc).__name__}: {exc})"
    return tensorrt_backend.unavailable(precision)


def settings_digest(settings: dict[str, Any]) -> str:
    """16 hex digits naming a build recipe, for the engine-cache key: a change to how plans
    are built misses every plan built the old way."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class IoTensor:
    """One engine I/O tensor as TensorRT describes it once every input shape is set."""

    name: str
    is_input: bool
    on_host: bool  # TensorLocation.kHOST: shape tensors, which need a host pointer
    shape: tuple[int, ...]


def check_io(where: str, tensors: list[IoTensor]) -> None:
    """Refuse an engine the fixed-latency runner cannot bind: an output whose shape depends on
    the data (-1 after every input shape is set, which needs an output allocator and a size
    that varies per call) or an input still unresolved."""
    for tensor in tensors:
        if any(d < 0 for d in tensor.shape):
            what = "input" if tensor.is_input else "output"
            raise EngineError(
                f"{where}: {what} {tensor.name!r} has shape {tensor.shape} after every input "
                "shape is set; data-dependent shapes are not supported (the node needs "
                "outputs of one fixed size to keep a fixed latency)")


def check_calibration(where: str, samples: dict[str, np.ndarray],
                      inputs: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
    """The calibration set as TensorRT must see it, or EngineError naming what is wrong.

    TensorRT swallows every exception raised while it asks for a batch and ends calibration
    early, so everything is checked here, before the build: one array per network input
    (samples along axis 0, each of the input's shape), equal sample counts, finite values,
    and the input's own dtype (a float64 .npz, NumPy's default, is cast to float32 rather
    than copied in as reinterpreted bytes).
    """
    missing = sorted(set(inputs) - set(samples))
    extra = sorted(set(samples) - set(inputs))
    if missing or extra:
        raise EngineError(f"{where}: calibration set has arrays {sorted(samples)}, the network "
                          f"inputs are {sorted(inputs)}"
                          + (f"; missing {missing}" if missing else "")
                          + (f"; not inputs {extra}" if extra else ""))
    counts = {name: len(array) if np.ndim(array) else 0 for name, array in samples.items()}
    if len(set(counts.values())) != 1 or not next(iter(counts.values()), 0):
        raise EngineError(f"{where}: calibration arrays need the same number (> 0) of samples "
                          f"along axis 0, got {counts}")
    checked = {}
    for name, (shape, dtype) in inputs.items():
        array = samples[name]
        if tuple(array.shape[1:]) != tuple(shape):
            raise EngineError(f"{where}: calibration samples of {name!r} have shape "
                              f"{tuple(array.shape[1:])}, the input is {tuple(shape)}")
        if array.dtype.kind not in "biuf":
            raise EngineError(f"{where}: calibration array {name!r} is {array.dtype}, not numeric")
        if dtype.kind != "f" and array.dtype.kind == "f":
            raise EngineError(f"{where}: calibration array {name!r} is {array.dtype}, the input "
                              f"is {dtype}: give it as integers")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise EngineError(f"{where}: calibration array {name!r} has NaN or inf values")
        if array.dtype != dtype:
            log.info("%s: calibration array %r cast from %s to %s", where, name, array.dtype,
                     dtype)
        checked[name] = np.ascontiguousarray(array, dtype=dtype)
    return checked


def logging_level(severity: str) -> int:
    """The Python logging level of a TensorRT `ILogger.Severity` name."""
    return {"INTERNAL_ERROR": logging.CRITICAL, "ERROR": logging.ERROR,
            "WARNING": logging.WARNING, "INFO": logging.INFO,
            "VERBOSE": logging.DEBUG}.get(severity.rsplit(".", 1)[-1], logging.WARNING)
