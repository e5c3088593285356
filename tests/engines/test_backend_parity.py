"""The backends agree with the torch reference on fresh random inputs, and are chosen by name.

ONNX Runtime runs everywhere. TensorRT and torch on CUDA run wherever they can (a GPU and,
for TensorRT, its Python bindings); elsewhere they are skipped, saying why.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from engines.backends import create_engine, resolve_backend, tensorrt_unavailable
from engines.torch_backend import TorchEngine
from fusion_node.errors import ConfigError, EngineError
from fusion_node.node import model_path
from training import models

INPUTS = {"speech": models.SPEECH_INPUTS, "action": models.ACTION_INPUTS}
TRIALS = 5
FP32_TOLERANCE = 1e-4
# fp16 keeps about 3 decimal digits; through 3 transformer layers 2e-2 of the output range.
FP16_TOLERANCE = 2e-2

NO_TENSORRT = tensorrt_unavailable("fp32")
NO_CUDA = None if torch.cuda.is_available() else "torch sees no CUDA GPU"


@pytest.fixture(scope="module")
def references() -> dict[str, TorchEngine]:
    return {name: TorchEngine.from_onnx(model_path(name)) for name in INPUTS}


def _worst_relative_error(engine, reference: TorchEngine, name: str) -> float:
    rng = np.random.default_rng()  # unseeded: fresh inputs on every run
    worst = 0.0
    for _ in range(TRIALS):
        feeds = models.random_feeds(INPUTS[name], rng)
        expected = reference.infer(feeds)
        actual = engine.infer(feeds)
        assert actual.keys() == expected.keys()
        for key, value in actual.items():
            scale = max(float(np.abs(expected[key]).max()), 1e-12)
            worst = max(worst, float(np.abs(value - expected[key]).max()) / scale)
    return worst


@pytest.mark.parametrize("name", INPUTS)
def test_onnxruntime_matches_torch(references, name: str) -> None:
    engine = create_engine(model_path(name), backend="onnxruntime")
    assert engine.model_hash == references[name].model_hash
    assert _worst_relative_error(engine, references[name], name) < FP32_TOLERANCE


@pytest.mark.skipif(NO_TENSORRT is not None, reason=f"TensorRT unusable: {NO_TENSORRT}")
@pytest.mark.parametrize("name", INPUTS)
@pytest.mark.parametrize(("precision", "tolerance"),
                         [("fp32", FP32_TOLERANCE), ("fp16", FP16_TOLERANCE)])
def test_tensorrt_matches_torch(references, tmp_path: Path, name: str, precision: str,
                                tolerance: float) -> None:
    if tensorrt_unavailable(precision) is not None:
        pytest.skip(f"TensorRT {precision}: {tensorrt_unavailable(precision)}")
    engine = create_engine(model_path(name), backend="tensorrt", precision=precision,
                           cache_dir=tmp_path)
    assert engine.backend == "tensorrt" and engine.built
    engine.warm_up()
    assert _worst_relative_error(engine, references[name], name) < tolerance
    assert engine.last_gpu_ms > 0
    # The second build of the same key is a cache hit.
    again = create_engine(model_path(name), backend="tensorrt", precision=precision,
                          cache_dir=tmp_path)
    assert not again.built


@pytest.mark.skipif(NO_CUDA is not None, reason=NO_CUDA or "")
@pytest.mark.parametrize("name", INPUTS)
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_torch_cuda_fp16_matches_torch(references, name: str, cuda_graphs: bool) -> None:
    engine = TorchEngine.from_onnx(model_path(name), device="cuda", precision="fp16",
                                   cuda_graphs=cuda_graphs, threads=None)
    assert _worst_relative_error(engine, references[name], name) < FP16_TOLERANCE
    assert engine.last_gpu_ms > 0


def test_auto_picks_tensorrt_only_where_usable() -> None:
    expected = "tensorrt" if NO_TENSORRT is None else "onnxruntime"
    assert resolve_backend("auto", "fp32") == expected
    assert resolve_backend("torch") == "torch"
    with pytest.raises(ConfigError, match="backend 'tflite' is not one of"):
        resolve_backend("tflite")


@pytest.mark.skipif(NO_TENSORRT is None, reason="TensorRT is usable here")
def test_asking_for_tensorrt_without_it_says_why() -> None:
    with pytest.raises(EngineError, match="TensorRT unusable|tensorrt does not import"):
        create_engine(model_path("speech"), backend="tensorrt")


def test_torch_backend_refuses_other_weights(tmp_path: Path) -> None:
    path = tmp_path / "speech.onnx"
    path.write_bytes(model_path("speech").read_bytes())
    torch.save(models.SpeechModel(seed=1).state_dict(), tmp_path / "speech.pt")
    with pytest.raises(EngineError, match="not the ones this ONNX file was exported with"):
        TorchEngine.from_onnx(path)


def test_torch_backend_needs_an_exported_file(tmp_path: Path) -> None:
    from tests.engines.test_onnxruntime_backend import _add_model

    with pytest.raises(EngineError, match="no torch_module in its metadata"):
        create_engine(_add_model(tmp_path / "adder.onnx"), backend="torch")


def test_the_auto_fallback_is_logged_once_per_process_not_per_engine(caplog):
    import logging

    from engines import backends
    from engines.backends import tensorrt_unavailable

    reason = tensorrt_unavailable()
    if reason is None:
        pytest.skip("TensorRT is usable here: auto picks it, nothing falls back")
    backends._FALLBACKS_LOGGED.discard(reason)
    with caplog.at_level(logging.INFO, logger="engines.backends"):
        assert [resolve_backend("auto") for _ in range(3)] == ["onnxruntime"] * 3
    assert [r.getMessage() for r in caplog.records].count(
        f"backend auto: ONNX Runtime, since TensorRT is unusable: {reason}") == 1
