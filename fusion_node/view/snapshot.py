"""`fusion-node view LOG.mcap --snapshot OUT.png`: the viewer's panels as one PNG.

The Rerun viewer cannot be captured without a display and a GPU (under Xvfb its software
renderer draws black), so the pictures in the docs come from here instead: the same decoded
messages, mouth box, latency and action targets as `rerun.py` (both take them from
`common.py`), drawn with matplotlib onto a fixed grid of SIZE_PX pixels. Nothing here needs
a display or rerun.

Time is sensor time (a sample's capture time, a prediction's `t_ref_ns`: Rerun's
`sensor_time` timeline) in seconds since the first sample of the log. The camera panel
shows what Rerun shows with its time cursor at `at_s`: the latest frame captured at or
before it, the mouth box labelled with the latest speech prediction's active-speaker score,
and the latest action chunk as the schematic arm. The latched command is recomputed from
the speech posteriors with the action engine's own `CommandLatch` (one update per speech
prediction; the engine itself sees only those its ticks pick up).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from engines.command_latch import CommandLatch
from engines.vocabulary import COMMANDS
from fusion_node.config import NodeConfig
from fusion_node.errors import ConfigError
from fusion_node.logs.mcap_format import LogReader
from fusion_node.protocol import AudioChunk, Frame, Health, JointState, Prediction
from fusion_node.view.common import (
    LATENCY_NAMES,
    SpeechView,
    arm_points,
    due_step,
    latency_ms,
    log_config,
    log_messages,
    mouth_crop,
    rgb,
    speech_views,
    waveform,
)

DPI = 100
FIGSIZE = (16.0, 10.0)
SIZE_PX = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
# Panels at fixed places (left, bottom, width, height as fractions of the figure), so the
# picture has the same layout whatever the log holds; tests find the camera panel by it.
CAMERA_RECT = (0.025, 0.475, 0.34, 0.435)
MOUTH_RECT = (0.025, 0.215, 0.34, 0.215)
NOTES_RECT = (0.025, 0.025, 0.34, 0.15)
_SERIES_LEFT, _SERIES_WIDTH = 0.425, 0.435  # the legends sit to the right of the series
_SERIES_TOP, _TITLE_GAP = 0.91, 0.037
_SERIES_HEIGHTS = {"audio": 0.085, "voice": 0.1, "posterior": 0.175, "joints": 0.15,
                   "latency": 0.15}
TOP_COMMANDS = 5
_PUBLISH = LATENCY_NAMES.index("capture→publish")
_READY = LATENCY_NAMES.index("capture→ready")
_GREEN, _GREY, _YELLOW = "#28c83c", "#c8c8c8", "#fac828"
_LATE = "#e63232"


@dataclass
class LogContent:
    """What the snapshot draws, gathered in one pass over the log (frames are read again,
    for the one frame drawn: keeping every image would hold the whole log in memory)."""

    start_ns: int | None = None
    end_ns: int | None = None
    frame_times: dict[str, list[int]] = field(default_factory=dict)
    # Per microphone, per chunk: start and end time, lowest and highest sample (full scale 1).
    audio: dict[str, list[tuple[int, int, float, float]]] = field(default_factory=dict)
    joints: dict[str, tuple[tuple[str, ...], list[int], list[np.ndarray]]] = field(
        default_factory=dict)
    predictions: dict[str, list[Prediction]] = field(default_factory=dict)
    node_deadline_misses: dict[str, int] = field(default_factory=dict)

    def _span(self, start_ns: int, end_ns: int | None = None) -> None:
        end_ns = start_ns if end_ns is None else end_ns
        self.start_ns = start_ns if self.start_ns is None else min(self.start_ns, start_ns)
        self.end_ns = end_ns if self.end_ns is None else max(self.end_ns, end_ns)

    def add(self, msg: Any) -> None:
        if isinstance(msg, Frame):
            self.frame_times.setdefault(msg.stream, []).append(msg.t_capture_ns)
            self._span(msg.t_capture_ns)
        elif isinstance(msg, AudioChunk):
            values = waveform(msg)
            end_ns = msg.t_capture_ns + len(values) * 1_000_000_000 // msg.sample_rate
            if len(values):
                self.audio.setdefault(msg.stream, []).append(
                    (msg.t_capture_ns, end_ns, float(values.min()), float(values.max())))
            self._span(msg.t_capture_ns, end_ns)
        elif isinstance(msg, JointState):
            _, times, positions = self.joints.setdefault(msg.stream, (msg.names, [], []))
            times.append(msg.t_capture_ns)
            positions.append(np.asarray(msg.position, np.float64))
            self._span(msg.t_capture_ns)
        elif isinstance(msg, Prediction):
            self.predictions.setdefault(msg.stream, []).append(msg)
            self._span(msg.t_ref_ns)
        elif isinstance(msg, Health):
            engines = msg.stats.get("engines")
            for name, stats in (engines.items() if isinstance(engines, dict) else ()):
                misses = stats.get("deadline_misses") if isinstance(stats, dict) else None
                if isinstance(misses, int) and not isinstance(misses, bool):
                    self.node_deadline_misses[name] = misses

    def seconds(self, t_ns: Any) -> Any:
        """Seconds since the log's first sample."""
        assert self.start_ns is not None
        return (np.asarray(t_ns, np.float64) - self.start_ns) / 1e9

    @property
    def duration_s(self) -> float:
        assert self.start_ns is not None and self.end_ns is not None
        return (self.end_ns - self.start_ns) / 1e9

    def speech_topics(self) -> list[str]:
        return [t for t, preds in self.predictions.items()
                if "command_posterior" in preds[0].arrays]

    def action_topics(self) -> list[str]:
        return [t for t, preds in self.predictions.items()
                if "actions" in preds[0].arrays and "step_times_ns" in preds[0].arrays]

    def model_hashes(self) -> dict[str, list[str]]:
        """Per engine, the model hashes its predictions carry, in order of appearance."""
        hashes: dict[str, list[str]] = {}
        for preds in self.predictions.values():
            for pred in preds:
                seen = hashes.setdefault(pred.engine, [])
                if pred.model_hash not in seen:
                    seen.append(pred.model_hash)
        return hashes


