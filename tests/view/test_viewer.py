"""`fusion-node view`: a log and a live stream into Rerun, read back with Rerun's own loader."""

from __future__ import annotations

import json
import math
import threading
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import zmq

pytest.importorskip("rerun", reason="the `view` extra (rerun-sdk) is not installed")

from rerun.chunk import RrdReader

from fusion_node.cli import main
from fusion_node.clock import MonotonicClock
from fusion_node.config import load_config
from fusion_node.errors import ConfigError
from fusion_node.logs.inspect import log_info
from fusion_node.logs.mcap_format import LogReader
from fusion_node.logs.replay import publish_log
from fusion_node.protocol import AudioChunk, Frame, Health, JointState, Prediction
from fusion_node.view.rerun import (
    arm_points,
    speech_views,
    view_live,
    view_log,
)

SAMPLE = str(Path(__file__).parents[1] / "data" / "sample.mcap")


def read_rrd(path: Path) -> dict[str, list[Any]]:
    """Temporal rows per entity path, each as {column: value}, through Rerun's reader."""
    rows: dict[str, list[Any]] = defaultdict(list)
    for chunk in RrdReader(path).stream():
        if chunk.is_static:
            continue
        batch = chunk.to_record_batch()
        # Times as integer ns: Python's timedelta has only µs.
        table = {name: (column.cast(pa.int64()) if pa.types.is_duration(column.type)
                        else column).to_pylist()
                 for name, column in zip(batch.schema.names, batch.columns)}
        for i in range(chunk.num_rows):
            rows[chunk.entity_path.lstrip("/")].append({k: v[i] for k, v in table.items()})
    return rows


def expected_counts(path: str, max_log_ns: float = math.inf) -> Counter[str]:
    """Rows each entity must hold, counted from the log itself."""
    counts: Counter[str] = Counter()
    last_command: dict[str, str] = {}
    cameras: list[str] = []  # action chunks are drawn on every camera seen so far
    with LogReader(path) as reader:
        first_ns = None
        for message in reader.messages():
            first_ns = message.log_time_ns if first_ns is None else first_ns
            if message.log_time_ns - first_ns > max_log_ns:
                break
            msg = message.decode(path)
            if isinstance(msg, Frame):
                counts[f"camera/{msg.stream}"] += 1
                if msg.stream == "camera.front":  # the speech engine's camera
                    counts[f"mouth/{msg.stream}"] += 1
                if msg.stream not in cameras:
                    cameras.append(msg.stream)
            elif isinstance(msg, AudioChunk):
                counts[f"audio/{msg.stream}/waveform"] += len(msg.samples)
            elif isinstance(msg, JointState):
                counts[f"joints/{msg.stream}/position"] += 1
            elif isinstance(msg, Prediction):
                counts[f"latency/{msg.stream}"] += 1
                counts[f"deadline_misses/{msg.stream}"] += 1
                counts["events"] += int(msg.late)
                if "command_posterior" in msg.arrays:
                    for name in ("voice_activity", "active_speaker", "command_posterior"):
                        counts[f"{msg.stream}/{name}"] += 1
                    counts["camera/camera.front/mouth_roi"] += 1
                    if msg.fields["command"] != last_command.get(msg.stream):
                        last_command[msg.stream] = msg.fields["command"]
                        counts[f"{msg.stream}/command"] += 1
                if "actions" in msg.arrays:
                    counts[f"{msg.stream}/targets"] += 1
                    for camera in cameras:
                        counts[f"camera/{camera}/action_chunk"] += 1
            elif isinstance(msg, Health):
                for engine in msg.stats["engines"]:
                    counts[f"health/{engine}/deadline_misses"] += 1
    return +counts


@pytest.fixture(scope="module")
def sample_rrd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp("view") / "sample.rrd"
    stats = view_log(SAMPLE, save=str(path))
    return path, stats


def test_every_entity_of_the_sample_log_has_one_row_per_sample(sample_rrd):
    path, stats = sample_rrd
    rows = read_rrd(path)
    expected = expected_counts(SAMPLE)
    assert {k: len(v) for k, v in rows.items()} == dict(expected)
    topics = log_info(SAMPLE)["topics"]
    assert sum(stats.received.values()) == sum(t["count"] for t in topics.values())
    assert not stats.seq_gaps and not stats.rejected


