"""The control-loop client against real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from fusion_node.client import ActionFollower, Client
from fusion_node.errors import ProtocolError
from fusion_node.protocol import Prediction, encode
from fusion_node.security import generate_keys, load_key_pair
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
        latest = client.latest("pred.action")
        assert latest is not None and latest.seq == 7001
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


def recv_seq(client: Client, seq: int) -> Prediction:
    """The message numbered `seq`, skipping probes that connected_pair left in flight."""
    while True:
        msg = client.recv(timeout_ms=5000)
        assert msg is not None, f"message {seq} never arrived"
        if msg.seq == seq:
            assert isinstance(msg, Prediction)
            return msg


@contextlib.contextmanager
def fails_after(seconds: float) -> Iterator[None]:
    """Turn a hang into a failure: SIGALRM interrupts a blocking poll or a busy loop."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still waiting after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_recv_waits_up_to_its_timeout_for_a_message(tmp_path):
    context, publisher, client = connected_pair(tmp_path)
    try:
        while client.recv(timeout_ms=50) is not None:  # probes still in flight
            pass
        assert client.recv(timeout_ms=50) is None
        # Sent well after recv started waiting: only a recv that honours its timeout sees it.
        timer = threading.Timer(0.2, publisher.send, (chunk(3000, 3000 * MS, 0.0),))
        timer.start()
        msg = client.recv(timeout_ms=5000)
        timer.join()
        assert msg is not None and msg.seq == 3000
    finally:
        client.close()
        publisher.close()
        context.term()


def test_recv_keeps_what_it_returns_as_the_latest_of_its_topic(tmp_path):
    context, publisher, client = connected_pair(tmp_path)
    try:
        publisher.send(chunk(4000, 4000 * MS, 0.0))
        msg = recv_seq(client, 4000)
        assert client.latest("pred.action") is msg
    finally:
        client.close()
        publisher.close()
        context.term()


def test_iterating_a_client_yields_every_valid_message(tmp_path):
    context, publisher, client = connected_pair(tmp_path)
    try:
        publisher.send_parts([b"pred.action", b"\xc1"])
        publisher.send(chunk(6000, 6000 * MS, 0.0))
        publisher.send(chunk(6001, 6001 * MS, 0.0))
        seqs: list[int] = []
        with fails_after(5):
            for msg in client:
                seqs.append(msg.seq)
                if msg.seq == 6001:
                    break
        assert seqs[-2:] == [6000, 6001]
        assert client.rejected == {"bad_header": 1}
    finally:
        client.close()
        publisher.close()
        context.term()


def ramp(values: np.ndarray) -> Prediction:
    """A chunk at t_ref 0 whose steps (20, 40, …, 400 ms) have targets `values` on joint 0."""
    prediction = chunk(0, 0, 0.0)
    prediction.arrays["actions"][:, 0] = values
    return prediction


def test_action_follower_covers_a_chunk_from_its_first_to_its_last_step():
    follower = ActionFollower()
    squares = np.arange(20, dtype=np.float32) ** 2  # not linear: a wrong step shows
    follower.add(ramp(squares))
    assert follower.action_at(20 * MS - 1) is None
    assert follower.action_at(20 * MS)[0] == 0.0
    assert follower.action_at(400 * MS)[0] == 361.0
    assert follower.action_at(400 * MS + 1) is None
    for step in range(19):
        midway = (step + 1) * 20 * MS + 10 * MS
        assert follower.action_at(midway)[0] == (squares[step] + squares[step + 1]) / 2, step


def test_action_follower_gives_a_step_its_own_target_at_its_time():
    follower = ActionFollower()
    # 1 − 1e-20 rounds to 1 in float64: reaching a step by interpolating from the previous
    # one would give 0 instead of 1e-20.
    values = np.where(np.arange(20) % 2 == 1, 1e-20, 1.0).astype(np.float32)
    follower.add(ramp(values))
    for step in range(20):
        assert follower.action_at((step + 1) * 20 * MS)[0] == np.float64(values[step]), step


def test_action_follower_interpolates_float32_targets_in_float64():
    follower = ActionFollower()
    values = np.zeros(20, np.float32)
    values[:2] = [1e-8, 1.0]
    follower.add(ramp(values))
    low, high = np.float64(values[0]), np.float64(values[1])
    assert follower.action_at(30 * MS)[0] == low + 0.5 * (high - low)


def test_action_follower_reads_step_times_as_int64_nanoseconds():
    # Epoch nanoseconds as float64 have 256 ns steps; the follower's arithmetic must not.
    base = 2**60
    prediction = ramp(np.arange(20, dtype=np.float32))
    prediction.arrays["step_times_ns"] = (base + prediction.arrays["step_times_ns"]).astype(
        np.float64)
    follower = ActionFollower()
    follower.add(prediction)
    assert follower.action_at(base + 20 * MS + 100)[0] == 100 / (20 * MS)


def test_action_follower_weights_older_chunks_more_by_default():
    follower = ActionFollower()
    follower.add(chunk(0, 0, 1.0))
    follower.add(chunk(1, 20 * MS, 3.0))
    older, newer = 1.0, np.exp(-0.01)
    np.testing.assert_allclose(follower.action_at(50 * MS),
                               [(1.0 * older + 3.0 * newer) / (older + newer)] * 3, rtol=1e-12)


def test_action_follower_keeps_the_newest_32_chunks_by_default():
    follower = ActionFollower()
    # Chunk k covers k + 20 ms to k + 400 ms: only chunk 0 covers 20 ms.
    for k in range(32):
        follower.add(chunk(k, k * MS, 1.0))
    assert follower.action_at(20 * MS) is not None
    follower.add(chunk(32, 32 * MS, 1.0))
    assert follower.action_at(20 * MS) is None


def test_action_follower_refuses_a_chunk_without_its_arrays():
    prediction = chunk(0, 0, 1.0)
    del prediction.arrays["actions"]
    with pytest.raises(ProtocolError) as raised:
        ActionFollower().add(prediction)
    assert raised.value.reason == "bad_field"
    assert str(raised.value) == "bad_field: pred.action has no array 'actions'"


def test_a_client_given_its_keys_receives_from_a_curve_publisher(tmp_path):
    generate_keys(tmp_path / "keys", "server")
    generate_keys(tmp_path / "keys", "client-robot")
    server = load_key_pair(tmp_path / "keys/server.key_secret")
    context = zmq.Context()
    publisher = context.socket(zmq.PUB)
    publisher.setsockopt(zmq.LINGER, 0)
    # A CURVE server: a client that does not speak CURVE with the server's key gets nothing.
    publisher.curve_secretkey = server.secret
    publisher.curve_publickey = server.public
    publisher.curve_server = True
    publisher.bind(f"ipc://{tmp_path}/curve.ipc")
    client = Client(f"ipc://{tmp_path}/curve.ipc", context=context,
                    client_key=tmp_path / "keys/client-robot.key_secret",
                    server_public_key=tmp_path / "keys/server.key")
    try:
        received = None
        for seq in range(200):  # PUB/SUB slow joiner, and the CURVE handshake first
            publisher.send_multipart(encode(chunk(seq, seq * MS, 0.0)))
            received = client.recv(timeout_ms=10)
            if received is not None:
                break
        assert received is not None and received.stream == "pred.action"
    finally:
        client.close()
        publisher.close()
        context.term()
