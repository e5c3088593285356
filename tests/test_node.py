"""The node end to end: real driver processes, real sockets, real ONNX Runtime sessions."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import msgpack
import numpy as np
import pytest
import zmq

from engines.backends import tensorrt_unavailable
from fusion_node.config import load_config, parse_config
from fusion_node.errors import EngineError
from fusion_node.host.supervisor import RestartPolicy
from fusion_node.protocol import Health, JointState, Prediction, encode
from fusion_node.transport import Publisher
from tests.conftest import (
    ACTION_GRID,
    ALWAYS_CRASHING,
    ENGINES,
    SPEECH_GRID,
    assert_ticking,
    run_node,
    running,
)


async def test_default_config_publishes_fixed_latency_predictions():
    node, collector = await run_node(load_config(), 4.0)
    speech = collector.on("pred.speech")
    action = collector.on("pred.action")
    assert len(speech) > 30 and len(action) > 25
    for topic, msgs, latency_ms in (("pred.speech", speech, 25), ("pred.action", action, 15)):
        for msg in msgs:
            assert isinstance(msg, Prediction)
            assert msg.deadline_ns == msg.t_ref_ns + latency_ms * 1_000_000
            # Never published before its deadline: the latency is fixed, not "as soon as".
            assert msg.t_publish_ns >= msg.deadline_ns
            trace = msg.trace
            assert (trace["t_capture_ns"] <= trace["t_receive_ns"] <= trace["t_infer_start_ns"]
                    <= trace["t_infer_end_ns"] <= trace["t_ready_ns"])
        seqs = [m.seq for m in msgs]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        # `late` is timing, not correctness: it is measured by `bench pipeline`; here it
        # must only be consistent with the trace.
        assert all(m.late == (m.trace["t_ready_ns"] > m.deadline_ns) for m in msgs), topic
    # Speech ticks on the 30 Hz grid, and a tick a loaded machine lost is counted (missing
    # input, error or skipped), never lost silently; every modality was present.
    health_now = collector.on("node.health")[-1].stats["engines"]
    assert_ticking(speech, SPEECH_GRID, health_now["speech"])
    assert_ticking(action, ACTION_GRID, health_now["action"])
    assert speech[-1].mask == {"audio.mic0": True, "camera.front": True}
    assert speech[-1].arrays["command_posterior"].shape == (17,)
    assert abs(float(speech[-1].arrays["command_posterior"].sum()) - 1.0) < 1e-5
    assert isinstance(speech[-1].fields["command"], str)
    assert action[-1].arrays["actions"].shape == (20, 3)
    assert action[-1].mask == {"camera.scene": True, "joints.arm": True, "pred.speech": True}
    # Each engine says what it runs on and, where "auto" did not get TensorRT, why.
    reason = tensorrt_unavailable("fp16")
    for name in ("speech", "action"):
        assert health_now[name]["backend"] == ("tensorrt" if reason is None else "onnxruntime")
        assert health_now[name].get("tensorrt_unused") == reason
    # A stopped node has freed its engines (GPU memory, on TensorRT).
    for runner in node.runners:
        with pytest.raises(EngineError, match="closed"):
            runner.engine.infer(runner.engine._example)
    steps = action[-1].arrays["step_times_ns"]
    assert steps[0] == action[-1].t_ref_ns + 20_000_000
    health = [m for m in collector.on("node.health") if isinstance(m, Health)]
    assert health, "node.health was not published"
    streams = health[-1].stats["streams"]
    assert streams["audio.mic0"]["received"] > 0 and streams["joints.arm"]["received"] > 0
    assert all(d["state"] == "running" for d in health[-1].stats["drivers"].values())


EXTERNAL_JOINTS = """
[node]
connect = ["{endpoint}"]

[[drivers]]
kind = "sim_camera"
stream = "camera.front"
process = false

[[drivers]]
kind = "sim_microphone"
stream = "audio.mic0"
process = false

