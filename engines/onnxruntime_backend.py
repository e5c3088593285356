"""ONNX Runtime backend: the CPU default engine.

onnxruntime is imported here only, so the node starts without it until an engine is built.
"""

import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engines import base
from engines.base import TensorSpec, check_feeds, fixed_shape
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

    A model with dynamic input dims runs once they are fixed by `input_shapes`; its output
    shapes are then found by one run on `example_feeds` (zeros for inputs not given), which
    are also what `warm_up` runs on.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        name: str | None = None,
        intra_op_threads: int = 1,
        allow_spinning: bool = False,
        input_shapes: dict[str, tuple[int, ...]] | None = None,
        example_feeds: dict[str, np.ndarray] | None = None,
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
        # Errors only: third-party graphs (Silero VAD) log a warning per unused initializer.
        options.log_severity_level = 3
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if allow_spinning else "0"
        )
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = _session(data, path, options)

        shapes = input_shapes or {}
        unknown = sorted(shapes.keys() - {arg.name for arg in self._session.get_inputs()})
        if unknown:
            raise EngineError(f"engine model {path}: input_shapes name unknown inputs {unknown}")
        self.inputs: tuple[TensorSpec, ...] = tuple(
            _spec(arg, path, shapes.get(arg.name)) for arg in self._session.get_inputs()
        )
        self.metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)
        self._output_names = [arg.name for arg in self._session.get_outputs()]
        self._example = base.example_feeds(f"engine model {path}", self.inputs, example_feeds)
        self.outputs: tuple[TensorSpec, ...] = self._output_specs(path)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once; every input must be given with its exact shape and dtype."""
        check_feeds(self.name, self.inputs, feeds)
        if self._session is None:
            raise EngineError(f"engine {self.name!r}: closed")
        try:
            results = self._session.run(self._output_names, feeds)
        except Exception as exc:  # ORT's own exception types all derive from Exception
            raise EngineError(f"engine {self.name!r}: inference failed: {exc}") from exc
        return dict(zip(self._output_names, results, strict=True))

    def warm_up(self, iterations: int = 3) -> None:
        """Run `iterations` inferences on the example feeds (all zeros unless given)."""
        for _ in range(iterations):
            self.infer(self._example)

    def close(self) -> None:
        """Drop the session, and with it its memory arena; `infer` refuses afterwards."""
        self._session = None

    def _output_specs(self, path: Path) -> tuple[TensorSpec, ...]:
        args = self._session.get_outputs()
        if all(all(isinstance(d, int) and d > 0 for d in arg.shape) for arg in args):
            return tuple(_spec(arg, path, None) for arg in args)
        # Dynamic output dims follow from the (now fixed) inputs: one run tells them.
        results = self.infer(self._example)
        return tuple(
            TensorSpec(arg.name, results[arg.name].shape, _dtype(arg, path)) for arg in args
        )


def load_metadata(path: str | Path) -> dict[str, str]:
    """The ONNX file's `metadata_props` (name, version, tensor specs, preprocessing, ...)."""
    return dict(_inspection_session(Path(path)).get_modelmeta().custom_metadata_map)


def _inspection_session(path: Path) -> ort.InferenceSession:
    """A session only for reading declarations and metadata: no graph optimisation."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EngineError(f"engine model {path}: cannot read: {exc}") from exc
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return _session(data, path, options)


def _session(data: bytes, path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # InvalidProtobuf, InvalidGraph, Fail, ...: no common base
        raise EngineError(f"engine model {path}: not a loadable ONNX model: {exc}") from exc


def _spec(arg: ort.NodeArg, path: Path, override: tuple[int, ...] | None) -> TensorSpec:
    shape = fixed_shape(f"engine model {path}", arg.name, arg.shape, override)
    return TensorSpec(arg.name, shape, _dtype(arg, path))


def _dtype(arg: ort.NodeArg, path: Path) -> str:
    dtype = _DTYPES.get(arg.type)
    if dtype is None:
        raise EngineError(
            f"engine model {path}: tensor {arg.name!r} has unsupported type {arg.type}"
        )
    return dtype


def describe(path: str | Path) -> dict[str, object]:
    """A model's declared inputs and outputs (dynamic dims as their names or None) and its
    metadata, without fixing any shape: what `fusion-node engine info` shows."""
    path = Path(path)
    session = _inspection_session(path)

    def tensors(args: list[ort.NodeArg]) -> list[dict[str, object]]:
        return [{"name": a.name, "shape": list(a.shape), "dtype": _DTYPES.get(a.type, a.type)}
                for a in args]

    return {"inputs": tensors(session.get_inputs()), "outputs": tensors(session.get_outputs()),
            "metadata": dict(session.get_modelmeta().custom_metadata_map)}
