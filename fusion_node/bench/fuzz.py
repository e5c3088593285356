"""`fusion-node bench fuzz`: mutation fuzzing of everything that reads untrusted input.

Five targets, each fed mutated copies of valid inputs:
  protocol     `protocol.decode` of multipart messages of every kind (bit flips, byte
               insertions and deletions, truncation, part-count changes, msgpack type
               confusion inside the header, huge declared sizes, payloads resized to match);
  shm          the same for frame, audio and joints messages whose payload is in shared
               memory, decoded through a `ShmReader` (headers pointing anywhere in or past
               real rings);
  launch       `config.parse_config` of mutated launch files (launch/*.toml, the default);
  calibration  `calibration.load_calibration` of a mutated calibration.yaml + camera_info;
  mcap         the log readers (`log_info`, `recover`, `LogReader` with `config_from_log`)
               on mutated and truncated logs cut from tests/data/sample.mcap.

The only acceptable outcomes are success or the module's typed error (ProtocolError,
ConfigError, CalibrationError, ReplayError); anything else is a crash, saved with the input
that caused it. An accepted protocol message must also survive encode -> decode unchanged.
Inputs whose rejection reason is new join the corpus, so mutations build on inputs that got
deeper into the parser (guidance by outcome; `--atheris` in `python -m fusion_node.bench.fuzz`
gives coverage guidance where atheris is installed). A memory phase runs the first inputs of
each target under tracemalloc and flags any input whose peak allocation is not bounded by its
own size; a watchdog flags an input that runs longer than `hang_s`.
"""

from __future__ import annotations

import ctypes
import hashlib
import inspect
import json
import math
import os
import random
import re
import struct
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from fusion_node.errors import CalibrationError, ConfigError, ProtocolError, ReplayError
from fusion_node.progress import progress, progress_seconds
from fusion_node.protocol import (
    DTYPES,
    AudioChunk,
    Frame,
    Health,
    JointState,
    Prediction,
    decode,
    encode,
)
from fusion_node.shm import ShmConfig, ShmReader, ShmWriter

REPO = Path(__file__).resolve().parents[2]
SAMPLE_LOG = REPO / "tests" / "data" / "sample.mcap"
TARGETS = ("protocol", "shm", "launch", "calibration", "mcap")
_CORPUS_LIMIT = 256  # per target: inputs that found a new outcome, mutated further


class FuzzHang(Exception):
    """An input ran longer than the fuzzer's hang limit."""


class RoundTripError(Exception):
    """An accepted message does not encode and decode back to itself."""


@dataclass
class Finding:
    """One input that crashed, hung, broke a round trip or allocated without bound."""

    target: str
    kind: str  # crash, hang, roundtrip, memory
    error: str
    input_sha1: str
    path: str | None = None  # where the input was saved


@dataclass
class TargetStats:
    inputs: int = 0
    accepted: int = 0
    seconds: float = 0.0
    slowest_input_ms: float = 0.0
    memory_checked: int = 0
    max_alloc_bytes: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "accepted": self.accepted,
                "seconds": round(self.seconds, 2),
                "inputs_per_s": round(self.inputs / self.seconds) if self.seconds else None,
                "crashes": len(self.findings), "slowest_input_ms": round(self.slowest_input_ms, 2),
                "memory_checked": self.memory_checked, "max_alloc_bytes": self.max_alloc_bytes,
                "distinct_reasons": len(self.reasons), "reasons": dict(self.reasons.most_common()),
                "distinct_outcomes": len(self.outcomes),
                "top_outcomes": dict(self.outcomes.most_common(8)),
                "findings": [vars(f) for f in self.findings]}


@dataclass
class Target:
    """A parser under fuzz: valid seeds, how to mutate them, and how to run one input."""

    name: str
    seeds: list[Any]
    mutate: Callable[[random.Random, Any, Sequence[Any]], Any]
    # Runs one input; returns the typed rejections of its steps (empty: accepted). A typed
    # error it raises is one rejection; any other exception is a crash.
    run: Callable[[Any], list[Exception]]
    expected: tuple[type[Exception], ...]
    dump: Callable[[Any], bytes]  # an input as the bytes of a regression file
    load: Callable[[bytes], Any]
    size: Callable[[Any], int]  # input bytes, for the memory bound
    alloc_limit: Callable[[int], int]  # allowed peak allocation for an input of that size
    close: Callable[[], None] = lambda: None
    scratch_dir: str | None = None  # blanked out of rejection messages


# -- shared byte and text mutations ---------------------------------------------------------

_INTERESTING_8 = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC0, 0xC1, 0xC2, 0xC3, 0xD3, 0xDC, 0xDD,
                  0xDE, 0xDF, 0xC4, 0xC6, 0xD9, 0xDB, 0xCF, 0x90, 0x80, 0xA0)
_INTERESTING_32 = (0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
                   0xFFFFFFFF, 0xFFFFFFFE)


