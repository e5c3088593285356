"""The shared-memory path: real publisher processes, bit-exact frames, leases, clean-up."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from fusion_node.clock import MonotonicClock
from fusion_node.errors import ConfigError, ProtocolError
from fusion_node.protocol import AudioChunk, Frame, JointState, decode, encode
from fusion_node.security import is_loopback_or_ipc
from fusion_node.shm import (
    SHM_DIR,
    ShmConfig,
    ShmReader,
    ShmWriter,
    in_shared_memory,
    reclaim_stale_segments,
    segment_names,
    shm_entry,
    shm_entry_prefix,
)
from fusion_node.transport import Publisher, Subscriber

SHAPE = (240, 320, 3)  # 230,400 bytes: above the default 64 KiB threshold
REPO = Path(__file__).resolve().parents[1]

# A publisher process: sends probes until told "go" on stdin, then `count` frames every
# `interval_ms`, prints a JSON summary, then waits for a line on stdin (or a SIGKILL).
_PUBLISHER = r"""
import json, select, sys, time
import numpy as np, zmq
from fusion_node.protocol import Frame, Health
from fusion_node.shm import ShmConfig
from fusion_node.transport import Publisher

args = json.loads(sys.argv[1])
context = zmq.Context()
pub = Publisher(context, args["endpoint"], hwm=1000,
                shm=ShmConfig(slots=args["slots"], lease_ms=args["lease_ms"]))
seq = 0
while not select.select([sys.stdin], [], [], 0.01)[0]:
    pub.send(Health("bench.probe", seq, time.monotonic_ns(), {}))
    seq += 1
sys.stdin.readline()
shape = tuple(args["shape"])
longest_ns = 0
for i in range(args["count"]):
    image = (np.arange(np.prod(shape), dtype=np.uint32) * (i + 1) % 251).astype(np.uint8)
    start = time.monotonic_ns()
    pub.send(Frame("camera.test", i, start, image.reshape(shape)))
    longest_ns = max(longest_ns, time.monotonic_ns() - start)
    time.sleep(args["interval_ms"] / 1000)
print(json.dumps({"sent": args["count"], "longest_send_ms": longest_ns / 1e6,
                  "shm_sent": pub.shm.sent, "fallbacks": pub.shm.fallbacks,
                  "segments": pub.shm.segments}), flush=True)
sys.stdin.readline()
pub.close()
context.term()
"""


def expected_image(i: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    image = (np.arange(np.prod(shape), dtype=np.uint32) * (i + 1) % 251).astype(np.uint8)
    return image.reshape(shape)


class PublisherProcess:
    def __init__(self, endpoint: str, count: int, interval_ms: float = 1.0, slots: int = 64,
                 lease_ms: int = 3000) -> None:
        args = {"endpoint": endpoint, "count": count, "interval_ms": interval_ms,
                "slots": slots, "lease_ms": lease_ms, "shape": list(SHAPE)}
        self.proc = subprocess.Popen([sys.executable, "-c", _PUBLISHER, json.dumps(args)],
                                     cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def summary(self) -> dict:
        assert self.proc.stdout is not None
        return json.loads(self.proc.stdout.readline())

    def finish(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("exit\n")
        self.proc.stdin.flush()
        assert self.proc.wait(10) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def start(context: zmq.Context, endpoint: str, publisher: PublisherProcess) -> Subscriber:
    """Subscribe, wait for the publisher's probes (no slow-joiner loss), then say go."""
    subscriber = Subscriber(context, [endpoint], MonotonicClock(), hwm=1000)
    deadline = time.monotonic() + 20
    while subscriber.recv(100) is None:
        assert time.monotonic() < deadline, "publisher process never started"
    publisher.go()
    return subscriber


def next_frame(subscriber: Subscriber) -> Frame | None:
    while True:
        msg = subscriber.recv(5000)
        if msg is None or isinstance(msg, Frame):
            return msg


