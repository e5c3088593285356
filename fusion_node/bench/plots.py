"""PNG plots of the benches (`fusion-node bench ... --plot DIR`) and of the evals
(`fusion-node eval speech|action --plot DIR`).

Each function draws from a bench's raw samples (what the bench measured, message by
message) and writes PNGs of a fixed pixel size: no tight bounding box, so a figure is always
`FIGSIZE × DPI` whatever its labels. matplotlib (the `view` extra) is imported with the Agg
backend inside each function: no display is needed, and importing this module is cheap.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fusion_node.errors import ConfigError

DPI = 100
PLOTTED_BENCHES = ("transport", "pipeline", "engines", "scale")
EVAL_CURVES = (("audio_only", "audio only"), ("video_only", "video only"),
               ("audio_video", "audio + video"))
_PATH_COLOURS = {"raw": "tab:grey", "ours": "tab:blue", "shm": "tab:green",
                 "shm_loan": "tab:olive", "zenoh_shm": "tab:red"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError(f"plots need matplotlib ({exc}); install the `view` extra: "
                          "pip install 'fusion-node[view]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the pixel size stays FIGSIZE × DPI
    _pyplot().close(fig)
    return path


def _us(values_ns: Sequence[float]) -> np.ndarray:
    return np.asarray(values_ns, np.float64) / 1000.0


def _histogram_and_cdf(hist_ax: Any, cdf_ax: Any, series: dict[str, np.ndarray],
                       title: str) -> None:
    """Side by side: a histogram on log-spaced bins, and the empirical CDF, one line per
    path, with each path's median marked."""
    present = {k: v for k, v in series.items() if len(v)}
    if not present:
        hist_ax.text(0.5, 0.5, "no samples", ha="center", transform=hist_ax.transAxes)
        cdf_ax.text(0.5, 0.5, "no samples", ha="center", transform=cdf_ax.transAxes)
        return
    low = max(min(float(v.min()) for v in present.values()), 1e-3)
    high = max(float(v.max()) for v in present.values())
    bins = np.geomspace(low, max(high, low * 1.01), 60)
    for name, values in present.items():
        colour = _PATH_COLOURS.get(name)
        median = float(np.median(values))
        hist_ax.hist(values, bins=bins, histtype="step", linewidth=1.5, color=colour,
                     label=f"{name} (p50 {median:.0f} µs)")
        ordered = np.sort(values)
        cdf_ax.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), color=colour,
                    label=f"{name} (p99 {np.percentile(values, 99):.0f} µs)")
    for ax in (hist_ax, cdf_ax):
        ax.set_xscale("log")
        ax.set_xlabel("one-way latency (µs)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    hist_ax.set_ylabel("messages")
    hist_ax.set_title(f"{title}: histogram")
    cdf_ax.set_ylabel("fraction of messages ≤ x")
    cdf_ax.set_ylim(0, 1.0)
    cdf_ax.set_title(f"{title}: CDF")


def plot_transport(result: dict[str, Any], samples: dict[str, Any], out_dir: Path
                   ) -> list[Path]:
    """`transport_latency.png`: per message kind, histogram and CDF of the protocol's
    one-way latency next to raw pyzmq's (the floor); `transport_frames.png` when the frame
    bench ran: raw, ours and shared memory for each frame size and subscriber count."""
    plt = _pyplot()
    kinds = samples.get("kinds")
    if not isinstance(kinds, dict) or not kinds:
        raise ConfigError("transport plot: the bench returned no per-message samples")
    fig, axes = plt.subplots(len(kinds), 2, figsize=(12, 3.5 * len(kinds)), squeeze=False)
    for row, (kind, paths) in enumerate(kinds.items()):
        payload = result.get("kinds", {}).get(kind, {}).get("payload_bytes")
        title = f"{kind} ({payload:,} B)" if isinstance(payload, int) else kind
        _histogram_and_cdf(axes[row][0], axes[row][1],
                           {"raw": _us(paths.get("raw", [])),
                            "ours": _us(paths.get("ours", []))}, title)
    fig.suptitle(f"fusion-node transport: protocol vs raw pyzmq, {result.get('endpoint')}, "
                 f"{result.get('count')} messages per kind and path")
    fig.tight_layout()
    written = [_save(fig, out_dir / "transport_latency.png")]
    frames = samples.get("frames")
    if isinstance(frames, dict) and frames:
        panels = [(subs, label, by_path) for subs, sizes in frames.items()
                  for label, by_path in sizes.items()]
        fig, axes = plt.subplots(len(panels), 2, figsize=(12, 3.5 * len(panels)),
                                 squeeze=False)
        for row, (subs, label, by_path) in enumerate(panels):
            _histogram_and_cdf(axes[row][0], axes[row][1],
                               {path: _us(values) for path, values in by_path.items()},
                               f"{label} frame, {subs.replace('_', ' ')}")
        fig.suptitle("frames: raw pyzmq, protocol inline, shared memory, Zenoh SHM")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "transport_frames.png"))
    return written