def mutate_bytes(rng: random.Random, data: bytes, pool: Sequence[bytes] = ()) -> bytes:
    """One libFuzzer-style mutation of `data`."""
    buf = bytearray(data)
    n = len(buf)
    op = rng.randrange(11)
    if op == 0 and n:  # flip one bit
        i = rng.randrange(n)
        buf[i] ^= 1 << rng.randrange(8)
    elif op == 1 and n:  # set a byte
        buf[rng.randrange(n)] = rng.randrange(256)
    elif op == 2 and n:  # an interesting byte (msgpack type markers among them)
        buf[rng.randrange(n)] = rng.choice(_INTERESTING_8)
    elif op == 3 and n >= 4:  # an interesting 32-bit size, either byte order
        i = rng.randrange(n - 3)
        buf[i:i + 4] = struct.pack(rng.choice("<>") + "I", rng.choice(_INTERESTING_32))
    elif op == 4:  # insert random bytes
        i = rng.randrange(n + 1)
        buf[i:i] = rng.randbytes(rng.choice((1, 1, 2, 4, 8, 32)))
    elif op == 5 and n:  # delete a range
        i = rng.randrange(n)
        del buf[i:i + rng.choice((1, 1, 2, 4, 16, 64))]
    elif op == 6 and n:  # truncate
        del buf[rng.randrange(n):]
    elif op == 7 and n:  # duplicate a range in place
        i = rng.randrange(n)
        chunk = buf[i:i + rng.choice((1, 4, 16, 64))]
        buf[i:i] = chunk * rng.choice((1, 2, 16))
    elif op == 8 and pool:  # splice in a piece of another input
        other = rng.choice(pool)
        if other:
            j = rng.randrange(len(other))
            i = rng.randrange(n + 1)
            buf[i:i + rng.randrange(16)] = other[j:j + rng.randrange(1, 64)]
    elif op == 9 and n >= 8:  # an interesting 64-bit size
        i = rng.randrange(n - 7)
        buf[i:i + 8] = struct.pack(rng.choice("<>") + "Q", rng.choice(
            (0, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1)))
    else:  # insert a run of one byte: long strings, deep nesting
        i = rng.randrange(n + 1)
        buf[i:i] = bytes([rng.choice(_INTERESTING_8)]) * rng.choice((16, 256, 4096))
    return bytes(buf)


_TEXT_CHARS = "[]{}=:,.\"'#\n\t -+_&*!?|>%@`\\0123456789abcdefxyz\u00e9\u4e2d\U0001f600"


def _replace_value(rng: random.Random, text: str, sep: str, values: Sequence[str]) -> str:
    lines = text.split("\n")
    candidates = [i for i, line in enumerate(lines) if sep in line]
    if not candidates:
        return text
    i = rng.choice(candidates)
    key, _, _ = lines[i].partition(sep)
    lines[i] = f"{key}{sep} {rng.choice(values)}"
    return "\n".join(lines)


def mutate_text(rng: random.Random, text: str, sep: str, values: Sequence[str],
                tokens: Sequence[str], pool: Sequence[str] = ()) -> str:
    """One mutation of a TOML or YAML document: a value replaced by an interesting one (`sep`
    separates keys from values), a key or token inserted, lines moved, characters changed."""
    op = rng.randrange(10)
    if op <= 2:
        return _replace_value(rng, text, sep, values)
    n = len(text)
    i = rng.randrange(n + 1)
    if op == 3:
        return text[:i] + rng.choice(tokens) + text[i:]
    if op == 4:
        return text[:i] + "".join(rng.choice(_TEXT_CHARS)
                                  for _ in range(rng.choice((1, 1, 3)))) + text[i:]
    if op == 5:
        return text[:i] + text[i + rng.choice((1, 1, 4, 16)):]
    if op == 6:
        lines = text.split("\n")
        a, b = rng.randrange(len(lines)), rng.randrange(len(lines))
        if rng.random() < 0.5:
            lines[a], lines[b] = lines[b], lines[a]
        elif rng.random() < 0.5:
            lines.insert(a, lines[b])
        else:
            del lines[a]
        return "\n".join(lines)
    if op == 7:
        return text[:i]
    if op == 8 and pool:
        other = rng.choice(pool)
        lines = text.split("\n")
        lines.insert(rng.randrange(len(lines) + 1), rng.choice(other.split("\n")))
        return "\n".join(lines)
    # a run of one token: deep nesting, long keys, many anchors
    return text[:i] + rng.choice(("[", "{", "- ", "a", "\"", "&a ", " ")) * rng.choice(
        (8, 200, 2000)) + text[i:]


def _framed(items: Sequence[bytes]) -> bytes:
    """Any number of byte strings as one file: u32 count, u32 lengths, then the items."""
    return struct.pack(f"<{len(items) + 1}I", len(items), *map(len, items)) + b"".join(items)


def _unframed(data: bytes) -> list[bytes]:
    (count,) = struct.unpack_from("<I", data)
    lengths = struct.unpack_from(f"<{count}I", data, 4)
    items, offset = [], 4 + 4 * count
    for length in lengths:
        items.append(data[offset:offset + length])
        offset += length
    return items


def reason(exc: Exception) -> str:
    """What a rejection is counted under: the ProtocolError reason, else the error type."""
    return exc.reason if isinstance(exc, ProtocolError) else type(exc).__name__


def outcome(exc: Exception, scratch: str | None = None) -> str:
    """A finer key for a rejection: its message with the values (quoted text, numbers, the
    scratch folder, parser positions) blanked, so like errors share a key."""
    text = str(exc)
    if scratch:
        text = text.replace(scratch, "<dir>")
    # Quoted names (fields, dtypes, kinds) stay; other quoted values, reprs of containers and
    # parser positions go.
    text = _QUOTED.sub(lambda m: m[0] if _NAME.fullmatch(m[0][1:-1]) else "…", text[:200])
    text = re.split(r"[\[{(]", text, maxsplit=1)[0]
    prefix = "" if isinstance(exc, ProtocolError) else f"{type(exc).__name__}: "
    return prefix + _NUMBER.sub("N", text)[:90]


