"""export_onnx: ORT/torch parity, embedded metadata, determinism, and refusing bad exports."""

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import Tensor, nn

from engines.onnxruntime_backend import OnnxRuntimeEngine
from fusion_node.errors import ConfigError, EngineError
from training import models
from training.export import export_onnx, main, verify_onnx, weights_sha256

REFERENCES = {
    "speech": (models.SpeechModel, models.SPEECH_INPUTS),
    "action": (models.ActionModel, models.ACTION_INPUTS),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both reference models exported once by the CLI, seed 0."""
    out = tmp_path_factory.mktemp("models")
    main(["--out", str(out)])
    return out


@pytest.mark.parametrize("name", REFERENCES)
def test_ort_matches_torch_on_fresh_inputs(exported: Path, name: str) -> None:
    cls, inputs = REFERENCES[name]
    model = cls(seed=0).eval()
    engine = OnnxRuntimeEngine(exported / f"{name}.onnx")
    rng = np.random.default_rng(2024)  # not the seed export verified with
    for _ in range(5):
        feeds = models.random_feeds(inputs, rng)
        with torch.no_grad():
            expected = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        for key, value in engine.infer(feeds).items():
            ref = expected[key].numpy()
            assert np.abs(value - ref).max() / np.abs(ref).max() < 1e-4, key


@pytest.mark.parametrize("name", REFERENCES)
def test_metadata_is_embedded(exported: Path, name: str) -> None:
    cls, inputs = REFERENCES[name]
    meta = {p.key: p.value for p in onnx.load(exported / f"{name}.onnx").metadata_props}
    assert meta["name"] == name
    assert meta["version"] == "0+untrained.seed0"
    assert meta["weights_sha256"] == weights_sha256(cls(seed=0))
    assert json.loads(meta["inputs"]) == [
        {"name": k, "shape": list(shape), "dtype": "float32"} for k, shape in inputs.items()
    ]
    assert "untrained" in meta["training"]
    preprocessing = json.loads(meta["preprocessing"])
    if name == "speech":
        assert preprocessing["audio_mel"]["samples"] == 10480
        assert preprocessing["video"]["size"] == 48


def test_export_is_byte_deterministic(exported: Path, tmp_path: Path) -> None:
    main(["--out", str(tmp_path)])
    for name in REFERENCES:
        assert (tmp_path / f"{name}.onnx").read_bytes() == (exported / f"{name}.onnx").read_bytes()


def test_verify_rejects_a_different_model(exported: Path) -> None:
    inputs = models.SPEECH_INPUTS
    feeds = models.random_feeds(inputs, np.random.default_rng(0))
    path = exported / "speech.onnx"
    assert verify_onnx(path, models.SpeechModel(seed=0), feeds) < 1e-4
    with pytest.raises(EngineError, match="differs from torch by relative error"):
        verify_onnx(path, models.SpeechModel(seed=1), feeds)


def test_verify_rejects_a_broken_graph(exported: Path) -> None:
    proto = onnx.load(exported / "action.onnx")
    proto.graph.node[-1].op_type = "NoSuchOp"
    feeds = models.random_feeds(models.ACTION_INPUTS, np.random.default_rng(0))
    with pytest.raises(EngineError, match="cannot load"):
        verify_onnx(proto.SerializeToString(), models.ActionModel(seed=0), feeds)


class _Frozen(nn.Module):
    """A tracer trap: the Python float becomes a constant, so ONNX differs on other inputs."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"y": x / float(x.abs().max())}


class _Tuple(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (x,)


def _example() -> dict[str, np.ndarray]:
    return {"x": np.linspace(-2, 3, 8, dtype=np.float32).reshape(1, 8)}


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the trap, on purpose
def test_export_refuses_a_mismatch_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "frozen.onnx"
    path.write_bytes(b"previous model")
    with pytest.raises(EngineError, match="'y' differs from torch"):
        export_onnx(_Frozen(), _example(), path, name="frozen", version="1", metadata={})
    assert path.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["frozen.onnx"]  # no temporary left behind


def test_export_checks_its_arguments(tmp_path: Path) -> None:
    path = tmp_path / "t.onnx"
    with pytest.raises(EngineError, match="must return a dict"):
        export_onnx(_Tuple(), _example(), path, name="t", version="1", metadata={})
    with pytest.raises(ConfigError, match=r"\['version'\] are reserved"):
        export_onnx(_Frozen(), _example(), path, name="t", version="1", metadata={"version": "2"})
    assert not list(tmp_path.iterdir())


def test_export_returns_the_file_hash(tmp_path: Path) -> None:
    class Double(nn.Module):
        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"y": 2 * x}

    path = tmp_path / "double.onnx"
    model_hash = export_onnx(Double(), _example(), path, name="d", version="1", metadata={})
    assert model_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert OnnxRuntimeEngine(path).model_hash == model_hash
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
