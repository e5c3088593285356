"""Recording: the MCAP layout, the bounded recorder, the node's recording buffer, and a
recorder process killed mid-run."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import json
import mmap
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter

import msgpack
import numpy as np
import pytest
import zmq
from mcap.exceptions import EndOfFile
from mcap.reader import make_reader
from mcap.records import Chunk
from mcap.stream_reader import StreamReader, breakup_chunk

import fusion_node.logs.recorder as recorder_module
from fusion_node.alignment import JointsInput
from fusion_node.cli.log import with_record
from fusion_node.cli.main import build_parser
from fusion_node.clock import MonotonicClock, ReplayClock, WallClockMapping
from fusion_node.config import parse_config
from fusion_node.errors import ConfigError, ReplayError
from fusion_node.logs.inspect import recover
from fusion_node.logs.mcap_format import (
    RECORDING_END_METADATA,
    RECORDING_METADATA,
    WALL_CLOCK_KEY,
    WINDOW_CUTS_TOPIC,
    LogReader,
    LogWriter,
    WindowCut,
    frame_parts,
    topic_matches,
    unframe,
)
from fusion_node.logs.recorder import (
    Recorder,
    RecordingBuffer,
    node_metadata,
    record_endpoints_blocking,
)
from fusion_node.protocol import AudioChunk, Frame, Health, JointState, Prediction, decode, encode
from fusion_node.shm import in_shared_memory

T0 = 5_000_000_000


def joints(seq: int, t_ns: int) -> JointState:
    return JointState("joints.arm", seq, t_ns, ("a", "b", "c"), np.full(3, 0.1 * seq),
                      np.zeros(3), np.ones(3))


def messages() -> list:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    return [
        Frame("camera.front", 0, T0, image, "rgb8"),
        AudioChunk("audio.mic0", 0, T0 + 1, 16_000, 0,
                   rng.integers(-3000, 3000, (160, 1)).astype(np.int16)),
        AudioChunk("audio.f32", 0, T0 + 2, 48_000, 0,
                   rng.uniform(-1, 1, (480, 2)).astype(np.float32)),
        joints(0, T0 + 3),
        Prediction("pred.speech", 0, T0 + 4, T0 + 40_000_004, "speech", "abc", {"a": True},
                   {"command": "go", "p": 0.5}, {"x": np.arange(6, dtype=np.float32)},
                   {"t_ready_ns": T0}, t_publish_ns=T0 + 40_000_005),
        Health("node.health", 0, T0 + 5, {"uptime_s": 1.0}),
    ]


def wire(msg) -> list[bytes]:
    return [bytes(memoryview(part)) for part in encode(msg)]


def test_each_message_is_framed_losslessly():
    for msg in messages():
        data = frame_parts(encode(msg))
        parts = unframe(data)
        assert [bytes(p) for p in parts] == wire(msg)
        assert wire(decode(parts)) == wire(msg)


@pytest.mark.parametrize("data", [b"", b"\x01\x00\x00\x00", b"\x02\x00\x00\x00\x01\x00",
                                  b"\x02\x00\x00\x00\x01\x00\x00\x00\x01\x00\x00\x00ab!"])
def test_malformed_framing_is_a_replay_error(data):
    with pytest.raises(ReplayError):
        unframe(data)


def test_log_round_trip_with_foxglove_previews(tmp_path):
    path = str(tmp_path / "log.mcap")
    writer = LogWriter(path, metadata={"source": "test"})
    originals = messages()
    # Written out of log-time order: the reader returns log-time order.
    for index, msg in reversed(list(enumerate(originals))):
        writer.write(msg, T0 + 100 + index)
    writer.close()

    with LogReader(path) as reader:
        got = list(reader.messages())
    assert [m.log_time_ns for m in got] == [T0 + 100 + i for i in range(len(originals))]
    for message, msg in zip(got, originals):
        assert message.topic == msg.stream
        assert message.publish_time_ns == msg.t_capture_ns  # capture time; t_ref if predicted
        decoded = message.decode(path)
        assert wire(decoded) == wire(msg)
        assert decoded.t_receive_ns == message.log_time_ns

    with open(path, "rb") as file:
        reader = make_reader(file)
        summary = reader.get_summary()
        schemas = {c.topic: summary.schemas[c.schema_id].name for c in summary.channels.values()}
        assert schemas["camera.front"] == "fusion_node.frame"
        assert schemas["pred.speech"] == "fusion_node.prediction"
        assert schemas["preview/camera.front"] == "foxglove.RawImage"
        assert schemas["preview/audio.mic0"] == "foxglove.RawAudio"
        previews = {c.topic: json.loads(m.data) for _, c, m in reader.iter_messages(
            topics=["preview/camera.front", "preview/audio.mic0", "preview/audio.f32"])}
    image = previews["preview/camera.front"]
    assert (image["width"], image["height"], image["encoding"], image["step"]) == \
        (32, 24, "rgb8", 96)
    assert base64.b64decode(image["data"]) == originals[0].image[::2, ::2].tobytes()
    assert image["timestamp"] == {"sec": 5, "nsec": 0}
    audio = previews["preview/audio.mic0"]
    assert (audio["format"], audio["sample_rate"], audio["number_of_channels"]) == \
        ("pcm-s16", 16_000, 1)
    assert base64.b64decode(audio["data"]) == originals[1].samples.tobytes()
    stereo = np.frombuffer(base64.b64decode(previews["preview/audio.f32"]["data"]), "<i2")
    assert stereo.shape == (960,) and np.abs(stereo).max() <= 32767


def test_chunk_indexes_live_on_disk_and_index_the_finished_log(tmp_path):
    path = str(tmp_path / "log.mcap")
    writer = LogWriter(path, chunk_size=4096, preview_hz=0)
    image = np.random.default_rng(2).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    for seq in range(300):  # each 9 KB frame closes a chunk
        writer.write(Frame("camera.front", seq, T0 + seq * 1000, image, "rgb8"), T0 + seq)
        writer.write(joints(seq, T0 + seq * 1000), T0 + seq)
    assert not isinstance(writer._writer._Writer__chunk_indices, list)
    writer.close()
    assert sorted(os.listdir(tmp_path)) == ["log.mcap"]  # the spill file is gone

    with open(path, "rb") as file:
        reader = make_reader(file)
        summary = reader.get_summary()
        assert summary.statistics.chunk_count >= 300
        assert len(summary.chunk_indexes) == summary.statistics.chunk_count
        assert [i.chunk_start_offset for i in summary.chunk_indexes] == \
            sorted({i.chunk_start_offset for i in summary.chunk_indexes})
        # The index is what a seeking reader uses for a time range.
        window = list(reader.iter_messages(topics=["camera.front"], starting_at=T0 + 100,
                                           ending_before=T0 + 110))
    assert [m.sequence for _, _, m in window] == list(range(100, 110))


def test_recorder_drops_and_counts_when_its_queue_is_full(tmp_path):
    path = str(tmp_path / "full.mcap")
    recorder = Recorder(path, ReplayClock(T0), max_queue_messages=3)
    # Not started: nothing drains the queue, so the bound is hit deterministically.
    accepted = [recorder.offer(joints(i, T0 + i), log_time_ns=T0 + i) for i in range(5)]
    assert accepted == [True, True, True, False, False]
    assert recorder.stats()["dropped"] == {"joints.arm": 2}
    recorder.close()
    with LogReader(path) as reader:
        assert [m.decode(path).seq for m in reader.messages()] == [0, 1, 2]
        end = reader.metadata()[RECORDING_END_METADATA]
    assert json.loads(end["dropped"]) == {"joints.arm": 2}


def test_recorder_selects_topics_and_stops_after_its_duration(tmp_path):
    path = str(tmp_path / "short.mcap")
    clock = ReplayClock(T0)
    recorder = Recorder(path, clock, topics=["joints.", "pred.speech"],
                        duration_ns=1_000_000_000)
    recorder.start()
    frame = messages()[0]
    assert not recorder.offer(frame, log_time_ns=T0)
    assert recorder.offer(joints(0, T0), log_time_ns=T0 + 1)
    assert not recorder.offer(joints(1, T0), log_time_ns=T0 + 1_000_000_000)
    deadline = time.monotonic() + 10
    while not recorder.finished and time.monotonic() < deadline:
        time.sleep(0.01)
    assert recorder.finished  # the file is finished without waiting for close()
    recorder.close()
    with LogReader(path) as reader:
        assert [m.topic for m in reader.messages()] == ["joints.arm"]
    assert topic_matches("pred.action", ["pred."]) and not topic_matches("pred.action", ["pred"])


def test_recording_buffer_logs_pushes_and_cuts_in_the_order_they_happened(tmp_path):
    class Runner:
        topic = "pred.test"

        class binding:
            spec = (JointsInput("joints.arm"),)

    path = str(tmp_path / "cuts.mcap")
    clock = ReplayClock(T0)  # a frozen clock: stamps still strictly increase
    buffer = RecordingBuffer({"joints.arm": 8}, clock)
    recorder = Recorder(path, clock)
    buffer.attach(recorder, [Runner])
    buffer.push(joints(0, T0 - 10_000_000))
    window = buffer.window(T0 - 10_000_000, Runner.binding.spec)
    buffer.push(joints(1, T0 - 5_000_000))
    buffer.window(T0, (JointsInput("joints.arm"),))  # not an engine's window: not logged
    recorder.close()
    assert window.mask == {"joints.arm": True}
    with LogReader(path) as reader:
        logged = list(reader.messages(["joints.arm", WINDOW_CUTS_TOPIC]))
    assert [(m.topic, m.log_time_ns) for m in logged] == [
        ("joints.arm", T0), (WINDOW_CUTS_TOPIC, T0 + 1), ("joints.arm", T0 + 2)]
    assert json.loads(logged[1].data) == {"topic": "pred.test", "t_ref_ns": T0 - 10_000_000}


def test_record_table_in_launch_files():
    config = parse_config('[record]\npath = "out.mcap"\ntopics = ["pred."]\nduration_s = 2.5\n'
                          'compression = "zstd"\npreview_hz = 0\nchunk_size_kb = 256\n', "t")
    record = config.record
    assert record is not None
    assert (record.path, record.topics, record.duration_ns, record.compression,
            record.preview_hz, record.chunk_size) == ("out.mcap", ("pred.",), 2_500_000_000,
                                                      "zstd", 0.0, 256 * 1024)
    assert parse_config("", "t").record is None
    for bad, message in (('[record]\npath = "o"\ncompression = "gzip"', "compression"),
                         ('[record]\npath = "o"\nduration_s = 0', "duration_s"),
                         ('[record]\npaht = "o"', "missing required key 'path'")):
        with pytest.raises(ConfigError, match=message):
            parse_config(bad, "t")


def test_unwritable_log_path_is_one_clear_error(tmp_path):
    with pytest.raises(ReplayError, match="cannot write log"):
        Recorder(str(tmp_path / "missing" / "x.mcap"), ReplayClock())


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def recorder_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == recorder_module.log.name]


def test_recorder_stats_report_the_queue_its_drops_and_the_finished_file(tmp_path):
    path = str(tmp_path / "stats.mcap")
    recorder = Recorder(path, ReplayClock(T0), preview_hz=0, max_queue_messages=2)
    idle = {"path": path, "written": 0, "dropped": {}, "queued": 0, "queued_mb": 0.0,
            "peak_queued_mb": 0.0, "cpu_s": 0.0, "priority": "default", "recording": True,
            "error": ""}
    assert recorder.stats() == idle
    # 1,234,568 bytes: 1.18 MiB, so the rounding to 0.1 MiB shows.
    big = AudioChunk("audio.mic0", 0, T0, 16_000, 0, np.zeros((617_284, 1), np.int16))
    assert recorder.offer(joints(0, T0), log_time_ns=T0)
    assert recorder.offer(big, log_time_ns=T0 + 1)
    assert not recorder.offer(joints(1, T0), log_time_ns=T0 + 2)
    assert recorder.stats() == {**idle, "dropped": {"joints.arm": 1}, "queued": 2,
                                "queued_mb": 1.2, "peak_queued_mb": 1.2}
    recorder.close()  # never started: close still writes the queue and finishes the file
    stats = recorder.stats()
    assert re.fullmatch(r"default|nice -\d+", stats.pop("priority"))
    assert stats.pop("cpu_s") == round(recorder.cpu_ns / 1e9, 3)
    del idle["priority"], idle["cpu_s"]
    assert stats == {**idle, "written": 2, "dropped": {"joints.arm": 1}, "peak_queued_mb": 1.2,
                     "recording": False}
    # Closed: refused, but not a drop (nothing went wrong).
    assert not recorder.offer(joints(2, T0), log_time_ns=T0 + 3)
    assert recorder.stats()["dropped"] == {"joints.arm": 1}
    with LogReader(path) as reader:
        assert [m.topic for m in reader.messages()] == ["joints.arm", "audio.mic0"]
        end = reader.metadata()[RECORDING_END_METADATA]
    assert json.loads(end["dropped"]) == {"joints.arm": 1}
    assert 0 <= float(end["writer_cpu_s"]) <= recorder.cpu_ns / 1e9 + 0.0005


def test_recorder_stats_give_the_writer_cpu_time_to_the_millisecond(tmp_path):
    recorder = Recorder(str(tmp_path / "cpu.mcap"), ReplayClock(T0))
    recorder.cpu_ns = 1_000_500_001  # what the writer thread measures; just past a rounding edge
    assert recorder.stats()["cpu_s"] == 1.001
    recorder.close()


def test_recorder_queue_bound_counts_each_message_by_its_size(tmp_path):
    cut = WindowCut("pred.speech", T0)
    offered = [*messages(), cut]
    # frame 9216 B, audio 320 B and 3840 B, joints 24 B a name, prediction 1 KB plus its
    # arrays, health 4 KB, window cut 64 B
    total = 9216 + 320 + 3840 + 3 * 24 + (1024 + 6 * 4) + 4096 + 64
    for max_bytes, accepted in ((total, [True] * 7), (total - 1, [True] * 6 + [False])):
        recorder = Recorder(str(tmp_path / f"{max_bytes}.mcap"), ReplayClock(T0),
                            preview_hz=0, max_queue_bytes=max_bytes)
        assert [recorder.offer(msg, log_time_ns=T0 + i)
                for i, msg in enumerate(offered)] == accepted
        assert recorder.stats()["dropped"] == ({} if all(accepted) else {WINDOW_CUTS_TOPIC: 1})
        recorder.close()


def test_a_window_cut_needs_its_log_time(tmp_path):
    recorder = Recorder(str(tmp_path / "cut.mcap"), ReplayClock(T0))
    with pytest.raises(ValueError, match="^a window cut needs its log time$"):
        recorder.offer(WindowCut("pred.speech", T0))
    recorder.close()


def test_recorder_copies_arrays_in_shared_memory_before_queueing_them(tmp_path):
    ring = mmap.mmap(-1, 4096)  # an anonymous mapping stands in for a shared-memory ring
    image = np.frombuffer(ring, np.uint8, 8 * 8 * 3, 0).reshape(8, 8, 3)
    samples = np.frombuffer(ring, np.int16, 16, 256).reshape(16, 1)
    position, velocity, effort = (np.frombuffer(ring, np.float64, 3, offset)
                                  for offset in (512, 544, 576))
    assert in_shared_memory(image) and in_shared_memory(effort)
    image[:] = 7
    samples[:] = 5
    position[:], velocity[:], effort[:] = 0.5, 1.5, 2.5
    path = str(tmp_path / "shm.mcap")
    recorder = Recorder(path, ReplayClock(T0), preview_hz=0)
    offered = [Frame("camera.front", 0, T0, image, "rgb8"),
               AudioChunk("audio.mic0", 0, T0, 16_000, 0, samples),
               JointState("joints.arm", 0, T0, ("a", "b", "c"), position, velocity, effort)]
    for i, msg in enumerate(offered):
        assert recorder.offer(msg, log_time_ns=T0 + i)
    originals = [wire(msg) for msg in offered]
    np.frombuffer(ring, np.uint8)[:] = 0xFF  # the ring's slots are reused while queued
    recorder.close()
    with LogReader(path) as reader:
        assert [wire(m.decode(path)) for m in reader.messages()] == originals


def test_recorder_writes_with_the_settings_it_was_given(tmp_path):
    image = np.zeros((48, 64, 3), np.uint8)
    frames = [Frame("camera.front", seq, T0 + seq, image, "rgb8") for seq in range(3)]
    summaries = {}
    for name, settings in (("default", {}),
                           ("given", {"compression": "zstd", "chunk_size": 1024,
                                      "preview_hz": 0, "metadata": {"source": "test"}}),
                           ("flushed", {"flush_interval_ns": 0})):
        path = str(tmp_path / f"{name}.mcap")
        recorder = Recorder(path, ReplayClock(T0), **settings)  # a frozen clock
        for frame in frames:
            assert recorder.offer(frame, log_time_ns=frame.t_capture_ns)
        recorder.close()
        with open(path, "rb") as file:
            summary = make_reader(file).get_summary()
        with LogReader(path) as reader:
            recording = reader.metadata()[RECORDING_METADATA]
        summaries[name] = (sorted(c.topic for c in summary.channels.values()),
                           {i.compression for i in summary.chunk_indexes},
                           summary.statistics.chunk_count, recording.get("source"))
    assert summaries["default"] == (["camera.front", "preview/camera.front"], {"lz4"}, 1, None)
    assert summaries["given"] == (["camera.front"], {"zstd"}, 3, "test")
    # With no flush interval each write closes the chunk in progress, even on a frozen clock.
    assert summaries["flushed"][2] > 1


def test_recorder_refuses_to_overwrite_a_log_unless_asked(tmp_path):
    path = tmp_path / "old.mcap"
    path.write_bytes(b"an hour of a robot's run")
    with pytest.raises(ReplayError, match="exists"):
        Recorder(str(path), ReplayClock(T0))
    assert path.read_bytes() == b"an hour of a robot's run"
    recorder = Recorder(str(path), ReplayClock(T0), overwrite=True)
    assert recorder.offer(joints(0, T0), log_time_ns=T0)
    recorder.close()
    with LogReader(str(path)) as reader:
        assert [m.topic for m in reader.messages()] == ["joints.arm"]


def test_a_write_error_stops_the_recorder_and_later_offers_count_as_dropped(tmp_path, caplog):
    # A pipe whose reader goes away: the writer thread's next chunk fails with EPIPE.
    path = str(tmp_path / "pipe.mcap")
    os.mkfifo(path)
    reader_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    recorder = Recorder(path, ReplayClock(T0), chunk_size=1024, preview_hz=0, overwrite=True)
    os.close(reader_fd)
    recorder.start()
    assert recorder.offer(messages()[0], log_time_ns=T0)
    assert wait_until(lambda: recorder.finished)
    assert not recorder.offer(joints(0, T0), log_time_ns=T0 + 1)
    assert not recorder.offer(joints(1, T0), log_time_ns=T0 + 2)
    stats = recorder.stats()
    assert stats["error"].startswith(f"{path}: [Errno {errno.EPIPE}]")
    assert (stats["dropped"], stats["queued"], stats["recording"]) == \
        ({"joints.arm": 2}, 0, False)
    assert recorder_logs(caplog) == [f"recorder stopped: {stats['error']}"]
    recorder.close()


def test_close_gives_up_on_a_writer_stuck_on_its_disk_and_says_so(tmp_path, monkeypatch,
                                                                    caplog):
    monkeypatch.setattr(recorder_module, "_CLOSE_TIMEOUT_S", 0.2)
    path = str(tmp_path / "stuck.mcap")
    os.mkfifo(path)
    reader_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    recorder = Recorder(path, ReplayClock(T0), compression="none", chunk_size=1024,
                        preview_hz=0, overwrite=True)
    recorder.start()
    # Nobody reads the pipe and this frame is more than a pipe holds: the writer blocks.
    image = np.zeros((1024, 1024, 3), np.uint8)
    assert recorder.offer(Frame("camera.front", 0, T0, image, "rgb8"), log_time_ns=T0)
    closing = threading.Thread(target=recorder.close, daemon=True)
    closing.start()
    closing.join(10)
    try:
        assert not closing.is_alive()
        assert recorder.stats()["recording"]
        assert recorder_logs(caplog) == [f"recorder: {path} not finished after 0 s"]
    finally:
        os.close(reader_fd)  # the blocked write fails now (EPIPE) and the thread ends
    assert wait_until(lambda: recorder.finished)


def test_a_recorder_never_closed_does_not_keep_the_process_alive(tmp_path):
    # Its writer thread idles until close(): a process that exits without calling it (its
    # main thread failed) must still exit.
    code = ("import sys; from fusion_node.clock import ReplayClock; "
            "from fusion_node.logs.recorder import Recorder; "
            "Recorder(sys.argv[1], ReplayClock()).start()")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "open.mcap")], timeout=30,
                   check=True)


def test_recording_buffer_checks_the_future_bound_against_the_log_time():
    buffer = RecordingBuffer({"joints.arm": 8}, ReplayClock(T0), max_future_ns=1_000)
    # Its own receipt stamp would pass; the log time, which a replay gives it, does not.
    received = dataclasses.replace(joints(0, T0 + 2_000), t_receive_ns=T0 + 2_000)
    assert not buffer.push(received)
    assert buffer.push(joints(1, T0 + 2_000))  # made in this process: not checked
    assert buffer.push(dataclasses.replace(joints(2, T0 + 1_000), t_receive_ns=T0 + 1))
    assert buffer.stats["joints.arm"].too_new == 1


def test_recording_buffer_stamps_from_the_clock_and_works_without_a_recorder(tmp_path):
    spec = (JointsInput("joints.arm"),)
    alone = RecordingBuffer({"joints.arm": 8}, ReplayClock(T0))
    assert alone.push(joints(0, T0 - 1_000))
    assert alone.window(T0, spec).mask == {"joints.arm": True}
    path = str(tmp_path / "zero.mcap")
    clock = ReplayClock(0)
    buffer = RecordingBuffer({"joints.arm": 8}, clock)
    recorder = Recorder(path, clock)
    buffer.attach(recorder, [])
    buffer.push(joints(0, 0))
    buffer.push(joints(1, 0))
    recorder.close()
    with LogReader(path) as reader:
        # Never 0, which would mean "not received" to the future bound.
        assert [m.log_time_ns for m in reader.messages()] == [1, 2]


def test_node_metadata_holds_the_config_and_model_hashes():
    class Runner:
        topic = "pred.speech"

        class engine:
            model_hash = "abc123"

    # A TOML date is not JSON: it is written as its text.
    config = parse_config(
        '[[drivers]]\nkind = "sim_microphone"\nstream = "audio.mic0"\n[[engines]]\n'
        'name = "speech"\nbinding = "speech"\nmodel = "speech"\ntopic = "pred.speech"\n'
        'rate_hz = 30\nlatency_ms = 25\nalign_delay_ms = 9\ninputs = { audio = "audio.mic0" }\n'
        'params = { trained = 2024-05-01 }\n', "t")
    metadata = node_metadata(config, [Runner])
    assert sorted(metadata) == ["config", "model_hashes", "source"]
    assert metadata["source"] == "node"
    logged = json.loads(metadata["config"])
    assert logged["engines"][0]["params"] == {"trained": "2024-05-01"}
    assert logged["drivers"][0]["stream"] == "audio.mic0"
    assert json.loads(metadata["model_hashes"]) == {"pred.speech": "abc123"}


# -- recording sockets (`fusion-node record`) --------------------------------------------------

def subscribed_publisher(context: zmq.Context, endpoint: str) -> zmq.Socket:
    # XPUB: the test sees the recorder's subscription arrive, so nothing is sent too early.
    publisher = context.socket(zmq.XPUB)
    publisher.setsockopt(zmq.LINGER, 0)
    publisher.bind(endpoint)
    return publisher


def recording_thread(recorder, context, endpoint, clock, stop, end_ns=None):
    result: list = []
    thread = threading.Thread(target=lambda: result.append(record_endpoints_blocking(
        recorder, context, [endpoint], clock, stop, end_ns)), daemon=True)
    thread.start()
    return thread, result


def test_recording_endpoints_keeps_the_bytes_received_and_counts_the_malformed(tmp_path):
    path = str(tmp_path / "endpoints.mcap")
    clock = ReplayClock(T0 + 77)
    recorder = Recorder(path, clock, preview_hz=0)
    recorder.start()
    context = zmq.Context()
    endpoint = "inproc://recording-endpoints"
    publisher = subscribed_publisher(context, endpoint)
    stop = threading.Event()
    thread, result = recording_thread(recorder, context, endpoint, clock, stop,
                                      end_ns=T0 + 10**12)
    try:
        assert publisher.poll(10_000), "the recorder never subscribed"
        assert publisher.recv() == b"\x01"
        time.sleep(0.3)  # let the recording loop wait through a few idle polls first
        # A header whose keys are reordered decodes the same but encodes differently: the log
        # must hold the bytes as received, not a re-encoding.
        first = wire(joints(0, T0))
        first[1] = msgpack.packb(dict(reversed(msgpack.unpackb(first[1]).items())))
        sent = [first, wire(joints(1, T0 + 1))]
        for parts in ([b"joints.arm"], sent[0], [b"joints.arm"], sent[1]):
            publisher.send_multipart(parts)
        assert wait_until(lambda: recorder.written == 2)
        stop.set()
        thread.join(10)
        assert not thread.is_alive()
    finally:
        stop.set()
        publisher.close()
    recorder.close()
    context.term()
    assert result == [Counter({"truncated": 2})]
    with LogReader(path) as reader:
        logged = list(reader.messages())
    assert [[bytes(p) for p in m.parts(path)] for m in logged] == sent
    assert [m.log_time_ns for m in logged] == [T0 + 77, T0 + 77]


def test_recording_endpoints_ends_at_its_end_time_or_when_the_recorder_finishes(tmp_path):
    context = zmq.Context()
    endpoint = "inproc://recording-ends"
    publisher = subscribed_publisher(context, endpoint)
    clock = ReplayClock(T0)
    stop = threading.Event()
    recorder = Recorder(str(tmp_path / "ends.mcap"), clock, duration_ns=1_000)
    recorder.start()
    try:
        thread, result = recording_thread(recorder, context, endpoint, clock, stop, end_ns=T0)
        thread.join(10)
        assert not thread.is_alive() and result == [Counter()]
        assert not recorder.offer(joints(0, T0), log_time_ns=T0 + 1_000)  # the duration is over
        assert wait_until(lambda: recorder.finished)
        thread, result = recording_thread(recorder, context, endpoint, clock, stop)
        thread.join(10)
        assert not thread.is_alive() and result == [Counter()]
    finally:
        stop.set()
        publisher.close()
    recorder.close()
    context.term()


# -- a recorder process killed with SIGKILL ------------------------------------------------

CHUNK_SIZE = 16 * 1024
SENT = 1000


def complete_chunk_messages(path: str) -> int:
    """Messages in the chunks of `path` that were written whole, read independently of
    `recover`."""
    count = 0
    with open(path, "rb") as file:
        records = StreamReader(file, emit_chunks=True, validate_crcs=True).records
        # The file may end inside a record: stop there.
        with contextlib.suppress(EndOfFile, struct.error):
            for record in records:
                if isinstance(record, Chunk):
                    count += sum(1 for r in breakup_chunk(record, validate_crc=True)
                                 if type(r).__name__ == "Message")
    return count


def expected_on_disk(tmp_path, sent: list[JointState]) -> int:
    """What a recorder writing `sent` has on disk before it finishes: the same writer and
    settings, stopped before close()."""
    path = str(tmp_path / "expected.mcap")
    writer = LogWriter(path, compression="none", chunk_size=CHUNK_SIZE, preview_hz=0,
                       flush_interval_ns=10**15)
    for msg in sent:
        writer.write(msg, msg.t_capture_ns)
    count = complete_chunk_messages(path)
    writer.abort()
    return count


def test_sigkilled_recorder_loses_only_the_chunk_in_memory(tmp_path):
    context = zmq.Context()
    # XPUB: the test sees the recorder's subscription arrive, so nothing is sent too early.
    publisher = context.socket(zmq.XPUB)
    publisher.setsockopt(zmq.SNDHWM, 0)
    publisher.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/joints.ipc"
    publisher.bind(endpoint)
    out = tmp_path / "killed.mcap"
    process = subprocess.Popen(
        [sys.executable, "-m", "fusion_node.cli", "record", str(out), "--endpoint", endpoint,
         "--compression", "none", "--chunk-size", str(CHUNK_SIZE), "--preview-hz", "0",
         "--flush-interval", "1000000"], stderr=subprocess.DEVNULL)
    try:
        poller = zmq.Poller()
        poller.register(publisher, zmq.POLLIN)
        assert poller.poll(30_000), "the recorder never subscribed"
        assert publisher.recv() == b"\x01"
        sent = [joints(seq, T0 + seq * 5_000_000) for seq in range(SENT)]
        for msg in sent:
            publisher.send_multipart(encode(msg))
        expected = expected_on_disk(tmp_path, sent)
        # Wait until the recorder has written every chunk it will write before finishing.
        deadline = time.monotonic() + 30
        while complete_chunk_messages(str(out)) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        publisher.close()
        context.term()

    assert 0 < expected < SENT
    per_chunk = CHUNK_SIZE // len(frame_parts(encode(sent[0]))) + 1
    assert SENT - expected <= per_chunk  # at most one chunk was lost
    with pytest.raises(ReplayError, match="incomplete"):
        LogReader(str(out))
    fixed = str(tmp_path / "fixed.mcap")
    result = recover(str(out), fixed)
    assert result.messages == expected and not result.was_complete
    with LogReader(fixed) as reader:
        recovered = [m.decode(fixed) for m in reader.messages()]
    assert [m.seq for m in recovered] == list(range(expected))
    assert all(wire(got) == wire(msg) for got, msg in zip(recovered, sent))
    assert os.path.getsize(fixed) > 0


def test_command_line_options_override_only_what_they_name():
    config = parse_config('[record]\npath = "a.mcap"\ncompression = "zstd"\npreview_hz = 2\n',
                          "t")
    args = build_parser().parse_args(["record", "b.mcap", "--preview-hz", "0",
                                      "--topics", "pred."])
    record = with_record(config, args).record
    assert (record.path, record.compression, record.preview_hz, record.topics) == \
        ("b.mcap", "zstd", 0.0, ("pred.",))
    run = with_record(config, build_parser().parse_args(["run", "--record", "c.mcap"])).record
    assert (run.path, run.compression, run.preview_hz) == ("c.mcap", "zstd", 2.0)


def test_the_writer_thread_is_named_for_thread_listings(tmp_path):
    # py-spy, /proc/<pid>/task/*/comm and the priority report name threads by this.
    recorder = Recorder(str(tmp_path / "named.mcap"), ReplayClock(T0))
    recorder.start()
    try:
        assert "recorder" in [thread.name for thread in threading.enumerate()]
    finally:
        recorder.close()


def test_a_recorder_on_the_monotonic_clock_logs_the_wall_clock_beside_the_given_metadata(
        tmp_path):
    path = str(tmp_path / "wall.mcap")
    before_ns = time.monotonic_ns()
    recorder = Recorder(path, MonotonicClock(), metadata={"source": "test"})
    after_ns = time.monotonic_ns()
    recorder.close()
    with LogReader(path) as reader:
        recording = reader.metadata()[RECORDING_METADATA]
    assert recording["source"] == "test"
    # Measured when the recorder was made, so viewers can show its stamps as wall time.
    mapping = WallClockMapping.from_json(recording[WALL_CLOCK_KEY])
    assert before_ns <= mapping.monotonic_ns <= after_ns


def test_the_writer_thread_is_a_daemon_so_a_recorder_never_closed_lets_the_process_exit(
        tmp_path):
    before = set(threading.enumerate())
    recorder = Recorder(str(tmp_path / "daemon.mcap"), ReplayClock(T0))
    recorder.start()
    try:
        started = [t for t in threading.enumerate() if t not in before and t.name == "recorder"]
        assert len(started) == 1
        assert started[0].daemon
    finally:
        recorder.close()


def test_the_writer_cpu_time_counts_from_the_start_of_its_thread(tmp_path, monkeypatch):
    # The writer thread's CPU clock, read by the thread itself: it starts at 3 s (a clock
    # need not start at 0), 2 ms after the first write, 1.0005 s plus 1 ns (just past a
    # rounding edge) when the log is closed and 1.0006 s when the thread ends.
    start_ns = 3_000_000_000
    readings = [start_ns, start_ns + 2_000_000, start_ns + 1_000_500_001,
                start_ns + 1_000_600_000]
    monkeypatch.setattr(recorder_module, "thread_cpu_ns", lambda: readings.pop(0))
    path = str(tmp_path / "cpu_clock.mcap")
    recorder = Recorder(path, ReplayClock(T0), preview_hz=0)
    assert recorder.cpu_ns == 0 and recorder.stats()["cpu_s"] == 0.0  # nothing used yet
    recorder.start()
    assert recorder.offer(joints(0, T0), log_time_ns=T0)
    assert wait_until(lambda: recorder.cpu_ns != 0)
    assert recorder.cpu_ns == 2_000_000  # while it records
    assert recorder.stats()["cpu_s"] == 0.002
    recorder.close()
    assert readings == []
    assert recorder.cpu_ns == 1_000_600_000
    with LogReader(path) as reader:
        end = reader.metadata()[RECORDING_END_METADATA]
    assert end["writer_cpu_s"] == "1.001"