_QUOTED = re.compile(r"'[^'\n]{0,80}'|\"[^\"\n]{0,80}\"")
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,23}")
_NUMBER = re.compile(r"-?\d[\d._e+-]*")


# -- protocol -------------------------------------------------------------------------------

def protocol_seeds() -> list[tuple[bytes, ...]]:
    """One valid encoded message of each kind and layout the node sends, kept small so a
    mutation is cheap; the header is what the fuzzer attacks."""
    rng = np.random.default_rng(0)
    messages = [
        Frame("camera.front", 7, 1_000_000_000, rng.integers(0, 255, (4, 6, 3), np.uint8)),
        Frame("camera.left", 0, 5, rng.integers(0, 255, (2, 3, 1), np.uint8), "mono8"),
        Frame("camera.back", 3, -5, rng.integers(0, 255, (3, 2, 3), np.uint8), "bgr8"),
        AudioChunk("audio.mic0", 12, 2_000_000, 16000, 1920,
                   rng.integers(-3000, 3000, (16, 1)).astype(np.int16)),
        AudioChunk("audio.array", 1, 3, 48000, 0, rng.random((8, 2), np.float32)),
        JointState("joints.arm", 100, 3_000_000, ("j0", "j1", "j2", "gripper"),
                   rng.random(4), rng.random(4), rng.random(4)),
        Prediction("pred.action", 4, 40_000_000, 70_000_000, "action", "1dc508c8208f924d",
                   {"camera.front": True, "joints.arm": False}, {"command": "stop"},
                   {"actions": rng.random((5, 3), np.float32),
                    "step_times_ns": np.arange(5, dtype=np.int64)},
                   {"t_window_start_ns": 40_000_100}, late=True, t_publish_ns=69_000_000),
        Prediction("pred.speech", 0, 1, 2, "speech", "08c37b85c4b0db4c", {}, {"n": 1.5},
                   {"voice_activity": rng.random(16, np.float32),
                    "ids": np.arange(3, dtype=np.int32), "u": np.zeros(2, np.uint8),
                    "s": np.zeros((2, 2), np.int16), "d": np.zeros(1, np.float64)}, {}),
        Prediction("pred.empty", 9, 0, 0, "e", "", {}, {}, {}, {}),
        Health("node.health", 2, 4_000_000_000,
               {"streams": {"camera.front": {"rate_hz": 30.0, "seq_gaps": 0}},
                "rejected": {"bad_header": 1}, "engines": [{"name": "speech", "misses": 0}]}),
    ]
    return [tuple(bytes(part) for part in encode(msg)) for msg in messages]


_CONFUSING: tuple[Any, ...] = (
    None, True, False, 0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
    -(2**63), -(2**63) + 1, 1.0, 1.5, -0.0, math.nan, math.inf, -math.inf, "", "x",
    "camera.front", "uint8", "float64", "int16", "float32", "mono8", "rgb8", "frame", "audio",
    "joints", "prediction", "health", "raw", "\u00e9\u4e2d", "x" * 300, b"", b"\x00" * 4, [],
    [0], [1, 2], [-1], [1.0], [2**31 - 1] * 4, [65536] * 4, [2**31] * 2, [0, 0, 0],
    [3, 4], [[1]], ["a", "b"], ["a", 1], {}, {"a": 1}, {"name": "a"},
    {"name": "a", "dtype": "uint8", "shape": [1]}, {1: 2}, {b"k": True},
    msgpack.ExtType(1, b"x"), msgpack.ExtType(127, b"\x00" * 4), msgpack.Timestamp(1, 0),
)
_HEADER_KEYS = ("v", "kind", "stream", "seq", "t_capture_ns", "dtype", "shape", "encoding",
                "sample_rate", "sample_index", "names", "t_ref_ns", "deadline_ns",
                "t_publish_ns", "late", "engine", "model_hash", "mask", "fields", "trace",
                "arrays", "stats", "shm", "name")


def _confusing(rng: random.Random) -> Any:
    if rng.random() < 0.85:
        return rng.choice(_CONFUSING)
    # random nesting, a random-width integer
    if rng.random() < 0.5:
        return rng.choice((-1, 1)) * rng.getrandbits(rng.choice((7, 15, 31, 63, 64)))
    value: Any = rng.choice(_CONFUSING)
    for _ in range(rng.randrange(1, 40)):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def _containers(value: Any, found: list[Any], depth: int = 0) -> None:
    if isinstance(value, (dict, list)) and depth < 8:
        found.append(value)
        for item in (value.values() if isinstance(value, dict) else value):
            if len(found) >= 64:
                return
            _containers(item, found, depth + 1)


def _mutate_header(rng: random.Random, header: Any) -> Any:
    """Type confusion inside a decoded header: a value replaced, a key dropped or added."""
    found: list[Any] = []
    _containers(header, found)
    if not found:
        return _confusing(rng)
    target = rng.choice(found)
    op = rng.randrange(4)
    if isinstance(target, dict):
        if op == 0 and target:
            del target[rng.choice(list(target))]
        elif op == 1:
            target[rng.choice(_HEADER_KEYS)] = _confusing(rng)
        elif target:
            target[rng.choice(list(target))] = _confusing(rng)
    elif target:
        if op == 0:
            del target[rng.randrange(len(target))]
        elif op == 1:
            target.append(_confusing(rng))
        else:
            target[rng.randrange(len(target))] = _confusing(rng)
    else:
        target.append(_confusing(rng))
    return header


