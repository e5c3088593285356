"""The first-GPU-run checklist of the TensorRT backend, end to end, as one JSON summary.

Run through `scripts/gpu-check.sh`. Without a GPU it says so and exits 0. On a GPU it exits 1
if TensorRT is unusable, if any TensorRT test skipped or failed, or if a check fails:
  versions       TensorRT, cuda-python, driver, torch, ONNX Runtime; the version rules
  parity         tests/engines/test_backend_parity.py -k tensorrt: must run, not skip
  cache          build, cache hit, rebuild after a flipped plan byte and after a header edit
  bench          `bench engines` rows: p50/p99, CPU per call, GIL-free share, parity
  silero_vad     Silero VAD (dynamic dims, int64 `sr`) on TensorRT against ONNX Runtime
  int8           a calibration set missing an input, or holding NaN, is refused
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BENCH_ITERATIONS = 200


def versions() -> dict[str, Any]:
    import onnxruntime
    import torch

    found: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                             "torch_cuda": torch.cuda.is_available(),
                             "onnxruntime": onnxruntime.__version__,
                             "onnxruntime_providers": onnxruntime.get_available_providers()}
    try:
        import cuda.bindings
        from cuda.bindings import runtime as cudart

        _, driver = cudart.cudaDriverGetVersion()
        found.update(cuda_python=str(cuda.bindings.__version__),
                     driver_cuda=f"{driver // 1000}.{(driver % 1000) // 10}" if driver else None)
    except ImportError as exc:
        found["cuda_python"] = f"not installed ({exc})"
    try:
        import tensorrt

        found["tensorrt"] = tensorrt.__version__
    except ImportError as exc:
        found["tensorrt"] = f"not installed ({exc})"
    try:
        found["gpu"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=False).stdout.strip() or None
    except OSError:
        found["gpu"] = None
    return found


def gpu_present() -> str | None:
    """Why there is no GPU here, or None if the driver sees one."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return "cuda-python is not installed, so no GPU can be looked for"
    _, driver = cudart.cudaDriverGetVersion()
    if not driver:
        return "no NVIDIA driver (cudaDriverGetVersion reports none)"
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or not count:
        return f"the driver sees no GPU ({err.name if hasattr(err, 'name') else err})"
    return None


def parity_tests() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-k", "tensorrt",
                        "tests/engines/test_backend_parity.py", f"--junitxml={report}"],
                       cwd=REPO, check=False, timeout=600, stdout=sys.stderr)
        suite = ElementTree.parse(report).getroot().find("testsuite")
        assert suite is not None
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["ok"] = counts["tests"] > 0 and not (counts["failures"] or counts["errors"]
                                                or counts["skipped"])
    return counts


def cache_checks() -> dict[str, Any]:
    from engines.backends import create_engine
    from fusion_node.node import model_path

    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        def build() -> tuple[bool, float, Any]:
            started = time.monotonic()
            engine = create_engine(model_path("speech"), backend="tensorrt", precision="fp16",
                                   cache_dir=cache_dir)
            engine.close()
            return engine.built, round(time.monotonic() - started, 2), engine

        result["first_built"], result["first_s"], engine = build()
        result["second_built"], result["second_s"], _ = build()
        plan = engine.cache.path_for(engine.key)
        data = bytearray(plan.read_bytes())
        data[-100] ^= 0xFF  # a byte of the plan itself, after the header
        plan.write_bytes(bytes(data))
        result["after_flipped_byte_built"], _, _ = build()
        text = plan.read_bytes()
        plan.write_bytes(text.replace(b'"tensorrt_version":"', b'"tensorrt_version":"0.', 1))
        result["after_header_edit_built"], _, _ = build()
    result["ok"] = (result["first_built"] and not result["second_built"]
                    and result["after_flipped_byte_built"] and result["after_header_edit_built"])
    return result


