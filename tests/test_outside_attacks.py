"""An outside process that may publish on an endpoint the node connects to cannot crash the
node or silence a stream (issue 18's B1 and B2).

The node runs as its own process (`fusion-node run`), so an attack that kills it fails the
test instead of the test runner; the attacker is another process, speaking only the
protocol, through real sockets and real shared-memory files. The test reads what the node
reports on `node.health`, subscribed like any client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from fusion_node.bench.faults import ATTACK_PROBE, fault_process_argv, free_tcp_port
from fusion_node.clock import MonotonicClock
from fusion_node.protocol import Health
from fusion_node.shm import SHM_DIR, reclaim_stale_segments, segment_names
from fusion_node.transport import Subscriber
from tests.conftest import ENGINES, SIM_SENSORS

REPO = Path(__file__).resolve().parents[1]

ATTACKED = """
[node]
pub = "tcp://127.0.0.1:{port}"
connect = ["{endpoint}"]
""" + SIM_SENSORS + ENGINES


_RUN_NODE = "import sys; from fusion_node.cli import main; sys.exit(main())"


class NodeProcess:
    """`fusion-node run` on a launch file, and a subscriber to its health."""

    def __init__(self, tmp_path: Path, attack_endpoint: str) -> None:
        port = free_tcp_port()
        config = tmp_path / "attacked.toml"
        config.write_text(ATTACKED.replace("{port}", str(port))
                          .replace("{endpoint}", attack_endpoint))
        self.log = tmp_path / "node.log"
        # Its own session: whatever is left of it (drivers) can be killed as a group.
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _RUN_NODE, "run", "--config", str(config)],
                cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        self.context = zmq.Context()
        self.health_subscriber = Subscriber(self.context, [f"tcp://127.0.0.1:{port}"],
                                            MonotonicClock(), topics=("node.health",))

    def health(self, timeout_s: float = 20.0) -> dict:
        """The next health report (the node publishes one a second)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the node died: exit {self.proc.returncode}"
            msg = self.health_subscriber.recv(200)
            if isinstance(msg, Health):
                return msg.stats
        raise AssertionError(f"no node.health within {timeout_s} s")

    def health_where(self, condition, timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            health = self.health(timeout_s)
            if condition(health):
                return health
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {health}"

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; the exit status."""
        self.health_subscriber.close()
        self.context.term()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # drivers a dead node left behind
        except ProcessLookupError:
            pass
        return self.proc.returncode


def attack(node: NodeProcess, kind: str, *args: str) -> dict:
    """Run attacker `kind` once the node hears its probes; its JSON summary."""
    attacker = subprocess.Popen(fault_process_argv(kind, *args), cwd=REPO, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        node.health_where(lambda h: h["unknown_streams"].get(ATTACK_PROBE, 0) > 0, 30,
                          "the node to hear the attacker")
        stdout, _ = attacker.communicate("go\n", timeout=60)
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait()
    assert attacker.returncode == 0, f"attacker exited {attacker.returncode}"
    return json.loads(stdout)


@pytest.fixture
def node(tmp_path):
    process = NodeProcess(tmp_path, f"ipc://{tmp_path}/attack.ipc")
    yield process
    status = process.stop()
    assert status == 0, f"node exited {status}: {process.log.read_text()[-2000:]}"


def test_a_ring_truncated_rewritten_or_unlinked_under_the_node_is_rejected_not_fatal(
        node, tmp_path):
    before = node.health_where(lambda h: h["streams"]["camera.front"]["received"] > 30, 30,
                               "camera frames")
    done = attack(node, "shm-attack", "--stream", "camera.front", "--endpoint",
                  f"ipc://{tmp_path}/attack.ipc")
    # A sealed ring cannot be truncated at all: the kernel refuses.
    assert done["truncate_refused"] == 1
    after = node.health_where(
        lambda h: h["streams"]["camera.front"]["received"]
        > before["streams"]["camera.front"]["received"] + 60, 30, "camera frames after")
    rejected = after["rejected"]
    # The unsealed ring: refused before it is mapped, both times, with the reason.
    assert rejected.get("shm_unsealed", 0) == done["unsealed_headers"] == 2
    # The garbage slot table and the unlinked ring: the frame the header names is not there.
    assert rejected.get("stale_generation", 0) \
        >= done["rewritten_headers"] + done["unlinked_headers"]
    # The node's own camera and both engines went on.
    for engine in ("speech", "action"):
        assert after["engines"][engine]["published"] \
            > before["engines"][engine]["published"] + 20, engine


def test_joint_states_stamped_a_day_ahead_are_refused_and_the_stream_goes_on(node, tmp_path):
    node.health_where(lambda h: h["streams"]["joints.arm"]["received"] > 200, 30,
                      "joint states")
    done = attack(node, "future-stamps", "--stream", "joints.arm", "--endpoint",
                  f"ipc://{tmp_path}/attack.ipc", "--count", "520")
    during = node.health()
    after = node.health_where(
        lambda h: h["streams"]["joints.arm"]["received"]
        > during["streams"]["joints.arm"]["received"] + 200, 30, "joint states after")
    joints = after["streams"]["joints.arm"]
    assert joints["too_new"] == done["future"] == 520
    # Every good sample after the attack was kept: none refused as too old.
    assert joints["too_old"] == 0
    assert joints["age_ms"] is not None and joints["age_ms"] < 100
    # seq 2^63 - 1 between the driver's seqs: two restarts (there and back), not 9.2e18 gaps.
    assert joints["seq_restarts"] == 2 and joints["seq_gaps"] < 1000
    assert after["engines"]["action"]["published"] \
        > during["engines"]["action"]["published"] + 20


def test_a_killed_node_leaves_no_driver_running_and_no_ring_behind(tmp_path):
    before = set(segment_names())
    node = NodeProcess(tmp_path, f"ipc://{tmp_path}/attack.ipc")
    try:
        node.health_where(lambda h: h["streams"]["camera.front"]["received"] > 10, 30,
                          "camera frames")
        rings = set(segment_names()) - before
        drivers = {int(name.split("-")[3]) for name in rings}  # fusion-node-shm-PID-...
        assert rings and node.proc.pid not in drivers
        node.proc.kill()  # SIGKILL: no clean-up of its own
        node.proc.wait(10)
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{pid}") for pid in drivers):
            assert time.monotonic() < deadline, "drivers outlived the killed node"
            time.sleep(0.05)
        # Stopped by SIGTERM, the drivers closed their rings; a name a driver could not
        # clear (killed itself) is reclaimed by the next start.
        reclaim_stale_segments()
        assert not any(os.path.lexists(SHM_DIR / name) for name in rings)
    finally:
        node.stop()