def _reshape(rng: random.Random, parts: list[bytes]) -> list[bytes]:
    """A header whose dtype and shape are changed with payloads resized to match them, so the
    input passes the size checks and reaches the per-kind checks behind them."""
    try:
        header = msgpack.unpackb(parts[1], raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - msgpack raises several unrelated types
        return parts
    if not isinstance(header, dict):
        return parts

    def spec() -> tuple[str, list[int], bytes]:
        dtype = rng.choice(sorted(DTYPES))
        shape = [rng.choice((0, 1, 2, 3, 4, 5)) for _ in range(rng.randint(1, 4))]
        return dtype, shape, rng.randbytes(math.prod(shape) * DTYPES[dtype].itemsize)

    if isinstance(header.get("arrays"), list):
        arrays, payloads = [], []
        for index in range(rng.randrange(4)):
            dtype, shape, payload = spec()
            arrays.append({"name": f"a{index}", "dtype": dtype, "shape": shape})
            payloads.append(payload)
        header["arrays"] = arrays
        return [parts[0], msgpack.packb(header, use_bin_type=True), *payloads]
    dtype, shape, payload = spec()
    header["dtype"], header["shape"] = dtype, shape
    if isinstance(header.get("names"), list) and rng.random() < 0.7:
        header["dtype"], header["shape"] = "float64", [3, rng.randrange(4)]
        header["names"] = [f"j{i}" for i in range(header["shape"][1])]
        payload = rng.randbytes(24 * header["shape"][1])
    return [parts[0], msgpack.packb(header, use_bin_type=True), payload]


def mutate_parts(rng: random.Random, parts: tuple[bytes, ...],
                 pool: Sequence[tuple[bytes, ...]]) -> tuple[bytes, ...]:
    """One to three mutations of a multipart message."""
    out = list(parts)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.random()
        if op < 0.2 and len(out) > 1:  # bytes of the header
            out[1] = mutate_bytes(rng, out[1])
        elif op < 0.55 and len(out) > 1:  # values inside the header
            try:
                header = msgpack.unpackb(out[1], raw=False, strict_map_key=False)
                out[1] = msgpack.packb(_mutate_header(rng, header),
                                       use_bin_type=rng.random() < 0.9)
            except Exception:  # noqa: BLE001 - not msgpack (any more): mutate the bytes
                out[1] = mutate_bytes(rng, out[1])
        elif op < 0.65 and out:  # bytes of any part
            i = rng.randrange(len(out))
            others = [p[i] for p in rng.sample(pool, min(4, len(pool))) if len(p) > i]
            out[i] = mutate_bytes(rng, out[i], others)
        elif op < 0.78:  # the number of parts
            choice = rng.randrange(5)
            if choice == 0 and out:
                del out[rng.randrange(len(out))]
            elif choice == 1 and out:
                out.insert(rng.randrange(len(out) + 1), rng.choice(out))
            elif choice == 2:
                out.insert(rng.randrange(len(out) + 1), rng.randbytes(rng.randrange(32)))
            elif choice == 3:
                out.extend([b""] * rng.randrange(1, 20))
            else:
                del out[rng.randrange(len(out) + 1):]
        elif op < 0.88 and len(out) > 1:
            out = _reshape(rng, out)
        elif op < 0.96 and pool:  # a part of another message
            other = rng.choice(pool)
            if other and out:
                out[rng.randrange(len(out))] = rng.choice(other)
        else:  # random parts
            out = [rng.randbytes(rng.randrange(40)) for _ in range(rng.randrange(6))]
    return tuple(out)


def _encoded(msg: Any) -> list[bytes]:
    return [bytes(part) for part in encode(msg)]


def run_protocol(parts: Sequence[bytes], shm: ShmReader | None = None) -> list[Exception]:
    """Decode; an accepted message must encode and decode back to the same bytes."""
    msg = decode(parts, 0, shm)
    try:
        once = _encoded(msg)
        twice = _encoded(decode(once))
    except Exception as exc:
        raise RoundTripError(f"accepted {type(msg).__name__} does not round-trip: "
                             f"{type(exc).__name__}: {exc}") from exc
    if once != twice:
        raise RoundTripError(f"accepted {type(msg).__name__} changes when re-encoded")
    return []


def protocol_target() -> Target:
    return Target(
        "protocol", protocol_seeds(), mutate_parts, run_protocol, (ProtocolError,),
        dump=_framed, load=lambda data: tuple(_unframed(data)),
        size=_parts_size, alloc_limit=_header_alloc_limit)


def _parts_size(parts: Sequence[bytes]) -> int:
    return sum(map(len, parts)) + 64 * len(parts)


def _header_alloc_limit(size: int) -> int:
    # A header's msgpack objects cost up to ~50x its bytes (8-byte pointers, small objects);
    # arrays are views. The constant: a new layout packs its header with a fresh
    # msgpack.Packer (a 256 KiB buffer), in decode and in the round-trip re-encode. Nothing
    # may scale with a size the input declares.
    return 2 * 1024 * 1024 + 64 * size


def shm_target() -> Target:
    """The protocol seeds with their arrays moved into shared-memory rings of the target's
    own (protocol.md §10), decoded through a ShmReader as a subscriber decodes them. The
    rings' names hold this process's pid, so unlike `protocol` the outcomes of a seeded run
    can differ between processes. The lease outlasts any run: a mutated header, not the
    clock, decides what is rejected."""
    writer = ShmWriter(ShmConfig(threshold_bytes=1, slots=4, lease_ms=10**9))
    reader = ShmReader()
    seeds = []
    for seed in protocol_seeds():
        wrapped = writer.wrap(list(seed))
        if len(wrapped) == 2:  # frames, audio and joints; predictions stay inline
            seeds.append(tuple(bytes(part) for part in wrapped))
    return Target(
        "shm", seeds, mutate_parts, lambda parts: run_protocol(parts, reader),
        (ProtocolError,), dump=_framed, load=lambda data: tuple(_unframed(data)),
        size=_parts_size, alloc_limit=_header_alloc_limit, close=writer.close)


# -- launch files ---------------------------------------------------------------------------

_TOML_VALUES = ("inf", "-inf", "nan", "+nan", "1e308", "-1e308", "1e-320", "0", "-1", "0.0",
                "9223372036854775807", "-9223372036854775808", "true", "false", '""', '"x"',
                "[]", "{}", '[1, "a"]', "{ a = 1 }", "1979-05-27T07:32:00Z", "1979-05-27",
                "07:32:00", "0x7fffffff", "'literal'", '"camera.front"', '"pred.speech"',
                '"audio.mic0"', '"sim_camera"', '"speech"', '"spec"', '"auto"', '"none"',
                "[[1]]", '{ inputs = {} }', '"' + "x" * 500 + '"', "1_000", "3.5e3")
_TOML_TOKENS = ("[node]\n", "[[drivers]]\n", "[[engines]]\n", "[record]\n", "[[streams]]\n",
                "\nkind = ", "\nstream = ", "\nconfig = ", "\nspec = ", "\nrate_hz = ",
                "\nlatency_ms = ", "\nalign_delay_ms = ", "\nduration_s = ", "\npath = ",
                "\nbuffer_capacity = ", "\ninputs = ", "\nparams = ", "\nbinding = ",
                "\ncalibration = ", "\nconnect = ", "\nchunk_size_kb = ", "\nclock = ",
                "\nhealth_period_ms = ", "\ndriver_restart_backoff_ms = ", "=", "\n[", "]",
                "{", "}", ",", '"', "'''", "\\u0000", "#", ".", "a.b.c = 1\n")


def launch_seeds() -> list[str]:
    paths = sorted((REPO / "launch").glob("*.toml")) + [REPO / "fusion_node" / "default.toml"]
    return [path.read_text() for path in paths if path.is_file()]


def mutate_launch(rng: random.Random, text: str, pool: Sequence[str]) -> str:
    for _ in range(rng.choice((1, 1, 2, 3))):
        text = mutate_text(rng, text, "=", _TOML_VALUES, _TOML_TOKENS, pool)
    return text


def run_launch(text: str) -> list[Exception]:
    from fusion_node.config import parse_config

    parse_config(text, "fuzz.toml")
    return []


def launch_target() -> Target:
    return Target(
        "launch", launch_seeds(), mutate_launch, run_launch, (ConfigError,),
        dump=lambda text: text.encode(), load=lambda data: data.decode(),
        size=lambda text: len(text.encode()),
        alloc_limit=lambda size: 4 * 1024 * 1024 + 512 * size)


# -- calibration ----------------------------------------------------------------------------

_YAML_VALUES = (".inf", "-.inf", ".nan", "1e308", "1.0e+308", "1e400", "-1", "0", "~", "null",
                "true", "[]", "{}", "[1, 2]", "!!binary aGVsbG8=", "!!python/object:os.system",
                "&a [1]", "*a", "*b", "2001-12-14", "0x1F", "0o17", "'x'", '"\\x00"',
                "!!float 1", "!!str 1", "!!int x", "{drift_ppm: 1e308}", "[[[[1]]]]",
                "{audio: a, video: v, offset_ms: 1e308}", "camera.front.yaml", "..",
                "/nonexistent.yaml", "'" + "x" * 500 + "'", "12:30:45", "!!set {a, b}",
                "{rows: 3, cols: 3, data: [1, 2, 3, 4, 5, 6, 7, 8, .nan]}", "|\n  text")
_YAML_TOKENS = ("\n- ", "\n  ", ": ", "\n? ", "&x ", "*x", "<<: ", "!!map ", "---\n", "...\n",
                "{", "}", "[", "]", "#", "\"", "'", "%YAML 1.1\n", "\ndelays_ms:\n  a: ",
                "\nclocks:\n  a: ", "\ncameras:\n  a: ", "\nav_offset: ", "\t", "\\")


def calibration_seeds() -> list[tuple[str, str]]:
    folder = REPO / "calibration" / "sim"
    calibration = (folder / "calibration.yaml").read_text()
    camera = (folder / "camera.front.yaml").read_text()
    return [(calibration, camera)]


def mutate_calibration(rng: random.Random, value: tuple[str, str],
                       pool: Sequence[tuple[str, str]]) -> tuple[str, str]:
    calibration, camera = value
    for _ in range(rng.choice((1, 1, 2, 3))):
        if rng.random() < 0.65:
            calibration = mutate_text(rng, calibration, ":", _YAML_VALUES, _YAML_TOKENS,
                                      [p[0] for p in pool[:8]])
        else:
            camera = mutate_text(rng, camera, ":", _YAML_VALUES, _YAML_TOKENS,
                                 [p[1] for p in pool[:8]])
    return calibration, camera


class _CalibrationFolder:
    """A scratch robot folder: calibration.yaml next to the camera_info file it names."""

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="fusion-node-fuzz-")
        self.dir = self.tmp.name
        self.calibration = os.path.join(self.dir, "calibration.yaml")
        self.camera = os.path.join(self.dir, "camera.front.yaml")

    def run(self, value: tuple[str, str]) -> list[Exception]:
        from fusion_node.calibration import load_calibration

        for path, text in ((self.calibration, value[0]), (self.camera, value[1])):
            with open(path, "w", encoding="utf-8", errors="surrogatepass") as file:
                file.write(text)
        load_calibration(self.calibration)
        return []


