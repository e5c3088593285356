"""TensorRT backend: build a plan from the ONNX file, cache it, run it on a CUDA stream.

`tensorrt` and cuda-python (`cuda.bindings.runtime`) are imported here only, and this module
only when a TensorRT engine is asked for, so the node starts without either installed.

Written against NVIDIA's Python API as its samples use it (`samples/python/common_runtime.py`,
`simple_progress_monitor`, `efficientdet/build_engine.py`, `int8_caffe_mnist/calibrator.py`):
TensorRT 10 (JetPack 6 ships 10.3). TensorRT 11 made every network strongly typed and removed
`BuilderFlag.FP16` / `INT8` and the int8 calibrators; there the ONNX file's own types decide
and only precision "fp32" (meaning "as typed in the file") builds; `unavailable()` says so.
Whether the installed versions fit together is decided first, in `engines.tensorrt_compat`
(importable without TensorRT), so this module is only imported where TensorRT >= 10 is.

Waiting for the GPU blocks on an event made with `cudaEventBlockingSync`: the default device
flags would spin a core (at the engine thread's real-time priority) for the whole inference.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorrt as trt  # type: ignore[import-not-found]  # NVIDIA's, not from PyPI here
from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]

from engines import base
from engines.base import TensorSpec, check_feeds, fixed_shape
from engines.cache import CacheKey, EngineCache
from engines.tensorrt_compat import (
    MIN_TENSORRT,
    IoTensor,
    check_calibration,
    check_io,
    device_problem,
    error_name,
    logging_level,
    parse_version,
    precision_problem,
    settings_digest,
)
from fusion_node.errors import EngineError

if parse_version(trt.__version__)[:2] < MIN_TENSORRT:
    # TensorRT 8.x (JetPack 5) lacks IProgressMonitor, subclassed below: say so as an import
    # failure, which every caller already turns into a reason to fall back.
    raise ImportError(f"TensorRT {trt.__version__} is older than 10, which this backend needs")

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
WORKSPACE_BYTES = 1 << 30
# Build progress is logged at most this often: a Jetson build runs for minutes.
_PROGRESS_PERIOD_S = 2.0
# How plans are built, beyond the key's other fields: part of the cache key, so changing any
# of it (or `recipe`, bumped on any other change to `build_plan`) rebuilds every plan.
BUILD_SETTINGS = {"recipe": 2, "workspace_bytes": WORKSPACE_BYTES, "fp32_tf32": False,
                  "profile": "min=opt=max", "int8_calibrator": "entropy2"}


class _PythonLogger(trt.ILogger):
    """TensorRT's messages through Python logging. TensorRT keeps one logger per process, so
    one instance serves every builder and runtime."""

    def __init__(self) -> None:
        trt.ILogger.__init__(self)

    def log(self, severity: Any, msg: str) -> None:
        level = logging_level(str(severity))
        # INFO from TensorRT is per-layer chatter; keep it at DEBUG.
        log.log(logging.DEBUG if level == logging.INFO else level, "TensorRT: %s", msg)


_LOGGER = _PythonLogger()


def _cuda(result: tuple[Any, ...]) -> Any:
    """The one place CUDA error codes become exceptions (cuda-python returns (err, *values))."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(err)
        raise EngineError(f"CUDA call failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_info(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of CUDA device `device`."""
    props = _cuda(cudart.cudaGetDeviceProperties(device))
    name = props.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    return str(name), f"{props.major}.{props.minor}"


def unavailable(precision: str = "fp32") -> str | None:
    """Why a TensorRT engine of `precision` cannot be built here, or None if it can (the
    version checks are `engines.tensorrt_compat.tensorrt_unavailable`'s, made before this
    module is imported)."""
    err, count = cudart.cudaGetDeviceCount()
    problem = device_problem(error_name(cudart, err), count)
    if problem is not None:
        return problem
    return precision_problem(trt.__version__, precision,
                             hasattr(trt.BuilderFlag, precision.upper()),
                             hasattr(trt, "IInt8EntropyCalibrator2"))


def versions() -> dict[str, str]:
    """TensorRT, cuda-python and driver versions: what a plan and a bug report depend on."""
    from cuda import bindings

    _, driver = cudart.cudaDriverGetVersion()
    return {"tensorrt": trt.__version__, "cuda_python": str(bindings.__version__),
            "driver_cuda": f"{driver // 1000}.{(driver % 1000) // 10}"}


def cache_key(onnx_sha256: str, precision: str, input_shapes: dict[str, tuple[int, ...]],
              calibration_sha256: str = "") -> CacheKey:
    """The engine-cache key of a plan built here, now (the one place it is made)."""
    gpu, capability = device_info()
    found = versions()
    return CacheKey(
        onnx_sha256=onnx_sha256, tensorrt_version=found["tensorrt"], gpu_name=gpu,
        compute_capability=capability, precision=precision,
        input_shapes=tuple(sorted(input_shapes.items())), calibration_sha256=calibration_sha256,
        builder_settings=settings_digest(BUILD_SETTINGS),
        cuda_versions=f"cuda-python {found['cuda_python']}, driver CUDA {found['driver_cuda']}")


class _ProgressLog(trt.IProgressMonitor):
    """Logs the builder's phases and steps (TensorRT calls these from its build thread)."""

    def __init__(self, label: str) -> None:
        trt.IProgressMonitor.__init__(self)
        self._label = label
        self._steps: dict[str, int] = {}
        self._last_log = 0.0

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        self._steps[phase_name] = num_steps
        log.info("%s: %s (%d steps)", self._label, phase_name, num_steps)

    def step_complete(self, phase_name: str, step: int) -> bool:
        now = time.monotonic()
        if now - self._last_log >= _PROGRESS_PERIOD_S:
            self._last_log = now
            log.info("%s: %s %d/%d", self._label, phase_name, step + 1,
                     self._steps.get(phase_name, 0))
        return True  # False would cancel the build

    def phase_finish(self, phase_name: str) -> None:
        self._steps.pop(phase_name, None)


def _calibrator(samples: dict[str, np.ndarray]) -> Any:
    """An entropy calibrator feeding one calibration sample per batch (TensorRT 10 only).
    `samples` are already checked and cast to the inputs' dtypes (`check_calibration`)."""

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._count = min(len(a) for a in samples.values())
            self._index = 0
            # TensorRT catches whatever get_batch raises and takes it as "no more batches";
            # the error is kept here and raised once the build returns.
            self.error: BaseException | None = None
            self._device = {name: int(_cuda(cudart.cudaMalloc(max(1, a[0].nbytes))))
                            for name, a in samples.items()}

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self._index >= self._count:
                return None
            try:
                for name in names:
                    host = samples[name][self._index]
                    _cuda(cudart.cudaMemcpy(self._device[name], host.ctypes.data, host.nbytes,
                                            cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
            except BaseException as exc:  # noqa: BLE001 - TensorRT would swallow it
                self.error = exc
                return None
            self._index += 1
            return [self._device[name] for name in names]

        def read_calibration_cache(self) -> None:
            return None  # the engine cache keeps the calibrated plan itself

        def write_calibration_cache(self, cache: bytes) -> None:
            return None

        def free(self) -> None:
            for pointer in self._device.values():
                _cuda(cudart.cudaFree(pointer))
            self._device.clear()

    return _EntropyCalibrator()


def build_plan(
    onnx_path: str | Path,
    *,
    label: str,
    precision: str,
    input_shapes: dict[str, tuple[int, ...]],
    calibration: dict[str, np.ndarray] | None = None,
    workspace_bytes: int = WORKSPACE_BYTES,
) -> bytes:
    """Parse `onnx`, fix dynamic input dims with a min = opt = max optimisation profile, and
    build a serialised plan of `precision`; progress is logged."""
    reason = unavailable(precision)
    if reason is not None:
        raise EngineError(f"engine {label!r}: {reason}")
    builder = trt.Builder(_LOGGER)
    network = builder.create_network(0)  # explicit batch is the only mode since TensorRT 10
    parser = trt.OnnxParser(network, _LOGGER)
    # From the file, not its bytes: weights stored beside a large model resolve by path.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"engine {label!r}: TensorRT cannot parse the ONNX file: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        # fp32 means fp32: TF32 matmuls (on by default) drift about 1e-3 from the reference.
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    dynamic = False
    network_inputs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)
        shape = fixed_shape(f"engine {label!r}", tensor.name, dims, input_shapes.get(tensor.name))
        network_inputs[tensor.name] = (tuple(shape), np.dtype(trt.nptype(tensor.dtype)))
        if all(d >= 0 for d in dims):
            continue
        dynamic = True
        # One fixed shape: latency is tuned for exactly what runs, as the node needs.
        profile.set_shape(tensor.name, shape, shape, shape)
    if dynamic:
        if config.add_optimization_profile(profile) < 0:
            raise EngineError(f"engine {label!r}: TensorRT rejected the optimisation profile "
                              f"{ {n: s for n, (s, _) in network_inputs.items()} }")
        if precision == "int8":
            config.set_calibration_profile(profile)  # calibration runs at the same shapes
    calibrator = None
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        if not calibration:
            raise EngineError(f"engine {label!r}: int8 needs a calibration set")
        config.set_flag(trt.BuilderFlag.INT8)
        calibrator = _calibrator(check_calibration(f"engine {label!r}", calibration,
                                                   network_inputs))
        config.int8_calibrator = calibrator
    config.progress_monitor = _ProgressLog(f"building {label} ({precision})")
    started = time.monotonic()
    try:
        plan = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.free()
    if calibrator is not None and calibrator.error is not None:
        raise EngineError(f"engine {label!r}: int8 calibration failed: "
                          f"{calibrator.error}") from calibrator.error
    if plan is None:
        raise EngineError(f"engine {label!r}: TensorRT failed to build a {precision} plan "
                          "(its errors are in the log, logger engines.tensorrt_backend)")
    log.info("built %s (%s) in %.1f s", label, precision, time.monotonic() - started)
    return bytes(plan)


class _Buffer:
    """A tensor's pinned host array and device memory, allocated once."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        self.host_ptr = _cuda(cudart.cudaMallocHost(self.nbytes))
        self.device = int(_cuda(cudart.cudaMalloc(self.nbytes)))
        raw = (ctypes.c_uint8 * self.nbytes).from_address(int(self.host_ptr))
        used = np.ctypeslib.as_array(raw)[: int(np.prod(shape)) * dtype.itemsize]
        self.host: np.ndarray = used.view(dtype).reshape(shape)

    def free(self) -> None:
        _cuda(cudart.cudaFree(self.device))
        _cuda(cudart.cudaFreeHost(self.host_ptr))


def _native(handle: Any) -> int:
    """The address of a cuda-python object; `int(obj)` is deprecated from 12.9.1 on."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle  # type: ignore[import-not-found]
    except ImportError:
        return int(handle)
    return int(get_cuda_native_handle(handle))


class TensorRTEngine:
    """An ONNX model compiled by TensorRT for this GPU, through the engine cache.

    Buffers, the stream and the events are created once; `infer` copies the feeds in, runs
    `execute_async_v3` on the stream between two timing events, copies the outputs back and
    waits on a blocking-sync event. `last_gpu_ms` is the GPU time of the last inference.
    Shape-tensor inputs (TensorRT places them on the host) are bound to their pinned host
    array. `close()` frees everything; the node calls it when it stops.
    """

    backend = "tensorrt"

    def __init__(
        self,
        path: str | Path,
        name: str | None = None,
        *,
        precision: str = "fp16",
        input_shapes: dict[str, tuple[int, ...]] | None = None,
        example_feeds: dict[str, np.ndarray] | None = None,
        calibration: str | Path | None = None,
        cache: EngineCache | None = None,
    ) -> None:
        path = Path(path)
        try:
            onnx = path.read_bytes()
        except OSError as exc:
            raise EngineError(f"engine model {path}: cannot read: {exc}") from exc
        self.path = path
        self.name = name if name is not None else path.stem
        self.model_hash = hashlib.sha256(onnx).hexdigest()[:16]
        self.precision = precision
        self._buffers: dict[str, _Buffer] = {}
        self._events: list[Any] = []
        self._stream: Any = None
        reason = unavailable(precision)
        if reason is not None:
            raise EngineError(f"engine {self.name!r}: TensorRT unusable: {reason}")
        shapes = dict(input_shapes or {})
        samples, calibration_sha = _load_calibration(calibration)
        self.cache = cache or EngineCache()
        self.key = cache_key(hashlib.sha256(onnx).hexdigest(), precision, shapes, calibration_sha)
        self._runtime = trt.Runtime(_LOGGER)
        self._engine, self.built = self.cache.get_or_build(
            self.key,
            build=lambda: build_plan(path, label=self.name, precision=precision,
                                     input_shapes=shapes, calibration=samples),
            # None when the plan is from another TensorRT or GPU: the cache then rebuilds.
            deserialize=self._runtime.deserialize_cuda_engine,
        )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"engine {self.name!r}: TensorRT cannot create an execution "
                              "context (out of GPU memory?)")
        self.inputs, self.outputs, on_host = self._bind(shapes)
        self._buffers = {s.name: _Buffer(s.shape, np.dtype(s.dtype))
                         for s in self.inputs + self.outputs}
        self._host_inputs = on_host
        for tensor_name, buffer in self._buffers.items():
            address = int(buffer.host_ptr) if tensor_name in on_host else buffer.device
            if not self._context.set_tensor_address(tensor_name, address):
                raise EngineError(f"engine {self.name!r}: TensorRT refused the address of "
                                  f"tensor {tensor_name!r}")
        # Non-blocking: work other libraries queue on the legacy default stream (torch in
        # `bench engines`) must not serialise this engine behind it.
        self._stream = _cuda(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
        self._stream_handle = _native(self._stream)
        self._start = self._event(cudart.cudaEventDefault)
        self._end = self._event(cudart.cudaEventDefault)
        # The host sleeps on this one instead of spinning a core while the GPU works.
        self._done = self._event(cudart.cudaEventBlockingSync | cudart.cudaEventDisableTiming)
        self._example = base.example_feeds(f"engine {self.name!r}", self.inputs, example_feeds)
        self.last_gpu_ms = 0.0

    def _event(self, flags: int) -> Any:
        event = _cuda(cudart.cudaEventCreateWithFlags(flags))
        self._events.append(event)
        return event

    def _bind(self, shapes: dict[str, tuple[int, ...]]
              ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], set[str]]:
        engine, where = self._engine, f"engine {self.name!r}"
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = []
        for tensor in names:
            if engine.get_tensor_mode(tensor) != trt.TensorIOMode.INPUT:
                continue
            declared = list(engine.get_tensor_shape(tensor))
            shape = fixed_shape(where, tensor, declared, shapes.get(tensor))
            if declared != list(shape) and not self._context.set_input_shape(tensor, shape):
                raise EngineError(f"{where}: TensorRT rejected shape {shape} for {tensor!r}")
            inputs.append(TensorSpec(tensor, shape, _dtype(engine, tensor)))
        # Output shapes are known once every input shape is set (or never: data-dependent).
        outputs = [TensorSpec(t, tuple(self._context.get_tensor_shape(t)), _dtype(engine, t))
                   for t in names if engine.get_tensor_mode(t) == trt.TensorIOMode.OUTPUT]
        described = [IoTensor(spec.name, spec in inputs,
                              engine.get_tensor_location(spec.name) == trt.TensorLocation.HOST,
                              tuple(spec.shape)) for spec in inputs + outputs]
        check_io(where, described)
        on_host = {t.name for t in described if t.on_host and t.is_input}
        return tuple(inputs), tuple(outputs), on_host

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the plan once on `feeds`; blocks until the outputs are back on the host."""
        check_feeds(self.name, self.inputs, feeds)
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for spec in self.inputs:
            buffer = self._buffers[spec.name]
            np.copyto(buffer.host, feeds[spec.name])
            if spec.name not in self._host_inputs:
                _cuda(cudart.cudaMemcpyAsync(buffer.device, buffer.host.ctypes.data,
                                             buffer.nbytes, to_device, self._stream))
        _cuda(cudart.cudaEventRecord(self._start, self._stream))
        if not self._context.execute_async_v3(self._stream_handle):
            raise EngineError(f"engine {self.name!r}: TensorRT execute_async_v3 failed")
        _cuda(cudart.cudaEventRecord(self._end, self._stream))
        for spec in self.outputs:
            buffer = self._buffers[spec.name]
            _cuda(cudart.cudaMemcpyAsync(buffer.host.ctypes.data, buffer.device, buffer.nbytes,
                                         to_host, self._stream))
        _cuda(cudart.cudaEventRecord(self._done, self._stream))
        _cuda(cudart.cudaEventSynchronize(self._done))
        self.last_gpu_ms = float(_cuda(cudart.cudaEventElapsedTime(self._start, self._end)))
        return {spec.name: self._buffers[spec.name].host.copy() for spec in self.outputs}

    def warm_up(self, iterations: int = 3) -> None:
        """Run `iterations` inferences on the example feeds (lazy CUDA set-up, clocks up)."""
        for _ in range(iterations):
            self.infer(self._example)

    def close(self) -> None:
        """Free the buffers, stream and events (cuda-python objects do not free themselves);
        the engine is unusable afterwards. Safe to call twice."""
        for buffer in self._buffers.values():
            buffer.free()
        self._buffers.clear()
        for event in self._events:
            _cuda(cudart.cudaEventDestroy(event))
        self._events.clear()
        if self._stream is not None:
            _cuda(cudart.cudaStreamDestroy(self._stream))
            self._stream = None


def _dtype(engine: Any, tensor: str) -> str:
    try:
        return np.dtype(trt.nptype(engine.get_tensor_dtype(tensor))).name
    except TypeError:  # bf16, fp8: no numpy type
        raise EngineError(f"tensor {tensor!r} has type {engine.get_tensor_dtype(tensor)} with "
                          "no numpy equivalent") from None


def _load_calibration(path: str | Path | None) -> tuple[dict[str, np.ndarray] | None, str]:
    """A calibration set: an .npz of one array per model input, samples along axis 0."""
    if path is None:
        return None, ""
    try:
        data = Path(path).read_bytes()
        with np.load(Path(path)) as npz:
            samples = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise EngineError(f"calibration set {path}: cannot read as .npz: {exc}") from exc
    if not samples:
        raise EngineError(f"calibration set {path}: no arrays")
    return samples, hashlib.sha256(data).hexdigest()