def bench() -> dict[str, Any]:
    from fusion_node.bench.engines import run_engine_bench

    rows = run_engine_bench(iterations=BENCH_ITERATIONS)["results"]
    speech = {f"{r['backend']} {r['precision']}": r for r in rows if r["model"] == "speech"}
    summary: dict[str, Any] = {"rows": rows}
    trt, torch_fp32 = speech.get("tensorrt-fp16 fp16"), speech.get("torch-cuda fp32")
    if trt and torch_fp32:
        summary["speech_tensorrt_fp16_vs_torch_cuda_fp32"] = round(
            torch_fp32["p50_ms"] / trt["p50_ms"], 2)
    summary["ok"] = bool(trt) and trt["max_rel_diff"] < 2e-2 and trt["gil_free_share"] > 0.5
    return summary


def silero_vad() -> dict[str, Any]:
    from engines.backends import create_engine
    from engines.spec import parse_spec
    from fusion_node.config import load_config
    from fusion_node.node import model_path

    config = load_config(REPO / "launch" / "vad.toml")
    engine_config = config.engines[0]
    spec = parse_spec(engine_config.spec, "vad")
    kwargs = {"input_shapes": spec.input_shapes(), "example_feeds": spec.example_feeds()}
    path = model_path(engine_config.model)
    trt = create_engine(path, backend="tensorrt", precision="fp32", **kwargs)
    ort = create_engine(path, backend="onnxruntime", **kwargs)
    inner = trt._engine  # the ICudaEngine: where TensorRT placed `sr`
    result: dict[str, Any] = {"sr_dtype": str(inner.get_tensor_dtype("sr")),
                              "sr_location": str(inner.get_tensor_location("sr")),
                              "sr_shape_inference_io": bool(inner.is_shape_inference_io("sr"))}
    rng = np.random.default_rng()
    worst = 0.0
    for _ in range(20):
        feeds = dict(spec.example_feeds())
        for tensor in trt.inputs:
            if tensor.name == "input":
                feeds["input"] = rng.uniform(-0.5, 0.5, tensor.shape).astype(np.float32)
        expected, actual = ort.infer(feeds), trt.infer(feeds)
        worst = max(worst, max(float(np.abs(actual[k] - expected[k]).max()) for k in expected))
    trt.close()
    result.update(max_abs_diff=worst, ok=worst < 1e-3)
    return result


def int8_refusals() -> dict[str, Any]:
    from engines.backends import create_engine
    from fusion_node.errors import EngineError
    from fusion_node.node import model_path
    from training import models

    refused: dict[str, str] = {}
    rng = np.random.default_rng(0)
    good = {name: rng.standard_normal((4, *shape)) for name, shape in models.SPEECH_INPUTS.items()}
    missing = dict(list(good.items())[1:])
    nan = {name: array.copy() for name, array in good.items()}
    next(iter(nan.values()))[0].flat[0] = np.nan
    with tempfile.TemporaryDirectory() as tmp:
        for label, samples in (("missing_input", missing), ("nan", nan)):
            path = Path(tmp) / f"{label}.npz"
            np.savez(path, **samples)
            try:
                create_engine(model_path("speech"), backend="tensorrt", precision="int8",
                              calibration=path, cache_dir=tmp).close()
                refused[label] = "BUILT: not refused"
            except EngineError as exc:
                refused[label] = str(exc)
    return {**refused, "ok": all(not v.startswith("BUILT") for v in refused.values())}


def main() -> int:
    summary: dict[str, Any] = {"versions": versions()}
    reason = gpu_present()
    if reason is not None:
        summary.update(gpu=False, reason=reason, ok=True)
        print(json.dumps(summary, indent=2))
        return 0
    from engines.backends import tensorrt_unavailable

    summary["gpu"] = True
    unusable = tensorrt_unavailable("fp16")
    summary["tensorrt_unusable"] = unusable
    checks: dict[str, Any] = {}
    steps = [("parity", parity_tests), ("bench", bench)]
    if unusable is None:
        steps += [("cache", cache_checks), ("silero_vad", silero_vad), ("int8", int8_refusals)]
    for name, step in steps:
        try:
            checks[name] = step()
        except Exception as exc:  # noqa: BLE001 - one failed check must not hide the rest
            checks[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    summary["checks"] = checks
    summary["ok"] = unusable is None and all(c.get("ok") for c in checks.values())
    print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
