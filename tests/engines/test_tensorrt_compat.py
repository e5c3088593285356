"""The TensorRT backend's rules that need no GPU: version checks, the reasons a user reads,
calibration-set checks, the engine-cache key, and the guard against TensorRT 8.

The probe itself runs the real cuda-python bindings (the `tensorrt` extra, in the test lock):
on a machine without an NVIDIA driver they must say exactly that.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from engines.backends import create_engine, resolve_backend, tensorrt_unavailable
from engines.cache import CacheKey, EngineCache
from engines.tensorrt_compat import (
    EXTRA_HINT,
    IoTensor,
    check_calibration,
    check_io,
    cuda_problem,
    device_problem,
    logging_level,
    parse_version,
    precision_problem,
    settings_digest,
    tensorrt_version_problem,
)
from fusion_node.errors import EngineError
from fusion_node.node import model_path

CUDA_12_4 = 12040
CUDA_13_0 = 13000


def test_versions_parse_from_what_packages_report():
    assert parse_version("10.3.0.30") == (10, 3, 0, 30)
    assert parse_version("12.9.1rc1") == (12, 9, 1)
    assert parse_version("13.0.0.dev0") == (13, 0, 0)
    assert parse_version("") == ()


def test_bindings_newer_than_the_driver_are_named_with_the_fix():
    problem = cuda_problem("13.0.2", CUDA_12_4)
    assert problem is not None
    assert "built for CUDA 13" in problem and "supports CUDA 12.4" in problem
    assert "driver is too old" in problem and "cuda-python>=12.9.1,<13" in problem


def test_bindings_that_hold_the_gil_are_refused_with_the_fix():
    for old in ("12.6.0", "12.8.0", "12.9.0"):
        problem = cuda_problem(old, CUDA_12_4)
        assert problem is not None and "holds the GIL" in problem and EXTRA_HINT in problem


def test_matching_bindings_and_driver_pass():
    assert cuda_problem("12.9.1", CUDA_12_4) is None
    assert cuda_problem("12.9.10", CUDA_13_0) is None  # an older major runs on a newer driver
    assert cuda_problem("13.0.0", CUDA_13_0) is None


def test_no_driver_says_there_is_no_gpu_rather_than_blaming_a_package():
    problem = cuda_problem("12.9.10", 0)
    assert problem is not None and problem.startswith("no NVIDIA driver")


def test_device_count_errors_read_as_what_they_mean():
    insufficient = device_problem("cudaErrorInsufficientDriver", None)
    assert insufficient is not None and "older than the CUDA runtime" in insufficient
    assert device_problem("cudaSuccess", 0) == "no CUDA GPU (the driver sees 0 devices)"
    assert device_problem("cudaErrorNoDevice", None) == "no CUDA GPU (the driver sees 0 devices)"
    assert device_problem("cudaErrorDevicesUnavailable", None) == \
        "CUDA cannot list the GPUs (cudaErrorDevicesUnavailable)"
    assert device_problem("cudaSuccess", 1) is None


def test_tensorrt_8_is_refused_in_words():
    problem = tensorrt_version_problem("8.6.1")
    assert problem is not None and "older than 10" in problem and "JetPack 6" in problem
    assert tensorrt_version_problem("10.3.0.30") is None
    assert tensorrt_version_problem("11.1.0") is None


def test_precisions_a_tensorrt_cannot_build_are_named():
    assert precision_problem("10.3.0", "fp16", True, True) is None
    strongly_typed = precision_problem("11.1.0", "fp16", False, False)
    assert strongly_typed is not None and "strongly typed" in strongly_typed
    no_calibrator = precision_problem("11.1.0", "int8", True, False)
    assert no_calibrator is not None and "Q/DQ" in no_calibrator
    unknown = precision_problem("10.3.0", "fp8", False, False)
    assert unknown is not None and "unknown precision" in unknown


def test_the_real_bindings_on_this_machine_give_the_reason_auto_falls_back_with(caplog):
    from cuda.bindings import runtime as cudart

    _, driver = cudart.cudaDriverGetVersion()
    if driver:
        pytest.skip("an NVIDIA driver is present: scripts/gpu-check.sh covers that machine")
    reason = tensorrt_unavailable("fp16")
    assert reason is not None and reason.startswith("no NVIDIA driver")
    with caplog.at_level(logging.INFO, logger="engines.backends"):
        assert resolve_backend("auto", "fp16") == "onnxruntime"
    # Asked for by name, it fails at once with the same words instead of falling back.
    with pytest.raises(EngineError, match="TensorRT unusable: no NVIDIA driver"):
        create_engine(model_path("speech"), backend="tensorrt")


def test_tensorrt_8_bindings_fail_the_import_cleanly_instead_of_crashing_start_up(tmp_path):
    # TensorRT 8.x (JetPack 5) has no IProgressMonitor, which the backend subclasses at import.
    # A package of that version's shape stands in for it here; the import must fail with an
    # ImportError naming the version (a load failure every caller turns into a fallback), not
    # an AttributeError escaping the availability check.
    package = tmp_path / "tensorrt"
    package.mkdir()
    (package / "__init__.py").write_text('__version__ = "8.6.1"\n')
    script = textwrap.dedent("""
        import sys
        try:
            import engines.tensorrt_backend
        except ImportError as exc:
            print("ImportError:", exc)
        """)
    repo = Path(__file__).parents[2]
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True,
                            text=True, env={"PYTHONPATH": f"{tmp_path}:{repo}"}, timeout=60,
                            cwd=repo)
    assert result.returncode == 0, result.stderr
    assert "ImportError: TensorRT 8.6.1 is older than 10" in result.stdout


def test_a_change_to_the_build_recipe_misses_the_cache(tmp_path):
    settings = {"recipe": 2, "workspace_bytes": 1 << 30, "fp32_tf32": False}
    digest = settings_digest(settings)
    assert digest == settings_digest(dict(reversed(list(settings.items()))))  # order-free
    for changed in ({**settings, "workspace_bytes": 1 << 31}, {**settings, "recipe": 3}):
        assert settings_digest(changed) != digest
    key = CacheKey(onnx_sha256="ab" * 32, tensorrt_version="10.3.0", gpu_name="Orin",
                   compute_capability="8.7", precision="fp16", builder_settings=digest,
                   cuda_versions="cuda-python 12.9.10, driver CUDA 12.6")
    cache = EngineCache(tmp_path)
    cache.store(key, b"plan built the old way")
    assert cache.load(key) == b"plan built the old way"
    rebuilt = dataclasses.replace(key, builder_settings=settings_digest(
        {**settings, "recipe": 3}))
    driver_update = dataclasses.replace(key, cuda_versions="cuda-python 12.9.10, driver CUDA 12.8")
    for other in (rebuilt, driver_update):
        assert other.digest() != key.digest()
        assert cache.load(other) is None


def test_data_dependent_output_shapes_are_refused_by_name():
    fixed = [IoTensor("x", True, False, (1, 4)), IoTensor("y", False, False, (1, 2))]
    check_io("engine 'm'", fixed)
    with pytest.raises(EngineError, match=r"output 'indices' has shape \(-1, 2\).*"
                                          "data-dependent"):
        check_io("engine 'm'", [*fixed, IoTensor("indices", False, False, (-1, 2))])


INPUTS = {"audio": ((1, 160), np.dtype(np.float32)), "sr": ((1,), np.dtype(np.int64))}


def _samples(count: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"audio": rng.standard_normal((count, 1, 160)),  # float64, NumPy's default
            "sr": np.full((count, 1), 16000, dtype=np.int64)}


def test_a_float64_calibration_set_is_cast_to_the_inputs_dtype():
    samples = _samples()
    checked = check_calibration("engine 'vad'", samples, INPUTS)
    assert checked["audio"].dtype == np.float32 and checked["audio"].flags.c_contiguous
    np.testing.assert_allclose(checked["audio"], samples["audio"].astype(np.float32))
    assert checked["sr"].dtype == np.int64
    # The bytes TensorRT copies are the float32 values, not float64 bytes read as float32.
    assert checked["audio"][0].nbytes == 160 * 4


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s.pop("sr"), r"missing \['sr'\]"),
    (lambda s: s.update(extra=np.zeros((4, 1))), r"not inputs \['extra'\]"),
    (lambda s: s.update(audio=np.zeros((4, 1, 80))), r"shape \(1, 80\), the input is \(1, 160\)"),
    (lambda s: s.update(sr=np.full((3, 1), 16000)), "same number"),
    (lambda s: s.update(audio=np.zeros((0, 1, 160)), sr=np.zeros((0, 1), np.int64)),
     "same number"),
    (lambda s: s["audio"].__setitem__((1, 0, 5), np.nan), "NaN or inf"),
    (lambda s: s.update(sr=np.full((4, 1), 16000.0)), "give it as integers"),
    (lambda s: s.update(audio=np.full((4, 1, 160), "x")), "not numeric"),
])
def test_bad_calibration_sets_are_refused_before_tensorrt_can_swallow_the_error(change,
                                                                                message):
    samples = _samples()
    change(samples)
    with pytest.raises(EngineError, match=message):
        check_calibration("engine 'vad'", samples, INPUTS)


def test_tensorrt_messages_go_to_python_logging_at_their_severity():
    assert logging_level("Severity.INTERNAL_ERROR") == logging.CRITICAL
    assert logging_level("Severity.ERROR") == logging.ERROR
    assert logging_level("Severity.WARNING") == logging.WARNING
    assert logging_level("Severity.INFO") == logging.INFO
    assert logging_level("Severity.VERBOSE") == logging.DEBUG
