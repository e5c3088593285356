"""Fuzzing: hypothesis properties of the decoder and loaders, a bounded mutation run of each
fuzz target, and every input a fuzz run ever crashed on (tests/fuzz_regressions/)."""

from __future__ import annotations

import math
import random
import tracemalloc
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion_node.bench.fuzz import (
    TARGETS,
    fuzz_target,
    mcap_target,
    opened_target,
    protocol_seeds,
    replay_input,
)
from fusion_node.errors import ProtocolError
from fusion_node.protocol import (
    AudioChunk,
    Frame,
    Health,
    JointState,
    Prediction,
    decode,
    encode,
)

REGRESSIONS = Path(__file__).parents[1] / "fuzz_regressions"
# No wall-clock deadline: the machine is shared; the bound on work is max_examples.
FUZZ = settings(deadline=None, max_examples=100, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

# -- round trip -----------------------------------------------------------------------------

int64 = st.integers(-(2**63), 2**63 - 1)
seq = st.integers(0, 2**63 - 1)
stream = st.from_regex(r"[a-z]{1,8}\.[a-z0-9_]{1,8}", fullmatch=True)
msgpack_value = st.recursive(
    st.none() | st.booleans() | int64 | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8)


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    encoding = draw(st.sampled_from(["rgb8", "bgr8", "mono8"]))
    h, w = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    image = np.frombuffer(draw(st.binary(min_size=h * w * 3, max_size=h * w * 3)), np.uint8)
    channels = 1 if encoding == "mono8" else 3
    return Frame(draw(stream), draw(seq), draw(int64),
                 image[:h * w * channels].reshape(h, w, channels), encoding)


@st.composite
def audio(draw: st.DrawFn) -> AudioChunk:
    dtype = draw(st.sampled_from([np.int16, np.float32]))
    n, channels = draw(st.integers(0, 6)), draw(st.integers(1, 3))
    samples = np.frombuffer(draw(st.binary(min_size=n * channels * np.dtype(dtype).itemsize,
                                           max_size=n * channels * np.dtype(dtype).itemsize)),
                            dtype).reshape(n, channels)
    return AudioChunk(draw(stream), draw(seq), draw(int64), draw(st.integers(1, 2**63 - 1)),
                      draw(seq), samples)


@st.composite
def joints(draw: st.DrawFn) -> JointState:
    names = tuple(draw(st.lists(st.text(max_size=6), max_size=5)))
    rows = [np.array(draw(st.lists(st.floats(), min_size=len(names), max_size=len(names))))
            for _ in range(3)]
    return JointState(draw(stream), draw(seq), draw(int64), names, *rows)


@st.composite
def predictions(draw: st.DrawFn) -> Prediction:
    arrays = {}
    for name in draw(st.lists(st.text(min_size=1, max_size=5), unique=True, max_size=3)):
        dtype = np.dtype(draw(st.sampled_from(
            ["uint8", "int16", "int32", "int64", "float32", "float64"]))).newbyteorder("<")
        shape = tuple(draw(st.lists(st.integers(0, 3), min_size=1, max_size=4)))
        size = int(np.prod(shape)) * dtype.itemsize
        arrays[name] = np.frombuffer(draw(st.binary(min_size=size, max_size=size)),
                                     dtype).reshape(shape)
    return Prediction(
        draw(stream), draw(seq), draw(int64), draw(int64), draw(st.text(max_size=8)),
        draw(st.text(max_size=16)), draw(st.dictionaries(st.text(max_size=8), st.booleans())),
        draw(st.dictionaries(st.text(max_size=8), msgpack_value, max_size=3)), arrays,
        draw(st.dictionaries(st.text(max_size=8), int64, max_size=3)), draw(st.booleans()),
        draw(int64))


@st.composite
def healths(draw: st.DrawFn) -> Health:
    return Health(draw(stream), draw(seq), draw(int64),
                  draw(st.dictionaries(st.text(max_size=8), msgpack_value, max_size=4)))


def _same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                and a.tobytes() == b.tobytes())
    if isinstance(a, dict):
        return (isinstance(b, dict) and a.keys() == b.keys()
                and all(_same(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)):
        return (isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_same(x, y) for x, y in zip(a, b)))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)  # NaN equals NaN here
    return type(a) is type(b) and a == b


@FUZZ
@given(st.one_of(frames(), audio(), joints(), predictions(), healths()))
def test_decode_of_encode_is_the_message(msg: object) -> None:
    decoded = decode([bytes(part) for part in encode(msg)], t_receive_ns=5)
    assert type(decoded) is type(msg)
    for name in msg.__dataclass_fields__:  # type: ignore[attr-defined]
        if name != "t_receive_ns":
            assert _same(getattr(msg, name), getattr(decoded, name)), name
    assert decoded.t_receive_ns == 5


# -- anything else is a ProtocolError -------------------------------------------------------

@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=24))
def test_arbitrary_multipart_raises_only_protocol_error(parts: list[bytes]) -> None:
    try:
        decode(parts)
    except ProtocolError as exc:
        assert exc.reason