def test_rrd_holds_the_log_values(sample_rrd):
    path, _ = sample_rrd
    rows = read_rrd(path)
    with LogReader(SAMPLE) as reader:
        msgs = [m.decode(SAMPLE) for m in reader.messages()]
    audio = np.concatenate([m.samples[:, 0] for m in msgs if isinstance(m, AudioChunk)])
    waveform = np.array([r["Scalars:scalars"][0] for r in rows["audio/audio.mic0/waveform"]])
    np.testing.assert_allclose(np.sort(waveform), np.sort(audio / 32768.0))
    speech = [m for m in msgs if isinstance(m, Prediction) and m.stream == "pred.speech"]
    first = speech[0]
    latency = rows["latency/pred.speech"][0]
    assert latency["sensor_time"] == first.t_ref_ns
    capture_to_publish_ms = (first.t_publish_ns - first.trace["t_capture_ns"]) / 1e6
    assert latency["Scalars:scalars"][-1] == pytest.approx(capture_to_publish_ms)
    posterior = rows["pred.speech/command_posterior"][0]["Scalars:scalars"]
    np.testing.assert_allclose(posterior, first.arrays["command_posterior"], rtol=1e-6)
    late = sum(m.late for m in speech)
    assert rows["deadline_misses/pred.speech"][-1]["Scalars:scalars"] == [float(late)]
    # The mouth crop is the ROI of the launch config stored in the log, at full resolution.
    roi = speech_views(load_config(None))[0].mouth_roi
    crop = rows["mouth/camera.front"][0]
    assert (crop["Image:format"][0]["width"], crop["Image:format"][0]["height"]) == roi[2:]
    x, y, w, h = roi
    # (The scene camera's frames interleave with the front camera's: take the front one.)
    frame = next(m for m in msgs if isinstance(m, Frame) and m.stream == "camera.front")
    assert bytes(crop["Image:buffer"][0]) == frame.image[y:y + h, x:x + w].tobytes()


