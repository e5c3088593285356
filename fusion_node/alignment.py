"""The temporal alignment buffer: bounded rings per stream and the windows engines need.

`AlignmentBuffer.window(t_ref_ns, spec)` is pure with respect to the samples held: the same
set of samples gives the same window whatever order they arrived in. Rings are ordered by
(capture time, seq), bounded, and drop the oldest sample when full (counted).

Any connected source may publish on any stream, so nothing it sends may stick: a sample
stamped more than `max_future_ns` after its receipt is refused (`too_new`), or a full ring
of far-future samples would outlive every good one (they are never the oldest) and refuse
them all as `too_old`; and a jump in `seq` (a restarted sender, or a bogus 2^63 - 1) counts
as one restart, not as 10^18 lost samples, and the count goes on from the new value.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fusion_node.protocol import AudioChunk, Frame, JointState, Message, SeqCounter

# The same sample delivered twice (a republished log, a reconnect) is dropped, not stored.
_Key = tuple[int, int]
# A sample may be stamped this far after its receipt (a remote clock's mapping error, a
# calibrated delay): local drivers stamp at capture, before receipt, so 0 would do for them.
DEFAULT_MAX_FUTURE_NS = 200_000_000


@dataclass(frozen=True)
class AudioInput:
    """A sample-exact audio span of `samples` samples ending at t_ref."""

    stream: str
    samples: int
    sample_rate: int
    required: bool = True
    # The newest sample may lag t_ref by this much before the stream counts as stopped.
    max_lag_ns: int = 100_000_000


@dataclass(frozen=True)
class VideoInput:
    """`frames` frames at or before t_ref, oldest first.

    With `period_ns`, slot k holds the newest frame at or before t_ref − (frames−1−k)·period
    (a fixed frame rate, resampled by nearest-before); without it, the most recent frames.
    A slot whose frame is older than `max_age_ns` is empty and masked.
    """

    stream: str
    frames: int
    period_ns: int | None = None
    required: bool = False
    max_age_ns: int = 100_000_000


@dataclass(frozen=True)
class JointsInput:
    """Joint state linearly interpolated to t_ref; held for at most `tolerance_ns` past the
    newest sample, never extrapolated."""

    stream: str
    required: bool = True
    tolerance_ns: int = 20_000_000


@dataclass(frozen=True)
class LatestInput:
    """The newest message describing a time at or before t_ref − `delay_ns`.

    Used for another engine's predictions: `delay_ns` makes the choice depend on declared
    latencies, not on how fast that engine happened to run.
    """

    stream: str
    delay_ns: int = 0
    required: bool = False
    max_age_ns: int = 500_000_000


InputSpec = AudioInput | VideoInput | JointsInput | LatestInput


@dataclass
class AudioSpan:
    samples: np.ndarray  # float32 [n, channels] in [-1, 1]; gaps are zero
    valid: np.ndarray  # bool [n]
    sample_rate: int
    t_start_ns: int
    newest: AudioChunk  # the newest chunk the span draws on


@dataclass
class FrameStack:
    frames: list[Frame | None]  # oldest first; None where the slot is empty
    valid: np.ndarray  # bool [frames]


@dataclass
class InterpolatedJoints:
    names: tuple[str, ...]
    position: np.ndarray
    velocity: np.ndarray
    effort: np.ndarray
    t_ns: int
    newest: JointState  # the newest sample interpolated from


@dataclass
class Window:
    t_ref_ns: int
    data: dict[str, Any] = field(default_factory=dict)
    mask: dict[str, bool] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    missing_required: list[str] = field(default_factory=list)
    # Capture and receive time of the newest message the window uses, for latency traces.
    newest_capture_ns: int = 0
    newest_receive_ns: int = 0


@dataclass
class StreamStats:
    """Per-stream counters. `evicted` is normal rotation of a full ring; samples actually
    lost are `too_old` (arrived older than anything kept), `too_new` (stamped further in the
    future than the buffer allows), `seq.gaps` (lost upstream) and `duplicates` (delivered
    twice, kept once); `seq.restarts` counts the sender starting its seq again."""

    received: int = 0
    evicted: int = 0
    duplicates: int = 0
    too_old: int = 0
    too_new: int = 0
    last_capture_ns: int = 0
    seq: SeqCounter = field(default_factory=SeqCounter)

    def summary(self) -> dict[str, int]:
        """The counters, flat: health's per-stream entry."""
        return {"received": self.received, "evicted": self.evicted,
                "duplicates": self.duplicates, "too_old": self.too_old,
                "too_new": self.too_new, "seq_gaps": self.seq.gaps,
                "seq_restarts": self.seq.restarts, "last_seq": self.seq.last,
                "last_capture_ns": self.last_capture_ns}


