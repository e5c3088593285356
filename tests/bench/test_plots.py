"""`bench ... --plot DIR`: PNGs drawn from short real bench runs, and the accuracy-vs-SNR plot."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the `view` extra (matplotlib) is not installed")

from fusion_node.bench.plots import plot_accuracy_vs_snr, plot_bench
from fusion_node.bench.transport import run_transport_bench
from fusion_node.cli import main
from fusion_node.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk; fails unless the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def assert_drawn(path: Path, size: tuple[int, int]) -> None:
    """A PNG of `size` pixels with something drawn on it (not one flat colour)."""
    from matplotlib.image import imread

    assert path.stat().st_size > 10_000
    assert png_size(path) == size
    pixels = imread(path)
    assert pixels.shape[:2] == (size[1], size[0]) and pixels.std() > 0.05


def test_transport_plots_from_a_short_run(tmp_path):
    samples: dict = {}
    result = run_transport_bench(count=40, warmup=5, frames=False, samples=samples)
    for kind in ("frame", "audio", "joints"):  # every measured message is in the samples
        assert len(samples["kinds"][kind]["ours"]) == result["kinds"][kind]["ours"]["count"]
    written = plot_bench("transport", result, samples, str(tmp_path / "plots"))
    assert [p.name for p in written] == ["bench_transport.json", "transport_latency.png"]
    assert json.loads(written[0].read_text()) == result
    assert_drawn(written[1], (1200, 1050))  # 3 kinds, histogram and CDF side by side


def test_pipeline_plot_from_the_bench_command(tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["--log-level", "WARNING", "bench", "pipeline", "--duration", "2", "--json",
                 "--plot", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((out / "bench_pipeline.json").read_text()) == printed
    assert "samples" not in printed["arrival_after_deadline"]  # raw rows stay out of the JSON
    assert_drawn(out / "pipeline_jitter.png", (1200, 700))  # 2 topics, 2 panels each


def test_engine_plot_from_a_short_run(tmp_path):
    pytest.importorskip("torch", reason="the engine bench compares with torch")
    from fusion_node.bench.engines import run_engine_bench

    samples: dict = {}
    result = run_engine_bench(iterations=10, samples=samples)
    assert set(samples) == {"speech", "action"}
    assert all(len(times) == 10 for model in samples.values() for times in model.values())
    written = plot_bench("engines", result, samples, str(tmp_path))
    assert_drawn(written[-1], (1200, 450))  # one panel per model


def test_accuracy_vs_snr(tmp_path):
    result = {"snr": [-5, 0, 5, 10, 20], "audio_only": [0.2, 0.4, 0.7, 0.85, 0.95],
              "video_only": [0.5, 0.5, 0.5, 0.5, 0.5],
              "audio_video": [0.55, 0.65, 0.8, 0.9, 0.96]}
    path = plot_accuracy_vs_snr(result, tmp_path / "accuracy.png")
    assert_drawn(path, (800, 500))
    result["audio_video_ci95"] = [[v - 0.05, min(1.0, v + 0.05)] for v in result["audio_video"]]
    result["clean"] = {"audio_only": 0.9, "audio_video": 0.97}
    assert_drawn(plot_accuracy_vs_snr(result, tmp_path / "intervals.png"), (800, 500))
    # A rate and its bounds rounded apart: 1.0 with an upper bound of 0.9999 once broke it.
    result["audio_video"][-1] = 1.0
    result["audio_video_ci95"][-1] = [0.93, 0.9999]
    assert_drawn(plot_accuracy_vs_snr(result, tmp_path / "rounded.png"), (800, 500))


@pytest.mark.parametrize("bad, message", [
    ({"snr": [0, 5], "audio_only": [0.1, 0.2], "video_only": [0.1, 0.2]}, "missing keys"),
    ({"snr": [0, 5], "audio_only": [0.1], "video_only": [0.1, 0.2],
      "audio_video": [0.1, 0.2]}, "differ in length"),
    ({"snr": [0, 5], "audio_only": [0.1, 1.5], "video_only": [0.1, 0.2],
      "audio_video": [0.1, 0.2]}, "outside"),
    ({"snr": [], "audio_only": [], "video_only": [], "audio_video": []}, "non-empty"),
    ({"snr": ["0"], "audio_only": [0.1], "video_only": [0.1], "audio_video": [0.1]},
     "list of numbers"),
])
def test_accuracy_vs_snr_rejects_bad_results(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        plot_accuracy_vs_snr(bad, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_plot_on_a_bench_without_plots_fails_before_running(capsys, tmp_path):
    assert main(["bench", "record", "--duration", "60", "--plot", str(tmp_path)]) == 1
    assert "has no plots" in capsys.readouterr().err