[[streams]]
name = "joints.arm"
kind = "joints"
""" + ENGINES


def bad_messages(seq: int) -> list[tuple[str, list[bytes]]]:
    good = encode(JointState("joints.arm", seq, time.monotonic_ns(), ("a", "b", "c"),
                             np.zeros(3), np.zeros(3), np.zeros(3)))
    header = msgpack.unpackb(bytes(good[1]))
    wrong_dtype = dict(header, dtype="complex64")
    newer = dict(header, v=2)
    return [
        ("truncated", [b"joints.arm"]),
        ("bad_dtype", [good[0], msgpack.packb(wrong_dtype), bytes(good[2])]),
        ("size_mismatch", [good[0], bytes(good[1]), bytes(good[2])[:-8]]),
        ("header_too_large", [good[0], b"\x80" * (70 * 1024), bytes(good[2])]),
        ("unsupported_version", [good[0], msgpack.packb(newer), bytes(good[2])]),
        ("bad_header", [good[0], b"\xc1garbage", bytes(good[2])]),
    ]


async def test_bad_messages_are_counted_and_the_node_keeps_running(tmp_path):
    endpoint = f"ipc://{tmp_path}/controller.ipc"
    context = zmq.Context()
    controller = Publisher(context, endpoint)
    config = parse_config(EXTERNAL_JOINTS.replace("{endpoint}", endpoint), "test")

    last_bad_ns = [0]

    def controller_loop(seconds: float) -> None:
        # A robot controller at 200 Hz whose stream is interleaved with malformed messages.
        end = time.monotonic() + seconds
        seq = 0
        while time.monotonic() < end:
            t = time.monotonic_ns()
            controller.send(JointState("joints.arm", seq, t, ("a", "b", "c"),
                                       np.full(3, 0.1), np.zeros(3), np.zeros(3)))
            if seq % 50 == 10 and time.monotonic() < end - 1.5:  # a clean last 1.5 s
                for _, parts in bad_messages(seq):
                    controller.send_parts(parts)
                last_bad_ns[0] = time.monotonic_ns()
            seq += 1
            time.sleep(0.005)

    try:
        node, collector = await run_node(config, 4.0, during=controller_loop)
    finally:
        controller.close()
        context.term()
    rejected = node.subscriber.rejected if node.subscriber else {}
    for reason, _ in bad_messages(0):
        assert rejected[reason] >= 3, f"{reason} not counted: {dict(rejected)}"
    action = collector.on("pred.action")
    assert len(action) > 25
    # Predictions kept coming after the last batch of bad messages.
    assert any(p.t_ref_ns > last_bad_ns[0] for p in action)
    health = collector.on("node.health")[-1].stats
    assert health["rejected"]["bad_dtype"] >= 1


MISSING = """
[[drivers]]
kind = "sim_microphone"
stream = "audio.mic0"
process = false

[[streams]]
name = "camera.front"
kind = "frame"