class _Ring:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: list[_Key] = []
        self.items: list[Message] = []
        self.samples: _SampleRing | None = None  # audio streams only


# Chunks whose stamps disagree with the run's index mapping by more than this belong to
# another run of the driver (sample_index restarted) and are never mixed in.
_CONSISTENCY_NS = 50_000_000


def _index_origin_ns(chunk: AudioChunk) -> int:
    """Capture time of sample index 0 according to this chunk's stamp."""
    return chunk.t_capture_ns - chunk.sample_index * 1_000_000_000 // chunk.sample_rate


# No window asks for this index (windows may start at negative indices, just after start-up).
_NEVER_WRITTEN = np.iinfo(np.int64).min


class _SampleRing:
    """Audio samples stored by sample index, so a window is one gather, whatever the chunking.

    Each slot remembers the index it holds: a slot not yet written, or overwritten by a later
    lap, never passes for the sample asked for.
    """

    def __init__(self, first: AudioChunk, capacity_samples: int) -> None:
        capacity = 1 << max(10, (capacity_samples - 1).bit_length())
        self.mask = capacity - 1
        self.sample_rate = first.sample_rate
        self.channels = first.samples.shape[1]
        self.samples = np.zeros((capacity, self.channels), np.float32)
        self.index = np.full(capacity, _NEVER_WRITTEN, np.int64)
        self.origin_ns = _index_origin_ns(first)
        self.newest_capture_ns = first.t_capture_ns

    def write(self, chunk: AudioChunk) -> bool:
        """Store a chunk of the current run; a newer run (driver restart) replaces it."""
        if chunk.sample_rate != self.sample_rate or chunk.samples.shape[1] != self.channels:
            return False
        origin = _index_origin_ns(chunk)
        if abs(origin - self.origin_ns) > _CONSISTENCY_NS:
            if chunk.t_capture_ns <= self.newest_capture_ns:
                return False  # a late chunk of an older run
            self.index.fill(_NEVER_WRITTEN)
            self.origin_ns = origin
        self.newest_capture_ns = max(self.newest_capture_ns, chunk.t_capture_ns)
        wanted = np.arange(chunk.sample_index, chunk.sample_index + len(chunk.samples))
        slots = wanted & self.mask
        data = chunk.samples
        self.samples[slots] = data * np.float32(1 / 32768) if data.dtype == np.int16 else data
        self.index[slots] = wanted
        return True

    def read(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        wanted = np.arange(start, end)
        first = start & self.mask
        if first + len(wanted) <= len(self.index):  # no wrap-around: plain slices
            valid = self.index[first:first + len(wanted)] == wanted
            out = self.samples[first:first + len(wanted)].copy()
        else:
            slots = wanted & self.mask
            valid = self.index[slots] == wanted
            out = self.samples[slots]
        if not valid.all():
            out[~valid] = 0.0
        return out, valid


class AlignmentBuffer:
    """Thread-safe: a receiver thread pushes while engine threads take windows.

    `max_future_ns`: how far after its receipt (`t_receive_ns`) a sample may be stamped. A
    message never received (`t_receive_ns` 0: made in this process) is not checked."""

    def __init__(self, capacities: dict[str, int],
                 max_future_ns: int = DEFAULT_MAX_FUTURE_NS) -> None:
        self._rings = {stream: _Ring(capacity) for stream, capacity in capacities.items()}
        self.stats = {stream: StreamStats() for stream in capacities}
        self.unknown_streams: Counter[str] = Counter()
        self.max_future_ns = max_future_ns
        self._lock = threading.Lock()

    @property
    def streams(self) -> tuple[str, ...]:
        return tuple(self._rings)

    def push(self, msg: Message) -> bool:
        """Store a sample; False if it was dropped (unknown stream, duplicate, too old or
        too new)."""
        stored, _evicted = self._store(msg, msg.t_receive_ns)
        return stored  # the evicted sample is released here, after the lock

    def _store(self, msg: Message, received_ns: int) -> tuple[bool, Message | None]:
        """Store a sample received at `received_ns` (0: not checked against the future
        bound); (stored, the sample it evicted). The caller releases the evicted sample after
        its locks: it may hold the last reference to a restarted camera's dead ring, and
        unmapping that takes ~30 ms in the kernel, during which every engine cutting a window
        waited for the lock."""
        ring = self._rings.get(msg.stream)
        if ring is None:
            self.unknown_streams[msg.stream] += 1
            return False, None
        stats = self.stats[msg.stream]
        key = (msg.t_capture_ns, msg.seq)
        evicted: Message | None = None
        with self._lock:
            stats.received += 1
            if received_ns and msg.t_capture_ns - received_ns > self.max_future_ns:
                stats.too_new += 1
                return False, None
            stats.seq.note(msg.seq)
            stats.last_capture_ns = max(stats.last_capture_ns, msg.t_capture_ns)
            index = bisect.bisect_left(ring.keys, key)
            if index < len(ring.keys) and ring.keys[index] == key:
                stats.duplicates += 1
                return False, None
            if len(ring.keys) >= ring.capacity:
                if index == 0:
                    stats.too_old += 1
                    return False, None
                del ring.keys[0]
                evicted = ring.items.pop(0)
                stats.evicted += 1
                index -= 1
            ring.keys.insert(index, key)
            ring.items.insert(index, msg)
            if isinstance(msg, AudioChunk):
                if ring.samples is None:
                    ring.samples = _SampleRing(msg, ring.capacity * len(msg.samples))
                ring.samples.write(msg)
        return True, evicted

    def unrecorded_window(self, t_ref_ns: int, spec: tuple[InputSpec, ...]) -> Window:
        """The window `window` would cut, which a recording node does not log as a cut: for
        work whose result is never published (an engine's rehearsal), so a replay of the log
        does not tick it."""
        return AlignmentBuffer.window(self, t_ref_ns, spec)

    def window(self, t_ref_ns: int, spec: tuple[InputSpec, ...]) -> Window:
        """Assemble what `spec` asks for at `t_ref_ns`; missing streams are masked and named."""
        window = Window(t_ref_ns)
        with self._lock:
            for item in spec:
                ring = self._rings.get(item.stream)
                if ring is None:
                    result: Any = f"stream {item.stream!r} is not configured"
                elif isinstance(item, AudioInput):
                    result = _audio(ring, t_ref_ns, item)
                elif isinstance(item, VideoInput):
                    result = _video(ring, t_ref_ns, item)
                elif isinstance(item, JointsInput):
                    result = _joints(ring, t_ref_ns, item)
                else:
                    result = _latest(ring, t_ref_ns, item)
                if isinstance(result, str):
                    window.mask[item.stream] = False
                    window.missing[item.stream] = result
                    if item.required:
                        window.missing_required.append(item.stream)
                else:
                    window.mask[item.stream] = True
                    window.data[item.stream] = result
                    _note_times(window, result)
        return window


def _note_times(window: Window, result: Any) -> None:
    newest: Message
    if isinstance(result, (AudioSpan, InterpolatedJoints)):
        newest = result.newest
    elif isinstance(result, FrameStack):
        newest = next(f for f in reversed(result.frames) if f is not None)
    else:
        newest = result
    if newest.t_capture_ns >= window.newest_capture_ns:
        window.newest_capture_ns = newest.t_capture_ns
        window.newest_receive_ns = newest.t_receive_ns


def _at_or_before(ring: _Ring, t_ns: int) -> int:
    """Index of the newest item captured at or before t_ns, or -1."""
    return bisect.bisect_right(ring.keys, (t_ns, 2**63)) - 1


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.1f} ms"


