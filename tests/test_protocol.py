"""Wire protocol v1: round trips, zero-copy, and every rejection path with its reason."""

from __future__ import annotations

import random
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from fusion_node.clock import MonotonicClock
from fusion_node.errors import ProtocolError
from fusion_node.protocol import (
    MAX_HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_PAYLOAD_PARTS,
    SEQ_JUMP,
    AudioChunk,
    Frame,
    Health,
    JointState,
    Message,
    Prediction,
    SeqCounter,
    decode,
    encode,
)
from fusion_node.transport import Publisher, Subscriber

DELETE = object()  # header override meaning "leave this field out"
NAMES = ("shoulder", "elbow", "wrist")


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.term()


@pytest.fixture
def pair(context: zmq.Context) -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    """A connected inproc PAIR: real ZeroMQ frames without PUB/SUB's join delay."""
    tx, rx = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    tx.bind("inproc://protocol-test")
    rx.connect("inproc://protocol-test")
    rx.setsockopt(zmq.RCVTIMEO, 2000)
    yield tx, rx
    tx.close(linger=0)
    rx.close(linger=0)


def through_zmq(pair: tuple[zmq.Socket, zmq.Socket], parts: list) -> list[zmq.Frame]:
    tx, rx = pair
    tx.send_multipart(parts, copy=False)
    return rx.recv_multipart(copy=False)


def sample_messages() -> dict[str, Message]:
    rng = np.random.default_rng(7)
    pose = rng.standard_normal((3, len(NAMES)))
    return {
        "frame-rgb8": Frame("camera.front", 0, 1_000, rng.integers(0, 256, (48, 64, 3), np.uint8),
                            "rgb8"),
        "frame-bgr8": Frame("camera.side", 5, 2_000, rng.integers(0, 256, (4, 6, 3), np.uint8),
                            "bgr8"),
        "frame-mono8": Frame("camera.ir", 9, -3, rng.integers(0, 256, (5, 7, 1), np.uint8),
                             "mono8"),
        "audio-int16": AudioChunk("audio.mic0", 3, 4_000, 16_000, 960,
                                  rng.integers(-3000, 3000, (320, 1), np.int16)),
        "audio-float32": AudioChunk("audio.mic1", 0, 5_000, 48_000, 0,
                                    rng.standard_normal((480, 2)).astype(np.float32)),
        "joints": JointState("joints.arm", 11, 6_000, NAMES, pose[0], pose[1], pose[2]),
        "prediction": Prediction(
            stream="pred.action", seq=2, t_ref_ns=7_000, deadline_ns=57_000, engine="act",
            model_hash="sha256:0123abcd", mask={"camera.front": True, "audio.mic0": False},
            fields={"command": "left", "confidence": 0.75, "step_ns": 20_000_000,
                    "ok": True, "none": None, "posterior": [0.1, 0.9]},
            arrays={"chunk": rng.standard_normal((8, 6)).astype(np.float32),
                    "t_step_ns": np.arange(8, dtype=np.int64) * 20_000_000,
                    "mask": np.ones((8,), np.uint8),
                    "scores": rng.standard_normal((2, 3, 4, 5))},
            trace={"t_capture_ns": 6_500, "t_receive_ns": 6_600, "t_window_ns": 6_700,
                   "t_infer_start_ns": 6_800, "t_infer_end_ns": 9_000,
                   "t_publish_ns": 57_000},
            late=True, t_publish_ns=57_010),
        "prediction-no-arrays": Prediction(
            stream="pred.speech", seq=0, t_ref_ns=1, deadline_ns=2, engine="speech",
            model_hash="h", mask={}, fields={}, arrays={}, trace={}),
        "health": Health("node.health", 4, 8_000,
                         {"streams": {"camera.front": {"rate_hz": 29.97, "drops": 0}},
                          "engines": {"act": {"p99_us": 812, "deadline_misses": 1}}}),
    }


