"""`fusion-node check`: optional parts named in one line, never an error from deep inside."""

import json
from pathlib import Path

from fusion_node.cli import main
from fusion_node.cli.check import parts_used_by
from fusion_node.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_every_part_is_reported_with_what_loaded(capsys):
    assert main(["check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"face landmarker", "rerun", "tensorrt", "portaudio", "torch"}
    assert report["face landmarker"] == {"ok": True, "detail": "face models on onnxruntime"}
    assert report["rerun"]["ok"] and report["rerun"]["detail"].startswith("rerun-sdk ")
    for result in report.values():
        assert result["ok"] or result["remedy"]


def test_a_launch_file_is_checked_for_the_parts_it_uses():
    assert parts_used_by(load_config(REPO / "launch" / "webcam.toml")) == [
        "face landmarker", "portaudio"]
    assert parts_used_by(load_config()) == []  # the simulated robot needs none


def test_a_part_a_launch_file_needs_that_cannot_load_fails_in_one_line(tmp_path, capsys):
    text = (REPO / "launch" / "sim.toml").read_text()
    assert 'binding = "action"' in text
    launch = tmp_path / "gpu.toml"
    launch.write_text(text.replace('binding = "action"', 'binding = "action"\nbackend = '
                                   '"tensorrt"', 1))
    assert main(["check", "--config", str(launch)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    from engines.backends import tensorrt_unavailable

    assert f"cannot load tensorrt: ImportError: {tensorrt_unavailable()}" in error
    assert "TensorRT from NVIDIA" in error