def _audio(ring: _Ring, t_ref_ns: int, spec: AudioInput) -> AudioSpan | str:
    anchor_at = _at_or_before(ring, t_ref_ns)
    if anchor_at < 0:
        return "no audio captured at or before t_ref"
    anchor = ring.items[anchor_at]
    assert isinstance(anchor, AudioChunk)
    sr = anchor.sample_rate
    if sr != spec.sample_rate:
        return f"sample rate is {sr} Hz, the engine needs {spec.sample_rate} Hz"
    anchor_end_ns = anchor.t_capture_ns + anchor.duration_ns
    if t_ref_ns - anchor_end_ns > spec.max_lag_ns:
        return f"newest audio ends {_ms(t_ref_ns - anchor_end_ns)} before t_ref"
    samples = ring.samples
    assert samples is not None
    if abs(_index_origin_ns(anchor) - samples.origin_ns) > _CONSISTENCY_NS:
        return "newest audio at or before t_ref is from an earlier run of the driver"
    # Sample indices, not per-chunk stamps, decide where the cut falls. The index↔time
    # mapping is the median over recent chunks of the run, so one chunk's stamp jitter
    # moves the cut by less than a sample and consecutive windows stay exactly a hop apart.
    recent = ring.items[max(0, anchor_at - _ORIGIN_CHUNKS + 1):anchor_at + 1]
    origins = [o for o in (_index_origin_ns(c) for c in recent if isinstance(c, AudioChunk))
               if abs(o - samples.origin_ns) <= _CONSISTENCY_NS]
    origin_ns = sorted(origins)[len(origins) // 2]
    end = (t_ref_ns - origin_ns) * sr // 1_000_000_000 + 1
    start = end - spec.samples
    out, valid = samples.read(start, end)
    newest = anchor
    following = ring.items[anchor_at + 1] if anchor_at + 1 < len(ring.items) else None
    if isinstance(following, AudioChunk) and following.sample_index < end:
        newest = following
    return AudioSpan(out, valid, sr, origin_ns + start * 1_000_000_000 // sr, newest)


_ORIGIN_CHUNKS = 32


def _video(ring: _Ring, t_ref_ns: int, spec: VideoInput) -> FrameStack | str:
    newest_at = _at_or_before(ring, t_ref_ns)
    if newest_at < 0:
        return "no frame captured at or before t_ref"
    newest = ring.items[newest_at]
    age = t_ref_ns - newest.t_capture_ns
    if age > spec.max_age_ns:
        return f"newest frame is {_ms(age)} old (limit {_ms(spec.max_age_ns)})"
    frames: list[Frame | None] = []
    if spec.period_ns is None:
        first = max(0, newest_at - spec.frames + 1)
        recent = [f for f in ring.items[first:newest_at + 1] if isinstance(f, Frame)]
        frames = [None] * (spec.frames - len(recent)) + list(recent)
    else:
        for k in range(spec.frames):
            slot_ns = t_ref_ns - (spec.frames - 1 - k) * spec.period_ns
            at = _at_or_before(ring, slot_ns)
            frame = ring.items[at] if at >= 0 else None
            stale = frame is None or slot_ns - frame.t_capture_ns > spec.max_age_ns
            frames.append(None if stale or not isinstance(frame, Frame) else frame)
    valid = np.array([f is not None for f in frames], bool)
    return FrameStack(frames, valid)


def _joints(ring: _Ring, t_ref_ns: int, spec: JointsInput) -> InterpolatedJoints | str:
    before_at = _at_or_before(ring, t_ref_ns)
    if before_at < 0:
        return "no joint state at or before t_ref"
    s0 = ring.items[before_at]
    assert isinstance(s0, JointState)
    if s0.t_capture_ns == t_ref_ns or before_at + 1 == len(ring.items):
        lag = t_ref_ns - s0.t_capture_ns
        if lag > spec.tolerance_ns:
            return f"newest joint state is {_ms(lag)} old (limit {_ms(spec.tolerance_ns)})"
        return InterpolatedJoints(s0.names, s0.position.copy(), s0.velocity.copy(),
                                  s0.effort.copy(), t_ref_ns, s0)
    s1 = ring.items[before_at + 1]
    assert isinstance(s1, JointState)
    if s1.names != s0.names:
        return f"joint names changed between samples ({s0.names} → {s1.names})"
    gap = min(t_ref_ns - s0.t_capture_ns, s1.t_capture_ns - t_ref_ns)
    if gap > spec.tolerance_ns:
        return (f"t_ref falls in a {_ms(s1.t_capture_ns - s0.t_capture_ns)} gap between "
                "joint states")
    alpha = (t_ref_ns - s0.t_capture_ns) / (s1.t_capture_ns - s0.t_capture_ns)

    def lerp(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + (b - a) * alpha

    return InterpolatedJoints(s0.names, lerp(s0.position, s1.position),
                              lerp(s0.velocity, s1.velocity), lerp(s0.effort, s1.effort),
                              t_ref_ns, s1)


def _latest(ring: _Ring, t_ref_ns: int, spec: LatestInput) -> Message | str:
    at = _at_or_before(ring, t_ref_ns - spec.delay_ns)
    if at < 0:
        return "nothing at or before t_ref yet"
    msg = ring.items[at]
    age = t_ref_ns - msg.t_capture_ns
    if age > spec.max_age_ns:
        return f"newest message is {_ms(age)} old (limit {_ms(spec.max_age_ns)})"
    return msg