def test_view_cli_saves_the_first_seconds_of_a_log(tmp_path, capsys):
    out = tmp_path / "first.rrd"
    assert main(["view", SAMPLE, "--save", str(out), "--duration", "1", "--nice", "0"]) == 0
    counts = {k: len(v) for k, v in read_rrd(out).items()}
    assert counts == dict(expected_counts(SAMPLE, max_log_ns=1e9))
    assert '"saved":' in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["view", "missing.mcap", "--save", "x.rrd"], "cannot read log"),
    (["view", SAMPLE, "--save", "x.png"], "must name an .rrd"),
    (["view", SAMPLE, "--endpoint", "tcp://127.0.0.1:5599"], "not both"),
    (["view", SAMPLE, "--duration", "0"], "must be positive"),
])
def test_view_cli_rejects_bad_input(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--nice", "0"]) == 1  # the test process keeps its priority
    assert message in capsys.readouterr().err


def test_live_view_logs_what_it_receives(tmp_path):
    """The sample log published on a socket: the viewer's rows match what it received."""
    from fusion_node.transport import Publisher

    context = zmq.Context()
    publisher = Publisher(context, f"ipc://{tmp_path}/live.ipc", hwm=10_000)
    stop = threading.Event()
    out = tmp_path / "live.rrd"
    result: dict[str, Any] = {}

    def view() -> None:
        result["stats"] = view_live([publisher.endpoint], load_config(None), save=str(out),
                                    stop=stop)

    viewer = threading.Thread(target=view)
    viewer.start()
    try:
        # Until the subscription reaches the publisher, messages are dropped (slow joiner):
        # probes first. What is dropped does not matter: rows are compared with receipts.
        for probe in range(25):
            publisher.send(Health("node.probe", probe, 0, {}))
            stop.wait(0.02)
        publish_log(SAMPLE, publisher.send_parts, MonotonicClock(), rate=8.0)
        stop.wait(0.5)
    finally:
        stop.set()
        viewer.join(10)
        publisher.close()
        context.term()
    stats = result["stats"]
    received = {t: n for t, n in stats.received.items() if t != "node.probe"}
    assert received["pred.speech"] > 0 and received["camera.front"] > 0
    rows = {k: len(v) for k, v in read_rrd(out).items()}
    assert rows["camera/camera.front"] == received["camera.front"]
    assert rows["joints/joints.arm/position"] == received["joints.arm"]
    assert rows["latency/pred.speech"] == received["pred.speech"]
    assert rows["latency/pred.action"] == received["pred.action"]


def test_schematic_arm_has_the_link_lengths():
    width, height = 320, 240
    upright = arm_points(np.zeros(3), width, height)
    assert upright[:, 0] == pytest.approx(upright[0, 0])  # straight up
    lengths = np.linalg.norm(np.diff(arm_points(np.array([0.3, -1.0, 2.0]), width, height),
                                    axis=0), axis=1)
    np.testing.assert_allclose(lengths, np.linalg.norm(np.diff(upright, axis=0), axis=1))
    left = arm_points(np.array([math.pi / 2, 0.0, 0.0]), width, height)
    assert left[-1, 0] < left[0, 0] and left[-1, 1] == pytest.approx(left[0, 1])


def test_speech_views_reject_a_bad_mouth_box():
    import dataclasses

    config = load_config(None)
    engines = tuple(dataclasses.replace(e, params={"mouth_roi": [1, 2, 3]})
                    if e.binding == "speech" else e for e in config.engines)
    with pytest.raises(ConfigError, match="mouth_roi"):
        speech_views(dataclasses.replace(config, engines=engines))


def read_mcap_json(path: Path) -> tuple[dict[str, str], dict[str, list[Any]]]:
    """Schema name and decoded JSON messages per topic of an MCAP file."""
    from mcap.reader import make_reader

    schemas: dict[str, str] = {}
    messages: dict[str, list[Any]] = defaultdict(list)
    with open(path, "rb") as file:
        for schema, channel, message in make_reader(file).iter_messages():
            assert channel.message_encoding == "json" and schema is not None
            schemas[channel.topic] = schema.name
            messages[channel.topic].append(json.loads(message.data))
    return schemas, messages


def resolve(path: str, messages: dict[str, list[Any]]) -> list[Any]:
    """The values a Foxglove message path (`/topic.field.sub`) selects in each message."""
    topic = max((t for t in messages if path == t or path.startswith(t + ".")), key=len)
    values = []
    for body in messages[topic]:
        for key in path[len(topic) + 1:].split("."):
            body = body[key]
        values.append(body)
    return values


def test_foxglove_export_fills_every_panel_of_the_documented_layout(tmp_path, capsys):
    out = tmp_path / "fox.mcap"
    assert main(["view", SAMPLE, "--foxglove", str(out), "--nice", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["foxglove"]["path"] == str(out)
    schemas, messages = read_mcap_json(out)
    layout = json.loads((Path(__file__).parents[2] / "docs" / "foxglove-layout.json").read_text())
    panels = layout["configById"]
    for panel_id, config in panels.items():
        kind = panel_id.split("!")[0]
        if kind == "Image":
            image = config["imageMode"]["imageTopic"]
            assert schemas[image] in ("foxglove.RawImage", "foxglove.CompressedImage")
            for topic in config["imageMode"].get("annotations", {}):
                assert schemas[topic] == "foxglove.ImageAnnotations", topic
        elif kind == "Audio":
            assert schemas[config["topic"]] == "foxglove.RawAudio"
        elif kind == "RosOut":
            assert schemas[config["topicToRender"]] == "foxglove.Log"
        elif kind == "Plot":
            for entry in config["paths"]:
                values = resolve(entry["value"], messages)
                assert values and all(isinstance(v, (int, float)) for v in values), entry
        elif kind == "StateTransitions":
            for entry in config["paths"]:
                assert resolve(entry["value"], messages), entry
        else:
            pytest.fail(f"layout panel {panel_id} is not checked")
    # Every panel the layout tree names is configured, and every configured one is placed.
    placed = json.dumps(layout["layout"])
    assert all(f'"{panel_id}"' in placed for panel_id in panels)
    counts = expected_counts(SAMPLE)
    assert len(messages["/pred_speech"]) == counts["latency/pred.speech"]
    assert len(messages["/mouth/camera_front"]) == counts["mouth/camera.front"]
    preview = messages["preview/camera.front"][0]
    for box in messages["/camera/camera_front/mouth_box"]:
        for point in box["points"][0]["points"]:
            assert 0 <= point["x"] <= preview["width"] and 0 <= point["y"] <= preview["height"]


def test_foxglove_export_needs_a_log(capsys):
    assert main(["view", "--foxglove", "out.mcap"]) == 1
    assert "give the log" in capsys.readouterr().err