def calibration_target() -> Target:
    folder = _CalibrationFolder()
    return Target(
        "calibration", calibration_seeds(), mutate_calibration, folder.run, (CalibrationError,),
        dump=lambda value: _framed([value[0].encode(), value[1].encode()]),
        load=lambda data: tuple(item.decode() for item in _unframed(data)),  # type: ignore
        size=lambda value: len(value[0].encode()) + len(value[1].encode()),
        alloc_limit=lambda size: 4 * 1024 * 1024 + 512 * size, close=folder.tmp.cleanup,
        scratch_dir=folder.dir)


# -- MCAP logs ------------------------------------------------------------------------------

def _small_log(path: str, compression: str, per_topic: int, finish: bool) -> None:
    """A short log with every kind of record the recorder writes (messages of each topic,
    frames shrunk, window cuts, previews, metadata), cut from the sample log."""
    from fusion_node.logs.mcap_format import WINDOW_CUT, LogReader, LogWriter, WindowCut

    with LogReader(str(SAMPLE_LOG)) as reader:
        metadata = reader.metadata()
        writer = LogWriter(path, compression=compression, chunk_size=4096, preview_hz=10.0,
                           metadata={k: v for k, v in metadata.get(
                               "fusion_node.recording", {}).items()
                               if k in ("source", "config", "model_hashes")})
        counts: Counter[str] = Counter()
        topics = reader.topics() + reader.topics([WINDOW_CUT])
        for message in reader.messages(topics):
            if counts[message.topic] >= per_topic:
                continue
            counts[message.topic] += 1
            if message.kind == WINDOW_CUT:
                cut = json.loads(message.data)
                writer.write_cut(WindowCut(cut["topic"], cut["t_ref_ns"]), message.log_time_ns)
                continue
            msg = message.decode(reader.path)
            if isinstance(msg, Frame):
                msg.image = np.ascontiguousarray(msg.image[::60, ::60])
            writer.write(msg, message.log_time_ns)
        if finish:
            writer.close({"dropped": json.dumps({})})
        else:  # a recorder killed mid-run: finished chunks on disk, no summary
            writer._writer.flush()
            writer.abort()


