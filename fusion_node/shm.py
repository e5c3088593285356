"""Shared-memory rings for large payloads between processes on one host (protocol.md §10).

A publisher writes a large array into a slot of a POSIX shared-memory segment
(`/dev/shm/fusion-node-shm-<pid>-<start>-<n>`) and sends only the header over ZeroMQ, with an
`shm` map naming the segment, slot, generation, offset and length. A subscriber maps each
segment once and hands out a read-only numpy view of the slot: no copy on either side of the
socket beyond the publisher's one write (none at all on the loan path).

Release channel (protocol.md §10.4). Next to each ring lies a small release table
(`<segment>.release`), one row per subscriber: a subscriber claims a row with an
open-file-description lock (the kernel drops it when the process dies) and, before it hands
out a view, stores the generation it holds in the row's cell for that slot; it clears the
cell when the last reference to the view is dropped. The publisher rewrites the least
recently written slot that no row holds, so a slot is reused as soon as every subscriber
that mapped it has released it, and a view is valid for as long as it is referenced. Both
sides store, fence, then load (a Dekker handshake): a subscriber that reaches a header after
its slot was reused sees the new generation and drops that whole frame (`stale_generation`,
counted per subscriber); it never receives bytes that were overwritten. The lease
(`lease_ms`) remains only as the bound for a subscriber that died: a slot held by a row
whose lock is gone is reclaimed once its lease has run out.

A full ring (every slot held or lent) is an explicit outcome: `loan` raises `RingFull`
(after waiting `wait_ms`, if asked to), and `wrap` sends that one message inline, counted in
`fallbacks` per stream and logged once per stream. The publisher never waits otherwise.

Sealed segments (protocol.md §10.2). A segment is a memfd whose size is sealed (it can never
shrink or grow), reached through a symbolic link `/dev/shm/<name>` -> `/proc/<pid>/fd/<fd>`.
A receiver refuses a segment without the shrink seal: a mapped file that its owner truncates
kills the reader with SIGBUS the next time it touches a page past the new end, and a frame
view is touched long after its header was checked (by the engines, the recorder). The seal is
the only check that holds for the view's whole life. It also frees a dead publisher's memory
by itself: the memfd goes when its last descriptor and mapping do. The release table is
sealed the same way; subscribers map it writable, the frames' segment stays read-only.

The links are removed by `ShmWriter.close()` (and at interpreter exit); a link left by a
killed publisher is removed by the next `ShmWriter` on the host and by the node at start and
exit (`reclaim_stale_segments`), which check each owner's pid and start time in /proc.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import itertools
import logging
import math
import mmap
import os
import re
import stat
import struct
import threading
import time
import weakref
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from fusion_node.errors import ConfigError, FusionError, ProtocolError

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "fusion-node-shm"
RELEASE_SUFFIX = ".release"
_NAME = re.compile(rf"^{SEGMENT_PREFIX}-(\d+)-(\d+)-(\d+)$")
# Rings and their release tables: what clean-up looks for.
_ANY_NAME = re.compile(rf"^{SEGMENT_PREFIX}-(\d+)-(\d+)-(\d+)(?:{re.escape(RELEASE_SUFFIX)})?$")
# Version 2: the ring has a release table (version 1 rings were freed by lease alone; a
# version 1 reader takes no holds, so it must refuse these rings rather than misread them).
_MAGIC = b"FNSHM\x00\x00\x02"
# Segment header: magic, slots, slot_size, data_offset, lease_ns, total size, release rows.
_SEGMENT = struct.Struct("<8sQQQQQQ")
_TABLE_OFFSET = 64
# Per slot: generation (odd while writing), t_written_ns, length; then, at +24, `claim`:
# nonzero while the publisher decides whether it may rewrite the slot (the release
# handshake, without touching the generation of a slot it may leave to a subscriber).
_SLOT = struct.Struct("<QqQ")
_SLOT_CLAIMED = struct.Struct("<QqQQ")
_CLAIM = 24
_SLOT_STRIDE = 32
_PAGE = 4096
_MAX_SLOTS = 4096
_MAX_ROWS = 1024
# Release table: magic, rows, slots, row_stride; row r's cells (one u64 per slot: the
# generation its subscriber holds, 0 for none) start at _ROWS_OFFSET + r * row_stride, and
# after them its progress: the t_written_ns of the newest frame its subscriber took.
_RELEASE_MAGIC = b"FNREL\x00\x00\x01"
_RELEASE = struct.Struct("<8sQQQ")
_ROWS_OFFSET = 64
_SEGMENT_NUMBERS = itertools.count()
_MAX_MAPPED = 64  # segments a reader keeps mapped; older ones are dropped (views keep theirs)
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
# struct flock on Linux x86-64 and arm64: l_type, l_whence, l_start, l_len, l_pid (0 for
# open-file-description locks), padded to 32 bytes.
_FLOCK = struct.Struct("@hhqqi4x")
_WAIT_STEP_S = 0.0005  # how often a blocking loan looks again for a released slot
_HOT_TRIES = 4  # newest slots tried for reuse at once before the reuse_after rule
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


@dataclass(frozen=True, slots=True)
class ShmConfig:
    """When and how a publisher uses shared memory.

    threshold_bytes: payloads at least this large go through the ring.
    slots: slots per stream ring; a slot is reused after every other slot has been written
        since (the slack a late subscriber has), and only once no subscriber holds it. The
        whole ring is allocated when the stream's first large payload is sent.
    lease_ms: how long a slot held by a subscriber that died stays untouched after it was
        written (live subscribers' holds last until they release them).
    subscribers: rows of each ring's release table: how many subscribers can hold its slots
        at once; a further subscriber receives copies (checked, never overwritten ones).
    reuse_after: frames written to a ring before a released slot of it is rewritten, while
        the ring has such a slot: the slack of a subscriber lagging behind its socket queue
        (one further behind loses those frames whole). The smaller, the warmer the slot in
        the CPU's cache when it is rewritten (33 640x480 slots: 30 MB).
    """

    threshold_bytes: int = 64 * 1024
    slots: int = 128
    lease_ms: int = 3000
    subscribers: int = 16
    reuse_after: int = 32

    def __post_init__(self) -> None:
        if (self.threshold_bytes < 1 or not 1 <= self.slots <= _MAX_SLOTS or self.lease_ms < 0
                or not 1 <= self.subscribers <= _MAX_ROWS or self.reuse_after < 0):
            raise ConfigError(f"shared memory: threshold_bytes {self.threshold_bytes} must be "
                              f">= 1, slots {self.slots} in 1..{_MAX_SLOTS}, lease_ms "
                              f"{self.lease_ms} >= 0, subscribers {self.subscribers} in "
                              f"1..{_MAX_ROWS}, reuse_after {self.reuse_after} >= 0")


class RingFull(FusionError):
    """Every slot of a stream's ring is held by a subscriber or lent to the producer.

    `Publisher.loan` raises it (after `wait_ms`, if it was asked to wait): the producer
    chooses to drop the frame or to send a plain array, which then goes inline (a counted
    fallback) unless a slot was released meanwhile."""

    def __init__(self, stream: str, slots: int, held: int, lent: int,
                 paced: bool = False) -> None:
        super().__init__(f"shared-memory ring of {stream!r} is full: {held} of {slots} slots "
                         f"held by subscribers, {lent} lent and not yet sent"
                         + (", the others' frames not yet taken by every subscriber"
                            if paced else ""))
        self.stream = stream
        self.slots, self.held, self.lent = slots, held, lent


_FENCE = threading.Lock()


def _renew_fence() -> None:
    global _FENCE  # a child forked while another thread held it would wait forever
    _FENCE = threading.Lock()


os.register_at_fork(after_in_child=_renew_fence)


def _fence() -> None:
    """A full memory barrier between a store and a later load of another shared location
    (the release handshake). Python has no fence; the atomic exchange of taking a lock is
    one (a locked instruction on x86-64)."""
    _FENCE.acquire()
    _FENCE.release()


def _lock_row(fd: int, start: int, length: int, lock: bool = True) -> bool:
    """Take (or drop) an open-file-description write lock on bytes [start, start+length)
    without waiting; False if another open file holds a lock there."""
    kind = fcntl.F_WRLCK if lock else fcntl.F_UNLCK
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


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
        match = _ANY_NAME.match(path.name)
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


def _sealed_memfd(name: str, size: int) -> tuple[int, mmap.mmap]:
    """A memfd of `size` bytes sealed against any change of size, mapped with every page in
    place, and linked as /dev/shm/<name>."""
    # Held open for the ring's life: the link in /dev/shm resolves through it.
    fd = os.memfd_create(name, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        # Every slot is written within `slots` frames anyway; faulting its 225 pages in on
        # the first write of a 640x480 slot took ~0.5 ms on a VM, on the frame's path.
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE)
        os.symlink(f"/proc/{os.getpid()}/fd/{fd}", SHM_DIR / name)
    except BaseException:
        os.close(fd)
        raise
    return fd, mapping


class _Ring:
    """One segment of equal slots, written by one publisher for one stream, and its release
    table."""

    def __init__(self, name: str, slots: int, slot_size: int, lease_ns: int,
                 rows: int, reuse_after: int) -> None:
        self.name = name
        self.reuse_after = reuse_after
        self.slots = slots
        self.slot_size = slot_size
        self.lease_ns = lease_ns
        self.rows = rows
        self.data_offset = -(-(_TABLE_OFFSET + slots * _SLOT_STRIDE) // _PAGE) * _PAGE
        size = self.data_offset + slots * slot_size
        self.row_stride = -(-((slots + 1) * 8) // 64) * 64  # rows on their own cache lines
        self.fd, self.map = _sealed_memfd(name, size)
        try:
            self.release_fd, self.release_map = _sealed_memfd(
                name + RELEASE_SUFFIX, _ROWS_OFFSET + rows * self.row_stride)
        except BaseException:
            _unlink(name)
            self.map.close()
            os.close(self.fd)
            raise
        self.buf = memoryview(self.map)
        _SEGMENT.pack_into(self.buf, 0, _MAGIC, slots, slot_size, self.data_offset, lease_ns,
                           size, rows)
        _RELEASE.pack_into(self.release_map, 0, _RELEASE_MAGIC, rows, slots, self.row_stride)
        # holds[r, s]: the generation of slot s that row r's subscriber holds (0: none).
        self.holds = np.ndarray((rows, slots), np.uint64, self.release_map, _ROWS_OFFSET,
                                (self.row_stride, 8))
        # progress[r]: the t_written_ns of the newest frame row r's subscriber took (0: none).
        self.progress = np.ndarray((rows,), np.uint64, self.release_map,
                                   _ROWS_OFFSET + slots * 8, (self.row_stride,))
        self._dead_check_ns = 0
        self.generation = [0] * slots
        self.written_ns = [0] * slots
        self.in_use: deque[int] = deque()  # written slots, least recently written first
        self.fresh = 0  # slots below this have been written at least once
        # Slots lent to the producer and not yet sent: id(array) -> (slot, a weak reference
        # to the array, the finalizer that gives the slot back when the array is dropped).
        self.loans: dict[int, tuple[int, weakref.ref, weakref.finalize]] = {}
        self.closed = False
        self.entry_prefix = shm_entry_prefix(name)

    def _held(self, slot: int, generation: int) -> bool:
        return bool((self.holds[:, slot] == generation).any())

    def take(self, now_ns: int, paced: bool = False) -> int | None:
        """A slot to write, marked as being written (odd generation: readers reject it);
        None if every slot is held or lent.

        The most recently written slot whose frame every subscriber took and none holds
        any more (tried among the newest few); else the most recently written slot that no
        subscriber holds and that `reuse_after` frames have been written after (its memory is still in cache, and a subscriber
        lagging that many frames behind its socket still finds it); else a fresh slot; else
        any slot nobody holds, oldest first; else one a dead subscriber held past its
        lease. `paced`: only a slot whose frame every subscriber has taken (or a fresh
        one), so that the publisher goes at the pace of the slowest subscriber."""
        in_use = self.in_use
        if paced:
            taken = self.progress[self.progress > 0]
            if taken.size:  # subscribers that have taken no frame yet do not pace it
                floor = int(taken.min())
                in_use = deque(slot for slot in in_use if self.written_ns[slot] <= floor)
        return self._take_from(in_use, now_ns)

    def _take_from(self, in_use: deque[int], now_ns: int) -> int | None:
        taken = self.progress[self.progress > 0]
        if taken.size:
            # A slot whose frame every subscriber has taken (each took a frame written at or
            # after it; headers arrive in order) and that none holds any more can be reused
            # at once; the newest such one is still in the CPU's cache, which saves the
            # producer's write into it about 60 us a 640x480 frame. Bounded: in a node the
            # newest frames are held by the alignment buffer.
            floor = int(taken.min())
            for index in range(len(in_use) - 1, max(-1, len(in_use) - 1 - _HOT_TRIES), -1):
                slot = in_use[index]
                if self.written_ns[slot] <= floor and self._claim(slot):
                    self.in_use.remove(slot)
                    return slot
        eligible = len(in_use) - self.reuse_after  # in_use[:eligible] are old enough
        if eligible > 0 and self._claim(in_use[eligible - 1]):
            slot = in_use[eligible - 1]
            self.in_use.remove(slot)
            return slot
        if self.fresh < self.slots:
            self.fresh += 1
            self.begin(self.fresh - 1)
            return self.fresh - 1
        generations = np.array(self.generation, np.uint64)
        held = (self.holds == generations).any(axis=0)
        order = [*range(eligible - 2, -1, -1), *range(max(eligible, 0), len(in_use))]
        for index in order:
            slot = in_use[index]
            if not held[slot] and self._claim(slot):
                self.in_use.remove(slot)
                return slot
        for slot in in_use:
            if held[slot] and self._reclaim_dead(slot, now_ns) and self._claim(slot):
                self.in_use.remove(slot)
                return slot
        return None

    def drop_dead_readers(self, now_ns: int) -> None:
        """Clear the rows of subscribers that died (their progress would pace a waiting
        publisher forever); at most every 10 ms."""
        if now_ns - self._dead_check_ns < 10_000_000:
            return
        self._dead_check_ns = now_ns
        for row in np.flatnonzero(self.progress):
            start = _ROWS_OFFSET + int(row) * self.row_stride
            if _lock_row(self.release_fd, start, self.row_stride):  # nobody holds it
                try:
                    self.holds[row] = 0
                    self.progress[row] = 0
                finally:
                    _lock_row(self.release_fd, start, self.row_stride, lock=False)

    def _claim(self, slot: int) -> bool:
        """Mark `slot` as being written unless a subscriber holds it. The subscriber stores
        its hold, then loads the slot's claim and generation; this stores the claim, then
        loads the holds: with a fence between on each side, at least one of the two sees
        the other. A subscriber that sees the claim drops the frame; one this sees keeps
        it, and the slot's generation never changed."""
        generation = self.generation[slot]
        if self._held(slot, generation):
            return False
        claim = _TABLE_OFFSET + slot * _SLOT_STRIDE + _CLAIM
        struct.pack_into("<Q", self.buf, claim, 1)
        _fence()
        if self._held(slot, generation):  # a hold arrived meanwhile: leave the slot to it
            struct.pack_into("<Q", self.buf, claim, 0)
            return False
        self.begin(slot)  # odd, stored before the claim is dropped (stores stay in order)
        struct.pack_into("<Q", self.buf, claim, 0)
        return True

    def _reclaim_dead(self, slot: int, now_ns: int) -> bool:
        """Free the holds on `slot` of subscribers that died, once its lease has run out;
        True if none is left."""
        if now_ns < self.written_ns[slot] + self.lease_ns:
            return False
        generation = self.generation[slot]
        for row in np.flatnonzero(self.holds[:, slot] == generation):
            start = _ROWS_OFFSET + int(row) * self.row_stride
            # Locking the row ourselves both proves its subscriber is gone and keeps a new
            # subscriber from claiming it while its stale holds are cleared.
            if not _lock_row(self.release_fd, start, self.row_stride):
                return False  # alive: its hold stands, however old
            try:
                self.holds[row] = 0
                self.progress[row] = 0
            finally:
                _lock_row(self.release_fd, start, self.row_stride, lock=False)
        return True

    def held_count(self) -> int:
        generations = np.array(self.generation, np.uint64)
        held = (self.holds == generations).any(axis=0) & (generations != 0)
        return int(held.sum())

    def begin(self, slot: int) -> int:
        """Mark `slot` as being written (odd generation: readers reject it); its offset."""
        self.generation[slot] += 1
        struct.pack_into("<Q", self.buf, _TABLE_OFFSET + slot * _SLOT_STRIDE,
                         self.generation[slot])
        return self.data_offset + slot * self.slot_size

    def commit(self, slot: int, nbytes: int, now_ns: int) -> int:
        """Publish what `slot` holds; its new (even) generation."""
        generation = self.generation[slot] + 1
        _SLOT.pack_into(self.buf, _TABLE_OFFSET + slot * _SLOT_STRIDE, generation, now_ns,
                        nbytes)
        self.generation[slot] = generation
        self.written_ns[slot] = now_ns
        self.in_use.append(slot)
        return generation

    def write(self, slot: int, payload: memoryview, now_ns: int) -> tuple[int, int]:
        """Copy `payload` into `slot` (taken: already marked); return (generation, offset)."""
        offset = self.data_offset + slot * self.slot_size
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
        struct.pack_into("<Q", self.buf, _TABLE_OFFSET + slot * _SLOT_STRIDE,
                         self.generation[slot])
        self.in_use.appendleft(slot)

    def close(self) -> None:
        _unlink(self.name)
        _unlink(self.name + RELEASE_SUFFIX)
        os.close(self.fd)  # readers' mappings keep the memory until they drop it
        os.close(self.release_fd)
        self.closed = True
        for _, _, finalizer in self.loans.values():
            finalizer.detach()
        self.loans.clear()
        del self.holds, self.progress
        try:
            self.release_map.close()
        except BufferError:
            pass
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
        _unlink(name + RELEASE_SUFFIX)
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
        self.fallbacks = 0  # large payloads sent inline: every slot was held or lent
        self.fallbacks_by_stream: Counter[str] = Counter()
        self.ring_full = 0  # loans refused because every slot was held or lent
        # Re-entrant: a dropped loan gives its slot back from whatever code drops it.
        self._lock = threading.RLock()
        self._closed = False
        self.reclaimed = reclaim_stale_segments()
        # Segments must not outlive the process even if close() is never called.
        self._names: set[str] = set()
        self._finalizer = weakref.finalize(self, _unlink_all, self._names)

    def wrap(self, parts: list[Any]) -> list[Any]:
        """`parts` from `protocol.encode`, with a large payload moved into shared memory.

        Returns `[topic, header + shm]`, or `parts` unchanged when the message is small or
        not a single-array kind, or, counted and logged once per stream as a fallback, when
        every slot is held or lent (never waits)."""
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
        topic = bytes(parts[0])
        with self._lock:
            ring = self._ring(topic, payload.nbytes)
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
                    self._fallback(topic.decode(errors="replace"), ring)
                    return parts
                generation, offset = ring.write(slot, payload, now_ns)
            self.sent += 1
        return [parts[0], _with_shm(header, ring, slot, generation, offset, payload.nbytes)]

    def _fallback(self, stream: str, ring: _Ring) -> None:
        self.fallbacks += 1
        self.fallbacks_by_stream[stream] += 1
        if self.fallbacks_by_stream[stream] == 1:
            logger.warning("%s: every one of %d shared-memory slots is held by a subscriber "
                           "or lent (%d held): sending inline instead; counted in fallbacks, "
                           "logged once", stream, ring.slots, ring.held_count())

    def loan(self, topic: bytes, shape: tuple[int, ...], dtype: np.dtype,
             wait_ms: float = 0) -> np.ndarray | None:
        """A writable array in a free slot for a message on `topic`; None only once the
        writer is closed. Fill it, then send a message carrying exactly this array: it goes
        out without a copy. Several loans may be out at once (frames queued between capture
        and send); one dropped without being sent gives its slot back.

        Raises `RingFull` when every slot is held by subscribers or lent, after waiting up
        to `wait_ms` for one to be released (0: do not wait). With `wait_ms` > 0 the loan
        also waits for a slot whose frame every subscriber has taken: the publisher goes at
        the pace of its slowest subscriber (back-pressure) instead of making it lose frames,
        for up to `wait_ms` per frame."""
        nbytes = math.prod(shape) * dtype.itemsize
        deadline_ns = time.monotonic_ns() + int(wait_ms * 1_000_000)
        while True:
            with self._lock:
                if self._closed:  # a producer thread still running after the publisher closed
                    return None
                ring = self._ring(topic, nbytes)
                now_ns = self._clock_ns()
                slot = ring.take(now_ns, paced=wait_ms > 0)
                if slot is not None:
                    offset = ring.data_offset + slot * ring.slot_size
                    array = np.ndarray(shape, dtype, ring.buf[offset:offset + nbytes])
                    key = id(array)
                    # Neither holds the array: dropping it unsent is what gives the slot back.
                    finalizer = weakref.finalize(array, self._give_back, ring, key, slot)
                    finalizer.atexit = False  # at exit the whole ring goes
                    ring.loans[key] = (slot, weakref.ref(array), finalizer)
                    return array
                if time.monotonic_ns() >= deadline_ns:
                    self.ring_full += 1
                    raise RingFull(topic.decode(errors="replace"), ring.slots,
                                   ring.held_count(), len(ring.loans), paced=wait_ms > 0)
                ring.drop_dead_readers(now_ns)
            time.sleep(_WAIT_STEP_S)  # releases come from other processes: look again soon

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
        ring = _Ring(name, self.config.slots, slot_size, self._lease_ns,
                     self.config.subscribers, min(self.config.reuse_after,
                                                  self.config.slots - 1))
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
    """True if `array` views a shared-memory ring. Keeping it keeps its slot held (the
    publisher cannot reuse it): copy what you keep long or many of."""
    obj: Any = array
    while isinstance(obj, np.ndarray | memoryview):
        obj = obj.base if isinstance(obj, np.ndarray) else obj.obj
    return isinstance(obj, mmap.mmap)


_FOREVER_NS = 2**63 - 1


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 2 µs a frame on the receive path
class ShmLease:
    """Where a decoded array lives, and until when it is guaranteed not to change.

    A held view (the usual case) stays unchanged for as long as it is referenced:
    `expires_ns` is then the largest int64. A copy (this receiver had no row in the ring's
    release table) is checked once made, and never changes either."""

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


def _open_sealed(name: str, flags: int) -> int:
    """A descriptor of /dev/shm/<name>, refused unless it is a regular file sealed against
    shrinking (checked before anything maps it)."""
    try:
        # Non-blocking: a link to a FIFO must not hang the receiver in open().
        fd = os.open(SHM_DIR / name, flags | os.O_NONBLOCK | os.O_CLOEXEC)
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
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Row:
    """This receiver's row in a ring's release table: claimed with a lock the kernel drops
    when the process dies, and kept (with the mapping) until the last view it holds is
    released, even after the reader forgot the ring."""

    __slots__ = ("__weakref__", "cells", "counts", "fd", "holding", "map", "row")

    def __init__(self, fd: int, mapping: mmap.mmap, row: int, cells: np.ndarray) -> None:
        self.fd, self.map, self.row, self.cells = fd, mapping, row, cells
        self.holding: dict[int, weakref.ref] = {}  # id -> the weak reference to a view
        # slot -> views of it alive (a header repeated by a replay or an attacker names the
        # same slot and generation twice: the hold lasts until both are dropped).
        self.counts: dict[int, int] = {}
        weakref.finalize(self, _close_row, fd, mapping, cells)


def _close_row(fd: int, mapping: mmap.mmap, cells: np.ndarray) -> None:
    cells[:] = 0  # every hold was released; clear anything left by an aborted delivery
    del cells
    os.close(fd)  # drops the row's lock
    try:
        mapping.close()
    except BufferError:
        pass


def _release(row: _Row, slot: int, generation: int, ref: weakref.ref) -> None:
    """The last reference to a held view is gone: give its slot back to the publisher."""
    row.holding.pop(id(ref), None)
    count = row.counts.pop(slot, 1) - 1
    if count > 0:
        row.counts[slot] = count
    elif row.cells[slot] == generation:
        row.cells[slot] = 0


def _claim_row(name: str, rows: int, slots: int) -> _Row | None:
    """A row of the release table of ring `name`, or None if all are taken."""
    try:
        fd = _open_sealed(name + RELEASE_SUFFIX, os.O_RDWR)
    except ProtocolError:
        return None  # no release table we may write: this receiver copies instead
    try:
        info = os.fstat(fd)
        mapping = mmap.mmap(fd, info.st_size) if info.st_size >= _ROWS_OFFSET else None
    except OSError:
        mapping = None
    if mapping is None:
        os.close(fd)
        return None
    magic, table_rows, table_slots, stride = _RELEASE.unpack_from(mapping)
    if (magic != _RELEASE_MAGIC or table_rows != rows or table_slots != slots
            or stride < (slots + 1) * 8 or stride % 8
            or _ROWS_OFFSET + rows * stride != info.st_size):
        mapping.close()
        os.close(fd)
        return None
    for row in range(rows):
        start = _ROWS_OFFSET + row * stride
        if _lock_row(fd, start, stride):
            cells = np.ndarray((slots + 1,), np.uint64, mapping, start)
            cells[:] = 0  # a dead subscriber's holds and progress, if it had this row
            return _Row(fd, mapping, row, cells)
    mapping.close()
    os.close(fd)
    return None


class _Mapped:
    __slots__ = ("buf", "data_offset", "lease_ns", "map", "row", "slot_size", "slots")

    def __init__(self, name: str) -> None:
        fd = _open_sealed(name, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < _TABLE_OFFSET:
                raise ProtocolError("shm_missing", f"segment {name!r} is {size} bytes, not a "
                                    "fusion-node ring")
            # Populated: the publisher's pages are all in place, and mapping them now
            # spares each first read of a slot its page faults.
            self.map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE,
                                 prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.buf = memoryview(self.map)
        magic, slots, slot_size, data_offset, lease_ns, total, rows = (
            _SEGMENT.unpack_from(self.buf))
        # Kept from now on: the owner may rewrite the header, but never the size.
        if (magic != _MAGIC or total != size or not 0 < slots <= _MAX_SLOTS
                or data_offset < _TABLE_OFFSET + slots * _SLOT_STRIDE
                or data_offset + slots * slot_size != size):
            raise ProtocolError("shm_missing", f"segment {name!r} is not a fusion-node ring "
                                "(version 2)")
        self.slots, self.slot_size = slots, slot_size
        self.data_offset, self.lease_ns = data_offset, lease_ns
        self.row = _claim_row(name, rows, slots) if 0 < rows <= _MAX_ROWS else None


class ShmReader:
    """A subscriber's view of publishers' rings: maps each segment once, validates headers,
    holds the slots of the views it hands out until they are dropped."""

    def __init__(self, clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock_ns = clock_ns
        self._mapped: OrderedDict[str, _Mapped] = OrderedDict()
        self.last_lease: ShmLease | None = None
        self.copied = 0  # frames copied out because no release row was free

    def resolve(self, shm: Any, where: str) -> memoryview:
        """The payload an `shm` header map points at, as a read-only view; sets `last_lease`.

        Raises `ProtocolError` with reason `bad_shm`, `shm_missing`, `shm_unsealed`,
        `shm_out_of_range` or `stale_generation` (the slot was reused before this receiver
        got to it: the whole frame is lost)."""
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
        if generation % 2 or not _holds_frame(table, generation, length):
            raise _overwritten(where, slot, name, table, generation)
        row = mapped.row
        if row is None:
            # No row to hold the slot with: copy, then prove the copy is of one frame.
            data = bytes(mapped.buf[offset:offset + length])
            if not _holds_frame(table, generation, length):
                raise _overwritten(where, slot, name, table, generation)
            self.copied += 1
            self.last_lease = ShmLease(name, slot, generation, _FOREVER_NS, table)
            return memoryview(data)
        # Hold, fence, check again: if the publisher claimed the slot before it could see
        # the hold, the check sees its claim or its new generation (the publisher's side
        # of this handshake is _Ring._claim).
        cells = row.cells
        if cells[slot] == generation:  # already held (a repeated header): one more view
            row.counts[slot] = row.counts.get(slot, 0) + 1
        else:
            cells[slot] = generation
            _fence()
            t_written_ns = _settled(table, generation, length)
            if t_written_ns < 0:
                cells[slot] = 0
                raise _overwritten(where, slot, name, table, generation)
            row.counts[slot] = 1
            cells[-1] = max(cells[-1], t_written_ns)  # progress: what a paced publisher awaits
        # Every view of the payload keeps `holder` alive; when the last goes, so does the hold.
        holder = np.frombuffer(mapped.buf, np.uint8, length, offset)
        ref = weakref.ref(holder, functools.partial(_release, row, slot, generation))
        row.holding[id(ref)] = ref
        self.last_lease = ShmLease(name, slot, generation, _FOREVER_NS, table)
        return memoryview(holder)

    def close(self) -> None:
        """Forget every mapping (views still alive keep theirs, and their holds)."""
        self._mapped.clear()
        self.last_lease = None


def _holds_frame(table: memoryview, generation: int, length: int) -> bool:
    current, _, written = _SLOT.unpack_from(table)
    return current == generation and written == length


def _settled(table: memoryview, generation: int, length: int) -> int:
    """The slot's t_written_ns if `_holds_frame` and the publisher is not deciding whether
    to rewrite the slot, else -1."""
    current, t_written_ns, written, claim = _SLOT_CLAIMED.unpack_from(table)
    if current == generation and written == length and claim == 0:
        return max(t_written_ns, 0)
    return -1


def _overwritten(where: str, slot: int, name: str, table: memoryview,
                 generation: int) -> ProtocolError:
    current = _SLOT.unpack_from(table)[0]
    return ProtocolError("stale_generation", f"{where} slot {slot} of {name!r} holds "
                         f"generation {current}, header says {generation}: the slot was "
                         "reused before this receiver read it (the whole frame is lost)")
