"""Shared-memory rings for large payloads between processes on one host (protocol.md §10).

A publisher copies a large array into a slot of a POSIX shared-memory segment
(`/dev/shm/fusion-node-shm-<pid>-<start>-<n>`) and sends only the header over ZeroMQ, with an
`shm` map naming the segment, slot, generation, offset and length. A subscriber maps each
segment once and hands out a read-only numpy view of the slot: no copy on either side of the
socket beyond the publisher's one write.

Lifetime rule (the lease). A slot is rewritten only after its lease (`lease_ms`, default
3000 ms, longer than the ~2 s the node's alignment buffer keeps a 30 Hz camera frame) has
expired. The publisher never waits: when the oldest slot is still leased and no fresh slot
is left, it sends that message as a plain payload instead (counted in `fallbacks`). A view is
therefore valid until `ShmLease.expires_ns`; whoever keeps an array longer must copy it. A
subscriber that reaches a header after its lease (it was too slow) loses the frame: the
decode raises `ProtocolError("lease_expired")` or `("stale_generation")`, counted like any
other rejection. Each slot carries a seqlock-style generation (odd while being written);
`ShmLease.check()` re-reads it after use to prove the bytes were not replaced meanwhile.

Sealed segments (protocol.md §10.2). A segment is a memfd whose size is sealed (it can never
shrink or grow), reached through a symbolic link `/dev/shm/<name>` -> `/proc/<pid>/fd/<fd>`.
A receiver refuses a segment without the shrink seal: a mapped file that its owner truncates
kills the reader with SIGBUS the next time it touches a page past the new end, and a frame
view is touched long after its header was checked (by the engines, the recorder). The seal is
the only check that holds for the view's whole life. It also frees a dead publisher's memory
by itself: the memfd goes when its last descriptor and mapping do.

The links are removed by `ShmWriter.close()` (and at interpreter exit); a link left by a
killed publisher is removed by the next `ShmWriter` on the host and by the node at start and
exit (`reclaim_stale_segments`), which check each owner's pid and start time in /proc.
"""

from __future__ import annotations

import fcntl
import itertools
import math
import mmap
import os
import re
import stat
import struct
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from fusion_node.errors import ConfigError, ProtocolError

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "fusion-node-shm"
_NAME = re.compile(rf"^{SEGMENT_PREFIX}-(\d+)-(\d+)-(\d+)$")
_MAGIC = b"FNSHM\x00\x00\x01"
# Segment header: magic, slots, slot_size, data_offset, lease_ns, total size.
_SEGMENT = struct.Struct("<8sQQQQQ")
_TABLE_OFFSET = 64
# Per slot: generation (odd while writing), t_written_ns, length.
_SLOT = struct.Struct("<QqQ")
_SLOT_STRIDE = 32
_PAGE = 4096
_MAX_SLOTS = 4096
_SEGMENT_NUMBERS = itertools.count()
_MAX_MAPPED = 64  # segments a reader keeps mapped; older ones are dropped (views keep theirs)
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


@dataclass(frozen=True, slots=True)
class ShmConfig:
    """When and how a publisher uses shared memory.

    threshold_bytes: payloads at least this large go through the ring.
    slots: slots per stream ring; the most frames one stream can have leased at once.
    lease_ms: how long a slot stays untouched after it was written.
    """

    threshold_bytes: int = 64 * 1024
    slots: int = 128
    lease_ms: int = 3000

    def __post_init__(self) -> None:
        if self.threshold_bytes < 1 or not 1 <= self.slots <= _MAX_SLOTS or self.lease_ms < 0:
            raise ConfigError(f"shared memory: threshold_bytes {self.threshold_bytes} must be "
                              f">= 1, slots {self.slots} in 1..{_MAX_SLOTS}, lease_ms "
                              f"{self.lease_ms} >= 0")


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its end.
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def reclaim_stale_segments() -> list[str]:
    """Remove segments whose owning process is gone (killed before it could clean up)."""
    reclaimed = []
    for path in list(SHM_DIR.glob(f"{SEGMENT_PREFIX}-*")):
        match = _NAME.match(path.name)
        if match is None:
            continue
        pid, start = int(match[1]), int(match[2])
        if _start_time(pid) == start:  # alive (a reused pid has another start time)
            continue
        try:
            path.unlink()
            reclaimed.append(path.name)
        except FileNotFoundError:  # another publisher reclaimed it first
            pass
    return reclaimed


