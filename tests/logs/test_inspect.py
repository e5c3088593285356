"""`log info`, `log recover`, bad input, and `bench record`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import msgpack
import pytest
from mcap.data_stream import ReadDataStream
from mcap.reader import make_reader
from mcap.records import Chunk
from mcap.stream_reader import breakup_chunk
from mcap.writer import Writer

from fusion_node.bench.record import run_record_bench
from fusion_node.cli import main
from fusion_node.errors import ReplayError
from fusion_node.logs.inspect import log_info, recover
from fusion_node.logs.mcap_format import LogWriter
from fusion_node.protocol import encode
from tests.logs.test_recorder import joints

SAMPLE = str(Path(__file__).parents[1] / "data" / "sample.mcap")


def test_sample_log_info():
    info = log_info(SAMPLE)
    assert info["complete"] and info["protocol_version"] == "1" and info["source"] == "node"
    assert set(info["topics"]) == {"camera.front", "camera.scene", "audio.mic0", "joints.arm",
                                   "pred.speech", "pred.action", "node.health"}
    assert all(t["gaps"] == 0 for t in info["topics"].values())
    assert info["topics"]["camera.front"]["rate_hz"] == pytest.approx(30, rel=0.01)
    assert info["recorder_dropped"] == {}
    assert set(info["model_hashes"]) == {"pred.speech", "pred.action"}


def test_info_on_a_truncated_log_says_so(tmp_path):
    data = Path(SAMPLE).read_bytes()
    broken = tmp_path / "half.mcap"
    broken.write_bytes(data[:len(data) // 2])
    info = log_info(str(broken))
    assert not info["complete"] and "truncated" in info["error"]
    assert 0 < info["messages"] < log_info(SAMPLE)["messages"]
    assert info["recorder_dropped_from"].startswith("the last node.health")


def whole_chunk_messages(path: str) -> list[tuple[int, int, bytes]]:
    """(chunk end offset, log time, data) of every message, from the log's chunk index."""
    found = []
    with open(path, "rb") as file:
        reader = make_reader(file)
        summary = reader.get_summary()
        assert summary is not None
        for index in summary.chunk_indexes:
            file.seek(index.chunk_start_offset + 9)  # past the opcode and the record length
            chunk = Chunk.read(ReadDataStream(file))
            end = index.chunk_start_offset + index.chunk_length
            found += [(end, r.log_time, r.data) for r in breakup_chunk(chunk)
                      if type(r).__name__ == "Message"]
    return found


@pytest.mark.parametrize("seed", range(8))
def test_recover_truncated_log_keeps_exactly_the_whole_chunks(tmp_path, seed):
    data = Path(SAMPLE).read_bytes()
    cut = random.Random(seed).randrange(len(data))
    broken = tmp_path / "broken.mcap"
    broken.write_bytes(data[:cut])
    expected = [(t, d) for end, t, d in whole_chunk_messages(SAMPLE) if end <= cut]
    fixed = str(tmp_path / "fixed.mcap")
    if not expected:
        with pytest.raises(ReplayError):
            recover(str(broken), fixed)
        assert not Path(fixed).exists()
        return
    result = recover(str(broken), fixed)
    assert result.messages == len(expected)
    with open(fixed, "rb") as file:
        got = [(m.log_time, m.data) for _, _, m in
               make_reader(file).iter_messages(log_time_order=False)]
    assert got == expected


def test_recover_a_complete_log_copies_everything(tmp_path):
    fixed = str(tmp_path / "copy.mcap")
    result = recover(SAMPLE, fixed)
    assert result.was_complete and result.messages == len(whole_chunk_messages(SAMPLE))
    assert log_info(fixed)["topics"] == log_info(SAMPLE)["topics"]
    with pytest.raises(ReplayError, match="new file"):
        recover(fixed, fixed)


# -- bad input: one clear error line, non-zero exit -----------------------------------------

