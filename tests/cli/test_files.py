"""Commands that write a file never replace one unless --force is given, and say so in one
line before anything starts."""

from pathlib import Path

import pytest

from fusion_node.cli import main
from fusion_node.errors import ReplayError
from fusion_node.logs.mcap_format import LogWriter

SAMPLE = str(Path(__file__).resolve().parents[1] / "data" / "sample.mcap")


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("argv", [
    ["record", "{out}", "--duration", "1"],
    ["record", "{out}", "--endpoint", "tcp://127.0.0.1:1", "--duration", "1"],
    ["run", "--record", "{out}", "--duration", "1"],
    ["replay", SAMPLE, "--out", "{out}"],
    ["log", "recover", SAMPLE, "{out}"],
    ["view", SAMPLE, "--save", "{out}.rrd"],
    ["view", SAMPLE, "--foxglove", "{out}"],
])
def test_an_existing_output_is_refused_and_left_as_it_was(tmp_path, capsys, argv):
    out = tmp_path / "mine.mcap"
    existing = out.with_name(out.name + ".rrd") if "--save" in argv else out
    existing.write_bytes(b"an hour of a robot's run")
    assert main([a.replace("{out}", str(out)) for a in argv]) == 1
    line = one_error_line(capsys)
    assert str(out) in line and "exists; pass --force to overwrite it" in line
    assert existing.read_bytes() == b"an hour of a robot's run"


def test_force_overwrites(tmp_path, capsys):
    out = tmp_path / "mine.mcap"
    out.write_bytes(b"old")
    assert main(["log", "recover", SAMPLE, str(out), "--force"]) == 0
    assert out.read_bytes()[:8] == b"\x89MCAP0\r\n"


def test_a_record_path_in_a_missing_folder_is_one_line_before_the_node_starts(tmp_path,
                                                                             capsys):
    out = tmp_path / "missing" / "run.mcap"
    assert main(["run", "--record", str(out), "--duration", "5"]) == 1
    assert one_error_line(capsys) == (f"fusion-node: error: record path {out}: folder "
                                      f"{out.parent} does not exist")


def test_the_log_writer_itself_never_replaces_a_file(tmp_path):
    path = tmp_path / "log.mcap"
    path.write_bytes(b"kept")
    with pytest.raises(ReplayError, match="exists; pass --force"):
        LogWriter(str(path))
    assert path.read_bytes() == b"kept"
    LogWriter(str(path), overwrite=True).close()
    assert path.read_bytes()[:8] == b"\x89MCAP0\r\n"
