# SPDX-License-Identifier: Apache-2.0
"""A standalone subscriber for fusion-node's prediction and health topics.

It is written from docs/protocol.md alone, without the fusion_node package or its code,
as a check that the specification suffices to implement a receiver. It needs only
pyzmq, msgpack and numpy.

    python examples/spec_subscriber.py [--endpoint tcp://127.0.0.1:5599]
        [--topics pred.] [--count N] [--timeout S]

Every message is validated as protocol.md section 7 requires, in its order, and a
message that fails is dropped and counted under the reason of the first failed check.
Each accepted message is printed to stdout as one JSON line. Each rejection is printed
to stderr as one line, and at exit a JSON summary line goes to stderr.

Beyond section 7, accepted messages are compared with what sections 5.4 and 5.6 say
about them (fields and arrays of the known topics, fixed latency, `late`, probabilities).
A disagreement does not reject the message, since section 7 does not require it; it is
printed to stderr and counted under `warnings` in the summary.

Exit status: 0 if at least one message was accepted, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from typing import Any

import msgpack
import numpy as np
import zmq

PROTOCOL_VERSION = 1
MAX_PAYLOAD_PARTS = 16  # section 2: 0 to 16 raw arrays
MAX_HEADER_BYTES = 65536  # section 7, check 4
MAX_PART_BYTES = 64 * 1024 * 1024  # section 4: 64 MiB per part
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
KINDS = ("frame", "audio", "joints", "prediction", "health")
# section 3.3 / 4: dtype name -> explicit little-endian numpy dtype
DTYPES = {
    "uint8": np.dtype("u1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}
FRAME_CHANNELS = {"rgb8": 3, "bgr8": 3, "mono8": 1}  # section 5.1
MAX_PRINTED_VALUES = 32

# section 5.6: the reference prediction topics
SPEECH_VOCABULARY = (
    "none", "stop", "home", "go", "left", "right", "up", "down", "red", "green",
    "blue", "yellow", "pick", "place", "open", "close", "wait",
)
TOPIC_SPECS: dict[str, dict[str, Any]] = {
    "pred.speech": {
        "latency_ns": 25_000_000,
        "mask": {"audio.mic0", "camera.front"},
        "fields": {
            "voice_activity": "float",
            "voice_active": "bool",
            "active_speaker": "float",
            "speaker_visible_talking": "bool",
            "command": "str",
            "command_index": "int",
            "command_confidence": "float",
            "frame_period_ns": "int",
        },
        "arrays": {
            "voice_activity": ("float32", [16]),
            "active_speaker": ("float32", [16]),
            "command_posterior": ("float32", [len(SPEECH_VOCABULARY)]),
        },
    },
    "pred.action": {
        "latency_ns": 15_000_000,
        "mask": {"camera.scene", "joints.arm", "pred.speech"},
        "fields": {
            "joint_names": "str[]",
            "horizon": "int",
            "step_period_ns": "int",
        },
        "arrays": {
            "actions": ("float32", [20, 3]),
            "step_times_ns": ("int64", [20]),
        },
    },
}


class Rejected(Exception):
    """A message failed a section 7 check; args[0] is the reason, args[1] a detail."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------- types (3.1)

def is_int(x: Any) -> bool:
    """An msgpack integer that fits in int64 (a bool is never an int)."""
    return isinstance(x, int) and not isinstance(x, bool) and INT64_MIN <= x <= INT64_MAX


def is_bool(x: Any) -> bool:
    return isinstance(x, bool)


def is_str(x: Any) -> bool:
    return isinstance(x, str)  # bin decodes to bytes, so it is not a str


def is_float(x: Any) -> bool:
    return isinstance(x, float)


def is_scalar(x: Any) -> bool:
    """Section 5.4: a msgpack scalar (nil, bool, int, float, str)."""
    return x is None or is_bool(x) or is_int(x) or is_float(x) or is_str(x)


# ------------------------------------------------------------------------ validation (7)

def _declared_size(dtype: str, shape: list[int]) -> int:
    """Check 15: product(shape) x itemsize, compared with the limit after each step."""
    size = DTYPES[dtype].itemsize
    for d in shape:
        size *= d  # Python ints do not overflow, but stop early anyway, as section 7 asks
        if size > MAX_PART_BYTES:
            raise Rejected("payload_too_large", f"more than {MAX_PART_BYTES} bytes")
    return size


