"""HeapTrimmer gives the C heap's free, still-resident pages back to the kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusion_node.host.heap import HeapTrimmer


def _anon_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_trim_returns_freed_heap_pages_to_the_kernel():
    trimmer = HeapTrimmer()
    if not trimmer.available:
        pytest.skip("not glibc: no malloc_trim")
    # 64 KiB chunks come from the heap (under the 128 KiB mmap threshold); keeping the last
    # one pins the heap's top, so freeing the rest leaves ~128 MB free but resident.
    chunks = [bytearray(64 * 1024) for _ in range(2048)]
    pin = chunks.pop()
    del chunks
    before = _anon_rss_mb()
    trimmer.trim()
    after = _anon_rss_mb()
    assert before - after > 64, (before, after)
    assert trimmer.summary()["trims"] == 1 and trimmer.summary()["released"] == 1
    assert len(pin) == 64 * 1024