def not_mcap(tmp_path: Path) -> str:
    path = tmp_path / "notes.mcap"
    path.write_text("these are not the logs you are looking for\n")
    return str(path)


def unknown_schema(tmp_path: Path) -> str:
    path = tmp_path / "ros.mcap"
    with open(path, "wb") as file:
        writer = Writer(file)
        writer.start()
        schema = writer.register_schema("std_msgs/msg/String", "ros2msg", b"string data")
        channel = writer.register_channel("/chatter", "cdr", schema)
        writer.add_message(channel, 1, b"\x00\x01\x00\x00hi", 1)
        writer.finish()
    return str(path)


def newer_protocol(tmp_path: Path) -> str:
    path = str(tmp_path / "v2.mcap")
    writer = LogWriter(path)
    writer.write(joints(0, 10), 10)
    writer.close()
    # The same log as a future version would write it: schema and header say version 2.
    data = Path(path).read_bytes().replace(b'"protocol_version": 1', b'"protocol_version": 2')
    Path(path).write_bytes(data)
    return path


def newer_headers(tmp_path: Path) -> str:
    """A v1 log whose messages carry version-2 headers."""
    path = str(tmp_path / "v2headers.mcap")
    parts = encode(joints(0, 10))
    header = msgpack.unpackb(bytes(parts[1]))
    header["v"] = 2
    writer = LogWriter(path)
    writer.write(joints(0, 10), 10, parts=[parts[0], msgpack.packb(header), parts[2]])
    writer.close()
    return path


COMMANDS = [["log", "info", "{}"], ["replay", "{}", "--fast", "--start-delay", "0",
                                     "--pub", "ipc://{dir}/bad.ipc"],
            ["replay", "{}", "--through-node"]]


@pytest.mark.parametrize("make, words", [
    (not_mcap, "not an MCAP file"),
    (unknown_schema, "not a fusion-node log"),
    (newer_protocol, "a newer protocol version 2"),
])
@pytest.mark.parametrize("command", COMMANDS, ids=["info", "replay", "through-node"])
def test_bad_input_is_one_clear_error_line(tmp_path, capsys, make, words, command):
    path = make(tmp_path)
    argv = [arg.replace("{}", path).replace("{dir}", str(tmp_path)) for arg in command]
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("fusion-node: error: ") and words in lines[0]


def test_messages_from_a_newer_protocol_are_refused_by_replay(tmp_path, capsys):
    path = newer_headers(tmp_path)
    assert main(["replay", path, "--fast", "--start-delay", "0", "--pub",
                 f"ipc://{tmp_path}/x.ipc"]) == 0  # bytes are published as recorded
    capsys.readouterr()
    assert main(["log", "info", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["undecodable"] == {"joints.arm": 1}
    assert "unsupported_version" in info["first_undecodable"]


def test_recover_refuses_what_it_cannot_read(tmp_path, capsys):
    assert main(["log", "recover", not_mcap(tmp_path), str(tmp_path / "out.mcap")]) == 1
    assert "not an MCAP file" in capsys.readouterr().err
    header_only = tmp_path / "header_only.mcap"
    header_only.write_bytes(Path(SAMPLE).read_bytes()[:40])
    assert main(["log", "recover", str(header_only), str(tmp_path / "out.mcap")]) == 1
    assert "no whole chunk" in capsys.readouterr().err
    assert not (tmp_path / "out.mcap").exists()


def test_bench_record_reports_drops_cost_and_replay_speed():
    result = run_record_bench(duration_s=1.0)
    assert result["dropped"] == {}
    assert result["recorded"] == sum(result["messages_offered"].values())
    assert result["messages_offered"] == {"frame": 30, "audio": 100, "joints": 500}
    for key in ("recorder_cpu_s_per_log_s", "replay_publish_x_realtime",
                "replay_through_node_x_realtime", "file_mb_per_s"):
        assert result[key] > 0