def mcap_seeds(scratch: str) -> list[bytes]:
    seeds = []
    for index, (compression, per_topic, finish) in enumerate((
            ("none", 6, True), ("lz4", 6, True), ("zstd", 10, True), ("none", 6, False))):
        path = os.path.join(scratch, f"seed{index}.mcap")
        _small_log(path, compression, per_topic, finish)
        seeds.append(Path(path).read_bytes())
        os.remove(path)
    return seeds


def _records(data: bytes) -> list[int]:
    """Offsets of the top-level MCAP records (opcode, u64 length, content) after the magic."""
    offsets, offset = [], 8
    while offset + 9 <= len(data) and len(offsets) < 4096:
        offsets.append(offset)
        (length,) = struct.unpack_from("<Q", data, offset + 1)
        offset += 9 + length
    return offsets


def mutate_mcap(rng: random.Random, data: bytes, pool: Sequence[bytes]) -> bytes:
    """Byte mutations, truncation, and edits of record opcodes and lengths."""
    for _ in range(rng.choice((1, 1, 2))):
        op = rng.random()
        if op < 0.2:  # a log cut short, as a killed recorder or a full disk leaves it
            data = data[:rng.randrange(len(data) + 1)]
        elif op < 0.45:
            offsets = _records(data)
            if offsets:
                at = rng.choice(offsets)
                buf = bytearray(data)
                if rng.random() < 0.3:
                    buf[at] = rng.choice((0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07,
                                          0x08, 0x09, 0x0A, 0x0C, 0x0D, 0x0F, 0xFF))
                else:  # a record length, or the first length inside its content
                    at += 1 if rng.random() < 0.5 else 9 + rng.choice((0, 2, 4, 8, 16))
                    if at + 8 <= len(buf):
                        buf[at:at + 8] = struct.pack("<Q", rng.choice(
                            (0, 1, 7, 2**31, 2**32 - 1, 2**62, 2**64 - 1,
                             rng.randrange(len(buf) + 64))))
                data = bytes(buf)
        else:
            data = mutate_bytes(rng, data, pool[:4])
    return data


class _LogFolder:
    """Scratch files for the log readers, which take paths."""

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="fusion-node-fuzz-")
        self.dir = self.tmp.name
        self.log = os.path.join(self.dir, "fuzz.mcap")
        self.fixed = os.path.join(self.dir, "fixed.mcap")

    def run(self, data: bytes) -> list[Exception]:
        """Every way fusion-node reads a log: `log info`, `log recover`, and replay's
        indexed reader with the launch config stored in the log."""
        from fusion_node.logs.inspect import format_info, log_info, recover
        from fusion_node.logs.mcap_format import LogReader
        from fusion_node.logs.replay import config_from_log

        Path(self.log).write_bytes(data)
        rejections: list[Exception] = []
        try:
            format_info(log_info(self.log))
        except ReplayError as exc:
            rejections.append(exc)
        try:
            recover(self.log, self.fixed)
        except ReplayError as exc:
            rejections.append(exc)
        try:
            with LogReader(self.log) as reader:
                config_from_log(self.log, reader.metadata())
                for message in reader.messages():
                    try:
                        message.decode(self.log)
                    except ReplayError as exc:
                        rejections.append(exc)
                        break
        except ReplayError as exc:
            rejections.append(exc)
        return rejections