def assert_same(got: Message, sent: Message) -> None:
    assert type(got) is type(sent)
    for name in sent.__slots__:  # type: ignore[union-attr]
        if name == "t_receive_ns":
            continue
        want, have = getattr(sent, name), getattr(got, name)
        if isinstance(want, np.ndarray):
            assert have.dtype == want.dtype.newbyteorder("<") and have.shape == want.shape
            np.testing.assert_array_equal(have, want)
        elif name == "arrays":
            assert list(have) == list(want)
            for key in want:
                np.testing.assert_array_equal(have[key], want[key])
                assert have[key].dtype == want[key].dtype
        else:
            assert have == want, name


# --- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(sample_messages()))
def test_round_trip_in_memory(name: str) -> None:
    msg = sample_messages()[name]
    got = decode(encode(msg), t_receive_ns=123)
    assert_same(got, msg)
    assert got.t_receive_ns == 123


@pytest.mark.parametrize("name", list(sample_messages()))
def test_round_trip_through_zeromq_twice(pair: tuple[zmq.Socket, zmq.Socket],
                                         name: str) -> None:
    # The second message of a stream takes the remembered-layout fast path: same result.
    msg = sample_messages()[name]
    for seq in (msg.seq, msg.seq + 1):
        msg.seq = seq
        assert_same(decode(through_zmq(pair, encode(msg))), msg)


def test_header_fields_on_the_wire() -> None:
    msg = sample_messages()["audio-int16"]
    header = msgpack.unpackb(encode(msg)[1])
    assert header == {"v": 1, "kind": "audio", "stream": "audio.mic0", "seq": 3,
                      "t_capture_ns": 4_000, "dtype": "int16", "shape": [320, 1],
                      "encoding": "raw", "sample_rate": 16_000, "sample_index": 960}
    pred = msgpack.unpackb(encode(sample_messages()["prediction"])[1])
    assert pred["arrays"][0] == {"name": "chunk", "dtype": "float32", "shape": [8, 6]}
    assert pred["t_capture_ns"] == pred["t_ref_ns"] == 7_000 and pred["late"] is True


def test_big_endian_and_strided_arrays_go_out_little_endian_c_order() -> None:
    samples = np.arange(20, dtype=">f4").reshape(2, 10).T  # big-endian and not contiguous
    parts = encode(AudioChunk("audio.mic0", 0, 0, 16_000, 0, samples))
    assert bytes(parts[2]) == np.ascontiguousarray(samples, "<f4").tobytes()
    np.testing.assert_array_equal(decode(parts).samples, samples)


def test_joint_rows_of_other_types_go_out_as_float64() -> None:
    for rows in ([0.5, 1.0, 2.0], np.arange(3, dtype=np.float32), np.arange(6.0)[::2]):
        got = decode(encode(JointState("joints.arm", 0, 0, NAMES, rows, rows, rows)))
        assert got.position.dtype == np.float64 and got.effort.tolist() == list(rows)
    with pytest.raises(ValueError):  # ragged rows are a caller's bug, not a wire message
        encode(JointState("joints.arm", 0, 0, NAMES, np.zeros(3), np.zeros(2), np.zeros(3)))


def test_empty_arrays_round_trip() -> None:
    msg = Frame("camera.front", 0, 0, np.zeros((0, 4, 3), np.uint8))
    assert decode(encode(msg)).image.shape == (0, 4, 3)


def test_encode_refuses_unsendable_values() -> None:
    with pytest.raises(ProtocolError) as exc:
        encode(Frame("camera.front", 0, 0, np.zeros((2, 2, 3), np.float16)))
    assert exc.value.reason == "bad_dtype"
    with pytest.raises(ProtocolError) as exc:
        encode(Frame("camera.front", 2**63, 0, np.zeros((2, 2, 3), np.uint8)))
    assert exc.value.reason == "bad_field"
    with pytest.raises(TypeError):
        encode("not a message")  # type: ignore[arg-type]


