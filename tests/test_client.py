"""The control-loop client against real sockets."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import zmq

from fusion_node.client import ActionFollower, Client
from fusion_node.protocol import Prediction
from fusion_node.transport import Publisher

MS = 1_000_000


def chunk(seq: int, t_ref_ns: int, value: float) -> Prediction:
    steps = t_ref_ns + 20 * MS * np.arange(1, 21, dtype=np.int64)
    actions = np.full((20, 3), value, np.float32)
    return Prediction("pred.action", seq, t_ref_ns, t_ref_ns + 30 * MS, "action", "h",
                      {"joints.arm": True}, {}, {"actions": actions, "step_times_ns": steps}, {})


def connected_pair(tmp_path) -> tuple[zmq.Context, Publisher, Client]:
    context = zmq.Context()
    publisher = Publisher(context, f"ipc://{tmp_path}/pred.ipc")
    client = Client(publisher.endpoint, context=context)
    # PUB/SUB slow joiner: publish probes until the subscription has reached the publisher.
    for seq in range(200):
        publisher.send(chunk(seq, seq * MS, 0.0))
        if client.recv(timeout_ms=10) is not None:
            break
    return context, publisher, client


def test_latest_never_blocks_and_returns_the_newest(tmp_path):
    context, publisher, client = connected_pair(tmp_path)
    try:
        started = time.monotonic()
        for _ in range(1000):
            client.latest("pred.speech")  # nothing on this topic: returns at once
        assert client.latest("pred.speech") is None
        assert time.monotonic() - started < 5  # a blocking call would hang the test
        for seq in range(1000, 1010):
            publisher.send(chunk(seq, seq * MS, float(seq)))
        deadline = time.monotonic() + 5
        newest = None
        while time.monotonic() < deadline:
            newest = client.latest("pred.action")
            if newest is not None and newest.seq == 1009:
                break
        assert newest is not None and newest.seq == 1009
        assert float(newest.arrays["actions"][0, 0]) == 1009.0
    finally:
        client.close()
        publisher.close()
        context.term()


def test_malformed_messages_are_counted_not_raised(tmp_path):
    context, publisher, client = connected_pair(tmp_path)
    try:
        publisher.send_parts([b"pred.action", b"\xc1"])
        publisher.send(chunk(5000, 5000 * MS, 1.0))
        msg = client.recv(timeout_ms=2000)
        assert msg is not None and msg.seq == 5000
        assert client.rejected == {"bad_header": 1}
    finally:
        client.close()
        publisher.close()
        context.term()


async def test_async_stream_yields_predictions(tmp_path):
    context, publisher, client = connected_pair(tmp_path)
    try:
        async def first_two() -> list[int]:
            seqs = []
            async for msg in client.stream():
                seqs.append(msg.seq)
                if len(seqs) == 2:
                    return seqs
            return seqs

        task = asyncio.create_task(first_two())
        for seq in (7000, 7001):
            await asyncio.sleep(0.05)
            publisher.send(chunk(seq, seq * MS, 0.0))
        assert await asyncio.wait_for(task, 5) == [7000, 7001]
    finally:
        client.close()
        publisher.close()
        context.term()


def test_action_follower_interpolates_and_ensembles():
    follower = ActionFollower(decay=0.0)
    assert follower.action_at(0) is None
    follower.add(chunk(0, 0, 1.0))
    np.testing.assert_allclose(follower.action_at(30 * MS), [1.0, 1.0, 1.0])
    # A newer chunk covering the same time: equal weights with decay 0 → the mean.
    follower.add(chunk(1, 20 * MS, 3.0))
    np.testing.assert_allclose(follower.action_at(50 * MS), [2.0, 2.0, 2.0])
    # Only the newer chunk reaches this far.
    np.testing.assert_allclose(follower.action_at(410 * MS), [3.0, 3.0, 3.0])
    follower.add(chunk(1, 20 * MS, 9.0))  # a repeat is ignored
    np.testing.assert_allclose(follower.action_at(50 * MS), [2.0, 2.0, 2.0])


def test_action_follower_interpolates_between_steps():
    follower = ActionFollower()
    prediction = chunk(0, 0, 0.0)
    prediction.arrays["actions"][:, 0] = np.arange(20, dtype=np.float32)
    follower.add(prediction)
    assert follower.action_at(30 * MS)[0] == 0.5  # halfway between step 0 (20 ms) and 1


def test_client_imports_no_heavy_modules():
    import subprocess
    import sys

    code = ("import sys, fusion_node.client; "
            "print(sorted(m for m in ('torch', 'cv2', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_client_bench_reports_latest_cost():
    from fusion_node.bench.client import run_client_bench

    result = run_client_bench(duration_s=1.0, rate_hz=200.0)
    assert result["calls"] == 200
    assert 0 < result["latest_us"]["p50"] <= result["latest_us"]["max"]
    assert result["calls_with_a_new_chunk"] > 0
