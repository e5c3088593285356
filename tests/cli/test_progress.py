"""Long commands draw a progress bar on a terminal (stderr), and nothing at all elsewhere: no
bar and no carriage return in a log, stdout's JSON untouched. `eval action --plot DIR` writes
the files its help lists."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from fusion_node.cli import main
from fusion_node.progress import progress, progress_seconds, progress_seconds_async, write

ROOT = Path(__file__).resolve().parents[2]
# The smallest action eval: 4 + 3 episodes with the true command, 4 + 2 from speech (~10 s).
EVAL_ACTION = [sys.executable, "-m", "fusion_node.cli", "eval", "action", "--episodes", "4",
               "--json"]
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (scripts/setup.sh --test)")


def read_terminal(master: int, process: subprocess.Popen[bytes] | None = None,
                  timeout_s: float = 300.0) -> bytes:
    """What was written to a pseudo-terminal, until `process` exits (or, without one, until
    nothing more comes)."""
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.2 if process is None else timeout_s)
        if not ready:
            if process is None or process.poll() is not None:
                return out
            raise AssertionError(f"nothing on the terminal for {timeout_s} s")
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer of the terminal has closed it
            return out
        if not chunk:
            return out
        out += chunk


@pytest.fixture
def terminal():
    """A pseudo-terminal nobody sized: (its master end, a stream on its slave end)."""
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w", encoding="utf-8")
    yield master, stream
    stream.close()
    os.close(master)


def test_off_a_terminal_a_bar_writes_nothing(capsys):
    with progress(range(3), desc="counting", unit="clip") as bar:
        assert list(bar) == [0, 1, 2]
    assert bar.disable
    with progress_seconds(10, desc="waiting") as bar:
        bar.at(5)
    write("a log line")
    assert capsys.readouterr() == ("a log line\n", "")

    async def wait() -> None:
        tasks = len(asyncio.all_tasks())
        async with progress_seconds_async(10, desc="waiting") as bar:
            assert bar.disable and len(asyncio.all_tasks()) == tasks  # no task to wake up

    asyncio.run(wait())


def test_on_a_terminal_the_bar_is_drawn_with_no_thread_of_its_own(terminal, monkeypatch):
    master, stream = terminal
    # Here, not in a fixture: pytest puts its own sys.stderr back when the test starts.
    monkeypatch.setattr(sys, "stderr", stream)
    threads = threading.active_count()
    with progress(range(3), desc="counting clips", unit="clip") as bar:
        assert list(bar) == [0, 1, 2]
        assert threading.active_count() == threads
    with progress_seconds(10, desc="waiting") as seconds:
        seconds.at(12)  # past the end: held at the total
        assert seconds.n == 10

    async def wait() -> None:
        async with progress_seconds_async(1, desc="waiting in the loop"):
            await asyncio.sleep(1.1)

    asyncio.run(wait())
    stream.flush()
    drawn = read_terminal(master).decode()
    # An unsized terminal gets 80 columns: tqdm alone would draw nothing on it.
    assert "counting clips: 100%|" in drawn and "3/3" in drawn and "\r" in drawn
    assert "waiting: 100%|" in drawn and "10/10 s" in drawn
    assert "waiting in the loop:   0%|" in drawn and "waiting in the loop: 100%|" in drawn


@needs_espeak
def test_eval_action_off_a_terminal_has_no_bar_and_writes_what_plot_promises(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the `view` extra (matplotlib) is not installed")
    from tests.bench.test_plots import assert_drawn

    with pytest.raises(SystemExit):
        main(["eval", "action", "--help"])
    promised = re.findall(r"eval_\w+\.(?:json|png)", capsys.readouterr().out)
    assert promised == ["eval_action.json", "eval_action.png"]

    out = tmp_path / "plots"
    done = subprocess.run([*EVAL_ACTION, "--plot", str(out)], capture_output=True, cwd=ROOT,
                          timeout=300, check=False)
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert "\r" not in stderr and "%|" not in stderr and "eval action:" not in stderr
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert sorted(p.name for p in out.iterdir()) == sorted(promised)
    assert json.loads((out / "eval_action.json").read_text()) == report
    assert_drawn(out / "eval_action.png", (1200, 500))
    assert f"wrote {out / 'eval_action.png'}" in stderr


@needs_espeak
def test_eval_action_on_a_terminal_draws_its_bars():
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = subprocess.Popen(EVAL_ACTION, stdout=subprocess.PIPE, stderr=slave, cwd=ROOT)
    os.close(slave)
    try:
        drawn = read_terminal(master, process).decode()
        stdout = process.communicate(timeout=60)[0].decode()
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, drawn
    assert re.search(r"eval action: true command: 100%\|█+\| 7/7 ", drawn), drawn
    assert re.search(r"eval action: from speech: 100%\|█+\| 6/6 ", drawn), drawn
    assert "episode/s" in drawn
    lines = stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["true_command"]["episodes"] == 4


def test_eval_plot_into_a_file_fails_before_the_eval_runs(tmp_path, capsys):
    taken = tmp_path / "plots"
    taken.write_text("not a folder")
    assert main(["eval", "action", "--episodes", "1000", "--plot", str(taken)]) == 1
    assert f"--plot '{taken}': cannot create the directory" in capsys.readouterr().err


def test_action_eval_plot_refuses_a_report_without_its_figures(tmp_path):
    pytest.importorskip("matplotlib", reason="the `view` extra (matplotlib) is not installed")
    from fusion_node.bench.plots import plot_action_eval
    from fusion_node.errors import ConfigError

    with pytest.raises(ConfigError, match="true_command"):
        plot_action_eval({"colour": {}}, tmp_path / "a.png")
    rate = {"rate": 0.5, "ci95": [0.2, 0.8], "n": 4}
    report = {"true_command": {"colour": {**rate, "per_colour": {"red": rate},
                                          "ended_at_another_block": rate},
                               "home": rate, "no_command": {"moved": {**rate, "rate": 1.5}}},
              "from_speech": {}}
    with pytest.raises(ConfigError, match="no_command/moved has rate 1.5"):
        plot_action_eval(report, tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()