def mcap_target() -> Target:
    folder = _LogFolder()
    return Target(
        "mcap", mcap_seeds(folder.dir), mutate_mcap, folder.run, (ReplayError,),
        dump=bytes, load=bytes, size=len,
        # The seeds are tens of kB: 64 MiB is far beyond any honest read of them, and far
        # below what a corrupt length would allocate if it were trusted (up to 4 GiB).
        alloc_limit=lambda size: 64 * 1024 * 1024 + 64 * size, close=folder.tmp.cleanup,
        scratch_dir=folder.dir)


TARGET_BUILDERS: dict[str, Callable[[], Target]] = {
    "protocol": protocol_target, "shm": shm_target, "launch": launch_target,
    "calibration": calibration_target, "mcap": mcap_target}


# -- the loop -------------------------------------------------------------------------------

class _Watchdog:
    """Raises FuzzHang in the fuzzing thread when one input runs longer than `hang_s`.

    It works while the fuzzed code runs Python bytecode or releases the GIL; C code that
    spins holding the GIL cannot be interrupted this way (faulthandler is the last resort)."""

    def __init__(self, hang_s: float) -> None:
        self.hang_s = hang_s
        self.started_ns = 0  # when the current input started; 0 between inputs
        self._thread_id = threading.get_ident()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="fuzz-watchdog", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.hang_s / 4)):
            started = self.started_ns
            if started and time.monotonic_ns() - started > self.hang_s * 1e9:
                self.started_ns = 0
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self._thread_id), ctypes.py_object(FuzzHang))

    def close(self) -> None:
        self._stop.set()
        self._watcher.join()


def _save(target: Target, value: Any, crash_dir: str | None) -> tuple[str, str | None]:
    data = target.dump(value)
    sha1 = hashlib.sha1(data).hexdigest()[:16]
    if crash_dir is None:
        return sha1, None
    os.makedirs(crash_dir, exist_ok=True)
    path = os.path.join(crash_dir, f"{target.name}-{sha1}.bin")
    Path(path).write_bytes(data)
    return sha1, path


def fuzz_target(target: Target, *, inputs: int | None = None, seconds: float | None = None,
                seed: int = 0, memory_inputs: int = 0, hang_s: float = 10.0,
                crash_dir: str | None = None, max_findings: int = 20) -> TargetStats:
    """Mutate and run inputs until `inputs` have run or `seconds` have passed (at least one
    limit must be given). The first `memory_inputs` run under tracemalloc."""
    if inputs is None and seconds is None:
        raise ValueError("fuzz_target needs an input count or a time limit")
    rng = random.Random(f"{target.name}:{seed}")
    stats = TargetStats()
    corpus: list[Any] = list(target.seeds)
    seen_findings: set[str] = set()
    watchdog = _Watchdog(hang_s)
    start_ns = time.perf_counter_ns()
    deadline_ns = None if seconds is None else start_ns + round(seconds * 1e9)
    tracing = memory_inputs > 0
    bar = (progress(desc=f"bench fuzz: {target.name}", total=inputs, unit="input")
           if seconds is None else progress_seconds(seconds, desc=f"bench fuzz: {target.name}"))
    if tracing:
        tracemalloc.start()
    try:
        while inputs is None or stats.inputs < inputs:
            if stats.inputs % 16 == 0:
                now_ns = time.perf_counter_ns()
                bar.at(stats.inputs if seconds is None else (now_ns - start_ns) / 1e9)
                if deadline_ns is not None and now_ns >= deadline_ns:
                    break
            if tracing and stats.inputs >= memory_inputs:
                tracemalloc.stop()
                tracing = False
            # The seeds run first, untraced: their first use imports modules (drivers).
            traced = tracing and stats.inputs >= len(target.seeds)
            # Each of the first inputs runs an unmutated seed: they must be accepted.
            value = (target.seeds[stats.inputs] if stats.inputs < len(target.seeds)
                     else target.mutate(rng, rng.choice(corpus), corpus))
            kind = error = None
            rejections: list[Exception] = []
            if traced:
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
            t0 = time.perf_counter_ns()
            try:
                watchdog.started_ns = time.monotonic_ns()
                try:
                    rejections = target.run(value)
                finally:
                    watchdog.started_ns = 0
            except target.expected as exc:
                rejections = [exc]
            except FuzzHang:
                kind, error = "hang", f"input ran longer than {hang_s} s"
            except RoundTripError as exc:
                kind, error = "roundtrip", str(exc)
            except Exception as exc:  # noqa: BLE001 - every other exception is the finding
                kind, error = "crash", f"{type(exc).__name__}: {exc}"[:500]
            elapsed_ms = (time.perf_counter_ns() - t0) / 1e6
            stats.slowest_input_ms = max(stats.slowest_input_ms, elapsed_ms)
            if traced:
                peak = tracemalloc.get_traced_memory()[1] - base
                stats.memory_checked += 1
                stats.max_alloc_bytes = max(stats.max_alloc_bytes, peak)
                limit = target.alloc_limit(target.size(value))
                if peak > limit and kind is None:
                    kind, error = "memory", f"peak allocation {peak} bytes, limit {limit}"
            stats.inputs += 1
            if kind is not None:
                key = f"{kind}:{re.sub(r'[0-9]+', 'N', error or '')[:120]}"
                if key not in seen_findings and len(stats.findings) < max_findings:
                    seen_findings.add(key)
                    sha1, path = _save(target, value, crash_dir)
                    stats.findings.append(Finding(target.name, kind, error or "", sha1, path))
                continue
            if not rejections:
                stats.accepted += 1
                key = "accepted"
            else:
                key = " | ".join(outcome(exc, target.scratch_dir) for exc in rejections)
                for exc in rejections:
                    stats.reasons[reason(exc)] += 1
            if key not in stats.outcomes:
                # A new outcome: this input reached somewhere new, mutate it further.
                if len(corpus) < _CORPUS_LIMIT:
                    corpus.append(value)
                else:
                    corpus[rng.randrange(len(target.seeds), _CORPUS_LIMIT)] = value
            stats.outcomes[key] += 1
    finally:
        if seconds is None:
            bar.at(stats.inputs)
        bar.close()
        if tracing:
            tracemalloc.stop()
        watchdog.close()
        stats.seconds = (time.perf_counter_ns() - start_ns) / 1e9
    return stats


