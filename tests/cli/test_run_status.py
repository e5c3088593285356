"""What `fusion-node run` tells a person on stderr: a start line (where it publishes, which
engine on which backend, which drivers), a live status line only on a terminal, neither with
--quiet; the final summary always. Real processes, since a terminal is what decides."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time

from fusion_node.config import load_config

# As a script runs it, with its own sys.argv (main() reads it, and re-executes on jemalloc).
NODE = [sys.executable, "-c", "import sys; from fusion_node.cli import main; sys.exit(main())"]
SUMMARY = re.compile(r"^fusion-node: published pred\.speech \d+, pred\.action \d+; "
                     r"\d+ deadline misses$", re.MULTILINE)
LIVE = re.compile(r"\rfusion-node: up \d+ s \| pred\.speech \d+\.\d Hz \d+ misses \| "
                  r"pred\.action \d+\.\d Hz \d+ misses \| ok")


def _free_endpoint() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _start_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("fusion-node: publishing on")]


def _run_piped(*options: str) -> tuple[int, str, str]:
    process = subprocess.run([*NODE, "run", "--duration", "3", *options],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=60, check=False)
    return process.returncode, process.stdout, process.stderr


def test_a_service_gets_the_start_line_once_and_no_live_line():
    endpoint = _free_endpoint()
    code, out, err = _run_piped("--pub", endpoint)
    assert code == 0, err
    assert out == ""
    assert "\r" not in err
    [start] = _start_lines(err)
    assert start.startswith(f"fusion-node: publishing on {endpoint}; engines: ")
    for engine in load_config().engines:
        assert (f"{engine.name} ({engine.topic}, ONNX Runtime, {engine.rate_hz:g} Hz, "
                f"{engine.latency_ns // 1_000_000} ms latency)") in start
    assert "drivers: camera.front (sim_camera), audio.mic0 (sim_microphone)" in start
    assert SUMMARY.search(err), err


def test_quiet_leaves_only_the_final_summary():
    code, out, err = _run_piped("--pub", _free_endpoint(), "--quiet")
    assert code == 0, err
    assert out == "" and _start_lines(err) == []
    assert SUMMARY.search(err), err


def test_a_terminal_gets_a_live_line_cleared_before_the_summary():
    master, terminal = pty.openpty()
    # Wide enough that the line is not cut to the terminal's width.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    # Stopped by SIGINT once the live line shows, not after a fixed time: on a loaded machine
    # start-up can take longer than a short --duration.
    process = subprocess.Popen([*NODE, "run", "--pub", _free_endpoint(), "--duration", "60"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    shown = b""
    interrupted = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the node's end of the terminal closed
                    break
                if not chunk:
                    break
                shown += chunk
            if not interrupted and len(LIVE.findall(shown.decode(errors="replace"))) >= 2:
                process.send_signal(signal.SIGINT)
                interrupted = True
        code = process.wait(timeout=30)
        out = process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()
        os.close(master)
    err = shown.decode(errors="replace")
    assert interrupted, err
    assert code == 0, err
    assert out == b""
    assert len(_start_lines(err.replace("\r\n", "\n"))) == 1
    # Refreshed in place: no newline between two refreshes.
    assert re.search(LIVE.pattern + r"[^\n]*" + LIVE.pattern, err), err
    # The last refresh blanked at once (by the stop, or by a log record before it), and the
    # summary a line of its own after it.
    tail = err[list(LIVE.finditer(err))[-1].end():]
    assert re.match(r"\r +\r", tail), tail
    assert SUMMARY.search(tail.replace("\r\n", "\n")), tail
