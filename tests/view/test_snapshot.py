"""`fusion-node view LOG --snapshot OUT.png`: the viewer's panels as a PNG, without Rerun."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="the `view` extra (matplotlib) is not installed")

from matplotlib.image import imread

from fusion_node.cli import main
from fusion_node.logs.mcap_format import LogReader, LogWriter
from fusion_node.view.snapshot import CAMERA_RECT, SIZE_PX

SAMPLE = str(Path(__file__).parents[1] / "data" / "sample.mcap")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk; fails unless the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def camera_pixels(pixels: np.ndarray) -> np.ndarray:
    """The middle half of the camera panel (CAMERA_RECT, in figure fractions from the
    bottom left): inside the drawn image whatever the margins its aspect ratio leaves."""
    height, width = pixels.shape[:2]
    left, bottom, panel_w, panel_h = CAMERA_RECT
    x0, x1 = width * (left + panel_w / 4), width * (left + 3 * panel_w / 4)
    y0 = height * (1 - bottom - 3 * panel_h / 4)
    y1 = height * (1 - bottom - panel_h / 4)
    return pixels[round(y0):round(y1), round(x0):round(x1), :3]


def error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_snapshot_of_the_sample_log(tmp_path, capsys):
    out = tmp_path / "viewer.png"
    assert main(["view", SAMPLE, "--snapshot", str(out), "--nice", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["snapshot"] == str(out) and result["camera"] == "camera.front"
    assert result["at_s"] == pytest.approx(result["duration_s"] / 2, abs=1e-3)
    assert result["frame_s"] <= result["at_s"]  # the frame Rerun's cursor would show
    assert set(result["model_hashes"]) == {"speech", "action"}

    assert out.stat().st_size > 10_000
    assert png_size(out) == SIZE_PX
    pixels = imread(out)
    assert pixels.shape[:2] == (SIZE_PX[1], SIZE_PX[0]) and pixels.std() > 0.05
    camera = camera_pixels(pixels)
    assert camera.std() > 0.05  # the face on its background, not a flat panel
    assert len(np.unique(camera.reshape(-1, 3), axis=0)) > 20

    # Without --force the picture stays as it is.
    before = out.read_bytes()
    assert main(["view", SAMPLE, "--snapshot", str(out), "--nice", "0"]) == 1
    lines = error_lines(capsys)
    assert len(lines) == 1 and "exists" in lines[0]
    assert out.read_bytes() == before

    # With --force, in a process without a display: rerun is never imported, and the same
    # log draws the same picture.
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    script = ("import sys; from fusion_node.cli import main; "
              f"code = main(['view', {SAMPLE!r}, '--snapshot', {str(out)!r}, '--force', "
              "'--nice', '0']); "
              "assert 'rerun' not in sys.modules, 'the snapshot imported rerun'; "
              "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == before


def test_at_moves_the_camera_and_must_lie_inside_the_log(tmp_path, capsys):
    out = tmp_path / "talking.png"
    assert main(["view", SAMPLE, "--snapshot", str(out), "--at", "0.7", "--nice", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["frame_s"] == pytest.approx(0.7, abs=0.05)
    assert main(["view", SAMPLE, "--snapshot", str(tmp_path / "late.png"), "--at", "60",
                 "--nice", "0"]) == 1
    lines = error_lines(capsys)
    assert len(lines) == 1 and "the log spans 0 to" in lines[0]
    assert not (tmp_path / "late.png").exists()


@pytest.mark.parametrize("log, message", [
    ("missing.mcap", "cannot read log"),
    ("predictions-only.mcap", "no camera frames to draw"),
])
def test_snapshot_refuses_a_log_it_cannot_draw(log, message, tmp_path, capsys):
    path = tmp_path / log
    if log == "predictions-only.mcap":
        writer = LogWriter(str(path))
        with LogReader(SAMPLE) as reader:
            for recorded in reader.messages(["pred.speech", "pred.action"]):
                writer.write(recorded.decode(SAMPLE), recorded.log_time_ns,
                             recorded.parts(SAMPLE))
        writer.close()
    out = tmp_path / "out.png"
    assert main(["view", str(path), "--snapshot", str(out), "--nice", "0"]) == 1
    lines = error_lines(capsys)
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


def test_snapshot_of_seconds_without_predictions(tmp_path, capsys):
    out = tmp_path / "early.png"
    # A span that ends before the log's first prediction.
    from fusion_node.logs.mcap_format import LogReader

    with LogReader(SAMPLE) as reader:
        times = [m.log_time_ns for m in reader.messages()]
        first_prediction = min(m.log_time_ns for m in reader.messages(["pred.speech",
                                                                        "pred.action"]))
    before_s = (first_prediction - min(times)) / 1e9 / 2
    assert main(["view", SAMPLE, "--snapshot", str(out), "--duration", f"{before_s:.4f}",
                 "--nice", "0"]) == 1
    lines = error_lines(capsys)
    assert len(lines) == 1 and "no predictions to draw" in lines[0]
    assert not out.exists() and not list(tmp_path.iterdir())  # no temporary left behind


@pytest.mark.parametrize("argv, message", [
    (["view", "--snapshot", "x.png"], "give the log"),
    (["view", SAMPLE, "--at", "1"], "give --snapshot"),
    (["view", SAMPLE, "--snapshot", "x.jpg"], "must name a .png"),
    (["view", SAMPLE, "--snapshot", "x.png", "--save", "x.rrd"], "not with --save"),
])
def test_snapshot_options(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--nice", "0"]) == 1
    lines = error_lines(capsys)
    assert len(lines) == 1 and message in lines[0]


def test_viewing_without_a_display_says_what_to_do_instead(capsys, monkeypatch):
    # A viewer spawned without a display failed in the background and the command hung.
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert main(["view", SAMPLE, "--nice", "0"]) == 1
    lines = error_lines(capsys)
    assert len(lines) == 1 and "no display" in lines[0] and "--snapshot" in lines[0]