header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=12) | st.binary(max_size=12)
    | st.sampled_from(["frame", "audio", "joints", "prediction", "health", "uint8",
                       "float64", "rgb8", 1, [2, 3, 3], [3, 2]]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
header_keys = st.sampled_from(["v", "kind", "stream", "seq", "t_capture_ns", "dtype", "shape",
                               "encoding", "sample_rate", "sample_index", "names", "arrays",
                               "mask", "fields", "trace", "late", "engine", "model_hash",
                               "t_ref_ns", "deadline_ns", "t_publish_ns", "stats", "shm"])


@FUZZ
@given(st.dictionaries(header_keys, header_values, max_size=12),
       st.lists(st.binary(max_size=40), max_size=4), st.sampled_from(protocol_seeds()))
def test_type_confused_headers_raise_only_protocol_error(
        edits: dict, payload: list[bytes], seed: tuple[bytes, ...]) -> None:
    # A valid header with some fields replaced: the checks behind the first one are reached.
    header = msgpack.unpackb(seed[1])
    header.update(edits)
    try:
        decode([seed[0], msgpack.packb(header, use_bin_type=True), *payload])
    except ProtocolError as exc:
        assert exc.reason


@FUZZ
@given(st.lists(st.integers(0, 2**32), min_size=1, max_size=4),
       st.sampled_from(["uint8", "int16", "float64"]))
def test_declared_sizes_allocate_nothing(shape: list[int], dtype: str) -> None:
    # However large the shape a header declares, decoding allocates in proportion to the
    # bytes received, never to the size declared.
    seed = protocol_seeds()[0]
    header = msgpack.unpackb(seed[1]) | {"shape": shape, "dtype": dtype}
    parts = [seed[0], msgpack.packb(header), b"\x00" * 64]
    tracemalloc.start()
    try:
        try:
            decode(parts)
        except ProtocolError:
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


# -- loaders: mutated files give only their typed errors -----------------------------------

@pytest.mark.parametrize("name", ["launch", "calibration"])
@settings(deadline=None, max_examples=60, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), rounds=st.integers(1, 6))
def test_mutated_files_raise_only_typed_errors(name: str, seed: int, rounds: int) -> None:
    with opened_target(name) as target:
        rng = random.Random(seed)
        value = rng.choice(target.seeds)
        for _ in range(rounds):
            value = target.mutate(rng, value, target.seeds)
        # replay_input returns the typed rejections and lets anything else propagate.
        for exc in replay_input(target, target.dump(value)):
            assert isinstance(exc, target.expected)


@pytest.fixture(scope="module")
def mcap():
    target = mcap_target()
    yield target
    target.close()


@settings(deadline=None, max_examples=40, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), cut=st.floats(0, 1))
def test_mutated_and_truncated_logs_raise_only_replay_error(mcap, seed: int,
                                                            cut: float) -> None:
    rng = random.Random(seed)
    data = mcap.mutate(rng, rng.choice(mcap.seeds), mcap.seeds)
    for exc in mcap.run(data[:round(len(data) * cut)] if seed % 2 else data):
        assert isinstance(exc, mcap.expected)


# -- bounded mutation runs ------------------------------------------------------------------

BOUNDED_INPUTS = {"protocol": 20_000, "shm": 5_000, "launch": 1_000, "calibration": 150,
                  "mcap": 120}


@pytest.mark.parametrize("name", TARGETS)
def test_bounded_mutation_run_finds_nothing(name: str) -> None:
    with opened_target(name) as target:
        stats = fuzz_target(target, inputs=BOUNDED_INPUTS[name], seed=1,
                            memory_inputs=BOUNDED_INPUTS[name] // 10, hang_s=30.0)
    assert stats.inputs == BOUNDED_INPUTS[name]
    assert [vars(f) for f in stats.findings] == []
    assert stats.accepted >= len(target.seeds)  # every valid seed is accepted
    assert sum(stats.reasons.values()) > stats.inputs // 2  # the mutations do get rejected
    assert stats.memory_checked > 0


def test_bounded_run_is_deterministic() -> None:
    runs = []
    for _ in range(2):
        with opened_target("protocol") as target:
            runs.append(fuzz_target(target, inputs=2_000, seed=7).outcomes)
    assert runs[0] == runs[1]


# -- regressions ----------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(REGRESSIONS.glob("*.bin")), ids=lambda p: p.stem)
def test_regression_input_raises_only_typed_errors(path: Path) -> None:
    # Each file is an input that once crashed its loader; now each is rejected, typed.
    with opened_target(path.stem.split("-")[0]) as target:
        rejections = replay_input(target, path.read_bytes())
    assert rejections
    assert all(isinstance(exc, target.expected) for exc in rejections)


def test_declared_string_length_in_a_log_does_not_drive_allocation(mcap) -> None:
    # A 14 kB log whose chunk index declares a 1.7 GB string: mcap read it in one call on a
    # buffered file, which allocated the declared length (recording.ClampedFile).
    data = (REGRESSIONS / "mcap-ce649399c9a2e0cf.bin").read_bytes()
    tracemalloc.start()
    try:
        mcap.run(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20