def run_fuzz_bench(inputs: int = 1_000_000, seconds: float = 20.0, seed: int = 0,
                   targets: Sequence[str] = TARGETS, memory_inputs: int = 20_000,
                   crash_dir: str | None = None) -> dict[str, Any]:
    """`fusion-node bench fuzz`: `inputs` decoder inputs, `seconds` for each other target
    (shared-memory headers and the file loaders)."""
    if crash_dir is None:
        crash_dir = os.path.join(tempfile.gettempdir(), "fusion-node-fuzz-crashes")
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ConfigError(f"unknown fuzz target(s) {unknown}; choose from {TARGETS}")
    result: dict[str, Any] = {"bench": "fuzz", "seed": seed, "crash_dir": crash_dir,
                              "targets": {}}
    for name in targets:
        target = TARGET_BUILDERS[name]()
        try:
            stats = fuzz_target(
                target, seed=seed, crash_dir=crash_dir,
                inputs=inputs if name == "protocol" else None,
                seconds=None if name == "protocol" else seconds,
                memory_inputs=min(memory_inputs, inputs) if name == "protocol"
                else memory_inputs // 100)
        finally:
            target.close()
        result["targets"][name] = stats.summary()
    result["crashes"] = sum(t["crashes"] for t in result["targets"].values())
    return result


def replay_input(target: Target, data: bytes) -> list[Exception]:
    """Run one saved input (a regression file); typed rejections are returned, anything
    else raises."""
    try:
        return target.run(target.load(data))
    except target.expected as exc:
        return [exc]


@contextmanager
def opened_target(name: str) -> Iterator[Target]:
    target = TARGET_BUILDERS[name]()
    try:
        yield target
    finally:
        target.close()


# -- coverage-guided, with atheris ----------------------------------------------------------

_INSTRUMENTED = {"fusion_node", "drivers", "engines", "tomllib", "yaml", "mcap", "msgpack"}


def _atheris_main(argv: list[str]) -> None:
    """`python -m fusion_node.bench.fuzz TARGET [libFuzzer flags]`: coverage-guided fuzzing with
    atheris (optional: `pip install atheris`), its corpus seeded with the target's seeds.
    libFuzzer owns the process from here: it exits when done or on the first crash."""
    import sys

    try:
        import atheris
    except ImportError:
        raise SystemExit("atheris is not installed: pip install atheris") from None
    if len(argv) < 2 or argv[1] not in TARGETS:
        raise SystemExit(f"usage: python -m fusion_node.bench.fuzz {{{','.join(TARGETS)}}} "
                         "[libFuzzer flags, e.g. -runs=100000 -max_total_time=60]")
    target = TARGET_BUILDERS[argv[1]]()
    for seed in target.seeds:  # imports every module the target reaches
        target.run(seed)
    # This module imported the parsers already, so instrument_imports() would miss them, and
    # instrument_all() takes minutes on some large functions: instrument the parsers'
    # modules only (ours, and the TOML, YAML, MCAP and msgpack readers they call).
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in _INSTRUMENTED:
            for item in list(vars(module).values()):
                for func in [item, *(vars(item).values() if isinstance(item, type) else ())]:
                    if (inspect.isfunction(func)
                            and func.__module__ == name):  # defined here, not imported
                        atheris.instrument_func(func)
    corpus = tempfile.mkdtemp(prefix=f"fusion-node-atheris-{target.name}-")
    for index, seed in enumerate(target.seeds):
        Path(corpus, f"seed{index}").write_bytes(target.dump(seed))

    def one_input(data: bytes) -> None:
        try:
            value = target.load(data)
        except (struct.error, UnicodeDecodeError, ValueError, MemoryError):
            return  # not an input of this target's file format
        try:
            target.run(value)
        except target.expected:
            pass

    atheris.Setup([argv[0], *argv[2:], corpus], one_input)
    sys.stdout.flush()
    atheris.Fuzz()


if __name__ == "__main__":
    import sys

    _atheris_main(sys.argv)