def plot_pipeline(result: dict[str, Any], samples: dict[str, Any], out_dir: Path
                  ) -> list[Path]:
    """`pipeline_jitter.png`: for every prediction, publish time minus deadline (the node's
    jitter) and arrival at a subscriber minus deadline, over the run; late ones in red."""
    plt = _pyplot()
    topics = samples.get("predictions")
    if not isinstance(topics, dict) or not topics:
        raise ConfigError("pipeline plot: the subscriber received no prediction")
    fig, axes = plt.subplots(len(topics), 2, figsize=(12, 3.5 * len(topics)), squeeze=False)
    start_ns = min(rows[0][0] for rows in topics.values() if rows)
    for row, (topic, rows) in enumerate(sorted(topics.items())):
        data = np.asarray(rows, np.float64).reshape(-1, 4)
        t_s = (data[:, 0] - start_ns) / 1e9
        late = data[:, 3] > 0
        for col, (values, what) in enumerate(((data[:, 1], "publish − deadline"),
                                              (data[:, 2], "arrival − deadline"))):
            ax = axes[row][col]
            ms = values / 1e6
            ax.plot(t_s[~late], ms[~late], ".", markersize=3, color="tab:blue",
                    label=f"on time ({int((~late).sum())})")
            if late.any():
                ax.plot(t_s[late], ms[late], "x", color="tab:red",
                        label=f"late ({int(late.sum())})")
            p50, p99 = np.percentile(ms, [50, 99]) if len(ms) else (math.nan, math.nan)
            ax.set_title(f"{topic}: {what} (p50 {p50:.3f}, p99 {p99:.3f} ms)")
            ax.set_xlabel("t_ref since the first prediction (s)")
            ax.set_ylabel("ms")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, loc="upper right")
    engines = result.get("engines", {})
    misses = ", ".join(f"{name} {e.get('deadline_misses')}" for name, e in engines.items())
    fig.suptitle(f"fusion-node pipeline, {result.get('duration_s')} s: deadline misses "
                 f"{misses or 'unknown'}")
    fig.tight_layout()
    return [_save(fig, out_dir / "pipeline_jitter.png")]


def plot_engines(result: dict[str, Any], samples: dict[str, Any], out_dir: Path
                 ) -> list[Path]:
    """`engine_latency.png`: per model, the distribution of batch-1 latency per backend."""
    plt = _pyplot()
    models = {m: b for m, b in samples.items() if isinstance(b, dict) and b}
    if not models:
        raise ConfigError("engines plot: the bench returned no per-call samples")
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, (model, backends) in zip(axes[0], models.items()):
        names = list(backends)
        ax.boxplot([backends[n] for n in names], whis=(1, 99), showfliers=False)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=15, fontsize=8)
        for i, name in enumerate(names, start=1):
            ax.annotate(f"p50 {np.median(backends[name]):.2f}", (i, np.median(backends[name])),
                        textcoords="offset points", xytext=(18, 0), fontsize=7, va="center")
        ax.set_ylabel("latency per call (ms)")
        ax.set_title(f"{model}: {len(next(iter(backends.values())))} calls per backend")
        ax.grid(True, axis="y", alpha=0.3)
    skipped = result.get("skipped") or {}
    note = f"; not run: {', '.join(sorted(skipped))}" if skipped else ""
    fig.suptitle(f"engine latency, batch 1, whiskers p1–p99, {result.get('cpus')} CPUs{note}",
                 fontsize=9)
    fig.tight_layout()
    return [_save(fig, out_dir / "engine_latency.png")]