def segment_names(pid: int | None = None) -> list[str]:
    """Names of this host's fusion-node segments, optionally only those of `pid`."""
    names = []
    for path in SHM_DIR.glob(f"{SEGMENT_PREFIX}-*"):
        match = _NAME.match(path.name)
        if match is not None and (pid is None or int(match[1]) == pid):
            names.append(path.name)
    return sorted(names)


class _Ring:
    """One segment of equal slots, written by one publisher for one stream."""

    def __init__(self, name: str, slots: int, slot_size: int, lease_ns: int) -> None:
        self.name = name
        self.slots = slots
        self.slot_size = slot_size
        self.lease_ns = lease_ns
        self.data_offset = -(-(_TABLE_OFFSET + slots * _SLOT_STRIDE) // _PAGE) * _PAGE
        size = self.data_offset + slots * slot_size
        # Held open for the ring's life: the link in /dev/shm resolves through it.
        self.fd = os.memfd_create(name, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)  # pages are allocated on first touch only
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
            self.map = mmap.mmap(self.fd, size)
            os.symlink(f"/proc/{os.getpid()}/fd/{self.fd}", SHM_DIR / name)
        except BaseException:
            os.close(self.fd)
            raise
        self.buf = memoryview(self.map)
        _SEGMENT.pack_into(self.buf, 0, _MAGIC, slots, slot_size, self.data_offset, lease_ns,
                           size)
        self.generation = [0] * slots
        self.expires_ns = [0] * slots
        self.in_use: deque[int] = deque()  # written slots, oldest first
        self.fresh = 0  # slots below this have been written at least once
        # Slots lent to the producer and not yet sent: id(array) -> (slot, a weak reference
        # to the array, the finalizer that gives the slot back when the array is dropped).
        self.loans: dict[int, tuple[int, weakref.ref, weakref.finalize]] = {}
        self.closed = False
        self.entry_prefix = shm_entry_prefix(name)

    def take(self, now_ns: int) -> int | None:
        """A slot free to write: the oldest expired one, else a fresh one, else None."""
        if self.in_use and self.expires_ns[self.in_use[0]] <= now_ns:
            return self.in_use.popleft()
        if self.fresh < self.slots:
            self.fresh += 1
            return self.fresh - 1
        return None

    def begin(self, slot: int) -> int:
        """Mark `slot` as being written (odd generation: readers reject it); its offset."""
        self.generation[slot] += 1
        struct.pack_into("<Q", self.buf, _TABLE_OFFSET + slot * _SLOT_STRIDE,
                         self.generation[slot])
        return self.data_offset + slot * self.slot_size

    def commit(self, slot: int, nbytes: int, now_ns: int) -> int:
        """Publish what `slot` holds, leased from now; its new (even) generation."""
        generation = self.generation[slot] + 1
        _SLOT.pack_into(self.buf, _TABLE_OFFSET + slot * _SLOT_STRIDE, generation, now_ns,
                        nbytes)
        self.generation[slot] = generation
        self.expires_ns[slot] = now_ns + self.lease_ns
        self.in_use.append(slot)
        return generation

    def write(self, slot: int, payload: memoryview, now_ns: int) -> tuple[int, int]:
        """Copy `payload` into `slot`; return (generation, offset)."""
        offset = self.begin(slot)
        self.buf[offset:offset + payload.nbytes] = payload
        return self.commit(slot, payload.nbytes, now_ns), offset

    def lent(self, payload: memoryview) -> int | None:
        """The slot of the loan `payload` (as `encode` made it) views exactly, taken off the
        loans; None if it views no loan."""
        # encode() views the message's own array when it is already C-contiguous
        # little-endian: payload.obj is then that array or a view of it, and the loaned
        # array is on its chain of bases.
        obj = payload.obj
        while isinstance(obj, np.ndarray):
            loan = self.loans.get(id(obj))
            if loan is not None and loan[1]() is obj:
                if payload.nbytes != obj.nbytes:
                    return None
                del self.loans[id(obj)]
                loan[2].detach()
                return loan[0]
            obj = obj.base
        return None

    def give_back(self, key: int, slot: int) -> None:
        """A loan dropped unsent: its slot is reusable at once."""
        if self.closed or self.loans.pop(key, None) is None:
            return
        self.generation[slot] += 1  # even again, but no header names this generation
        self.expires_ns[slot] = 0
        self.in_use.appendleft(slot)

    def close(self) -> None:
        _unlink(self.name)
        os.close(self.fd)  # readers' mappings keep the memory until they drop it
        self.closed = True
        for _, _, finalizer in self.loans.values():
            finalizer.detach()
        self.loans.clear()
        try:
            self.buf.release()
            self.map.close()
        except BufferError:
            pass  # a loaned array is still alive: the mapping goes when it does


def _unlink(name: str) -> None:
    try:
        os.unlink(SHM_DIR / name)
    except FileNotFoundError:
        pass


def _unlink_all(names: set[str]) -> None:
    for name in list(names):
        _unlink(name)
    names.clear()


class ShmWriter:
    """A publisher's rings, one per stream.

    `wrap` runs on the publisher's thread; `loan` may also be called from a producer's own
    thread (a camera's capture thread), so ring state is guarded by a lock."""

    def __init__(self, config: ShmConfig,
                 clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.config = config
        self._clock_ns = clock_ns
        self._lease_ns = config.lease_ms * 1_000_000
        self._rings: dict[bytes, _Ring] = {}
        start = _start_time(os.getpid())
        self._prefix = f"{SEGMENT_PREFIX}-{os.getpid()}-{start}"
        self.sent = 0
        self.loaned = 0  # of those sent, written in place by the producer: no copy
        self.fallbacks = 0  # large payloads sent plainly: every slot was still leased
        # Re-entrant: a dropped loan gives its slot back from whatever code drops it.
        self._lock = threading.RLock()
        self._closed = False
        self.reclaimed = reclaim_stale_segments()
        # Segments must not outlive the process even if close() is never called.
        self._names: set[str] = set()
        self._finalizer = weakref.finalize(self, _unlink_all, self._names)

    def wrap(self, parts: list[Any]) -> list[Any]:
        """`parts` from `protocol.encode`, with a large payload moved into shared memory.

        Returns `[topic, header + shm]`, or `parts` unchanged when the message is small,
        not a single-array kind, or no slot is free (never waits)."""
        if len(parts) != 3:
            return parts
        payload = parts[2]
        if not isinstance(payload, memoryview):
            payload = memoryview(payload).cast("B")
        if payload.nbytes < self.config.threshold_bytes:
            return parts
        header = bytes(parts[1])
        if not _single_array_kind(header):
            return parts
        with self._lock:
            ring = self._ring(bytes(parts[0]), payload.nbytes)
            now_ns = self._clock_ns()
            slot = ring.lent(payload)
            if slot is not None:
                # The producer wrote the payload into the slot itself: nothing to copy.
                offset = ring.data_offset + slot * ring.slot_size
                generation = ring.commit(slot, payload.nbytes, now_ns)
                self.loaned += 1
            else:
                slot = ring.take(now_ns)
                if slot is None:
                    self.fallbacks += 1
                    return parts
                generation, offset = ring.write(slot, payload, now_ns)
            self.sent += 1
        return [parts[0], _with_shm(header, ring, slot, generation, offset, payload.nbytes)]

    def loan(self, topic: bytes, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """A writable array in a free slot for a message on `topic`, or None if all are
        leased or lent. Fill it, then send a message carrying exactly this array: it goes out
        without a copy. Several loans may be out at once (frames queued between capture and
        send); one dropped without being sent gives its slot back."""
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            if self._closed:  # a producer thread still running after the publisher closed
                return None
            ring = self._ring(topic, nbytes)
            slot = ring.take(self._clock_ns())
            if slot is None:  # the producer writes a plain array; `wrap` counts a fallback
                return None
            offset = ring.begin(slot)
            array = np.ndarray(shape, dtype, ring.buf[offset:offset + nbytes])
            key = id(array)
            # Neither holds the array: dropping it unsent is what gives the slot back.
            finalizer = weakref.finalize(array, self._give_back, ring, key, slot)
            finalizer.atexit = False  # at exit the whole ring goes
            ring.loans[key] = (slot, weakref.ref(array), finalizer)
        return array

    def _give_back(self, ring: _Ring, key: int, slot: int) -> None:
        with self._lock:
            ring.give_back(key, slot)

    def _ring(self, topic: bytes, nbytes: int) -> _Ring:
        ring = self._rings.get(topic)
        if ring is None or ring.slot_size < nbytes:
            if ring is not None:
                self._retire(ring)
            ring = self._new_ring(nbytes)
            self._rings[topic] = ring
        return ring

    def _new_ring(self, nbytes: int) -> _Ring:
        slot_size = -(-nbytes // _PAGE) * _PAGE  # page-aligned slots: aligned arrays
        # Numbered per process, not per writer: a name is never reused, so a reader can
        # never mistake a new ring for the unlinked one it still has mapped.
        name = f"{self._prefix}-{next(_SEGMENT_NUMBERS)}"
        ring = _Ring(name, self.config.slots, slot_size, self._lease_ns)
        self._names.add(name)
        return ring

    def _retire(self, ring: _Ring) -> None:
        # Subscribers keep their own mapping of an unlinked segment: views stay valid.
        ring.close()
        self._names.discard(ring.name)

    @property
    def segments(self) -> list[str]:
        return sorted(ring.name for ring in self._rings.values())

    def close(self) -> None:
        """Unlink every segment; subscribers' existing mappings stay readable. Later loans
        get None, so a producer thread that outlives the publisher makes no new segment."""
        with self._lock:
            self._closed = True
            for ring in self._rings.values():
                ring.close()
            self._rings.clear()
            self._finalizer()


def _single_array_kind(header: bytes) -> bool:
    # The fixed layout headers encode() writes put "kind" early; a substring test is enough
    # to choose the path (the receiver validates everything anyway).
    return (b"\xa4kind\xa5frame" in header or b"\xa4kind\xa5audio" in header
            or b"\xa4kind\xa6joints" in header)


# The `shm` entry `wrap` appends to a header: a part constant per ring (the key, a 5-entry
# map header, the segment name), then slot, generation, offset and length as msgpack int64
# (0xd3 and 8 big-endian bytes) at fixed offsets. A receiver that has fully validated one
# such header of a stream reads the next ones with one struct unpack (protocol.decode).
_SHM_INTS = struct.Struct(">6sq12sq8sq8sq")
_SLOT_KEY, _GENERATION_KEY = b"\xa4slot\xd3", b"\xaageneration\xd3"
_OFFSET_KEY, _LENGTH_KEY = b"\xa6offset\xd3", b"\xa6length\xd3"
SHM_INTS_SIZE = _SHM_INTS.size


def shm_entry_prefix(segment: str) -> bytes:
    """The constant start of the `shm` entry `wrap` writes for `segment`."""
    return (msgpack.packb("shm") + b"\x85" + msgpack.packb("segment")
            + msgpack.packb(segment))


def shm_entry(prefix: bytes, slot: int, generation: int, offset: int, length: int) -> bytes:
    """The `shm` key and map, as `wrap` writes it after the constant `prefix`."""
    return prefix + _SHM_INTS.pack(_SLOT_KEY, slot, _GENERATION_KEY, generation, _OFFSET_KEY,
                                   offset, _LENGTH_KEY, length)


def shm_ints(raw: bytes, start: int) -> tuple[int, int, int, int] | None:
    """(slot, generation, offset, length) if `raw[start:]` is exactly the fixed-width tail of
    a `shm_entry`, else None."""
    if len(raw) - start != _SHM_INTS.size:
        return None
    slot_key, slot, generation_key, generation, offset_key, offset, length_key, length = (
        _SHM_INTS.unpack_from(raw, start))
    if (slot_key != _SLOT_KEY or generation_key != _GENERATION_KEY
            or offset_key != _OFFSET_KEY or length_key != _LENGTH_KEY):
        return None
    return slot, generation, offset, length


def _with_shm(raw: bytes, ring: _Ring, slot: int, generation: int, offset: int,
              length: int) -> bytes:
    """The msgpack map `raw` with one more key, `shm`."""
    if 0x80 <= raw[0] < 0x8F:  # fixmap with room for one more key: bump the count
        return (bytes((raw[0] + 1,)) + raw[1:]
                + shm_entry(ring.entry_prefix, slot, generation, offset, length))
    decoded = msgpack.unpackb(raw, raw=False)
    decoded["shm"] = {"segment": ring.name, "slot": slot, "generation": generation,
                      "offset": offset, "length": length}
    return msgpack.packb(decoded, use_bin_type=True)


def in_shared_memory(array: np.ndarray) -> bool:
    """True if `array` views a shared-memory ring: copy it to keep it past its lease."""
    obj: Any = array
    while isinstance(obj, np.ndarray):
        obj = obj.base
    if isinstance(obj, memoryview):
        obj = obj.obj
    return isinstance(obj, mmap.mmap)


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 2 µs a frame on the receive path
class ShmLease:
    """Where a decoded array lives, and until when it is guaranteed not to change."""

    segment: str
    slot: int
    generation: int
    expires_ns: int
    _table: memoryview

    def valid(self) -> bool:
        """True while the slot still holds the frame (the seqlock re-check after use)."""
        return struct.unpack_from("<Q", self._table)[0] == self.generation

    def check(self) -> None:
        """Raise `ProtocolError("stale_generation")` if the slot was rewritten."""
        if not self.valid():
            raise ProtocolError("stale_generation", f"shared-memory slot {self.slot} of "
                                f"{self.segment!r} was rewritten after it was read")


class _Mapped:
    __slots__ = ("buf", "data_offset", "lease_ns", "map", "slot_size", "slots")

    def __init__(self, name: str) -> None:
        try:
            # Non-blocking: a link to a FIFO must not hang the receiver in open().
            fd = os.open(SHM_DIR / name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise ProtocolError("shm_missing", f"shared-memory segment {name!r} cannot be "
                                f"opened ({exc.strerror}; publisher gone?)") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ProtocolError("shm_missing", f"segment {name!r} is not a regular file")
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:  # a file system without seals
                seals = 0
            if not seals & fcntl.F_SEAL_SHRINK:
                raise ProtocolError("shm_unsealed", f"segment {name!r} is not sealed against "
                                    "shrinking: its owner could truncate it under the "
                                    "receiver's mapping")
            size = info.st_size
            if size < _TABLE_OFFSET:
                raise ProtocolError("shm_missing", f"segment {name!r} is {size} bytes, not a "
                                    "fusion-node ring")
            self.map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.buf = memoryview(self.map)
        magic, slots, slot_size, data_offset, lease_ns, total = _SEGMENT.unpack_from(self.buf)
        # Kept from now on: the owner may rewrite the header, but never the size.
        if (magic != _MAGIC or total != size or not 0 < slots <= _MAX_SLOTS
                or data_offset < _TABLE_OFFSET + slots * _SLOT_STRIDE
                or data_offset + slots * slot_size != size):
            raise ProtocolError("shm_missing", f"segment {name!r} is not a fusion-node ring")
        self.slots, self.slot_size = slots, slot_size
        self.data_offset, self.lease_ns = data_offset, lease_ns


class ShmReader:
    """A subscriber's view of publishers' rings: maps each segment once, validates headers."""

    def __init__(self, clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock_ns = clock_ns
        self._mapped: OrderedDict[str, _Mapped] = OrderedDict()
        self.last_lease: ShmLease | None = None

    def resolve(self, shm: Any, where: str) -> memoryview:
        """The payload an `shm` header map points at, as a read-only view; sets `last_lease`.

        Raises `ProtocolError` with reason `bad_shm`, `shm_missing`, `shm_unsealed`,
        `shm_out_of_range`, `stale_generation` or `lease_expired`."""
        if type(shm) is not dict:
            raise ProtocolError("bad_shm", f"{where} shm {shm!r} is not a map")
        name = shm.get("segment")
        slot, generation = shm.get("slot"), shm.get("generation")
        offset, length = shm.get("offset"), shm.get("length")
        if not (type(name) is str and type(slot) is int and type(generation) is int
                and type(offset) is int and type(length) is int):
            raise ProtocolError("bad_shm", f"{where} shm {shm!r} needs a fusion-node segment "
                                "name and non-negative int slot, generation, offset, length")
        return self.resolve_slot(name, slot, generation, offset, length, where)

    def resolve_slot(self, name: str, slot: int, generation: int, offset: int, length: int,
                     where: str) -> memoryview:
        """`resolve` for fields already known to be a str and four ints."""
        # Spelled out, not looped: this runs once per frame in a freshly woken thread. Only
        # a new segment's name needs the pattern test: mapped names have passed it.
        mapped = self._mapped.get(name)
        if not (0 <= slot < 2**63 and 0 <= generation < 2**63 and 0 <= offset < 2**63
                and 0 <= length < 2**63) or (mapped is None and _NAME.match(name) is None):
            raise ProtocolError("bad_shm", f"{where} shm segment {name!r} slot {slot} "
                                f"generation {generation} offset {offset} length {length}: "
                                "needs a fusion-node segment name and non-negative ints")
        if mapped is None:
            # A new segment often means a publisher restarted and reclaimed its old one:
            # unmap segments that are gone, or a restarting camera pins a dead ring each time.
            for gone in [n for n in self._mapped if not (SHM_DIR / n).exists()]:
                del self._mapped[gone]  # live views keep their own reference
            mapped = _Mapped(name)
            self._mapped[name] = mapped
            if len(self._mapped) > _MAX_MAPPED:
                self._mapped.popitem(last=False)
        if (slot >= mapped.slots or length > mapped.slot_size
                or offset != mapped.data_offset + slot * mapped.slot_size):
            raise ProtocolError("shm_out_of_range", f"{where} slot {slot} offset {offset} "
                                f"length {length} is outside {name!r} ({mapped.slots} slots "
                                f"of {mapped.slot_size} bytes from {mapped.data_offset})")
        table_offset = _TABLE_OFFSET + slot * _SLOT_STRIDE
        table = mapped.buf[table_offset:table_offset + _SLOT_STRIDE]
        current, t_written_ns, written = _SLOT.unpack_from(table)
        if current != generation or generation % 2 or written != length:
            raise ProtocolError("stale_generation", f"{where} slot {slot} of {name!r} holds "
                                f"generation {current}, header says {generation}: the frame "
                                "was overwritten before it was read")
        expires_ns = t_written_ns + mapped.lease_ns
        if self._clock_ns() >= expires_ns:
            raise ProtocolError("lease_expired", f"{where} slot {slot} of {name!r}: lease "
                                f"expired {(self._clock_ns() - expires_ns) // 1000} µs ago")
        self.last_lease = ShmLease(name, slot, generation, expires_ns, table)
        return mapped.buf[offset:offset + length]

    def close(self) -> None:
        """Forget every mapping (views still alive keep theirs)."""
        self._mapped.clear()
        self.last_lease = None