def _check_array(dtype: Any, shape: Any, part: bytes, what: str) -> tuple[str, list[int]]:
    """Checks 13 to 16 for one array description and its payload part."""
    if not is_str(dtype) or dtype not in DTYPES:  # 13
        raise Rejected("bad_dtype", f"{what}: dtype {dtype!r}")
    if (  # 14
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 4
        or not all(is_int(d) and 0 <= d < 2**31 for d in shape)
    ):
        raise Rejected("bad_shape", f"{what}: shape {shape!r}")
    declared = _declared_size(dtype, shape)  # 15
    if len(part) != declared:  # 16
        raise Rejected("size_mismatch", f"{what}: {len(part)} bytes, declared {declared}")
    return dtype, list(shape)


def _decode_array(dtype: str, shape: list[int], part: bytes) -> np.ndarray:
    """Section 4: raw little-endian C-order bytes; copy, since parts need not be aligned."""
    return np.frombuffer(part, dtype=DTYPES[dtype]).reshape(shape).copy()


def validate(frames: list[bytes]) -> dict[str, Any]:
    """Validate one multipart message in section 7's order.

    Returns {"topic", "header", "arrays": [(name, ndarray), ...]}; raises Rejected.
    """
    if len(frames) < 2:  # 1
        raise Rejected("truncated", f"{len(frames)} part(s)")
    if len(frames) > 2 + MAX_PAYLOAD_PARTS:  # 2
        raise Rejected("too_many_parts", f"{len(frames)} parts")
    try:  # 3
        topic = frames[0].decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected("bad_topic", "topic is not valid UTF-8") from None
    raw_header = frames[1]
    if len(raw_header) > MAX_HEADER_BYTES:  # 4, before parsing
        raise Rejected("header_too_large", f"{len(raw_header)} bytes")
    try:  # 5: exactly one object, no trailing bytes (unpackb raises ExtraData)
        header = msgpack.unpackb(raw_header, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is bad_header
        raise Rejected("bad_header", f"{type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict) or not all(is_str(k) for k in header):  # 6
        raise Rejected("bad_header", "not a map with str keys")

    v = header.get("v")  # 7: the integer 1, not true, not 1.0
    if not is_int(v) or v != PROTOCOL_VERSION:
        raise Rejected("unsupported_version", f"v = {v!r}")
    kind = header.get("kind")
    if not is_str(kind) or kind not in KINDS:  # 8
        raise Rejected("unknown_kind", f"kind = {kind!r}")
    stream = header.get("stream")
    if not is_str(stream):  # 9
        raise Rejected("bad_field", f"stream = {stream!r}")
    if stream != topic:  # 10 (valid UTF-8 decodes 1:1, so this is byte for byte)
        raise Rejected("bad_topic", f"topic {topic!r} != stream {stream!r}")
    seq = header.get("seq")
    if not (is_int(seq) and seq >= 0):  # 11
        raise Rejected("bad_field", f"seq = {seq!r}")
    if not is_int(header.get("t_capture_ns")):
        raise Rejected("bad_field", f"t_capture_ns = {header.get('t_capture_ns')!r}")

    payload = frames[2:]
    # 12: expected payload part count
    if kind == "health":
        expected = 0
    elif kind == "prediction":
        specs = header.get("arrays")
        if not isinstance(specs, list):  # needed to count the parts (see report)
            raise Rejected("bad_field", "arrays is not an array")
        expected = len(specs)
    else:
        expected = 1
    if len(payload) < expected:
        raise Rejected("truncated", f"{len(payload)} payload part(s), expected {expected}")
    if len(payload) > expected:
        raise Rejected("too_many_parts", f"{len(payload)} payload parts, expected {expected}")

    arrays: list[tuple[str, np.ndarray]] = []
    if kind in ("frame", "audio", "joints"):  # 13 to 16, top-level description
        dtype, shape = _check_array(header.get("dtype"), header.get("shape"), payload[0], kind)
        _check_kind(kind, header, dtype, shape)  # 17
        arrays.append(("data", _decode_array(dtype, shape, payload[0])))
    elif kind == "prediction":
        described = []
        for i, spec in enumerate(header["arrays"]):  # 13 to 16, per spec
            if not isinstance(spec, dict):  # needed to read dtype/shape (see report)
                raise Rejected("bad_field", f"arrays[{i}] is not a map")
            dtype, shape = _check_array(spec.get("dtype"), spec.get("shape"), payload[i],
                                        f"arrays[{i}]")
            described.append((spec, dtype, shape))
        _check_prediction(header)  # 17
        for (spec, dtype, shape), part in zip(described, payload):
            arrays.append((spec["name"], _decode_array(dtype, shape, part)))
    else:  # health: 17
        if not isinstance(header.get("stats"), dict):
            raise Rejected("bad_field", "stats is not a map")
    return {"topic": topic, "header": header, "arrays": arrays}


def _check_kind(kind: str, h: dict[str, Any], dtype: str, shape: list[int]) -> None:
    """Check 17 for frame, audio and joints."""
    if kind == "frame":
        encoding = h.get("encoding")
        if not is_str(encoding) or encoding not in FRAME_CHANNELS:
            raise Rejected("bad_field", f"encoding = {encoding!r}")
        if dtype != "uint8" or len(shape) != 3 or shape[2] != FRAME_CHANNELS[encoding]:
            raise Rejected("bad_shape", f"frame {dtype} {shape} for {encoding}")
    elif kind == "audio":
        if dtype not in ("int16", "float32") or len(shape) != 2:
            raise Rejected("bad_shape", f"audio {dtype} {shape}")
        rate, index = h.get("sample_rate"), h.get("sample_index")
        if not (is_int(rate) and rate >= 1):
            raise Rejected("bad_field", f"sample_rate = {rate!r}")
        if not (is_int(index) and index >= 0):
            raise Rejected("bad_field", f"sample_index = {index!r}")
    elif kind == "joints":
        names = h.get("names")
        if not isinstance(names, list) or not all(is_str(n) for n in names):
            raise Rejected("bad_field", "names is not an array of str")
        if dtype != "float64" or shape != [3, len(names)]:
            raise Rejected("bad_shape", f"joints {dtype} {shape} for {len(names)} names")


def _check_prediction(h: dict[str, Any]) -> None:
    """Check 17 for predictions; every failure is bad_field."""
    seen = set()
    for i, spec in enumerate(h["arrays"]):
        name = spec.get("name")
        if not is_str(name):
            raise Rejected("bad_field", f"arrays[{i}].name = {name!r}")
        if name in seen:
            raise Rejected("bad_field", f"duplicate array name {name!r}")
        seen.add(name)
    mask = h.get("mask")
    if not isinstance(mask, dict) or not all(is_str(k) and is_bool(b) for k, b in mask.items()):
        raise Rejected("bad_field", "mask is not a map of str -> bool")
    for key in ("fields", "trace"):
        if not isinstance(h.get(key), dict):
            raise Rejected("bad_field", f"{key} is not a map")
    for key in ("t_ref_ns", "deadline_ns", "t_publish_ns"):
        if not is_int(h.get(key)):
            raise Rejected("bad_field", f"{key} = {h.get(key)!r}")
    for key in ("engine", "model_hash"):
        if not is_str(h.get(key)):
            raise Rejected("bad_field", f"{key} = {h.get(key)!r}")
    if not is_bool(h.get("late")):
        raise Rejected("bad_field", f"late = {h.get('late')!r}")


# ------------------------------------------- conformance with sections 5.4 and 5.6 (warnings)

def _type_ok(value: Any, kind: str) -> bool:
    if kind == "float":
        return is_float(value)
    if kind == "int":
        return is_int(value)
    if kind == "bool":
        return is_bool(value)
    if kind == "str":
        return is_str(value)
    if kind == "str[]":
        return isinstance(value, list) and all(is_str(x) for x in value)
    raise ValueError(kind)


def conformance(msg: dict[str, Any]) -> list[str]:
    """What sections 5.4 and 5.6 say about a valid prediction, as a list of disagreements."""
    h, topic = msg["header"], msg["topic"]
    out: list[str] = []
    if h["kind"] != "prediction":
        return out
    arrays = dict(msg["arrays"])
    if h["t_capture_ns"] != h["t_ref_ns"]:
        out.append("t_capture_ns != t_ref_ns")
    if h["late"] and not h["t_publish_ns"] > h["deadline_ns"]:
        out.append("late but t_publish_ns <= deadline_ns")
    if h.get("encoding") != "raw":
        out.append(f"encoding = {h.get('encoding')!r}, expected 'raw'")
    for k, val in h["fields"].items():
        ok = is_str(k) and (is_scalar(val) or (isinstance(val, list)
                                                and all(is_scalar(x) for x in val)))
        if not ok:
            out.append(f"field {k!r} is not a scalar or array of scalars")
    for k, val in h["trace"].items():
        if not (is_str(k) and k.endswith("_ns") and is_int(val)):
            out.append(f"trace entry {k!r} = {val!r} is not *_ns -> int")
    spec = TOPIC_SPECS.get(topic)
    if spec is None:
        return out
    latency = h["deadline_ns"] - h["t_ref_ns"]
    if latency != spec["latency_ns"]:
        out.append(f"deadline_ns - t_ref_ns = {latency}, expected {spec['latency_ns']}")
    if set(h["mask"]) != spec["mask"]:
        out.append(f"mask keys {sorted(h['mask'])}, expected {sorted(spec['mask'])}")
    fields = h["fields"]
    for name, kind in spec["fields"].items():
        if name not in fields:
            out.append(f"missing field {name!r}")
        elif not _type_ok(fields[name], kind):
            out.append(f"field {name!r} = {fields[name]!r} is not {kind}")
    for name, (dtype, shape) in spec["arrays"].items():
        a = arrays.get(name)
        if a is None:
            out.append(f"missing array {name!r}")
        elif a.dtype != DTYPES[dtype] or list(a.shape) != shape:
            out.append(f"array {name!r} is {a.dtype.name} {list(a.shape)}, "
                       f"expected {dtype} {shape}")
    if out:
        return out
    if topic == "pred.speech":
        out += _speech_conformance(fields, arrays)
    elif topic == "pred.action":
        out += _action_conformance(h, fields, arrays)
    return out


def _prob(x: float) -> bool:
    return 0.0 <= x <= 1.0


def _speech_conformance(f: dict[str, Any], a: dict[str, np.ndarray]) -> list[str]:
    out = []
    for name in ("voice_activity", "active_speaker", "command_confidence"):
        if not _prob(f[name]):
            out.append(f"field {name} = {f[name]} outside [0, 1]")
    for name in ("voice_activity", "active_speaker", "command_posterior"):
        if not np.all((a[name] >= 0) & (a[name] <= 1)):
            out.append(f"array {name} has values outside [0, 1]")
    if f["voice_active"] != (f["voice_activity"] > 0.5):
        out.append("voice_active != (voice_activity > 0.5)")
    if f["speaker_visible_talking"] != (f["active_speaker"] > 0.5):
        out.append("speaker_visible_talking != (active_speaker > 0.5)")
    idx = f["command_index"]
    if not 0 <= idx < len(SPEECH_VOCABULARY) or SPEECH_VOCABULARY[idx] != f["command"]:
        out.append(f"command {f['command']!r} != vocabulary[{idx}]")
    total = float(a["command_posterior"].astype(np.float64).sum())
    if abs(total - 1.0) > 1e-5:
        out.append(f"command_posterior sums to {total}")
    if f["frame_period_ns"] != 40_000_000:
        out.append(f"frame_period_ns = {f['frame_period_ns']}")
    return out


def _action_conformance(h: dict[str, Any], f: dict[str, Any],
                        a: dict[str, np.ndarray]) -> list[str]:
    out = []
    if f["horizon"] != 20:
        out.append(f"horizon = {f['horizon']}")
    if f["step_period_ns"] != 20_000_000:
        out.append(f"step_period_ns = {f['step_period_ns']}")
    if len(f["joint_names"]) != a["actions"].shape[1]:
        out.append(f"{len(f['joint_names'])} joint_names for {a['actions'].shape[1]} columns")
    k = np.arange(1, a["step_times_ns"].shape[0] + 1, dtype=np.int64)
    if not np.array_equal(a["step_times_ns"], h["t_ref_ns"] + k * f["step_period_ns"]):
        out.append("step_times_ns != t_ref_ns + (k + 1) * step_period_ns")
    if not np.all(np.isfinite(a["actions"])):
        out.append("actions has non-finite values")
    return out


# -------------------------------------------------------------------------------- output

def _jsonable(x: Any) -> Any:
    if isinstance(x, bytes):
        return {"bin": x.hex()}
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


def render(msg: dict[str, Any], t_receive_ns: int) -> dict[str, Any]:
    h = msg["header"]
    out: dict[str, Any] = {"topic": msg["topic"], "kind": h["kind"], "seq": h["seq"]}
    if h["kind"] == "prediction":
        out.update({
            "t_ref_ns": h["t_ref_ns"],
            "deadline_ns": h["deadline_ns"],
            "t_publish_ns": h["t_publish_ns"],
            "t_receive_ns": t_receive_ns,
            "late": h["late"],
            "engine": h["engine"],
            "model_hash": h["model_hash"],
            "mask": h["mask"],
            "fields": _jsonable(h["fields"]),
        })
    else:
        out["t_capture_ns"] = h["t_capture_ns"]
        out["t_receive_ns"] = t_receive_ns
        if h["kind"] == "health":
            out["stats"] = _jsonable(h["stats"])
    arrays = []
    for name, a in msg["arrays"]:
        item: dict[str, Any] = {"name": name, "dtype": a.dtype.name, "shape": list(a.shape)}
        if a.size <= MAX_PRINTED_VALUES:
            item["values"] = _jsonable(a.tolist())
        arrays.append(item)
    out["arrays"] = arrays
    return out


# ---------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5599",
                   help="publisher to connect to (default: the node's default --pub)")
    p.add_argument("--topics", action="append", default=None,
                   help="topic prefix to subscribe to; repeat or comma-separate for several "
                        "(default: pred. and node.health)")
    p.add_argument("--count", type=int, default=0,
                   help="exit after this many accepted messages (0: no limit)")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="exit after this many seconds in all (0: no limit)")
    args = p.parse_args(argv)
    prefixes = ["pred.", "node.health"] if args.topics is None else [
        t for arg in args.topics for t in arg.split(",")]
    if args.topics is not None and not prefixes:
        prefixes = [""]

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    for prefix in prefixes:
        sub.setsockopt(zmq.SUBSCRIBE, prefix.encode("utf-8"))
    sub.connect(args.endpoint)

    accepted: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    warnings: Counter[str] = Counter()
    seq_gaps: Counter[str] = Counter()
    seq_restarts: Counter[str] = Counter()
    last_seq: dict[str, int] = {}
    end = time.monotonic() + args.timeout if args.timeout > 0 else None
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    try:
        while not args.count or sum(accepted.values()) < args.count:
            wait_ms = None
            if end is not None:
                wait_ms = int((end - time.monotonic()) * 1000)
                if wait_ms <= 0:
                    break
            if not poller.poll(wait_ms):
                continue
            frames = sub.recv_multipart(copy=True)
            t_receive_ns = time.monotonic_ns()  # CLOCK_MONOTONIC, as section 3.1 asks
            try:
                msg = validate(frames)
            except Rejected as r:
                rejected[r.reason] += 1
                topic = frames[0][:64].decode("utf-8", "replace") if frames else ""
                print(f"rejected: {r.reason} topic={topic!r} {r.detail}", file=sys.stderr,
                      flush=True)
                continue
            topic, seq = msg["topic"], msg["header"]["seq"]
            if topic in last_seq:  # section 6
                if seq > last_seq[topic] + 1:
                    seq_gaps[topic] += seq - last_seq[topic] - 1
                elif seq <= last_seq[topic]:
                    seq_restarts[topic] += 1
            last_seq[topic] = seq
            accepted[topic] += 1
            for problem in conformance(msg):
                warnings[f"{topic}: {problem.split(' = ')[0]}"] += 1
                print(f"warning: {topic} seq={seq}: {problem}", file=sys.stderr, flush=True)
            print(json.dumps(render(msg, t_receive_ns)), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        sub.close(0)
        ctx.term()
    summary = {
        "accepted": sum(accepted.values()),
        "accepted_by_topic": dict(accepted),
        "rejected": sum(rejected.values()),
        "rejected_by_reason": dict(rejected),
        "warnings": dict(warnings),
        "seq_lost": dict(seq_gaps),
        "seq_restarts": dict(seq_restarts),
    }
    print(json.dumps({"summary": summary}), file=sys.stderr, flush=True)
    return 0 if summary["accepted"] else 1


if __name__ == "__main__":
    sys.exit(main())
