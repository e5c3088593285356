"""The training commands as a user meets them: no overwrite without --force, and Ctrl-C
stops them with one line and nothing written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("torch")


@pytest.mark.parametrize("module", ["training.train_speech", "training.train_action"])
def test_an_existing_model_is_not_replaced_without_force(tmp_path, module):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"keep me")
    result = subprocess.run([sys.executable, "-m", module, "--out", str(out), "--tiny"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert f"{out} exists; pass --force to replace it" in result.stderr
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("module", ["training.train_speech", "training.train_action"])
def test_ctrl_c_stops_training_with_one_line_and_writes_nothing(tmp_path, module):
    out = tmp_path / "model.onnx"
    process = subprocess.Popen([sys.executable, "-m", module, "--out", str(out), "--steps",
                                "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        time.sleep(10)  # imported and under way; a Ctrl-C at any point must stop it cleanly
        os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert f"interrupted; {out} not written" in stderr
    assert not out.exists()