def _latest_at(times_ns: Sequence[int], t_ns: int) -> int | None:
    """Index of the last of the sorted `times_ns` at or before `t_ns`, as Rerun's time
    cursor picks; None if all are later."""
    index = int(np.searchsorted(np.asarray(times_ns, np.int64), t_ns, side="right")) - 1
    return index if index >= 0 else None


def _frame_at(reader: LogReader, path: str, camera: str, t_ns: int) -> Frame:
    """The latest frame of `camera` captured at or before `t_ns` (else its first frame)."""
    chosen: Frame | None = None
    for message in reader.messages([camera]):
        frame = message.decode(path)
        assert isinstance(frame, Frame)
        if chosen is not None and frame.t_capture_ns > t_ns:
            break
        chosen = frame
    if chosen is None:
        raise ConfigError(f"{path}: no frame of {camera}")
    return chosen


def _pick_camera(path: str, content: LogContent,
                 speech: Sequence[SpeechView]) -> tuple[str, SpeechView | None]:
    """The speech engine's camera (the viewer's main panel), else the first camera."""
    if not content.frame_times:
        raise ConfigError(f"{path}: no camera frames to draw")
    for view in speech:
        if view.camera in content.frame_times:
            return view.camera, view
    return min(content.frame_times), None


def snapshot_log(path: str, out: str, *, config: NodeConfig | None = None,
                 at_s: float | None = None, duration_s: float | None = None) -> dict[str, Any]:
    """Draw the log `path` (its first `duration_s` seconds, by receive time) into the PNG
    `out`, the camera at `at_s` seconds of sensor time (default: the middle of the log).
    The mouth box comes from `config`, else the launch config stored in the log. Returns
    what was drawn."""
    config = config or log_config(path)
    speech = speech_views(config)
    content = LogContent()
    with LogReader(path) as reader:
        for msg in log_messages(reader, path, duration_s):
            content.add(msg)
        if not content.predictions:
            raise ConfigError(f"{path}: no predictions to draw")
        camera, view = _pick_camera(path, content, speech)
        if at_s is None:
            at_s = content.duration_s / 2
        if not 0 <= at_s <= content.duration_s:
            raise ConfigError(f"view --at {at_s:g}: the log spans 0 to "
                              f"{content.duration_s:.2f} s of sensor time")
        assert content.start_ns is not None
        at_ns = content.start_ns + round(at_s * 1e9)
        frame = _frame_at(reader, path, camera, at_ns)
    figure = _draw(Path(path).name, content, frame, view, at_ns)
    _save(figure, out)
    return {"snapshot": out, "at_s": round(at_s, 3), "camera": camera,
            "frame_s": round(float(content.seconds(frame.t_capture_ns)), 3),
            "duration_s": round(content.duration_s, 3),
            "predictions": {t: len(p) for t, p in content.predictions.items()},
            "model_hashes": content.model_hashes()}


