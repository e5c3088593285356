"""AudioChunker: fixed-size chunks, exact sample indices and stamps from any block sizes."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.microphone import AudioChunker
from fusion_node.errors import ConfigError

RATE = 16000
NS_PER_SAMPLE = 1_000_000_000 // RATE


def test_odd_blocks_become_exact_chunks():
    rng = np.random.default_rng(7)
    chunker = AudioChunker("audio.test", RATE, 2, chunk_ms=10)
    sizes = [1, 159, 160, 161, 7, 480, 333, 2, 1000, 37]
    total = sum(sizes)
    signal = rng.integers(-32768, 32767, (total, 2), dtype=np.int16)
    block_start_ns: dict[int, int] = {}  # block's first sample index -> its stamp
    chunks = []
    index = 0
    for size in sizes:
        # Jittered stamps: each chunk must take its time from the block it starts in.
        t_ns = 5_000_000_000 + index * NS_PER_SAMPLE + int(rng.integers(-20_000, 20_000))
        block_start_ns[index] = t_ns
        chunks += chunker.push(signal[index:index + size], t_ns)
        index += size
    tail = chunker.flush()
    assert tail is not None and chunker.flush() is None
    chunks.append(tail)

    assert all(len(c.samples) == 160 for c in chunks[:-1])
    assert len(tail.samples) == total % 160
    np.testing.assert_array_equal(np.concatenate([c.samples for c in chunks]), signal)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert [c.sample_index for c in chunks] == list(range(0, total, 160))
    starts = sorted(block_start_ns)
    for chunk in chunks:
        assert chunk.stream == "audio.test" and chunk.sample_rate == RATE
        block = max(s for s in starts if s <= chunk.sample_index)
        offset = chunk.sample_index - block
        assert chunk.t_capture_ns == block_start_ns[block] + offset * NS_PER_SAMPLE


def test_gap_emits_short_chunk_and_restarts_at_new_index():
    chunker = AudioChunker("audio.test", RATE, 1)
    block = np.arange(250, dtype=np.int16)[:, None]
    first = chunker.push(block, 0)
    after_gap = chunker.push(block, 1_000_000_000, sample_index=1000)
    assert [c.sample_index for c in first] == [0]
    # The 90 samples before the gap go out alone, then chunking restarts at sample 1000.
    assert [(c.sample_index, len(c.samples)) for c in after_gap] == [(160, 90), (1000, 160)]
    assert after_gap[0].t_capture_ns == 160 * NS_PER_SAMPLE
    assert after_gap[1].t_capture_ns == 1_000_000_000
    assert chunker.next_index == 1250


def test_rejects_overlap_and_wrong_blocks():
    chunker = AudioChunker("audio.test", RATE, 1)
    chunker.push(np.zeros((100, 1), np.int16), 0)
    with pytest.raises(ValueError, match="sample 50"):
        chunker.push(np.zeros((10, 1), np.int16), 0, sample_index=50)
    with pytest.raises(ValueError, match="float32"):
        chunker.push(np.zeros((10, 1), np.float32), 0)
    with pytest.raises(ValueError, match=r"\[10, 2\]"):
        chunker.push(np.zeros((10, 2), np.int16), 0)
    with pytest.raises(ConfigError, match="chunk_ms"):
        AudioChunker("audio.test", RATE, 1, chunk_ms=0.01)
