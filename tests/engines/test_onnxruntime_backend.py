"""OnnxRuntimeEngine: loading, specs, hashing and input validation, on tiny hand-built models."""

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from engines.base import TensorSpec
from engines.onnxruntime_backend import OnnxRuntimeEngine, load_metadata
from fusion_node.errors import ConfigError, EngineError


def _add_model(path: Path, x_shape: tuple[int | str, ...] = (1, 4)) -> Path:
    """out = x + y (float32) with a metadata entry; x's shape may be made dynamic."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["out"])],
        "add",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape)),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])],
    )
    # IR version 8 goes with opset 17; onnx 1.23 would default to one ORT 1.31 cannot load.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    helper.set_model_props(model, {"version": "7"})
    onnx.save(model, path)
    return path


@pytest.fixture
def engine(tmp_path: Path) -> OnnxRuntimeEngine:
    return OnnxRuntimeEngine(_add_model(tmp_path / "adder.onnx"))


def _feeds() -> dict[str, np.ndarray]:
    return {
        "x": np.arange(4, dtype=np.float32).reshape(1, 4),
        "y": np.full((1, 4), 10, dtype=np.float32),
    }


def test_specs_hash_name_and_metadata(tmp_path: Path) -> None:
    path = _add_model(tmp_path / "adder.onnx")
    engine = OnnxRuntimeEngine(path)
    assert engine.name == "adder"
    assert OnnxRuntimeEngine(path, name="sum").name == "sum"
    assert engine.model_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert engine.inputs == (
        TensorSpec("x", (1, 4), "float32"),
        TensorSpec("y", (1, 4), "float32"),
    )
    assert engine.outputs == (TensorSpec("out", (1, 4), "float32"),)
    assert engine.metadata["version"] == "7"
    assert load_metadata(path)["version"] == "7"


def test_infer_returns_outputs_by_name(engine: OnnxRuntimeEngine) -> None:
    outputs = engine.infer(_feeds())
    assert list(outputs) == ["out"]
    np.testing.assert_array_equal(outputs["out"], [[10, 11, 12, 13]])
    engine.warm_up(iterations=2)


def test_spinning_off_by_default(tmp_path: Path) -> None:
    # Spinning intra-op threads burn a core between ticks; see OnnxRuntimeEngine's docstring.
    path = _add_model(tmp_path / "adder.onnx")
    key = "session.intra_op.allow_spinning"
    default = OnnxRuntimeEngine(path)._session.get_session_options()
    spinning = OnnxRuntimeEngine(path, allow_spinning=True)._session.get_session_options()
    assert default.get_session_config_entry(key) == "0"
    assert spinning.get_session_config_entry(key) == "1"
    assert default.intra_op_num_threads == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.pop("y"), r"missing inputs \['y'\]"),
        (lambda f: f.update(z=f["x"]), r"unknown inputs \['z'\]"),
        (
            lambda f: f.update(x=np.zeros((1, 5), np.float32)),
            r"'x': shape \(1, 5\), expected \(1, 4\)",
        ),
        (
            lambda f: f.update(y=np.zeros((1, 4), np.float64)),
            r"'y': dtype float64, expected float32",
        ),
        (lambda f: f.update(x=[[0.0] * 4]), r"'x': expected numpy array, got list"),
    ],
)
def test_infer_rejects_bad_feeds(engine: OnnxRuntimeEngine, change, message: str) -> None:
    feeds = _feeds()
    change(feeds)
    with pytest.raises(EngineError, match=message):
        engine.infer(feeds)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="nowhere.onnx"):
        OnnxRuntimeEngine(tmp_path / "nowhere.onnx")
    with pytest.raises(EngineError, match="nowhere.onnx"):
        load_metadata(tmp_path / "nowhere.onnx")


def test_invalid_model_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"this is not a protobuf")
    with pytest.raises(EngineError, match="garbage.onnx"):
        OnnxRuntimeEngine(path)


def test_dynamic_shapes_are_rejected(tmp_path: Path) -> None:
    path = _add_model(tmp_path / "dynamic.onnx", x_shape=("batch", 4))
    with pytest.raises(EngineError, match=r"'x' has dynamic shape \['batch', 4\]"):
        OnnxRuntimeEngine(path)


def test_zero_threads_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="intra_op_threads must be >= 1, got 0"):
        OnnxRuntimeEngine(_add_model(tmp_path / "adder.onnx"), intra_op_threads=0)