def _save(figure: Figure, out: str) -> None:
    """Write the PNG beside `out`, then rename it over `out`: a failed draw leaves an
    existing file as it was."""
    folder = os.path.dirname(out) or "."
    handle, temporary = tempfile.mkstemp(suffix=".png", dir=folder)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 is for secrets, not pictures
        # No bbox_inches="tight": the picture stays SIZE_PX whatever its labels.
        figure.savefig(temporary, dpi=DPI)
        os.replace(temporary, out)
    except BaseException:
        os.unlink(temporary)
        raise


# -- drawing ---------------------------------------------------------------------------------

def _draw(name: str, content: LogContent, frame: Frame, view: SpeechView | None,
          at_ns: int) -> Figure:
    with matplotlib.rc_context({"font.size": 8.5, "axes.titlesize": 10,
                                "axes.titlelocation": "left", "legend.fontsize": 8,
                                "axes.grid": True, "grid.alpha": 0.3}):
        figure = Figure(figsize=FIGSIZE, dpi=DPI)
        hashes = "; ".join(f"{engine} {', '.join(found)}"
                           for engine, found in sorted(content.model_hashes().items()))
        figure.suptitle(f"{name}: {content.duration_s:.1f} s, time cursor at "
                        f"{content.seconds(at_ns):.2f} s    model hashes: {hashes}",
                        x=0.025, y=0.975, ha="left", fontsize=12, fontweight="bold")
        # The launch config's speech topic, if the drawn span holds any of its predictions.
        speech_topic = (view.topic if view is not None and view.topic in content.predictions
                        else next(iter(content.speech_topics()), None))
        _camera(figure.add_axes(CAMERA_RECT), content, frame, view, at_ns)
        _mouth(figure.add_axes(MOUTH_RECT), frame, view)
        _notes(figure.add_axes(NOTES_RECT), content, speech_topic, at_ns)
        series = _series_axes(figure)
        _audio(series["audio"], content)
        _voice(series["voice"], content)
        _posterior(series["posterior"], content, speech_topic)
        _joints(series["joints"], content)
        _latency(series["latency"], content)
        at_s = float(content.seconds(at_ns))
        for ax in series.values():
            ax.axvline(at_s, color="black", linestyle="--", linewidth=0.8)
            ax.set_xlim(0, content.duration_s)
        series["latency"].set_xlabel("seconds of sensor time since the log's first sample "
                                     "(dashed: the time cursor, where the images are taken)")
    return figure


def _series_axes(figure: Figure) -> dict[str, Any]:
    """The time series, stacked on one time axis; only the lowest shows the time labels."""
    axes: dict[str, Any] = {}
    top = _SERIES_TOP
    shared = None
    for key, height in _SERIES_HEIGHTS.items():
        bottom = top - height
        ax = figure.add_axes((_SERIES_LEFT, bottom, _SERIES_WIDTH, height), sharex=shared)
        shared = shared or ax
        axes[key] = ax
        top = bottom - _TITLE_GAP
    for ax in list(axes.values())[:-1]:
        ax.tick_params(labelbottom=False)
    return axes


