"""scripts/gpu-check.sh: a clean "no GPU" here, and a skipped TensorRT test counts as a failure
(the GPU run it exists for must not pass having tested nothing)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_the_script_says_so_in_one_json_and_exits_0():
    if _gpu_check().gpu_present() is None:
        pytest.skip("a GPU is present: the script runs its full checklist there")
    result = subprocess.run(["bash", "scripts/gpu-check.sh"], cwd=REPO, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["gpu"] is False and summary["ok"] is True
    assert summary["reason"].startswith("no NVIDIA driver")
    assert summary["versions"]["cuda_python"].startswith("12.")


def test_skipped_tensorrt_parity_tests_are_not_ok():
    gpu_check = _gpu_check()
    if gpu_check.gpu_present() is None:
        pytest.skip("a GPU is present: there the TensorRT tests must run")
    counts = gpu_check.parity_tests()
    assert counts["tests"] > 0 and counts["skipped"] > 0  # the four TensorRT parity cases
    assert counts["ok"] is False
