# SPDX-License-Identifier: Apache-2.0
"""End-to-end check that docs/protocol.md suffices: run the node, read it with
examples/spec_subscriber.py (written from the spec alone), and compare what arrives with
what the spec says about the prediction topics (section 5.6)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBSCRIBER = ROOT / "examples" / "spec_subscriber.py"
LATENCY_NS = {"pred.speech": 25_000_000, "pred.action": 15_000_000}  # section 5.6


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, node: subprocess.Popen, timeout: float) -> None:
    """Retry a plain TCP connect until the node's PUB socket is bound."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert node.poll() is None, f"node exited early with {node.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"node did not bind port {port} within {timeout} s")


def _stop(node: subprocess.Popen) -> tuple[int, str]:
    if node.poll() is None:
        node.send_signal(signal.SIGTERM)
    try:
        _, err = node.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        node.kill()
        _, err = node.communicate()
        raise AssertionError(f"node did not exit within 15 s of SIGTERM\n{err}") from None
    return node.returncode, err


def _start_node() -> tuple[str, subprocess.Popen]:
    """The node on a free port, running for 8 s; returns once its PUB socket is bound."""
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    node = subprocess.Popen(
        [sys.executable, "-m", "fusion_node.cli", "--log-level", "WARNING", "run",
         "--duration", "8", "--pub", endpoint],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_listening(int(endpoint.rsplit(":", 1)[1]), node, timeout=6.0)
    except AssertionError:
        _stop(node)
        raise
    return endpoint, node


def test_spec_subscriber_reads_the_node() -> None:
    endpoint, node = _start_node()
    try:
        sub = subprocess.run(
            [sys.executable, str(SUBSCRIBER), "--endpoint", endpoint, "--topics", "pred.",
             "--count", "40", "--timeout", "10"],
            check=False, cwd=ROOT, capture_output=True, text=True, timeout=30,
        )
    finally:
        node_rc, node_err = _stop(node)

    context = f"subscriber stderr:\n{sub.stderr[-4000:]}\nnode stderr:\n{node_err[-4000:]}"
    assert sub.returncode == 0, context
    lines = [json.loads(line) for line in sub.stdout.splitlines() if line.strip()]
    assert len(lines) >= 40, context
    topics = {line["topic"] for line in lines}
    assert {"pred.speech", "pred.action"} <= topics, (topics, context)

    for line in lines:
        topic = line["topic"]
        assert line["t_publish_ns"] >= line["deadline_ns"], line
        assert line["deadline_ns"] - line["t_ref_ns"] == LATENCY_NS[topic], line
        arrays = {a["name"]: a for a in line["arrays"]}
        if topic == "pred.action":
            assert arrays["actions"]["shape"] == [20, 3], line
        elif topic == "pred.speech":
            posterior = arrays["command_posterior"]
            assert posterior["shape"] == [17], line
            assert abs(sum(posterior["values"]) - 1.0) <= 1e-5, line

    summary = json.loads(sub.stderr.strip().splitlines()[-1])["summary"]
    assert summary["accepted"] >= 40, summary
    assert summary["rejected"] == 0, summary
    # Everything else section 5 says about the topics (fields, masks, step times, ...).
    assert summary["warnings"] == {}, context

    assert node_rc == 0, f"node exited with {node_rc}\n{node_err[-4000:]}"


def _build_cpp_subscriber(out: Path) -> Path:
    import shutil

    import pytest

    source = ROOT / "examples" / "cpp" / "subscriber.cpp"
    compiler = shutil.which("g++")
    headers = [Path("/usr/include/zmq.hpp"), Path("/usr/include/msgpack.hpp")]
    if compiler is None or not all(h.exists() for h in headers):
        pytest.skip("needs g++ and Debian's cppzmq-dev and libmsgpack-cxx-dev "
                    "(scripts/setup.sh --test installs them)")
    binary = out / "subscriber"
    subprocess.run([compiler, "-std=c++17", "-O2", str(source), "-o", str(binary), "-lzmq"],
                   check=True, capture_output=True, text=True)
    return binary


def test_cpp_subscriber_reads_the_node(tmp_path: Path) -> None:
    binary = _build_cpp_subscriber(tmp_path)
    endpoint, node = _start_node()
    try:
        sub = subprocess.run([str(binary), endpoint, "20"], check=False, capture_output=True,
                             text=True, timeout=30)
    finally:
        code, err = _stop(node)
    assert sub.returncode == 0, sub.stderr
    assert "rejected" not in sub.stderr
    lines = sub.stdout.splitlines()
    assert sum(line.startswith("pred.action seq") for line in lines) >= 5
    assert sum(line.startswith("pred.speech seq") for line in lines) >= 5
    # The decoded action chunk: its first joint target is printed as a float.
    assert any(line.strip().startswith("actions[0] = ") for line in lines)
    assert code == 0, err