def _legend(ax: Any, **kwargs: Any) -> None:
    """Outside the plot, to its right: the curves stay uncovered."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              frameon=False, **kwargs)


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_yticks([])


def _latest(preds: Sequence[Prediction], at_ns: int) -> Prediction | None:
    index = _latest_at([p.t_ref_ns for p in preds], at_ns)
    return None if index is None else preds[index]


def _camera(ax: Any, content: LogContent, frame: Frame, view: SpeechView | None,
            at_ns: int) -> None:
    image = rgb(frame)
    height, width = image.shape[:2]
    ax.imshow(image if image.shape[2] == 3 else image[..., 0], cmap="gray",
              interpolation="nearest")
    ax.set_title(f"{frame.stream} at {content.seconds(frame.t_capture_ns):.2f} s "
                 f"({width}x{height}), mouth box and action chunk")
    ax.axis("off")
    speech = (_latest(content.predictions.get(view.topic, []), at_ns)
              if view is not None else None)
    score = speech.fields.get("active_speaker") if speech is not None else None
    if view is not None:
        x, y, w, h = view.mouth_roi
        talking = speech is not None and bool(speech.fields.get("speaker_visible_talking"))
        colour = _GREEN if talking else _GREY
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=2))
        label = ("active speaker " + (f"{score:.2f}" if isinstance(score, float) else "—")
                 + (" (talking)" if talking else ""))
        ax.text(x + w / 2, y + h + 6, label, ha="center", va="top", fontsize=9,
                color="white", bbox={"facecolor": "black", "alpha": 0.6, "pad": 2,
                                     "edgecolor": "none"})
    drawn = [np.array([[-0.5, -0.5], [width - 0.5, height - 0.5]])]
    for topic in content.action_topics():
        action = _latest(content.predictions[topic], at_ns)
        if action is None:
            continue
        actions = np.asarray(action.arrays["actions"], np.float64)
        if actions.ndim != 2 or not len(actions):
            continue
        # As in Rerun: grey the arm at the chunk's first step, green at its last, yellow
        # the tip's path through every step.
        first, last = arm_points(actions[0], width, height), arm_points(actions[-1], width,
                                                                        height)
        tip = np.stack([arm_points(a, width, height)[-1] for a in actions])
        ax.plot(first[:, 0], first[:, 1], color=_GREY, linewidth=1.5)
        ax.plot(last[:, 0], last[:, 1], color=_GREEN, linewidth=2)
        ax.plot(tip[:, 0], tip[:, 1], color=_YELLOW, linewidth=1.2)
        drawn += [first, last, tip]
    # As Rerun's 2D view, the panel fits the image and everything drawn on it: the
    # schematic arm may reach past the image's edge.
    low, high = np.concatenate(drawn).min(axis=0), np.concatenate(drawn).max(axis=0)
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(high[1], low[1])


def _mouth(ax: Any, frame: Frame, view: SpeechView | None) -> None:
    crop = mouth_crop(rgb(frame), view.mouth_roi) if view is not None else None
    ax.axis("off")
    if crop is None:
        ax.set_title("mouth crop")
        _empty(ax, "no mouth box on this camera")
        return
    x, y, w, h = view.mouth_roi  # type: ignore[union-attr]
    ax.imshow(crop if crop.shape[2] == 3 else crop[..., 0], cmap="gray",
              interpolation="nearest")
    ax.set_title(f"mouth crop [{x}, {y}, {w}, {h}] as the speech engine sees it")


def _notes(ax: Any, content: LogContent, speech_topic: str | None, at_ns: int) -> None:
    """The values at the time cursor, deadline misses, and the command changes."""
    ax.axis("off")
    lines = []
    speech = _latest(content.predictions.get(speech_topic, []), at_ns) if speech_topic else None
    if speech is not None:
        fields = speech.fields
        lines.append(
            f"{speech_topic} at {content.seconds(speech.t_ref_ns):.2f} s: command "
            f"{fields.get('command')} ({_number(fields.get('command_confidence'))}), "
            f"voice activity {_number(fields.get('voice_activity'))}, active speaker "
            f"{_number(fields.get('active_speaker'))}")
    late = ", ".join(f"{topic} {sum(p.late for p in preds)} of {len(preds)}"
                     for topic, preds in sorted(content.predictions.items()))
    lines.append(f"late predictions: {late}")
    if content.node_deadline_misses:
        lines.append("node.health deadline misses: " + ", ".join(
            f"{engine} {n}" for engine, n in sorted(content.node_deadline_misses.items())))
    if speech_topic is not None:
        changes, previous = [], None
        for pred in content.predictions[speech_topic]:
            command = pred.fields.get("command")
            if command != previous:
                changes.append(f"{content.seconds(pred.t_ref_ns):.2f} s {command}")
                previous = command
        shown = changes[:8] + (["…"] if len(changes) > 8 else [])
        lines.append(f"{speech_topic} command changes: " + ", ".join(shown))
    ax.text(0.0, 1.0, "\n".join(lines), ha="left", va="top", transform=ax.transAxes,
            fontsize=9, wrap=True, linespacing=1.6)


def _number(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else "—"


def _audio(ax: Any, content: LogContent) -> None:
    ax.set_title("audio: waveform of channel 0 (lowest and highest sample of each chunk)")
    if not content.audio:
        _empty(ax, "no audio in the log")
        return
    for stream, chunks in sorted(content.audio.items()):
        table = np.array(chunks, np.float64)
        # Each chunk spans its own time: its lowest and highest sample drawn as a band.
        times = content.seconds(table[:, :2].ravel())
        low, high = np.repeat(table[:, 2], 2), np.repeat(table[:, 3], 2)
        ax.fill_between(times, low, high, linewidth=0.4, label=stream)
    # Scaled to the loudest sample, as Rerun does: speech rarely nears full scale.
    peak = max(max(abs(c[2]), abs(c[3])) for chunks in content.audio.values() for c in chunks)
    ax.set_ylim(-1.1 * max(peak, 0.01), 1.1 * max(peak, 0.01))
    ax.set_ylabel("full scale 1")
    _legend(ax)


def _voice(ax: Any, content: LogContent) -> None:
    topics = content.speech_topics()
    ax.set_title("voice activity and active speaker (speech predictions)")
    if not topics:
        _empty(ax, "no speech predictions")
        return
    for topic in topics:
        preds = content.predictions[topic]
        times = content.seconds([p.t_ref_ns for p in preds])
        for name in ("voice_activity", "active_speaker"):
            values = [p.fields.get(name) for p in preds]
            values = [v if isinstance(v, float) else np.nan for v in values]
            ax.plot(times, values, linewidth=1.2,
                    label=f"{topic} {name.replace('_', ' ')}")
    ax.axhline(0.5, color="grey", linewidth=0.7, linestyle=":", label="0.5: active")
    ax.set_ylim(-0.05, 1.05)
    ax.set_yticks([0, 0.5, 1])
    ax.set_ylabel("probability")
    _legend(ax)


def _posterior(ax: Any, content: LogContent, topic: str | None) -> None:
    if topic is None:
        ax.set_title("command posterior")
        _empty(ax, "no speech predictions")
        return
    preds = content.predictions[topic]
    posterior = np.array([p.arrays["command_posterior"] for p in preds], np.float64)
    names = list(COMMANDS) if posterior.shape[1] == len(COMMANDS) else [
        f"class {i}" for i in range(posterior.shape[1])]
    top = sorted(np.argsort(-posterior.max(axis=0), kind="stable")[:TOP_COMMANDS])
    ax.set_title(f"{topic} command posterior (the {len(top)} of {len(names)} commands "
                 "highest at any time); band: latched command")
    times = content.seconds([p.t_ref_ns for p in preds])
    colours = {}
    for index in top:
        (line,) = ax.plot(times, posterior[:, index], linewidth=1.2, label=names[index])
        colours[index] = line.get_color()
    ax.set_ylim(-0.03, 1.3)
    ax.set_yticks([0, 0.5, 1])
    ax.set_ylabel("probability")
    if len(names) == len(COMMANDS):
        _latched_band(ax, times, posterior, colours, content.duration_s)
    _legend(ax)


def _latched_band(ax: Any, times: np.ndarray, posterior: np.ndarray,
                  colours: dict[int, str], duration_s: float) -> None:
    """Above the curves, a bar per span during which one command was latched."""
    latch = CommandLatch()
    latched = [latch.update(row) for row in posterior]
    starts = [i for i, command in enumerate(latched) if i == 0 or command != latched[i - 1]]
    px_per_s = ax.get_position().width * FIGSIZE[0] * DPI / (duration_s or 1.0)
    for n, i in enumerate(starts):
        command = latched[i]
        start = float(times[i])
        end = float(times[starts[n + 1]]) if n + 1 < len(starts) else float(times[-1])
        taken = command != 0  # 0: nothing taken yet
        ax.fill_between([start, end], 1.08, 1.24, linewidth=0, alpha=0.3 if taken else 0.15,
                        color=colours.get(command, "black") if taken else "grey")
        label = f"latched: {COMMANDS[command]}" if taken else "nothing latched"
        # A label wider than its span would run into the next one: left out.
        if len(label) * 6 + 8 < (end - start) * px_per_s:
            ax.text(start, 1.16, f" {label}", va="center", ha="left", fontsize=8,
                    fontweight="bold" if taken else "normal")


def _joints(ax: Any, content: LogContent) -> None:
    ax.set_title("joints: measured (solid) and action targets due on arrival (dashed)")
    if not content.joints:
        _empty(ax, "no joint states in the log")
        return
    colours: dict[str, str] = {}
    for stream, (names, times, positions) in sorted(content.joints.items()):
        table = np.stack(positions)
        for j, joint in enumerate(names):
            (line,) = ax.plot(content.seconds(times), table[:, j], linewidth=1.2,
                              label=f"{joint} measured")
            colours[joint] = line.get_color()
    for topic in content.action_topics():
        due_times, targets, names = [], [], None
        for pred in content.predictions[topic]:
            actions = np.asarray(pred.arrays["actions"], np.float64)
            step_times = np.asarray(pred.arrays["step_times_ns"], np.int64)
            if actions.ndim != 2 or not len(actions) or len(step_times) != len(actions):
                continue
            due = due_step(step_times, pred.deadline_ns)
            due_times.append(int(step_times[due]))
            targets.append(actions[due])
            joint_names = pred.fields.get("joint_names")
            names = joint_names if isinstance(joint_names, list) else None
        if not targets:
            continue
        table = np.stack(targets)
        names = names if names and len(names) == table.shape[1] else [
            f"joint {j}" for j in range(table.shape[1])]
        for j, joint in enumerate(names):
            ax.plot(content.seconds(due_times), table[:, j], linestyle="--", linewidth=1.2,
                    color=colours.get(joint), label=f"{joint} target")
    ax.set_ylabel("rad")
    _legend(ax, ncol=1)


def _latency(ax: Any, content: LogContent) -> None:
    ax.set_title("latency from capture to publish (solid) and to the result being ready "
                 "(dotted); × late")
    for topic, preds in sorted(content.predictions.items()):
        times = content.seconds([p.t_ref_ns for p in preds])
        latencies = np.array([latency_ms(p) for p in preds]).reshape(len(preds), -1)
        publish = latencies[:, _PUBLISH]
        late = np.array([p.late for p in preds], bool)
        (line,) = ax.plot(times, publish, linewidth=1.2,
                          label=f"{topic}: {int(late.sum())} late of {len(preds)}")
        # The node holds a result until its deadline: ready shows the time left over.
        ax.plot(times, latencies[:, _READY], linewidth=1.0, linestyle=":",
                color=line.get_color())
        if late.any():
            ax.plot(times[late], publish[late], "x", color=_LATE, markersize=6)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("ms")
    _legend(ax)