def plot_scale(result: dict[str, Any], samples: dict[str, Any], out_dir: Path) -> list[Path]:
    """`scale.png`: per configuration (cameras / mic channels / engines), CPU in cores split
    into the node and its driver processes, and each engine's ready-after-t_ref p99 against
    its declared latency."""
    plt = _pyplot()
    rows = result.get("rows") or []
    if not rows:
        raise ConfigError("scale plot: the bench returned no configurations")
    labels = [f"{r['cameras']} cam\n{r['mic_channels']} ch\n{r['engine_count']} eng" for r in rows]
    x = np.arange(len(rows))
    fig, (cpu_ax, ready_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    node = np.array([r["cpu_cores"].get("node", 0.0) for r in rows])
    drivers = np.array([sum(v for k, v in r["cpu_cores"].items() if k.startswith("driver "))
                        for r in rows])
    cpu_ax.bar(x, node, label="node process")
    cpu_ax.bar(x, drivers, bottom=node, label="driver processes")
    cpu_ax.axhline(result.get("cpus") or 0, color="tab:red", linestyle="--", linewidth=1,
                   label=f"{result.get('cpus')} cores")
    cpu_ax.set_xticks(x, labels, fontsize=7)
    cpu_ax.set_ylabel("CPU (cores)")
    cpu_ax.legend(fontsize=8)
    cpu_ax.grid(True, axis="y", alpha=0.3)
    names = sorted({name for r in rows for name in r["engines"]})
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = [r["engines"].get(name, {}).get("ready_after_t_ref_p99_ms") or np.nan
                  for r in rows]
        ready_ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=name)
    for name in names:
        declared = next(r["engines"][name]["declared_latency_ms"] for r in rows
                        if name in r["engines"])
        ready_ax.axhline(declared, linestyle=":", linewidth=1, color="grey")
    ready_ax.set_xticks(x, [f"{lab}\nmisses {r['deadline_misses']}"
                            for lab, r in zip(labels, rows)], fontsize=7)
    ready_ax.set_ylabel("ready after t_ref, p99 (ms); dotted: declared latencies")
    ready_ax.legend(fontsize=8)
    ready_ax.grid(True, axis="y", alpha=0.3)
    largest = result.get("largest_without_misses")
    fig.suptitle(f"bench scale, {result.get('duration_s')} s per configuration; largest "
                 f"without misses: {largest}", fontsize=9)
    fig.tight_layout()
    return [_save(fig, out_dir / "scale.png")]


