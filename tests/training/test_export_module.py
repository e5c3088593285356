"""`python -m training.export --module`: any torch module to a verified ONNX file that the
torch and ONNX Runtime backends both run, and that names its preprocessing and origin."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from engines.backends import create_engine
from engines.onnxruntime_backend import load_metadata
from fusion_node.errors import ConfigError
from training.export import main


class Scaler(nn.Module):
    """A keyword-in, dict-out module with seeded weights."""

    def __init__(self, width: int = 6, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.linear = nn.Linear(width, 2)

    def forward(self, x: Tensor, mask: Tensor) -> dict[str, Tensor]:
        return {"score": self.linear(x * mask).tanh()}


def test_export_any_module_and_run_it_on_both_backends(tmp_path: Path) -> None:
    path = tmp_path / "scaler.onnx"
    preprocessing = {"x": {"op": "standardise"}}
    main(["--module", f"{__name__}:Scaler", "--init", '{"width": 6, "seed": 3}',
          "--input", "x=1x6", "--input", "mask=1x6", "--name", "scaler", "--version", "2",
          "--preprocessing", json.dumps(preprocessing), "--out", str(path)])
    meta = load_metadata(path)
    assert meta["torch_module"] == f"{__name__}:Scaler"
    assert json.loads(meta["torch_init"]) == {"seed": 3, "width": 6}
    assert json.loads(meta["preprocessing"]) == preprocessing
    assert meta["name"] == "scaler" and meta["version"] == "2"
    assert [d["shape"] for d in json.loads(meta["inputs"])] == [[1, 6], [1, 6]]

    ort_engine = create_engine(path, backend="onnxruntime")
    torch_engine = create_engine(path, backend="torch")
    assert torch_engine.model_hash == ort_engine.model_hash
    rng = np.random.default_rng()
    feeds = {"x": rng.standard_normal((1, 6)).astype(np.float32),
             "mask": np.ones((1, 6), np.float32)}
    np.testing.assert_allclose(ort_engine.infer(feeds)["score"],
                               torch_engine.infer(feeds)["score"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("argv", "message"), [
    (["--module", "no.such.module:Model", "--input", "x=1x2"], "No module named"),
    (["--module", f"{__name__}:Scaler", "--input", "x=1by6"], "is not NAME=D1xD2"),
    (["--module", f"{__name__}:Scaler"], "give every input"),
])
def test_export_module_errors_name_the_problem(tmp_path: Path, argv, message) -> None:
    with pytest.raises(ConfigError, match=message):
        main([*argv, "--out", str(tmp_path / "m.onnx")])