def test_frames_from_another_process_arrive_bit_exact_through_shm(
        context: zmq.Context, tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/cam.ipc"
    publisher = PublisherProcess(endpoint, count=40, interval_ms=2)
    try:
        subscriber = start(context, endpoint, publisher)
        for i in range(40):
            frame = next_frame(subscriber)
            assert frame is not None and frame.seq == i
            lease = subscriber.last_lease
            assert lease is not None, "frame did not come through shared memory"
            assert not frame.image.flags.writeable
            np.testing.assert_array_equal(frame.image, expected_image(i))
            assert lease.valid()
        summary = publisher.summary()
        assert summary["shm_sent"] == 40 and summary["fallbacks"] == 0
        assert dict(subscriber.rejected) == {}
        subscriber.close()
        publisher.finish()
        assert not (SHM_DIR / summary["segments"][0]).exists()  # unlinked on close
    finally:
        publisher.kill()


def test_a_held_frame_is_never_overwritten_and_a_lagging_subscriber_drops_whole_frames(
        context: zmq.Context, tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/cam.ipc"
    # A lease far shorter than the test: only the release channel keeps frame 0 intact.
    publisher = PublisherProcess(endpoint, count=150, interval_ms=2, slots=4, lease_ms=40)
    try:
        subscriber = start(context, endpoint, publisher)
        held = next_frame(subscriber)
        assert held is not None and held.seq == 0
        lease = subscriber.last_lease
        assert lease is not None
        summary = publisher.summary()  # while we hold frame 0 and read nothing
        assert summary["sent"] == 150
        assert summary["longest_send_ms"] < 100  # never waited for us
        # The three other slots went round and round; frame 0's slot was never touched.
        assert summary["shm_sent"] == 150 and summary["fallbacks"] == 0
        assert lease.valid()
        np.testing.assert_array_equal(held.image, expected_image(0))
        received = []
        for frame in iter(lambda: next_frame_or_none(subscriber), None):
            # Whatever is delivered is the frame its header names, bit for bit.
            np.testing.assert_array_equal(frame.image, expected_image(frame.seq))
            received.append(frame.seq)
        dropped = subscriber.shm_dropped["camera.test"]
        assert dropped > 0, "the frames whose slots were reused before we read them"
        assert dropped == subscriber.rejected["stale_generation"]
        assert len(received) + dropped == 149  # each one either whole or counted as lost
        assert received == sorted(received)
        subscriber.close()
        publisher.finish()
    finally:
        publisher.kill()


def next_frame_or_none(subscriber: Subscriber) -> Frame | None:
    msg = subscriber.recv(300)
    while msg is not None and not isinstance(msg, Frame):
        msg = subscriber.recv(300)
    return msg


def test_sigkilled_publisher_leaves_no_segment_after_next_start(
        context: zmq.Context, tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/cam.ipc"
    publisher = PublisherProcess(endpoint, count=3, interval_ms=1)
    try:
        subscriber = start(context, endpoint, publisher)
        summary = publisher.summary()
        subscriber.close()
        publisher.proc.send_signal(signal.SIGKILL)
        publisher.proc.wait(10)
        leaked = summary["segments"]
        # The memory went with the process (a memfd); its dangling link is what is left.
        assert leaked and all(os.path.lexists(SHM_DIR / name) for name in leaked)
        assert not any((SHM_DIR / name).exists() for name in leaked)
        writer = ShmWriter(ShmConfig())  # the next start
        assert set(leaked) <= set(writer.reclaimed)
        assert not any(os.path.lexists(SHM_DIR / name) for name in leaked)
        writer.close()
    finally:
        publisher.kill()


def test_reclaim_spares_live_publishers() -> None:
    writer = ShmWriter(ShmConfig())
    parts = writer.wrap(encode(Frame("camera.test", 0, 1, expected_image(0))))
    assert len(parts) == 2
    assert reclaim_stale_segments() == []  # we are alive
    assert segment_names(os.getpid()) == writer.segments
    writer.close()
    assert segment_names(os.getpid()) == []


# -- validation of shared-memory headers ------------------------------------------------------

@pytest.fixture
def shm_message() -> Iterator[tuple[ShmWriter, list]]:
    writer = ShmWriter(ShmConfig(slots=4))
    parts = writer.wrap(encode(Frame("camera.test", 7, 123, expected_image(7))))
    yield writer, parts
    writer.close()


def with_shm(parts: list, **changes: object) -> list:
    header = msgpack.unpackb(parts[1])
    header["shm"] = {**header["shm"], **changes} if changes else header["shm"]
    return [parts[0], msgpack.packb(header)]


# Values a header may carry in either form (any msgpack ints, or as `wrap` writes them).
REFUSED_SHM_VALUES = [
    ({"slot": 4}, "shm_out_of_range"),
    ({"slot": 2**40}, "shm_out_of_range"),
    ({"offset": 0}, "shm_out_of_range"),
    ({"length": 1 << 30}, "shm_out_of_range"),
    ({"generation": 4}, "stale_generation"),
    ({"generation": 1}, "stale_generation"),
    ({"segment": "fusion-node-shm-1-1-999"}, "shm_missing"),
    ({"slot": -1}, "bad_shm"),
]


@pytest.mark.parametrize(("changes", "reason"), [
    *REFUSED_SHM_VALUES,
    ({"length": 1000}, "stale_generation"),  # not what the slot holds
    ({"segment": "../../etc/passwd"}, "bad_shm"),
    ({"generation": True}, "bad_shm"),
])
def test_corrupt_shm_header_is_rejected_with_a_reason(
        shm_message: tuple[ShmWriter, list], changes: dict, reason: str) -> None:
    _, parts = shm_message
    reader = ShmReader()
    frame = decode(with_shm(parts), 0, reader)  # the intact header decodes
    np.testing.assert_array_equal(frame.image, expected_image(7))
    assert in_shared_memory(frame.image) and not in_shared_memory(frame.image.copy())
    with pytest.raises(ProtocolError) as exc:
        decode(with_shm(parts, **changes), 0, reader)
    assert exc.value.reason == reason


def test_a_ring_cannot_be_truncated_under_its_readers(
        shm_message: tuple[ShmWriter, list]) -> None:
    writer, parts = shm_message
    frame = decode(parts, 0, ShmReader())
    with pytest.raises(PermissionError):  # the kernel enforces the shrink seal
        os.truncate(SHM_DIR / writer.segments[0], 0)
    np.testing.assert_array_equal(frame.image, expected_image(7))


@pytest.mark.parametrize("kind", ["unsealed file", "fifo"])
def test_a_segment_that_could_shrink_or_block_is_refused_before_it_is_mapped(
        shm_message: tuple[ShmWriter, list], kind: str) -> None:
    writer, parts = shm_message
    # A name of a live owner (ours), in fusion-node's pattern, that is not a sealed ring.
    name = f"{writer.segments[0].rsplit('-', 1)[0]}-{10**6}"
    path = SHM_DIR / name
    if kind == "fifo":
        os.mkfifo(path, 0o600)  # opening it for reading would wait for a writer
    else:  # a plain file holding a copy of a real ring: right layout, no seal
        path.write_bytes((SHM_DIR / writer.segments[0]).read_bytes())
    try:
        with pytest.raises(ProtocolError) as exc:
            decode(with_shm(parts, segment=name), 0, ShmReader())
        assert exc.value.reason == ("shm_unsealed" if kind != "fifo" else "shm_missing")
    finally:
        path.unlink()


def as_wrapped(parts: list, seq: int = 7, **changes: object) -> list:
    """`parts` with fields changed but in the exact byte layout `ShmWriter.wrap` writes."""
    header = msgpack.unpackb(parts[1])
    shm = {**header["shm"], **changes}
    layout = bytes(encode(Frame(header["stream"], seq, header["t_capture_ns"],
                                expected_image(7)))[1])
    raw = (bytes((layout[0] + 1,)) + layout[1:] + shm_entry(
        shm_entry_prefix(shm["segment"]), shm["slot"], shm["generation"], shm["offset"],
        shm["length"]))
    return [parts[0], raw]


@pytest.mark.parametrize(("changes", "reason"), [
    *REFUSED_SHM_VALUES,
    ({"offset": -4096}, "bad_shm"),
    ({"seq": -1}, "bad_field"),
])
def test_corrupt_header_in_the_remembered_layout_is_rejected_too(
        shm_message: tuple[ShmWriter, list], changes: dict, reason: str) -> None:
    """Once a stream's shared-memory layout is remembered, the next headers are read at fixed
    offsets: altered values in that exact layout must fail as on the full path."""
    _, parts = shm_message
    assert bytes(parts[1]) == as_wrapped(parts)[1]  # the helper writes what wrap writes
    reader = ShmReader()
    for _ in range(2):  # full path, then the remembered layout: the same frame
        frame = decode(parts, 0, reader)
        assert (frame.seq, frame.t_capture_ns) == (7, 123)
        np.testing.assert_array_equal(frame.image, expected_image(7))
        assert reader.last_lease is not None and reader.last_lease.valid()
    seq = changes.pop("seq", 7)
    with pytest.raises(ProtocolError) as exc:
        decode(as_wrapped(parts, seq, **changes), 0, reader)
    assert exc.value.reason == reason
    assert decode(parts, 0, reader).seq == 7  # and the intact one still decodes


def test_shm_header_not_a_map_and_receiver_without_shm(
        shm_message: tuple[ShmWriter, list]) -> None:
    _, parts = shm_message
    header = msgpack.unpackb(parts[1])
    with pytest.raises(ProtocolError) as exc:
        decode([parts[0], msgpack.packb({**header, "shm": [1, 2]})], 0, ShmReader())
    assert exc.value.reason == "bad_shm"
    with pytest.raises(ProtocolError) as exc:
        decode(parts)
    assert exc.value.reason == "shm_unsupported"


def test_a_header_read_late_is_delivered_unless_its_slot_was_reused(
        shm_message: tuple[ShmWriter, list]) -> None:
    """The lease no longer decides what a live subscriber gets: the slot's generation does."""
    writer, parts = shm_message
    later = ShmReader(clock_ns=lambda: time.monotonic_ns() + 10 * 10**9)
    frame = decode(parts, 0, later)
    np.testing.assert_array_equal(frame.image, expected_image(7))
    del frame  # released: the slot may be reused ...
    for seq in range(4):  # ... and is, once the three others have been written
        writer.wrap(encode(Frame("camera.test", seq, 1, expected_image(seq))))
    with pytest.raises(ProtocolError) as exc:
        decode(parts, 0, later)
    assert exc.value.reason == "stale_generation"


def test_subscriber_counts_corrupt_shm_headers(
        context: zmq.Context, tmp_path: Path, shm_message: tuple[ShmWriter, list]) -> None:
    _, parts = shm_message
    endpoint = f"ipc://{tmp_path}/raw.ipc"
    socket = context.socket(zmq.PUB)
    socket.bind(endpoint)
    subscriber = Subscriber(context, [endpoint], MonotonicClock())
    try:
        deadline = time.monotonic() + 10
        while True:  # slow joiner: resend the good one until it arrives
            socket.send_multipart(with_shm(parts))
            if subscriber.recv(50) is not None:
                break
            assert time.monotonic() < deadline
        while subscriber.recv(300) is not None:  # the good copies still in flight
            pass
        subscriber.rejected.clear()
        for bad in ({"slot": 99}, {"generation": 10}, {"segment": "fusion-node-shm-1-1-1"}):
            socket.send_multipart(with_shm(parts, **bad))
        socket.send_multipart(with_shm(parts))
        frame = subscriber.recv(2000)  # the bad ones are skipped, never raised
        assert isinstance(frame, Frame) and frame.seq == 7
        assert subscriber.rejected == {"shm_out_of_range": 1, "stale_generation": 1,
                                       "shm_missing": 1}
    finally:
        subscriber.close()
        socket.close(linger=0)


# -- choosing the path ------------------------------------------------------------------------

def test_small_messages_and_predictions_stay_plain() -> None:
    writer = ShmWriter(ShmConfig(threshold_bytes=1024))
    small = encode(Frame("camera.small", 0, 1, np.zeros((8, 8, 3), np.uint8)))
    assert writer.wrap(small) is small
    big_audio = encode(AudioChunk("audio.mic0", 0, 1, 16000, 0, np.zeros((4096, 1), np.int16)))
    assert len(writer.wrap(big_audio)) == 2
    joints = encode(JointState("joints.arm", 0, 1, ("a",) * 64, *np.zeros((3, 64))))
    assert len(writer.wrap(joints)) == 2
    decoded = decode(writer.wrap(joints), 0, ShmReader())
    assert isinstance(decoded, JointState) and decoded.position.shape == (64,)
    writer.close()


def test_growing_payload_moves_to_a_bigger_segment() -> None:
    writer = ShmWriter(ShmConfig())
    reader = ShmReader()
    first = decode(writer.wrap(encode(Frame("camera.x", 0, 1, expected_image(0)))), 0, reader)
    old = writer.segments
    bigger = expected_image(1, (480, 640, 3))
    second = decode(writer.wrap(encode(Frame("camera.x", 1, 1, bigger))), 0, reader)
    assert writer.segments != old and not (SHM_DIR / old[0]).exists()
    np.testing.assert_array_equal(second.image, bigger)
    np.testing.assert_array_equal(first.image, expected_image(0))  # old mapping still alive
    writer.close()


def test_publisher_chooses_shm_only_for_local_endpoints(context: zmq.Context,
                                                        tmp_path: Path) -> None:
    assert is_loopback_or_ipc("ipc:///tmp/x.ipc") and is_loopback_or_ipc("inproc://x")
    assert is_loopback_or_ipc("tcp://127.0.0.1:5599") and is_loopback_or_ipc("tcp://localhost:1")
    assert not is_loopback_or_ipc("tcp://10.0.0.2:5599")
    assert not is_loopback_or_ipc("tcp://robot.local:5599")
    endpoint = f"ipc://{tmp_path}/plain.ipc"
    plain = Publisher(context, endpoint, shm=None)
    subscriber = Subscriber(context, [endpoint], MonotonicClock())
    try:
        image = expected_image(3)
        deadline = time.monotonic() + 10
        while (frame := subscriber.recv(50)) is None:
            plain.send(Frame("camera.plain", 0, 1, image))
            assert time.monotonic() < deadline
        assert isinstance(frame, Frame) and subscriber.last_lease is None
        np.testing.assert_array_equal(frame.image, image)
        assert plain.shm is None
    finally:
        subscriber.close()
        plain.close()


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError):
        ShmConfig(slots=0)
    with pytest.raises(ConfigError):
        ShmConfig(threshold_bytes=0)


def test_loaned_slot_is_sent_without_a_copy(context: zmq.Context, tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/loan.ipc"
    publisher = Publisher(context, endpoint, shm=ShmConfig(slots=2))
    subscriber = Subscriber(context, [endpoint], MonotonicClock())
    try:
        deadline = time.monotonic() + 10
        while subscriber.recv(50) is None:  # slow joiner
            publisher.send(Frame("camera.loan", 0, 1, np.zeros((4, 4, 3), np.uint8)))
            assert time.monotonic() < deadline
        image = publisher.loan("camera.loan", SHAPE)
        image[...] = expected_image(5)
        assert publisher.shm is not None
        publisher.send(Frame("camera.loan", 1, 1, image))
        assert publisher.shm.sent == 1
        publisher.loan("camera.loan", SHAPE)  # never sent: given back by the next loan
        image = publisher.loan("camera.loan", SHAPE)
        image[...] = expected_image(6)
        publisher.send(Frame("camera.loan", 2, 1, image))
        received = [m for m in iter(lambda: subscriber.recv(500), None) if m.seq > 0]
        assert [m.seq for m in received] == [1, 2]
        for msg, i in zip(received, (5, 6)):
            np.testing.assert_array_equal(msg.image, expected_image(i))
        assert publisher.shm.fallbacks == 0 and publisher.shm.loaned == 2
    finally:
        subscriber.close()
        publisher.close()


def test_reader_unmaps_the_segments_of_a_restarted_publisher() -> None:
    """A publisher that restarts makes a new segment; the reader must let the old ring go,
    or every camera restart pins another ring in the node's memory."""
    reader = ShmReader()
    first_writer = ShmWriter(ShmConfig())
    decode(first_writer.wrap(encode(Frame("camera.x", 0, 1, expected_image(0)))), 0, reader)
    old = list(first_writer.segments)
    first_writer.close()  # the publisher goes away and its segment is unlinked
    second_writer = ShmWriter(ShmConfig())
    frame = decode(second_writer.wrap(encode(Frame("camera.x", 0, 1, expected_image(1)))), 0,
                   reader)
    np.testing.assert_array_equal(frame.image, expected_image(1))
    assert not set(old) & set(reader._mapped)
    assert set(second_writer.segments) <= set(reader._mapped)
    second_writer.close()


def test_a_loan_after_close_makes_no_new_segment() -> None:
    # A camera's render thread can still ask for a slot while its publisher shuts down.
    writer = ShmWriter(ShmConfig(slots=2))
    assert writer.loan(b"camera.test", SHAPE, np.dtype(np.uint8)) is not None
    writer.close()
    assert writer.loan(b"camera.test", SHAPE, np.dtype(np.uint8)) is None
    assert segment_names(os.getpid()) == []


# -- the release channel: holds, whole-frame drops, a full ring, dead subscribers -------------

# A subscriber process: prints "ready" once it hears the publisher's probes, then reads
# frames until none comes for `idle_ms`. It checks each frame against the image its header
# names when it gets it and again after holding it `hold_ms`, and prints a JSON summary.
# With `keep`, it keeps the first `keep` frames, prints "holding", and waits to be killed.
_SUBSCRIBER = r"""
import json, sys, time
import numpy as np, zmq
from fusion_node.clock import MonotonicClock
from fusion_node.protocol import Frame
from fusion_node.transport import Subscriber

args = json.loads(sys.argv[1])
shape = tuple(args["shape"])

def expected(i):
    return (np.arange(np.prod(shape), dtype=np.uint32) * (i + 1) % 251).astype(np.uint8
                                                                                ).reshape(shape)

context = zmq.Context()
sub = Subscriber(context, [args["endpoint"]], MonotonicClock(), hwm=10000)
while sub.recv(100) is None:
    pass
print("ready", flush=True)
received, overwritten, kept = 0, 0, []
while (msg := sub.recv(args["idle_ms"])) is not None:
    if not isinstance(msg, Frame):
        continue
    received += 1
    intact = np.array_equal(msg.image, expected(msg.seq))
    if args["keep"]:
        kept.append(msg)
        if len(kept) == args["keep"]:
            print("holding", flush=True)
            sys.stdin.readline()
        continue
    time.sleep(args["hold_ms"] / 1000)
    lease = sub.last_lease
    intact = intact and np.array_equal(msg.image, expected(msg.seq)) and lease.valid()
    overwritten += not intact
print(json.dumps({"received": received, "overwritten": overwritten,
                  "dropped": sub.shm_dropped.get("camera.test", 0),
                  "rejected": dict(sub.rejected)}), flush=True)
"""


class SubscriberProcess:
    def __init__(self, endpoint: str, hold_ms: float = 0, keep: int = 0,
                 idle_ms: int = 2000) -> None:
        args = {"endpoint": endpoint, "hold_ms": hold_ms, "keep": keep, "idle_ms": idle_ms,
                "shape": list(SHAPE)}
        self.proc = subprocess.Popen([sys.executable, "-c", _SUBSCRIBER, json.dumps(args)],
                                     cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def test_a_slow_subscriber_drops_whole_frames_and_none_is_ever_overwritten(
        tmp_path: Path) -> None:
    """Two subscriber processes, one holding every frame longer than the lease: the slow one
    loses whole frames, counted; neither ever sees a frame change under it; the publisher
    never falls back and never waits."""
    endpoint = f"ipc://{tmp_path}/cam.ipc"
    publisher = PublisherProcess(endpoint, count=300, interval_ms=2, slots=8, lease_ms=40)
    fast = SubscriberProcess(endpoint)
    slow = SubscriberProcess(endpoint, hold_ms=60)
    try:
        assert fast.line() == "ready" and slow.line() == "ready"
        publisher.go()
        summary = publisher.summary()
        assert summary["sent"] == 300 and summary["shm_sent"] == 300
        assert summary["fallbacks"] == 0 and summary["longest_send_ms"] < 100
        results = {"fast": json.loads(fast.line()), "slow": json.loads(slow.line())}
        for name, result in results.items():
            assert result["overwritten"] == 0, (name, result)
            # Every frame either arrived whole or was counted as lost whole.
            assert result["received"] + result["dropped"] == 300, (name, result)
            assert set(result["rejected"]) <= {"stale_generation"}, (name, result)
        assert results["slow"]["dropped"] > 200, results  # it could take one in 30
        assert results["slow"]["received"] >= 5, results
        publisher.finish()
    finally:
        for process in (fast, slow):
            process.kill()
        publisher.kill()


def test_a_full_ring_is_an_explicit_outcome(context: zmq.Context, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    from drivers.process import loan_or_plain
    from fusion_node.shm import RingFull

    endpoint = f"ipc://{tmp_path}/full.ipc"
    publisher = Publisher(context, endpoint, shm=ShmConfig(slots=2, lease_ms=0))
    subscriber = Subscriber(context, [endpoint], MonotonicClock())
    try:
        deadline = time.monotonic() + 10
        while subscriber.recv(50) is None:  # slow joiner: small frames stay inline
            publisher.send(Frame("camera.full", 0, 1, np.zeros((4, 4, 3), np.uint8)))
            assert time.monotonic() < deadline
        held = []
        for seq in (1, 2):
            image = publisher.loan("camera.full", SHAPE)
            image[...] = expected_image(seq)
            publisher.send(Frame("camera.full", seq, 1, image))
            del image
            frame = subscriber.recv(2000)
            assert isinstance(frame, Frame) and subscriber.last_lease is not None
            held.append(frame)
        # Both slots are held by a live subscriber: a lease of 0 ms changes nothing.
        with pytest.raises(RingFull) as full:
            publisher.loan("camera.full", SHAPE)
        assert (full.value.slots, full.value.held, full.value.lent) == (2, 2, 0)
        started = time.monotonic()
        with pytest.raises(RingFull):
            publisher.loan("camera.full", SHAPE, wait_ms=50)  # the blocking option
        assert time.monotonic() - started >= 0.05
        plain = loan_or_plain(publisher)("camera.full", SHAPE, np.dtype(np.uint8))
        assert not in_shared_memory(plain)  # the driver's choice, sent inline below
        # send() never waits: a full ring sends inline, counted on both sides, logged once.
        with caplog.at_level("WARNING"):
            for seq in (3, 4):
                plain[...] = expected_image(seq)
                publisher.send(Frame("camera.full", seq, 1, plain))
                frame = subscriber.recv(2000)
                assert isinstance(frame, Frame) and frame.seq == seq
                assert subscriber.last_lease is None
                np.testing.assert_array_equal(frame.image, expected_image(seq))
        assert publisher.shm is not None
        assert publisher.shm.fallbacks_by_stream == {"camera.full": 2}
        assert subscriber.shm_fallbacks == {"camera.full": 2}
        assert subscriber.shm_stats()["fallbacks"] == {"camera.full": 2}
        warnings = [r.getMessage() for r in caplog.records if "camera.full" in r.getMessage()]
        assert len(warnings) == 2, warnings  # the publisher's and the subscriber's, once each
        # A release frees a slot at once; a blocked loan takes it.
        threading.Timer(0.05, held.pop).start()
        started = time.monotonic()
        image = publisher.loan("camera.full", SHAPE, wait_ms=5000)
        assert in_shared_memory(image) and time.monotonic() - started < 2
        np.testing.assert_array_equal(held[0].image, expected_image(1))  # still intact
    finally:
        subscriber.close()
        publisher.close()


def test_a_dead_subscribers_slots_are_freed_after_the_lease(context: zmq.Context,
                                                            tmp_path: Path) -> None:
    from fusion_node.protocol import Health
    from fusion_node.shm import RingFull

    endpoint = f"ipc://{tmp_path}/dead.ipc"
    lease_s = 0.5
    publisher = Publisher(context, endpoint, hwm=1000,
                          shm=ShmConfig(slots=2, lease_ms=int(lease_s * 1000)))
    holder = SubscriberProcess(endpoint, keep=2)
    try:
        deadline = time.monotonic() + 20
        assert holder.proc.stdout is not None
        while not select.select([holder.proc.stdout], [], [], 0.01)[0]:
            publisher.send(Health("bench.probe", 0, time.monotonic_ns(), {}))
            assert time.monotonic() < deadline, "subscriber process never started"
        assert holder.line() == "ready"
        for seq in (0, 1):
            image = publisher.loan("camera.test", SHAPE)
            image[...] = expected_image(seq)
            publisher.send(Frame("camera.test", seq, time.monotonic_ns(), image))
            del image
        assert holder.line() == "holding"
        time.sleep(2 * lease_s)
        with pytest.raises(RingFull):  # a live subscriber's holds outlast the lease
            publisher.loan("camera.test", SHAPE)
        holder.proc.send_signal(signal.SIGKILL)
        holder.proc.wait(10)
        image = publisher.loan("camera.test", SHAPE)  # dead, and past the lease: freed
        assert in_shared_memory(image)
        # A subscriber that dies within the lease: its slot waits out the lease first.
        del image
        second = SubscriberProcess(endpoint, keep=1)
        while not select.select([second.proc.stdout], [], [], 0.01)[0]:
            publisher.send(Health("bench.probe", 0, time.monotonic_ns(), {}))
            assert time.monotonic() < deadline + 20, "subscriber process never started"
        assert second.line() == "ready"
        for seq in (2, 3):
            image = publisher.loan("camera.test", SHAPE)
            image[...] = expected_image(seq)
            publisher.send(Frame("camera.test", seq, time.monotonic_ns(), image))
            del image
        assert second.line() == "holding"  # frame 2; frame 3 it never reads
        second.proc.send_signal(signal.SIGKILL)
        second.proc.wait(10)
        written = time.monotonic()
        kept = publisher.loan("camera.test", SHAPE)  # frame 3's slot, lent and kept
        assert in_shared_memory(kept)
        with pytest.raises(RingFull):
            publisher.loan("camera.test", SHAPE)  # frame 2's: its holder is dead, lease runs
        assert time.monotonic() - written < lease_s
        time.sleep(lease_s)
        assert in_shared_memory(publisher.loan("camera.test", SHAPE))
        second.kill()
    finally:
        holder.kill()
        publisher.close()


def test_a_loan_that_may_wait_goes_at_the_slowest_subscribers_pace(
        context: zmq.Context, tmp_path: Path) -> None:
    """Back-pressure on request: a publisher whose loans may wait rewrites only slots whose
    frame every subscriber took, so a slow subscriber loses nothing."""
    from fusion_node.protocol import Health

    endpoint = f"ipc://{tmp_path}/paced.ipc"
    publisher = Publisher(context, endpoint, hwm=1000, shm=ShmConfig(slots=8))
    slow = SubscriberProcess(endpoint, hold_ms=5, idle_ms=1000)
    try:
        deadline = time.monotonic() + 20
        assert slow.proc.stdout is not None
        while not select.select([slow.proc.stdout], [], [], 0.01)[0]:
            publisher.send(Health("bench.probe", 0, time.monotonic_ns(), {}))
            assert time.monotonic() < deadline, "subscriber process never started"
        assert slow.line() == "ready"
        for seq in range(100):  # flat out: 100 frames far faster than 5 ms each
            image = publisher.loan("camera.test", SHAPE, wait_ms=5000)
            image[...] = expected_image(seq)
            publisher.send(Frame("camera.test", seq, time.monotonic_ns(), image))
            del image
            if seq == 0:  # a subscriber paces the publisher from the first frame it takes
                time.sleep(0.2)
        result = json.loads(slow.line())
        assert result == {"received": 100, "overwritten": 0, "dropped": 0, "rejected": {}}
    finally:
        slow.kill()
        publisher.close()


def test_a_subscriber_beyond_the_release_rows_gets_checked_copies() -> None:
    writer = ShmWriter(ShmConfig(slots=2, subscribers=1))
    first, second = ShmReader(), ShmReader()
    try:
        parts = writer.wrap(encode(Frame("camera.test", 1, 1, expected_image(1))))
        held = decode(parts, 0, first)  # takes the only row: a view, holding its slot
        copy = decode(parts, 0, second)  # no row left: a copy, checked after it was made
        assert in_shared_memory(held.image) and not in_shared_memory(copy.image)
        assert (first.copied, second.copied) == (0, 1)
        np.testing.assert_array_equal(copy.image, expected_image(1))
        assert not copy.image.flags.writeable
        del copy  # holds nothing: the slot stays held by the first reader alone
        lease = first.last_lease
        assert lease is not None
        for seq in (2, 3, 4):  # all through the other slot, again and again
            assert len(writer.wrap(encode(Frame("camera.test", seq, 1,
                                                expected_image(seq))))) == 2
        assert writer.fallbacks == 0 and lease.valid()
        np.testing.assert_array_equal(held.image, expected_image(1))
    finally:
        writer.close()


def _slot_of(parts: list) -> int:
    return msgpack.unpackb(parts[1])["shm"]["slot"]


def test_a_slot_every_subscriber_took_and_dropped_is_reused_at_once() -> None:
    """The newest such slot is still in the CPU's cache; one a subscriber holds, or has not
    taken yet, is not reused early."""
    writer = ShmWriter(ShmConfig(slots=8, reuse_after=4))
    fast, lagging = ShmReader(), ShmReader()
    try:
        first = writer.wrap(encode(Frame("camera.test", 0, 1, expected_image(0))))
        del decode(first, 0, fast).image  # taken and dropped by the only subscriber
        second = writer.wrap(encode(Frame("camera.test", 1, 2, expected_image(1))))
        assert _slot_of(second) == _slot_of(first)
        held = decode(second, 0, fast)  # held: its slot is not rewritten under it
        third = writer.wrap(encode(Frame("camera.test", 2, 3, expected_image(2))))
        assert _slot_of(third) != _slot_of(second)
        np.testing.assert_array_equal(held.image, expected_image(1))
        del held
        # A second subscriber that took only the oldest frame still has the newer ones to
        # read: they are not reused before it takes them.
        del decode(second, 0, lagging).image
        del decode(third, 0, fast).image
        fourth = writer.wrap(encode(Frame("camera.test", 3, 4, expected_image(3))))
        assert _slot_of(fourth) == _slot_of(second) != _slot_of(third)
        np.testing.assert_array_equal(decode(third, 0, lagging).image, expected_image(2))
    finally:
        fast.close()
        lagging.close()
        writer.close()


# -- the fence after fork, row locks, fallbacks, retired rings, lease checks ------------------

def child_exit_code(pid: int, hung: str) -> int:
    """The exit code of forked child `pid`; the test fails with `hung` after 20 s."""
    deadline = time.monotonic() + 20
    while (waited := os.waitpid(pid, os.WNOHANG)) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(hung)
        time.sleep(0.001)
    return os.waitstatus_to_exitcode(waited[1])


def test_a_child_forked_while_the_fence_is_taken_still_reads_frames(
        shm_message: tuple[ShmWriter, list]) -> None:
    """The fence lock is renewed in a forked child: one inherited while held would hang the
    child's first read of a frame."""
    from fusion_node import shm

    _, parts = shm_message
    with shm._FENCE:  # what another thread of the parent may be doing at fork time
        pid = os.fork()
        if pid == 0:  # the child: read a frame through the hold-fence-check handshake
            code = 1
            try:
                frame = decode(parts, 0, ShmReader())
                code = 0 if np.array_equal(frame.image, expected_image(7)) else 2
            finally:
                os._exit(code)
    assert child_exit_code(pid, "the forked child hung on the fence it inherited") == 0


FALLBACK_WARNING = ("camera.test: every one of 2 shared-memory slots is held by a subscriber "
                    "or lent (2 held): sending inline instead; counted in fallbacks, logged "
                    "once")


def shm_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fusion_node.shm"]


def test_fallbacks_are_counted_each_time_and_logged_once_per_stream(
        caplog: pytest.LogCaptureFixture) -> None:
    writer = ShmWriter(ShmConfig(slots=2))
    reader = ShmReader()
    try:
        held = [decode(writer.wrap(encode(Frame("camera.test", seq, 1, expected_image(seq)))),
                       0, reader) for seq in (0, 1)]  # both slots held by a live subscriber
        with caplog.at_level("WARNING", logger="fusion_node.shm"):
            inline = encode(Frame("camera.test", 2, 1, expected_image(2)))
            assert writer.wrap(inline) is inline
            assert writer.fallbacks == 1
            assert shm_warnings(caplog) == [FALLBACK_WARNING]
            for seq in (3, 4):
                inline = encode(Frame("camera.test", seq, 1, expected_image(seq)))
                assert writer.wrap(inline) is inline
        assert writer.fallbacks == 3 and writer.fallbacks_by_stream == {"camera.test": 3}
        assert len(shm_warnings(caplog)) == 1
        assert all(in_shared_memory(frame.image) for frame in held)
    finally:
        reader.close()
        writer.close()


def test_a_retired_ring_is_no_longer_unlinked_at_exit() -> None:
    writer = ShmWriter(ShmConfig())
    try:
        writer.wrap(encode(Frame("camera.x", 0, 1, expected_image(0))))
        old = writer.segments
        writer.wrap(encode(Frame("camera.x", 1, 1, expected_image(1, (480, 640, 3)))))
        assert writer.segments != old
        # The exit clean-up lists the live ring only, not the one already unlinked.
        assert writer._names == set(writer.segments)
    finally:
        writer.close()
    assert writer._names == set()


def test_lease_check_raises_stale_generation_once_the_slot_is_rewritten(
        shm_message: tuple[ShmWriter, list]) -> None:
    writer, parts = shm_message
    reader = ShmReader()
    frame = decode(parts, 0, reader)
    lease = reader.last_lease
    assert lease is not None
    lease.check()  # held: unchanged
    del frame  # released: the slot may be reused, and is once the three others were written
    for seq in range(4):
        writer.wrap(encode(Frame("camera.test", seq, 1, expected_image(seq))))
    assert not lease.valid()
    with pytest.raises(ProtocolError) as exc:
        lease.check()
    assert exc.value.reason == "stale_generation"
    assert str(exc.value) == (f"stale_generation: shared-memory slot {lease.slot} of "
                              f"{lease.segment!r} was rewritten after it was read")


# -- a full ring's report, dead subscribers' rows, the overwritten-slot message ---------------

def full_message(held: int, slots: int, lent: int, paced: bool = False) -> str:
    return (f"shared-memory ring of 'camera.test' is full: {held} of {slots} slots held by "
            f"subscribers, {lent} lent and not yet sent"
            + (", the others' frames not yet taken by every subscriber" if paced else ""))


def test_ring_full_names_the_stream_its_slots_and_whether_it_waited_on_pacing() -> None:
    from fusion_node.shm import RingFull

    full = RingFull("camera.test", 4, 3, 1)  # a loan that did not wait: not paced
    assert str(full) == full_message(3, 4, 1)
    assert (full.stream, full.slots, full.held, full.lent) == ("camera.test", 4, 3, 1)
    assert str(RingFull("camera.test", 4, 3, 1, paced=True)) == full_message(3, 4, 1, True)


def test_a_full_ring_counts_held_slots_apart_from_lent_ones() -> None:
    from fusion_node.shm import RingFull

    writer = ShmWriter(ShmConfig(slots=2))
    reader = ShmReader()
    try:
        held = decode(writer.wrap(encode(Frame("camera.test", 0, 1, expected_image(0)))), 0,
                      reader)  # slot 0: held by a live subscriber
        lent = writer.loan(b"camera.test", SHAPE, np.dtype(np.uint8))  # slot 1: lent
        assert lent is not None and in_shared_memory(lent)
        with pytest.raises(RingFull) as full:
            writer.loan(b"camera.test", SHAPE, np.dtype(np.uint8))
        assert (full.value.stream, full.value.slots, full.value.held,
                full.value.lent) == ("camera.test", 2, 1, 1)
        assert str(full.value) == full_message(1, 2, 1)
        assert writer.ring_full == 1
        np.testing.assert_array_equal(held.image, expected_image(0))
    finally:
        reader.close()
        writer.close()


def die_holding(parts: list) -> None:
    """A subscriber process that takes the frame `parts` names and dies holding it (no
    clean-up runs: its row keeps its hold and progress, and the kernel drops its lock)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            frame = decode(parts, 0, ShmReader())
            code = 0 if in_shared_memory(frame.image) else 2
        finally:
            os._exit(code)
    assert child_exit_code(pid, "the forked subscriber hung") == 0


def test_a_waiting_loan_clears_a_dead_subscribers_row_and_the_row_is_free_again() -> None:
    """A dead subscriber's progress would pace a waiting publisher forever, and its holds
    outlast the lease's reach while the lease runs: the waiting loan clears its row (once
    10 ms of the writer's clock have passed since the last look) and leaves it claimable."""
    from fusion_node.shm import RingFull

    now = [10_000_000]  # exactly 10 ms after the writer's clock origin: the first look is due
    writer = ShmWriter(ShmConfig(slots=2, subscribers=1), clock_ns=lambda: now[0])
    reader = ShmReader()
    try:
        die_holding(writer.wrap(encode(Frame("camera.test", 0, 1, expected_image(0)))))
        first = writer.loan(b"camera.test", SHAPE, np.dtype(np.uint8))  # the fresh slot 1
        assert first is not None
        # Slot 0 is held and paced by the dead row, within its lease: only clearing it helps.
        second = writer.loan(b"camera.test", SHAPE, np.dtype(np.uint8), wait_ms=2000)
        assert second is not None and in_shared_memory(second)
        with pytest.raises(RingFull) as full:  # both lent; the dead row holds nothing now
            writer.loan(b"camera.test", SHAPE, np.dtype(np.uint8))
        assert (full.value.held, full.value.lent) == (0, 2)
        assert str(full.value) == full_message(0, 2, 2)
        # The cleared row was unlocked: the next subscriber claims it and holds a view.
        first[...] = expected_image(1)
        frame = decode(writer.wrap(encode(Frame("camera.test", 1, 1, first))), 0, reader)
        assert in_shared_memory(frame.image) and reader.copied == 0
        np.testing.assert_array_equal(frame.image, expected_image(1))
    finally:
        reader.close()
        writer.close()


def test_dead_subscribers_are_looked_for_at_most_every_10_ms_of_the_writers_clock() -> None:
    from fusion_node.shm import RingFull

    now = [10_000_000]
    writer = ShmWriter(ShmConfig(slots=1, subscribers=1), clock_ns=lambda: now[0])
    try:
        die_holding(writer.wrap(encode(Frame("camera.test", 0, 1, expected_image(0)))))
        image = writer.loan(b"camera.test", SHAPE, np.dtype(np.uint8), wait_ms=2000)
        assert image is not None  # looked at 10 ms: the dead row was cleared
        image[...] = expected_image(1)
        now[0] += 1
        die_holding(writer.wrap(encode(Frame("camera.test", 1, 1, image))))
        del image
        with pytest.raises(RingFull) as full:  # 1 ns after the last look: not looked again
            writer.loan(b"camera.test", SHAPE, np.dtype(np.uint8), wait_ms=100)
        assert (full.value.stream, full.value.slots, full.value.held,
                full.value.lent) == ("camera.test", 1, 1, 0)
        assert str(full.value) == full_message(1, 1, 0, paced=True)
        now[0] += 10_000_000  # 10 ms after the last look: looked again, cleared
        assert writer.loan(b"camera.test", SHAPE, np.dtype(np.uint8), wait_ms=2000) is not None
    finally:
        writer.close()


def test_a_waiting_loan_never_clears_the_row_of_a_live_subscriber() -> None:
    """Only a row whose lock is gone is cleared, whichever row it is (here the second)."""
    from fusion_node.shm import RingFull

    writer = ShmWriter(ShmConfig(slots=1, subscribers=2),
                       clock_ns=lambda: 20_000_000)  # every look is due
    first, second = ShmReader(), ShmReader()
    try:
        parts = writer.wrap(encode(Frame("camera.test", 0, 1, expected_image(0))))
        del decode(parts, 0, first).image  # row 0: took the frame and dropped it
        kept = decode(parts, 0, second)  # row 1: took it and holds it
        with pytest.raises(RingFull) as full:
            writer.loan(b"camera.test", SHAPE, np.dtype(np.uint8), wait_ms=100)
        assert (full.value.held, full.value.lent) == (1, 0)
        assert second.last_lease is not None and second.last_lease.valid()
        np.testing.assert_array_equal(kept.image, expected_image(0))
    finally:
        first.close()
        second.close()
        writer.close()


def test_a_stale_generation_names_the_slot_and_both_generations(
        shm_message: tuple[ShmWriter, list]) -> None:
    writer, parts = shm_message
    shm = msgpack.unpackb(parts[1])["shm"]
    assert (shm["slot"], shm["generation"]) == (0, 2)
    with pytest.raises(ProtocolError) as exc:
        ShmReader().resolve({**shm, "generation": 4}, "frame on 'camera.test'")
    assert exc.value.reason == "stale_generation"
    assert str(exc.value) == (
        f"stale_generation: frame on 'camera.test' slot 0 of {writer.segments[0]!r} holds "
        "generation 2, header says 4: the slot was reused before this receiver read it (the "
        "whole frame is lost)")


def table_generation(writer: ShmWriter, topic: bytes, slot: int) -> int:
    """The generation slot `slot`'s entry in the ring's slot table names (the table starts
    at byte 64 of the segment, 32 bytes a slot, the generation first)."""
    buf = writer._rings[topic].buf
    return int(np.frombuffer(buf, np.uint64, 1, 64 + 32 * slot)[0])


def test_dropped_loans_give_back_their_own_slots_and_leave_the_header_alone() -> None:
    writer = ShmWriter(ShmConfig(slots=3))
    reader = ShmReader()
    try:
        kept = writer.loan(b"camera.test", SHAPE, np.dtype(np.uint8))  # slot 0
        second = writer.loan(b"camera.test", SHAPE, np.dtype(np.uint8))  # slot 1
        third = writer.loan(b"camera.test", SHAPE, np.dtype(np.uint8))  # slot 2
        assert kept is not None and second is not None and third is not None
        ring = writer._rings[b"camera.test"]
        header = bytes(ring.buf[:64])
        del second, third  # dropped unsent: each slot's generation is even again
        assert [table_generation(writer, b"camera.test", slot) for slot in range(3)] == [1, 2, 2]
        assert bytes(ring.buf[:64]) == header
        assert list(ring.loans) == [id(kept)]
        # A reader still maps the ring and takes the kept loan's frame without a copy.
        kept[...] = expected_image(1)
        frame = decode(writer.wrap(encode(Frame("camera.test", 1, 1, kept))), 0, reader)
        assert in_shared_memory(frame.image) and reader.copied == 0
        np.testing.assert_array_equal(frame.image, expected_image(1))
        assert writer.loaned == 1
    finally:
        reader.close()
        writer.close()


def test_giving_back_a_key_that_is_not_on_loan_changes_nothing() -> None:
    writer = ShmWriter(ShmConfig(slots=2))
    reader = ShmReader()
    try:
        parts = writer.wrap(encode(Frame("camera.test", 0, 1, expected_image(0))))  # slot 0
        ring = writer._rings[b"camera.test"]
        assert ring.loans == {}
        ring.give_back(12345, 0)  # no such loan: slot 0 keeps its frame
        assert ring.generation == [2, 0] and list(ring.in_use) == [0]
        assert table_generation(writer, b"camera.test", 0) == 2
        frame = decode(parts, 0, reader)
        assert in_shared_memory(frame.image)
        np.testing.assert_array_equal(frame.image, expected_image(0))
    finally:
        reader.close()
        writer.close()


# -- reclaiming a dead subscriber's holds once the lease has run out, closing a reader's row --

def test_a_dead_subscribers_hold_is_freed_exactly_when_the_slots_lease_runs_out() -> None:
    now = [5_000_000]  # below 10 ms: no waiting loan's look for dead rows is ever due
    writer = ShmWriter(ShmConfig(slots=1, subscribers=1, lease_ms=1), clock_ns=lambda: now[0])
    reader = ShmReader()
    try:
        die_holding(writer.wrap(encode(Frame("camera.test", 0, 1, expected_image(0)))))
        now[0] += 999_999  # 1 ns short of the lease: the dead row's hold stands
        inline = encode(Frame("camera.test", 1, 1, expected_image(1)))
        assert writer.wrap(inline) is inline and writer.fallbacks == 1
        now[0] += 1  # the lease has run out: the hold is freed, the slot rewritten
        parts = writer.wrap(encode(Frame("camera.test", 2, 1, expected_image(2))))
        assert len(parts) == 2 and writer.fallbacks == 1
        # The freed row was unlocked again: the next subscriber claims it and holds a view.
        frame = decode(parts, 0, reader)
        assert in_shared_memory(frame.image) and reader.copied == 0
        np.testing.assert_array_equal(frame.image, expected_image(2))
    finally:
        reader.close()
        writer.close()


def test_a_reclaimed_dead_row_no_longer_paces_a_waiting_loan() -> None:
    writer = ShmWriter(ShmConfig(slots=1, subscribers=1, lease_ms=0),
                       clock_ns=lambda: 5_000_000)  # no look for dead rows is ever due
    try:
        die_holding(writer.wrap(encode(Frame("camera.test", 0, 1, expected_image(0)))))
        parts = writer.wrap(encode(Frame("camera.test", 1, 1, expected_image(1))))
        assert len(parts) == 2  # the dead row's hold was reclaimed, and its progress with it
        assert writer.loan(b"camera.test", SHAPE, np.dtype(np.uint8), wait_ms=1) is not None
    finally:
        writer.close()


def test_a_reclaimed_dead_row_holds_no_other_slot_afterwards() -> None:
    """A dead subscriber's row is cleared to no holds at all: a lent slot (an odd generation
    never sent) stays counted as lent, not as held."""
    from fusion_node.shm import RingFull

    writer = ShmWriter(ShmConfig(slots=2, subscribers=2, lease_ms=0),
                       clock_ns=lambda: 5_000_000)
    reader = ShmReader()
    try:
        first = writer.wrap(encode(Frame("camera.test", 0, 1, expected_image(0))))  # slot 0
        del decode(first, 0, reader).image  # row 0: a live subscriber, holding nothing
        die_holding(first)  # row 1: dead, holding slot 0
        lent = writer.loan(b"camera.test", SHAPE, np.dtype(np.uint8))  # the fresh slot 1
        assert lent is not None
        second = writer.wrap(encode(Frame("camera.test", 1, 1, expected_image(1))))
        assert len(second) == 2 and writer.fallbacks == 0  # slot 0, freed from the dead row
        kept = decode(second, 0, reader)  # row 0 holds slot 0 now
        with pytest.raises(RingFull) as full:
            writer.loan(b"camera.test", SHAPE, np.dtype(np.uint8))
        assert (full.value.held, full.value.lent) == (1, 1)
        assert str(full.value) == full_message(1, 2, 1)
        np.testing.assert_array_equal(kept.image, expected_image(1))
    finally:
        reader.close()
        writer.close()


def test_a_live_subscribers_hold_outlasts_the_lease_whichever_row_it_is_in() -> None:
    writer = ShmWriter(ShmConfig(slots=1, subscribers=2, lease_ms=0),
                       clock_ns=lambda: 5_000_000)
    first, second = ShmReader(), ShmReader()
    try:
        parts = writer.wrap(encode(Frame("camera.test", 0, 1, expected_image(0))))
        del decode(parts, 0, first).image  # row 0: took the frame and dropped it
        kept = decode(parts, 0, second)  # row 1: holds it, long past the lease
        inline = encode(Frame("camera.test", 1, 1, expected_image(1)))
        assert writer.wrap(inline) is inline and writer.fallbacks == 1
        assert second.last_lease is not None and second.last_lease.valid()
        np.testing.assert_array_equal(kept.image, expected_image(0))
    finally:
        first.close()
        second.close()
        writer.close()


@pytest.mark.parametrize("lease_ms", [0, 1000], ids=["lease run out", "within the lease"])
def test_a_slot_found_held_by_a_live_subscriber_is_left_to_it_for_that_message(
        lease_ms: int) -> None:
    """The writer's last resort (freeing a dead subscriber's holds) finds the slot's holder
    alive, or the lease still running: that message goes inline, even if the holder drops
    its view just after the look (here: at the moment the look returns)."""
    writer = ShmWriter(ShmConfig(slots=1, subscribers=1, lease_ms=lease_ms),
                       clock_ns=lambda: 5_000_000)
    reader = ShmReader()
    try:
        parts = writer.wrap(encode(Frame("camera.test", 0, 1, expected_image(0))))
        views = [decode(parts, 0, reader).image]
        assert in_shared_memory(views[0])

        def drop_views_when_the_look_returns(frame, event, arg):  # type: ignore[no-untyped-def]
            if event == "call" and "_reclaim_dead" in frame.f_code.co_name:
                def on_return(frame, event, arg):  # type: ignore[no-untyped-def]
                    if event == "return":
                        views.clear()  # the last reference: the hold is released
                    return on_return
                return on_return
            return None

        inline = encode(Frame("camera.test", 1, 1, expected_image(1)))
        previous = sys.gettrace()
        sys.settrace(drop_views_when_the_look_returns)
        try:
            sent = writer.wrap(inline)
        finally:
            sys.settrace(previous)
        assert views == []  # the look did happen
        assert sent is inline and writer.fallbacks == 1
        # The slot is free now: the next message takes it.
        assert len(writer.wrap(encode(Frame("camera.test", 2, 1, expected_image(2))))) == 2
    finally:
        reader.close()
        writer.close()


def test_a_closed_readers_row_is_left_clear_and_unlocked_once_its_views_are_dropped() -> None:
    import gc

    writer = ShmWriter(ShmConfig(slots=1, subscribers=1),
                       clock_ns=lambda: 5_000_000)  # no look for dead rows is ever due
    reader, later = ShmReader(), ShmReader()
    try:
        parts = writer.wrap(encode(Frame("camera.test", 0, 1, expected_image(0))))
        frame = decode(parts, 0, reader)
        assert in_shared_memory(frame.image) and reader.last_lease is not None
        reader.close()
        assert reader.last_lease is None
        del frame, reader  # the last view: the row is closed now
        gc.collect()
        # No progress is left behind to pace a waiting loan ...
        image = writer.loan(b"camera.test", SHAPE, np.dtype(np.uint8), wait_ms=1)
        assert image is not None
        image[...] = expected_image(1)
        # ... and the row's lock is gone: the next subscriber claims it and holds a view.
        frame = decode(writer.wrap(encode(Frame("camera.test", 1, 1, image))), 0, later)
        assert in_shared_memory(frame.image) and later.copied == 0
        np.testing.assert_array_equal(frame.image, expected_image(1))
    finally:
        later.close()
        writer.close()
