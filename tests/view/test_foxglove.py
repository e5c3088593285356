"""The Foxglove export's time: wall time through the pair the recorder stores, monotonic time
(said once) for a log without one. Its panels are checked against the layout in
test_viewer.py; the live server, which shares the conversion, in test_foxglove_live.py."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from mcap.reader import make_reader

pytest.importorskip("foxglove", reason="the `foxglove` extra (foxglove-sdk) is not installed")

from fusion_node.clock import MonotonicClock, WallClockMapping, measure_wall_clock
from fusion_node.logs.mcap_format import RECORDING_METADATA, WALL_CLOCK_KEY, LogReader
from fusion_node.logs.recorder import Recorder
from fusion_node.view.common import log_config
from fusion_node.view.foxglove import EXPORT_METADATA, export_foxglove

SAMPLE = str(Path(__file__).parents[1] / "data" / "sample.mcap")


def _times(path: Path) -> tuple[dict[str, list[tuple[int, int]]], dict[str, dict[str, str]]]:
    """(log time, publish time) per topic, and the metadata."""
    times: dict[str, list[tuple[int, int]]] = {}
    with open(path, "rb") as file:
        reader = make_reader(file)
        for _, channel, message in reader.iter_messages(log_time_order=False):
            times.setdefault(channel.topic, []).append((message.log_time,
                                                        message.publish_time))
        metadata = {m.name: dict(m.metadata) for m in reader.iter_metadata()}
    return times, metadata


def test_the_wall_clock_pair_is_the_tightest_bracket_and_round_trips():
    mapping = measure_wall_clock()
    assert 0 <= mapping.uncertainty_ns < 1_000_000
    assert abs(mapping.to_wall_ns(time.monotonic_ns()) - time.time_ns()) < 50_000_000
    assert WallClockMapping.from_json(mapping.to_json()) == mapping
    with pytest.raises(ValueError, match="not a wall clock mapping"):
        WallClockMapping.from_json('{"monotonic_ns": 1.5, "wall_ns": 2, "uncertainty_ns": 0}')


def test_a_live_recording_exports_in_wall_time(tmp_path):
    log = tmp_path / "live.mcap"
    # The sample's frames (155 MB decoded) are offered faster than a loaded writer drains
    # them: the queue holds them all, so that no frame is dropped and the export is whole.
    recorder = Recorder(str(log), MonotonicClock(), metadata={"source": "test"},
                        max_queue_bytes=512 << 20)
    recorder.start()
    with LogReader(SAMPLE) as reader:
        for message in reader.messages():
            assert recorder.offer(message.decode(SAMPLE), log_time_ns=message.log_time_ns)
    recorder.close()
    with LogReader(str(log)) as reader:
        stored = reader.metadata()[RECORDING_METADATA][WALL_CLOCK_KEY]
    mapping = WallClockMapping.from_json(stored)
    offset_ns = mapping.wall_ns - mapping.monotonic_ns

    out = tmp_path / "fox.mcap"
    result = export_foxglove(str(log), str(out), log_config(SAMPLE))
    assert result.wall_clock
    exported, metadata = _times(out)
    assert metadata[EXPORT_METADATA]["time"] == "wall"
    assert WallClockMapping.from_json(metadata[EXPORT_METADATA][WALL_CLOCK_KEY]) == mapping
    # The same messages as the monotonic export of the sample, each shifted by the offset.
    plain = tmp_path / "plain.mcap"
    export_foxglove(SAMPLE, str(plain), log_config(SAMPLE))
    monotonic, _ = _times(plain)
    assert exported.keys() == monotonic.keys()
    for topic, stamps in monotonic.items():
        assert exported[topic] == [(log + offset_ns, pub + offset_ns) for log, pub in stamps]
    # The body stamps move with them.
    with open(out, "rb") as file:
        for _, channel, message in make_reader(file).iter_messages(topics=["/events"]):
            body = json.loads(message.data)
            assert body["timestamp"]["sec"] * 10**9 + body["timestamp"]["nsec"] == \
                message.log_time


def test_an_old_log_exports_in_monotonic_time_and_says_so_once(tmp_path, caplog):
    out = tmp_path / "fox.mcap"
    with caplog.at_level(logging.WARNING, logger="fusion_node.view.foxglove"):
        result = export_foxglove(SAMPLE, str(out), log_config(SAMPLE))
    assert not result.wall_clock
    said = [r.getMessage() for r in caplog.records if "wall clock" in r.getMessage()]
    assert len(said) == 1 and "monotonic stamps" in said[0] and SAMPLE in said[0]
    exported, metadata = _times(out)
    assert metadata[EXPORT_METADATA]["time"] == "monotonic"
    with LogReader(SAMPLE) as reader:
        captures = {m.publish_time_ns for m in reader.messages()}
    # Sensor times of the log as they are: time since boot, not since 1970.
    assert exported["/joints/joints_arm"][0][0] in captures
    assert all(t < 10**9 * 3600 * 24 * 365 for stamps in exported.values() for t, _ in stamps)