# --- zero copy -----------------------------------------------------------------------------

def test_decoded_arrays_are_read_only_views_of_the_received_buffers(
        pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    image = np.random.default_rng(1).integers(0, 256, (480, 640, 3), np.uint8)
    for seq in range(2):  # full path, then the fast path
        parts = through_zmq(pair, encode(Frame("camera.front", seq, 0, image)))
        frame = decode(parts)
        received = np.frombuffer(parts[2].buffer, np.uint8)
        assert np.shares_memory(frame.image, received)
        assert not frame.image.flags.writeable
    pred = sample_messages()["prediction"]
    parts = through_zmq(pair, encode(pred))
    got = decode(parts)
    for i, array in enumerate(got.arrays.values()):
        assert np.shares_memory(array, np.frombuffer(parts[2 + i].buffer, np.uint8))


def test_encode_does_not_copy_contiguous_payloads() -> None:
    image = np.zeros((480, 640, 3), np.uint8)
    payload = encode(Frame("camera.front", 0, 0, image))[2]
    assert np.shares_memory(np.frombuffer(payload, np.uint8), image)


# --- rejections ----------------------------------------------------------------------------

def header_of(kind: str) -> dict[str, Any]:
    base = {"v": 1, "kind": kind, "seq": 3, "t_capture_ns": 10}
    if kind == "frame":
        return {**base, "stream": "camera.front", "dtype": "uint8", "shape": [4, 5, 3],
                "encoding": "rgb8"}
    if kind == "audio":
        return {**base, "stream": "audio.mic0", "dtype": "int16", "shape": [8, 1],
                "encoding": "raw", "sample_rate": 16_000, "sample_index": 0}
    if kind == "joints":
        return {**base, "stream": "joints.arm", "dtype": "float64", "shape": [3, 3],
                "encoding": "raw", "names": list(NAMES)}
    if kind == "prediction":
        return {**base, "stream": "pred.speech", "t_ref_ns": 10, "deadline_ns": 20,
                "t_publish_ns": 21, "late": False, "engine": "speech", "model_hash": "abc",
                "mask": {"audio.mic0": True}, "fields": {"vad": 0.5}, "trace": {},
                "encoding": "raw", "arrays": [{"name": "p", "dtype": "float32", "shape": [2]}]}
    return {**base, "stream": "node.health", "stats": {}}


PAYLOADS = {"frame": [bytes(60)], "audio": [bytes(16)], "joints": [bytes(72)],
            "prediction": [bytes(8)], "health": []}


def build(template: str, /, topic: bytes | None = None, payload: list[bytes] | None = None,
          **changes: Any) -> list[bytes]:
    """A valid message of kind `template` with header fields changed (DELETE removes one)."""
    header = header_of(template)
    for key, value in changes.items():
        if value is DELETE:
            header.pop(key)
        else:
            header[key] = value
    if topic is None:
        topic = header_of(template)["stream"].encode()
    return [topic, msgpack.packb(header), *(PAYLOADS[template] if payload is None else payload)]


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_valid_templates_decode(kind: str) -> None:
    assert decode(build(kind)).stream == header_of(kind)["stream"]


BAD_SPEC = {"name": "p", "dtype": "float32", "shape": [2]}

REJECTIONS: list[tuple[str, str, list]] = [
    # truncated messages
    ("no parts", "truncated", []),
    ("topic only", "truncated", [b"camera.front"]),
    ("frame without payload", "truncated", build("frame", payload=[])),
    ("prediction missing an array", "truncated",
     build("prediction", arrays=[BAD_SPEC, {**BAD_SPEC, "name": "q"}])),
    # too many parts
    ("over the part limit", "too_many_parts",
     build("frame", payload=[bytes(60)] * (MAX_PAYLOAD_PARTS + 1))),
    ("frame with two payloads", "too_many_parts", build("frame", payload=[bytes(60)] * 2)),
    ("health with a payload", "too_many_parts", build("health", payload=[b"x"])),
    ("prediction with an extra payload", "too_many_parts",
     build("prediction", payload=[bytes(8), bytes(8)])),
    # dtype
    ("unknown dtype", "bad_dtype", build("frame", dtype="complex64")),
    ("float16", "bad_dtype", build("audio", dtype="float16")),
    ("dtype not a string", "bad_dtype", build("frame", dtype=1)),
    ("dtype unhashable", "bad_dtype", build("frame", dtype=["uint8"])),
    ("dtype missing", "bad_dtype", build("joints", dtype=DELETE)),
    ("prediction array dtype", "bad_dtype",
     build("prediction", arrays=[{**BAD_SPEC, "dtype": "object"}])),
    ("frame not uint8", "bad_shape", build("frame", dtype="int16", shape=[2, 5, 3])),
    ("audio not int16/float32", "bad_shape", build("audio", dtype="uint8", shape=[16, 1])),
    ("joints not float64", "bad_shape", build("joints", dtype="float32", shape=[3, 6])),
    # shape and rank
    ("shape not a list", "bad_shape", build("frame", shape="4x5x3")),
    ("shape missing", "bad_shape", build("frame", shape=DELETE)),
    ("rank 0", "bad_shape", build("frame", shape=[])),
    ("rank 5", "bad_shape", build("frame", shape=[1, 1, 4, 5, 3])),
    ("negative dim", "bad_shape", build("frame", shape=[-4, -5, 3])),
    ("float dim", "bad_shape", build("frame", shape=[4.0, 5, 3])),
    ("bool dim", "bad_shape", build("audio", shape=[8, True])),
    ("dim beyond 2**31", "bad_shape", build("audio", shape=[2**31, 1])),
    ("frame rank 2", "bad_shape", build("frame", shape=[20, 3])),
    ("rgb8 with one channel", "bad_shape", build("frame", shape=[4, 15, 1])),
    ("mono8 with three channels", "bad_shape", build("frame", encoding="mono8")),
    ("audio rank 1", "bad_shape", build("audio", shape=[8])),
    ("prediction array rank 5", "bad_shape",
     build("prediction", arrays=[{**BAD_SPEC, "shape": [1, 1, 1, 1, 2]}])),
    # sizes
    ("payload one byte short", "size_mismatch", build("frame", payload=[bytes(59)])),
    ("payload one byte long", "size_mismatch", build("frame", payload=[bytes(61)])),
    ("audio payload of other dtype", "size_mismatch", build("audio", dtype="float32")),
    ("prediction array size", "size_mismatch", build("prediction", payload=[bytes(4)])),
    ("declared over 64 MiB", "payload_too_large",
     build("frame", shape=[4096, 4096, 5], encoding="rgb8", payload=[b""])),
    ("int64 product wraps to 0", "payload_too_large",
     build("audio", dtype="int16", shape=[65536] * 4, payload=[b""])),
    ("oversize header", "header_too_large",
     build("health", stats={"blob": "x" * MAX_HEADER_BYTES})),
    # version and kind
    ("version 2", "unsupported_version", build("frame", v=2)),
    ("version 0", "unsupported_version", build("frame", v=0)),
    ("version missing", "unsupported_version", build("frame", v=DELETE)),
    ("version True", "unsupported_version", build("frame", v=True)),
    ("version 1.0", "unsupported_version", build("frame", v=1.0)),
    ("version '1'", "unsupported_version", build("frame", v="1")),
    ("unknown kind", "unknown_kind", build("frame", kind="video")),
    ("kind missing", "unknown_kind", build("frame", kind=DELETE)),
    ("kind unhashable", "unknown_kind", build("frame", kind=["frame"])),
    # header bytes
    ("garbage header", "bad_header", [b"camera.front", b"\xc1\xff\x00garbage", bytes(60)]),
    ("empty header", "bad_header", [b"camera.front", b"", bytes(60)]),
    ("truncated msgpack", "bad_header", [b"camera.front", build("frame")[1][:-3], bytes(60)]),
    ("trailing bytes", "bad_header", [b"camera.front", build("frame")[1] + b"\x00", bytes(60)]),
    ("header is a list", "bad_header", [b"camera.front", msgpack.packb([1, "frame"]),
                                        bytes(60)]),
    ("header is an int", "bad_header", [b"camera.front", msgpack.packb(1), bytes(60)]),
    ("map with int keys", "bad_header", [b"camera.front", msgpack.packb({1: 2}), bytes(60)]),
    # topic and stream
    ("non-UTF-8 topic", "bad_topic", build("frame", topic=b"camera.\xff\xfe")),
    ("topic differs from stream", "bad_topic", build("frame", topic=b"camera.back")),
    ("topic is a prefix of stream", "bad_topic", build("frame", topic=b"camera")),
    ("stream not a string", "bad_field", build("frame", topic=b"5", stream=5)),
    ("stream missing", "bad_field", build("frame", stream=DELETE)),
    # integer fields
    ("bool seq", "bad_field", build("frame", seq=True)),
    ("bool t_capture_ns", "bad_field", build("joints", t_capture_ns=False)),
    ("float t_capture_ns", "bad_field", build("joints", t_capture_ns=1.5)),
    ("string seq", "bad_field", build("frame", seq="3")),
    ("seq missing", "bad_field", build("frame", seq=DELETE)),
    ("negative seq", "bad_field", build("frame", seq=-1)),
    ("seq beyond int64", "bad_field", build("frame", seq=2**64 - 1)),
    ("t_capture_ns beyond int64", "bad_field", build("audio", t_capture_ns=2**63)),
    ("sample_rate 0", "bad_field", build("audio", sample_rate=0)),
    ("bool sample_rate", "bad_field", build("audio", sample_rate=True)),
    ("negative sample_index", "bad_field", build("audio", sample_index=-1)),
    # per-kind fields
    ("unknown frame encoding", "bad_field", build("frame", encoding="yuv422")),
    ("frame encoding missing", "bad_field", build("frame", encoding=DELETE)),
    ("frame encoding unhashable", "bad_field", build("frame", encoding={"rgb8": 3})),
    ("joints names not a list", "bad_field", build("joints", names="shoulder")),
    ("joints name not a string", "bad_field", build("joints", names=["a", 2, "c"])),
    ("joints fewer names than columns", "bad_shape", build("joints", names=["a", "b"])),
    ("joints more names than columns", "bad_shape",
     build("joints", names=["a", "b", "c", "d"])),
    ("joints wrong rows", "bad_shape", build("joints", shape=[2, 3], payload=[bytes(48)])),
    ("prediction late as int", "bad_field", build("prediction", late=1)),
    ("prediction late missing", "bad_field", build("prediction", late=DELETE)),
    ("prediction bool t_ref_ns", "bad_field", build("prediction", t_ref_ns=True)),
    ("prediction deadline missing", "bad_field", build("prediction", deadline_ns=DELETE)),
    ("prediction engine not a string", "bad_field", build("prediction", engine=3)),
    ("prediction model_hash missing", "bad_field", build("prediction", model_hash=DELETE)),
    ("prediction mask not bools", "bad_field", build("prediction", mask={"audio.mic0": 1})),
    ("prediction fields not a map", "bad_field", build("prediction", fields=[1, 2])),
    ("prediction trace not a map", "bad_field", build("prediction", trace=5)),
    ("prediction arrays not a list", "bad_field", build("prediction", arrays=BAD_SPEC)),
    ("prediction array without name", "bad_field",
     build("prediction", arrays=[{"dtype": "float32", "shape": [2]}])),
    ("prediction array spec not a map", "bad_field", build("prediction", arrays=["p"])),
    ("prediction duplicate array names", "bad_field",
     build("prediction", arrays=[BAD_SPEC, BAD_SPEC], payload=[bytes(8), bytes(8)])),
    ("health stats not a map", "bad_field", build("health", stats=[1])),
]


@pytest.mark.parametrize(("reason", "parts"), [(r, p) for _, r, p in REJECTIONS],
                         ids=[name for name, _, _ in REJECTIONS])
def test_rejected_with_reason(reason: str, parts: list) -> None:
    with pytest.raises(ProtocolError) as exc:
        decode(parts)
    assert exc.value.reason == reason
    assert str(exc.value).startswith(f"{reason}: ")


def test_oversize_header_is_refused_before_parsing() -> None:
    # Over the limit by one byte, even though it would be valid msgpack.
    header = msgpack.packb({**header_of("health"), "stats": {"x": ""}})
    pad = MAX_HEADER_BYTES + 1 - len(header)
    big = msgpack.packb({**header_of("health"), "stats": {"x": "y" * (pad - 2)}})
    assert len(big) == MAX_HEADER_BYTES + 1
    with pytest.raises(ProtocolError) as exc:
        decode([b"node.health", big])
    assert exc.value.reason == "header_too_large"


def test_payload_limit_is_on_the_declared_size() -> None:
    limit_elems = MAX_PAYLOAD_BYTES // 2
    with pytest.raises(ProtocolError) as exc:
        decode(build("audio", shape=[limit_elems + 1, 1], payload=[b""]))
    assert exc.value.reason == "payload_too_large"
    with pytest.raises(ProtocolError) as exc:  # at the limit: only the size is wrong
        decode(build("audio", shape=[limit_elems, 1], payload=[b""]))
    assert exc.value.reason == "size_mismatch"


def test_fast_path_still_rejects_everything(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    """After a stream's layout is remembered, altered messages of that layout still fail."""
    msg = sample_messages()["audio-int16"]
    good = encode(msg)
    decode(through_zmq(pair, good))  # remember the layout
    header = bytes(good[1])
    cases = {
        "bad_field": [good[0], header[:-52] + (-1).to_bytes(8, "big", signed=True)
                      + header[-44:], good[2]],  # seq = -1
        "size_mismatch": [good[0], header, bytes(good[2])[:-2]],
        "size_mismatch ": [good[0], header, bytes(good[2]) + b"\0\0"],  # too long
        "bad_topic": [b"audio.mic1", header, good[2]],
        "too_many_parts": [good[0], header, good[2], b""],
    }
    index_neg = header[:-8] + (-5).to_bytes(8, "big", signed=True)
    cases["bad_field "] = [good[0], index_neg, good[2]]  # sample_index = -5
    mangled = bytearray(header)
    mangled[-43] = ord("T")  # "t_capture_ns" key misspelt: a missing field
    cases["bad_field  "] = [good[0], bytes(mangled), good[2]]
    for reason, parts in cases.items():
        with pytest.raises(ProtocolError) as exc:
            decode(through_zmq(pair, parts))
        assert exc.value.reason == reason.strip(), reason
    # And the remembered layout still decodes new values.
    msg.seq, msg.t_capture_ns, msg.sample_index = 2**62, -7, 2**40
    assert_same(decode(through_zmq(pair, encode(msg))), msg)


def test_decode_raises_only_protocol_errors_on_mutated_bytes() -> None:
    """Random byte corruption of valid messages: a ProtocolError or a message, never a crash."""
    rng = random.Random(1234)
    templates = [encode(m) for m in sample_messages().values()]
    templates += [build(kind) for kind in PAYLOADS]
    outcomes: Counter[str] = Counter()
    for _ in range(3000):
        parts = [bytearray(bytes(p)) for p in rng.choice(templates)]
        target = parts[rng.randrange(min(2, len(parts)) if rng.random() < 0.8 else len(parts))]
        for _ in range(rng.randint(1, 4)):
            if target:
                target[rng.randrange(len(target))] = rng.randrange(256)
        if rng.random() < 0.1:
            parts.pop(rng.randrange(len(parts)))
        try:
            decode([bytes(p) for p in parts])
            outcomes["ok"] += 1
        except ProtocolError as exc:
            outcomes[exc.reason] += 1
    assert outcomes["ok"] > 0 and len(outcomes) > 5


# --- real sockets --------------------------------------------------------------------------

@pytest.fixture
def ipc_endpoint(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "pub.sock"
    if len(str(path)) > 90:  # ipc:// paths are limited to ~107 bytes by sockaddr_un
        with tempfile.TemporaryDirectory(prefix="fn-") as short:
            yield f"ipc://{short}/pub.sock"
        return
    yield f"ipc://{path}"


def wait_for_subscription(publisher: Publisher, subscriber: Subscriber) -> None:
    """PUB/SUB slow joiner: send probes until one gets through, so nothing later is lost."""
    deadline = time.monotonic() + 10
    seq = 0
    while time.monotonic() < deadline:
        publisher.send(Health("test.probe", seq, 0))
        seq += 1
        msg = subscriber.recv(timeout_ms=20)
        if msg is not None and msg.stream == "test.probe":
            return
    raise AssertionError("subscriber never received a probe")


def recv_next(subscriber: Subscriber, timeout_s: float = 5.0) -> Message:
    """The next message that is not a leftover probe."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # recv returns None early when it only found rejected messages; keep waiting.
        msg = subscriber.recv(timeout_ms=100)
        if msg is not None and msg.stream != "test.probe":
            return msg
    raise AssertionError("no message arrived")


def test_subscriber_counts_bad_messages_and_keeps_receiving(context: zmq.Context,
                                                            ipc_endpoint: str) -> None:
    publisher = Publisher(context, ipc_endpoint)
    subscriber = Subscriber(context, [ipc_endpoint], MonotonicClock())
    try:
        wait_for_subscription(publisher, subscriber)
        goods = list(sample_messages().values())
        bads = [(reason, parts) for _, reason, parts in REJECTIONS if parts]
        expected: Counter[str] = Counter()
        for i, (reason, parts) in enumerate(bads):
            publisher.send_parts(list(parts))
            expected[reason] += 1
            good = goods[i % len(goods)]
            good.seq = i
            publisher.send(good)
            got = recv_next(subscriber)
            assert_same(got, good)
            assert got.t_receive_ns > 0
            assert subscriber.rejected == expected, f"after {reason}"
        assert subscriber.last_error.startswith(f"{bads[-1][0]}: ")
    finally:
        subscriber.close()
        publisher.close()


def test_the_seq_counter_tells_losses_from_restarts_and_repeats():
    counter = SeqCounter()
    for seq in (4, 5, 8, 8, 9):  # 6 and 7 lost, 8 delivered twice
        counter.note(seq)
    assert (counter.first, counter.last, counter.gaps, counter.restarts) == (4, 9, 2, 0)
    for seq in (0, 1, 3):  # a respawned sender counts from 0 again; 2 lost
        counter.note(seq)
    assert (counter.last, counter.gaps, counter.restarts) == (3, 3, 1)
    counter.note(3 + SEQ_JUMP + 1)  # a jump no stream makes by losing messages
    assert (counter.gaps, counter.restarts) == (3, 2)


def test_a_header_with_a_msgpack_extension_type_names_it():
    header = msgpack.packb({"v": 1, "kind": "joints", "ext": msgpack.ExtType(5, b"x")})
    with pytest.raises(ProtocolError) as raised:
        decode([b"joints.arm", header])
    assert raised.value.reason == "bad_header"
    assert "extension type 5 is not allowed" in str(raised.value)