[[streams]]
name = "joints.arm"
kind = "joints"
""" + ENGINES


async def test_missing_streams_mask_optional_and_report_required():
    config = dataclasses.replace(parse_config(MISSING, "test"), startup_timeout_ns=0)
    node, collector = await run_node(config, 3.0)
    speech = collector.on("pred.speech")
    # No camera: speech still predicts from audio, with the video marked missing.
    assert len(speech) > 20
    assert speech[-1].mask == {"audio.mic0": True, "camera.front": False}
    # No joint states: the action engine publishes nothing and says why.
    assert collector.on("pred.action") == []
    action = node.health()["engines"]["action"]
    assert action["missing_required"] > 20
    assert "joints.arm" in action["last_missing"]
    assert action["published"] == 0


async def test_killed_driver_process_is_restarted_and_its_stream_resumes():
    config = dataclasses.replace(load_config(), restart=RestartPolicy(backoff_initial_s=0.2))
    async with running(config) as (node, collector):
        await asyncio.sleep(1.0)
        camera = node.driver_processes["camera.front"]
        first_pid = camera.pid
        camera.kill()
        await asyncio.sleep(4.0)
    assert camera.restarts == 1 and camera.pid != first_pid
    speech = collector.on("pred.speech")
    masks = [m.mask["camera.front"] for m in speech]
    # Video went missing while the camera was down, then came back.
    first_gap = masks.index(False)
    assert True in masks[first_gap:]
    assert masks[-1] is True
    # Predictions kept coming throughout: no tick lost to the crash.
    seqs = [m.seq for m in speech]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))




async def test_driver_that_always_crashes_is_given_up_and_its_stream_masked():
    config = dataclasses.replace(parse_config(ALWAYS_CRASHING, "test"), startup_timeout_ns=0)
    async with running(config) as (node, collector):
        camera = node.driver_processes["camera.front"]
        for _ in range(300):  # each attempt starts a Python process: allow up to 30 s
            if camera.state == "dead":
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # the node carries on without the camera
    assert camera.state == "dead" and camera.restarts == 2 and camera.last_exit_code == 1
    assert node.health()["drivers"]["camera.front"]["state"] == "dead"
    speech = collector.on("pred.speech")
    assert len(speech) > 30 and speech[-1].mask["camera.front"] is False
    assert collector.on("pred.action")[-1].mask["camera.front"] is False


@pytest.mark.parametrize("text, message", [
    ("[[engines]]\nname = 1", "engines[0].name = 1 is not a str"),
    ("[node]\npub = 'tcp://10.1.2.3:5599'", "not loopback"),
    ("[node]\nbogus = 1", "unknown key(s) ['bogus']"),
])
def test_config_errors_name_the_problem(text, message):
    from fusion_node.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config(text, "t")
    assert message in str(info.value)


def test_shipped_launch_files_are_valid():
    from pathlib import Path

    from drivers.registry import check_driver_config

    paths = sorted(Path(__file__).parent.parent.joinpath("launch").glob("*.toml"))
    assert paths
    for path in paths:
        for driver in load_config(path).drivers:
            check_driver_config(driver.kind, driver.stream, driver.config)


async def test_systemd_readiness_and_watchdog_on_a_real_notify_socket(tmp_path, monkeypatch):
    import os
    import socket

    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.1)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    received: list[str] = []

    def listen(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                received.append(sock.recv(4096).decode())
            except TimeoutError:
                pass

    try:
        node, _ = await run_node(load_config(), 1.5, during=listen)
        listen(0.5)  # STOPPING=1 is sent after the run
    finally:
        sock.close()
    assert any(r.startswith("READY=1") for r in received)
    assert received.count("WATCHDOG=1") >= 5
    assert "STOPPING=1" in received
    assert node.ready.is_set()


async def test_top_renders_the_live_health():
    from fusion_node.cli.top import render

    _, collector = await run_node(load_config(), 1.5)
    table = render(collector.on("node.health")[-1].stats)
    for expected in ("camera.front", "audio.mic0", "joints.arm", "speech", "action",
                     "running", "publish − deadline", "clock ±ms"):
        assert expected in table
    # Local streams share the node's clock: their stamps need no mapping.
    streams = collector.on("node.health")[-1].stats["streams"]
    assert streams["audio.mic0"]["clock"] == {"source": "local", "uncertainty_ms": 0.0}
    assert render({}).startswith("fusion-node")  # an empty or foreign map still renders


def test_launch_sim_is_the_embedded_default():
    from pathlib import Path

    sim = Path(__file__).parent.parent / "launch" / "sim.toml"
    assert load_config(sim) == load_config()


async def test_the_simulated_arm_follows_this_node_whatever_its_pub():
    """`actions = "node.pub"`: the arm takes pred.action from the endpoint this node bound
    (here an ephemeral port), never from another node on the default one."""
    import json

    async with running(load_config()) as (node, collector):
        argv = node.driver_processes["joints.arm"].argv
        await asyncio.sleep(1.0)
    config = json.loads(argv[argv.index("--config") + 1])
    assert node.pub_endpoint != "tcp://127.0.0.1:5599"
    assert config["actions"] == node.pub_endpoint
    assert collector.on("pred.action")  # and there were actions to follow there
