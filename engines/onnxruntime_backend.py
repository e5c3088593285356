"""ONNX Runtime backend: the CPU default engine.

onnxruntime is imported here only, so the node starts without it until an engine is built.
"""

import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engines.base import TensorSpec
from fusion_node.errors import ConfigError, EngineError

# ONNX Runtime's element type names -> numpy dtype names.
_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


class OnnxRuntimeEngine:
    """An ONNX model run by ONNX Runtime on the CPU, with fixed input and output shapes.

    `intra_op_threads` defaults to 1 so that engines do not oversubscribe the cores. Spinning
    worker threads are off unless `allow_spinning`: at 100 Hz, 2 spinning threads burnt about
    15 ms of CPU per 10 ms period and starved the node's own thread.
    """

    def __init__(
        self,
        path: str | Path,
        name: str | None = None,
        intra_op_threads: int = 1,
        allow_spinning: bool = False,
    ) -> None:
        path = Path(path)
        if intra_op_threads < 1:
            # ORT reads 0 as "one thread per core", which is the oversubscription we avoid.
            raise ConfigError(
                f"engine {path}: intra_op_threads must be >= 1, got {intra_op_threads}"
            )
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise EngineError(f"engine model {path}: cannot read: {exc}") from exc
        # The session is built from the bytes that were hashed, so the hash names what runs.
        self.model_hash: str = hashlib.sha256(data).hexdigest()[:16]
        self.name: str = name if name is not None else path.stem
        self.path = path

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if allow_spinning else "0"
        )
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = _session(data, path, options)

        self.inputs: tuple[TensorSpec, ...] = tuple(
            _spec(arg, path) for arg in self._session.get_inputs()
        )
        self.outputs: tuple[TensorSpec, ...] = tuple(
            _spec(arg, path) for arg in self._session.get_outputs()
        )
        self.metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)
        self._input_specs = {spec.name: spec for spec in self.inputs}
        self._output_names = [spec.name for spec in self.outputs]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once; every input must be given with its exact shape and dtype."""
        self._check_feeds(feeds)
        try:
            results = self._session.run(self._output_names, feeds)
        except Exception as exc:  # ORT's own exception types all derive from Exception
            raise EngineError(f"engine {self.name!r}: inference failed: {exc}") from exc
        return dict(zip(self._output_names, results, strict=True))

    def warm_up(self, iterations: int = 3) -> None:
        """Run `iterations` inferences on all-zero feeds."""
        feeds = {spec.name: np.zeros(spec.shape, dtype=spec.dtype) for spec in self.inputs}
        for _ in range(iterations):
            self.infer(feeds)

    def _check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        missing = sorted(self._input_specs.keys() - feeds.keys())
        if missing:
            raise EngineError(f"engine {self.name!r}: missing inputs {missing}")
        unknown = sorted(feeds.keys() - self._input_specs.keys())
        if unknown:
            raise EngineError(
                f"engine {self.name!r}: unknown inputs {unknown}; "
                f"expected {sorted(self._input_specs)}"
            )
        for name, spec in self._input_specs.items():
            array = feeds[name]
            if not isinstance(array, np.ndarray):
                raise EngineError(
                    f"engine {self.name!r} input {name!r}: expected numpy array, "
                    f"got {type(array).__name__}"
                )
            if array.shape != spec.shape:
                raise EngineError(
                    f"engine {self.name!r} input {name!r}: shape {array.shape}, "
                    f"expected {spec.shape}"
                )
            if array.dtype != spec.dtype:
                raise EngineError(
                    f"engine {self.name!r} input {name!r}: dtype {array.dtype}, "
                    f"expected {spec.dtype}"
                )


def load_metadata(path: str | Path) -> dict[str, str]:
    """The ONNX file's `metadata_props` (name, version, tensor specs, preprocessing, ...)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EngineError(f"engine model {path}: cannot read: {exc}") from exc
    options = ort.SessionOptions()
    # Only the metadata is wanted: skip graph optimisation to load fast.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return dict(_session(data, path, options).get_modelmeta().custom_metadata_map)


def _session(data: bytes, path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # InvalidProtobuf, InvalidGraph, Fail, ...: no common base
        raise EngineError(f"engine model {path}: not a loadable ONNX model: {exc}") from exc


def _spec(arg: ort.NodeArg, path: Path) -> TensorSpec:
    shape = tuple(arg.shape)
    if not all(isinstance(dim, int) and dim > 0 for dim in shape):
        raise EngineError(
            f"engine model {path}: tensor {arg.name!r} has dynamic shape {list(arg.shape)}; "
            "fixed shapes are required for fixed latency (fix them with "
            "`python -m onnxruntime.tools.make_dynamic_shape_fixed`)"
        )
    dtype = _DTYPES.get(arg.type)
    if dtype is None:
        raise EngineError(
            f"engine model {path}: tensor {arg.name!r} has unsupported type {arg.type}"
        )
    return TensorSpec(arg.name, shape, dtype)
