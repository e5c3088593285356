"""`fusion-node engine build | info` and `bench engines`, through the real command line."""

import json
from pathlib import Path

import pytest

from engines.cache import CacheKey, EngineCache
from fusion_node.cli import main
from fusion_node.node import model_path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["--log-level", "WARNING", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_engine_info_describes_a_model(capsys) -> None:
    info = _run(capsys, "engine", "info", "speech")
    assert [t["name"] for t in info["inputs"]] == ["audio_mel", "audio_valid", "video",
                                                  "video_valid"]
    assert info["metadata"]["torch_module"] == "training.models:SpeechModel"
    assert info["model_hash"] == info["onnx_sha256"][:16]
    assert "tensorrt" in info  # the cache key on this machine, or why there is none


def test_engine_info_reads_a_plan_header(capsys, tmp_path: Path) -> None:
    key = CacheKey("cd" * 32, "10.3.0", "Orin", "8.7", "fp16")
    path = EngineCache(tmp_path).store(key, b"plan bytes")
    info = _run(capsys, "engine", "info", str(path))
    assert info["key"]["gpu_name"] == "Orin" and info["plan_bytes"] == 10
    path.write_bytes(path.read_bytes()[:-1])
    assert main(["engine", "info", str(path)]) == 1
    assert "truncated" in capsys.readouterr().err


def test_engine_build_on_onnxruntime(capsys) -> None:
    built = _run(capsys, "engine", "build", "action", "--backend", "onnxruntime")
    assert built["backend"] == "onnxruntime" and built["precision"] == "fp32"
    assert built["outputs"] == [{"name": "actions", "shape": [1, 20, 3], "dtype": "float32"}]
    assert built["model_hash"] == _run(capsys, "engine", "info", "action")["model_hash"]


def test_engine_build_rejects_bad_options(capsys) -> None:
    assert main(["engine", "build", "speech", "--shape", "audio_mel=64by40"]) == 1
    assert "NAME=D1xD2" in capsys.readouterr().err
    assert main(["engine", "build", str(model_path("speech")), "--backend", "tflite"]) == 1
    assert "not one of" in capsys.readouterr().err


def test_bench_engines_reports_latency_and_parity(capsys) -> None:
    report = _run(capsys, "bench", "engines", "--json", "--iterations", "5")
    rows = {(r["model"], r["backend"]): r for r in report["results"]}
    for model in ("speech", "action"):
        assert rows[(model, "torch")]["speedup_vs_torch"] == 1.0
        ort = rows[(model, "onnxruntime")]
        assert ort["threads"] == 1 and 0 < ort["p50_ms"] <= ort["p99_ms"]
        assert ort["max_rel_diff"] < 1e-4  # parity, not speed: speed is the bench's to show
    assert set(report["skipped"]) | {r["backend"] for r in report["results"]} >= {
        "torch-cuda", "tensorrt-fp32", "tensorrt-fp16"}