def _error_bars(rates: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """matplotlib's [below, above] error bars of `rates` from their [low, high] `bounds`.
    Rates and bounds are rounded separately, so a bound can sit a hair past its rate: a
    negative error bar, which matplotlib refuses."""
    return np.stack([np.maximum(rates - bounds[:, 0], 0), np.maximum(bounds[:, 1] - rates, 0)])


def _check_eval(result: dict[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    if not isinstance(result, dict):
        raise ConfigError(f"accuracy-vs-SNR: expected a dict, got {type(result).__name__}")
    keys = ["snr", *(k for k, _ in EVAL_CURVES)]
    missing = [k for k in keys if k not in result]
    if missing:
        raise ConfigError(f"accuracy-vs-SNR: missing keys {missing}; expected {keys}")
    arrays = {}
    for key in keys:
        values = result[key]
        if (not isinstance(values, list) or not values
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in values)):
            raise ConfigError(f"accuracy-vs-SNR: {key!r} must be a non-empty list of "
                              f"numbers, got {values!r}")
        arrays[key] = np.asarray(values, np.float64)
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ConfigError(f"accuracy-vs-SNR: lists differ in length: {lengths}")
    for key, _ in EVAL_CURVES:
        bad = arrays[key][(arrays[key] < 0) | (arrays[key] > 1) | np.isnan(arrays[key])]
        if bad.size:
            raise ConfigError(f"accuracy-vs-SNR: {key!r} holds {bad.tolist()}, outside "
                              "[0, 1] (accuracy is a fraction)")
    return arrays["snr"], {k: arrays[k] for k, _ in EVAL_CURVES}


def plot_accuracy_vs_snr(result: dict[str, Any], path: str | Path,
                         title: str = "command accuracy vs SNR") -> Path:
    """Accuracy (a fraction) against SNR (dB) for audio only, video only and audio + video,
    from the speech eval's `{"snr": [...], "audio_only": [...], "video_only": [...],
    "audio_video": [...]}`; written to `path` (PNG, 800 × 500 px). Optional keys:
    `"<curve>_ci95"`, a [low, high] pair per point, drawn as error bars, and `"clean"`,
    `{curve: rate}` on noise-free audio, drawn as a dashed line of the curve's colour (clean
    audio has no SNR to stand at)."""
    snr, curves = _check_eval(result)
    plt = _pyplot()
    order = np.argsort(snr)
    fig, ax = plt.subplots(figsize=(8, 5))
    clean = result.get("clean", {})
    for (key, label), marker in zip(EVAL_CURVES, "os^"):
        interval = result.get(f"{key}_ci95")
        if interval is not None:
            bounds = np.asarray(interval, np.float64)[order]
            line = ax.errorbar(snr[order], curves[key][order],
                               yerr=_error_bars(curves[key][order], bounds),
                               marker=marker, capsize=3, label=label)[0]
        else:
            (line,) = ax.plot(snr[order], curves[key][order], marker=marker, label=label)
        if key in clean:
            ax.axhline(clean[key], color=line.get_color(), linestyle="--", linewidth=1,
                       label=f"{label}, clean")
    ax.set_xlabel("SNR (dB)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, Path(path))


def _rate(report: dict[str, Any], *keys: str) -> tuple[float, tuple[float, float] | None]:
    """The rate at `keys` in an eval report, with its 95% interval where it has one;
    ConfigError naming the keys if it is not a fraction."""
    value: Any = report
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise ConfigError(f"action eval plot: the report has no {'/'.join(keys)}")
        value = value[key]
    rate = value.get("rate") if isinstance(value, dict) else None
    if (not isinstance(rate, (int, float)) or isinstance(rate, bool)
            or not 0.0 <= rate <= 1.0):
        raise ConfigError(f"action eval plot: {'/'.join(keys)} has rate {rate!r}, not a "
                          "fraction in [0, 1]")
    interval = value.get("ci95")
    if interval is None:
        return float(rate), None
    if (not isinstance(interval, (list, tuple)) or len(interval) != 2
            or not all(isinstance(v, (int, float)) for v in interval)):
        raise ConfigError(f"action eval plot: {'/'.join(keys)} has ci95 {interval!r}, not "
                          "a [low, high] pair")
    return float(rate), (float(interval[0]), float(interval[1]))


def _rate_bars(ax: Any, x: np.ndarray, rows: list[tuple[float, tuple[float, float] | None]],
               width: float, **style: Any) -> None:
    """Bars of rates at `x`, each with its 95% interval where it has one, and its value."""
    rates = np.array([rate for rate, _ in rows])
    bounds = np.array([interval or (rate, rate) for rate, interval in rows])
    ax.bar(x, rates, width, yerr=_error_bars(rates, bounds), capsize=3, **style)
    for xi, rate in zip(x, rates):
        ax.annotate(f"{rate:.0%}", (xi, rate), textcoords="offset points", xytext=(0, 2),
                    ha="center", va="bottom", fontsize=7)


def plot_action_eval(report: dict[str, Any], path: str | Path) -> Path:
    """The action eval (`fusion-node eval action`) in one PNG of 1200 × 500 px, with the 95%
    intervals as error bars. Left, the true command given at t = 0: colour commands reached
    (all, and per colour), home reached, ended at another block, moved with no command;
    the stop figures in the title. Right, commands from the speech engine, audio + video
    beside audio only: success, command latched, wrong target, and false action on
    distractor clips."""
    true, spoken = report.get("true_command"), report.get("from_speech")
    if not isinstance(true, dict) or not isinstance(spoken, dict):
        raise ConfigError("action eval plot: expected a report with `true_command` and "
                          f"`from_speech`, got keys {sorted(report)}")
    colours = list(true.get("colour", {}).get("per_colour", {}))
    left = [("colour\n(all)", _rate(true, "colour"), "tab:blue"),
            *((c, _rate(true, "colour", "per_colour", c), "tab:blue") for c in colours),
            ("home", _rate(true, "home"), "tab:blue"),
            ("ended at\nanother block", _rate(true, "colour", "ended_at_another_block"),
             "tab:red"),
            ("moved, no\ncommand", _rate(true, "no_command", "moved"), "tab:red")]
    figures = (("success", "success"), ("command_latched", "command\nlatched"),
               ("wrong_target", "wrong\ntarget"),
               ("false_action_on_distractor", "false action\n(distractor)"))
    modalities = [(key, label, f"C{i}") for i, (key, label) in enumerate(EVAL_CURVES)
                  if key in spoken.get("success", {})]
    right = {key: [_rate(spoken, figure, key) for figure, _ in figures]
             for key, _, _ in modalities}

    plt = _pyplot()
    fig, (ax_true, ax_speech) = plt.subplots(1, 2, figsize=(12, 5),
                                             gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(left))
    for i, (_, row, colour) in enumerate(left):
        _rate_bars(ax_true, x[i:i + 1], [row], 0.7, color=colour)
    ax_true.set_xticks(x, [label for label, _, _ in left], fontsize=8)
    stop = true.get("stop", {})
    travel, drift = stop.get("mean_travel_after_stop_m"), stop.get("mean_hold_drift_m")
    stop_note = (f"after stop: {travel * 100:.1f} cm travel, then {drift * 100:.2f} cm drift"
                 if isinstance(travel, (int, float)) and isinstance(drift, (int, float)) else "")
    ax_true.set_title(f"true command at t = 0, {true.get('episodes')} episodes\n"
                      f"{stop_note}", fontsize=9)
    width = 0.8 / max(1, len(modalities))
    x = np.arange(len(figures))
    for i, (key, label, colour) in enumerate(modalities):
        _rate_bars(ax_speech, x + (i - (len(modalities) - 1) / 2) * width, right[key], width,
                   color=colour, label=label)
    ax_speech.set_xticks(x, [label for _, label in figures], fontsize=8)
    ax_speech.set_title(f"commands from speech, {spoken.get('episodes')} episodes:\n"
                        f"{spoken.get('condition')}", fontsize=9)
    ax_speech.legend(fontsize=8, loc="upper right")
    for ax in (ax_true, ax_speech):
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("fraction of episodes (95% intervals)")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"fusion-node action eval, closed loop on the arm simulator: "
                 f"{Path(str(true.get('model'))).name}", fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path))


def check_plot_request(bench: str, out_dir: str) -> Path:
    """The plot directory, created; ConfigError before the bench runs if it cannot plot."""
    if bench not in PLOTTED_BENCHES:
        raise ConfigError(f"bench {bench!r} has no plots; --plot works with "
                          f"{', '.join(PLOTTED_BENCHES)}")
    return plot_directory(out_dir)


def plot_directory(out_dir: str) -> Path:
    """`out_dir`, created; ConfigError if matplotlib is missing or the directory cannot be
    made: checked before a bench or an eval runs, not after."""
    _pyplot()
    directory = Path(out_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--plot {out_dir!r}: cannot create the directory ({exc.strerror})"
                          ) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"--plot {out_dir!r}: the directory is not writable")
    return directory


def plot_bench(bench: str, result: dict[str, Any], samples: dict[str, Any], out_dir: str
               ) -> list[Path]:
    """Write the bench's JSON (`bench_<name>.json`) and its PNGs into `out_dir`."""
    directory = check_plot_request(bench, out_dir)
    (directory / f"bench_{bench}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot = {"transport": plot_transport, "pipeline": plot_pipeline,
            "engines": plot_engines, "scale": plot_scale}[bench]
    return [directory / f"bench_{bench}.json", *plot(result, samples, directory)]
