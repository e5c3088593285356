import random

import numpy as np
import pytest

from fusion_node.alignment import AlignmentBuffer, AudioInput, JointsInput, LatestInput, VideoInput
from fusion_node.protocol import AudioChunk, Frame, JointState

MS = 1_000_000
SR = 16_000


def audio_chunks(count: int, chunk: int = 160, t0: int = 1_000 * MS, jitter_ns: int = 0,
                 seed: int = 0) -> list[AudioChunk]:
    """Chunks of a ramp signal whose value is the sample index, so cuts are checkable."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        index = k * chunk
        samples = (np.arange(index, index + chunk) % 30000).astype(np.int16)[:, None]
        stamp = t0 + index * 1_000_000_000 // SR + int(rng.integers(-jitter_ns, jitter_ns + 1))
        out.append(AudioChunk("audio.mic", k, stamp, SR, index, samples))
    return out


def frames(count: int, period_ns: int = 33 * MS, t0: int = 1_000 * MS) -> list[Frame]:
    return [Frame("camera.front", k, t0 + k * period_ns,
                  np.full((4, 4, 3), k % 256, np.uint8)) for k in range(count)]


def joints(count: int, period_ns: int = 5 * MS, t0: int = 1_000 * MS) -> list[JointState]:
    names = ("a", "b")
    out = []
    for k in range(count):
        t = k * period_ns
        out.append(JointState("joints.arm", k, t0 + t, names,
                              np.array([t / 1e9, 2 * t / 1e9]), np.array([1.0, 2.0]),
                              np.zeros(2)))
    return out


def buffer(**extra: int) -> AlignmentBuffer:
    return AlignmentBuffer({"audio.mic": 512, "camera.front": 64, "joints.arm": 512,
                            "pred.speech": 16, **extra})


SPEC = (AudioInput("audio.mic", 4000, SR), VideoInput("camera.front", 4, 40 * MS),
        JointsInput("joints.arm"))


def window_signature(window):
    audio = window.data["audio.mic"]
    video = window.data["camera.front"]
    j = window.data["joints.arm"]
    return (audio.samples.tobytes(), audio.valid.tobytes(), audio.t_start_ns,
            tuple(None if f is None else f.seq for f in video.frames),
            j.position.tobytes(), tuple(window.mask.items()))


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_scrambled_arrival_gives_identical_windows(seed):
    messages = audio_chunks(300, jitter_ns=200_000) + frames(90) + joints(600)
    capacities = {"audio.mic": 1000, "camera.front": 100, "joints.arm": 1000}
    reference = AlignmentBuffer(capacities)
    for msg in sorted(messages, key=lambda m: m.t_capture_ns):
        reference.push(msg)
    scrambled = AlignmentBuffer(capacities)
    shuffled = list(messages)
    random.Random(seed).shuffle(shuffled)
    for msg in shuffled:
        scrambled.push(msg)
    for t_ref in range(1_500 * MS, 2_900 * MS, 37 * MS):
        assert (window_signature(reference.window(t_ref, SPEC))
                == window_signature(scrambled.window(t_ref, SPEC)))


def test_audio_cut_is_sample_exact_across_chunk_boundaries():
    buf = buffer()
    for chunk in audio_chunks(100, chunk=160, jitter_ns=300_000):
        buf.push(chunk)
    spec = (AudioInput("audio.mic", 1000, SR),)
    previous_end = None
    for t_ref_ms in range(1_300, 1_900, 10):
        span = buf.window(t_ref_ms * MS, spec).data["audio.mic"]
        values = np.round(span.samples[:, 0] * 32768).astype(int)
        # The ramp's value is the sample index: contiguous, and exactly 1000 samples.
        assert np.array_equal(np.diff(values), np.ones(999))
        assert span.valid.all()
        end = values[-1]
        # Sample `end` is at or before t_ref, the next one after it, up to the stamp jitter.
        t_end = 1_000 * MS + end * 1_000_000_000 // SR
        assert t_end - 300_000 <= t_ref_ms * MS < t_end + 1_000_000_000 // SR + 300_000
        if previous_end is not None:
            # 10 ms later is 160 samples later; stamp jitter may move a cut by one sample.
            assert abs(end - previous_end - 160) <= 1
        previous_end = end


def test_consecutive_cuts_are_exactly_one_hop_apart_without_jitter():
    buf = buffer()
    for chunk in audio_chunks(100, chunk=160):
        buf.push(chunk)
    ends = [buf.window(t * MS, (AudioInput("audio.mic", 1000, SR),)).data["audio.mic"]
            .samples[-1, 0] for t in range(1_300, 1_900, 10)]
    assert np.all(np.round(np.diff(ends) * 32768) == 160)


def test_audio_gap_is_zero_filled_and_masked():
    buf = buffer()
    chunks = audio_chunks(50)
    for chunk in chunks[:20] + chunks[25:]:  # chunks 20..24 lost in transit
        buf.push(chunk)
    span = buf.window(1_000 * MS + 400 * MS, (AudioInput("audio.mic", 6400, SR),)) \
        .data["audio.mic"]
    start_index = 6401 - 6400  # t_ref at sample 6400 → window [1, 6401)
    lost = slice(20 * 160 - start_index, 25 * 160 - start_index)
    assert not span.valid[lost].any()
    assert not span.samples[lost].any()
    assert span.valid[:lost.start].all() and span.valid[lost.stop:].all()


def test_audio_after_driver_restart_is_not_mixed():
    buf = buffer()
    old = audio_chunks(50, t0=1_000 * MS)
    # The driver restarted 2 s later: sample_index restarts at 0.
    new = audio_chunks(50, t0=3_000 * MS)
    for c in new:
        c.seq += 1000
    for c in old + new:
        buf.push(c)
    span = buf.window(3_000 * MS + 100 * MS, (AudioInput("audio.mic", 3200, SR),)) \
        .data["audio.mic"]
    # Only the 100 ms since the restart is valid; the old run's samples stay out.
    assert span.valid.sum() == 1601
    assert not span.valid[:1599].any()


def test_stopped_audio_is_missing_and_reported():
    buf = buffer()
    for chunk in audio_chunks(10):
        buf.push(chunk)
    window = buf.window(2_000 * MS, (AudioInput("audio.mic", 160, SR, required=True),))
    assert window.missing_required == ["audio.mic"]
    assert "ms before t_ref" in window.missing["audio.mic"]


def test_joint_interpolation_and_tolerance():
    buf = buffer()
    for j in joints(100):
        buf.push(j)
    w = buf.window(1_000 * MS + 12_500_000, (JointsInput("joints.arm"),))
    np.testing.assert_allclose(w.data["joints.arm"].position, [0.0125, 0.025])
    # Past the newest sample (t = 1.495 s): held within tolerance, missing beyond.
    held = buf.window(1_495 * MS + 10 * MS, (JointsInput("joints.arm", tolerance_ns=20 * MS),))
    np.testing.assert_allclose(held.data["joints.arm"].position, [0.495, 0.99])
    stale = buf.window(1_495 * MS + 30 * MS, (JointsInput("joints.arm", tolerance_ns=20 * MS),))
    assert stale.missing_required == ["joints.arm"]
    before = buf.window(999 * MS, (JointsInput("joints.arm"),))
    assert before.missing_required == ["joints.arm"]


def test_joint_gap_is_not_interpolated_across():
    buf = buffer()
    samples = joints(200)
    for j in samples[:50] + samples[150:]:  # 500 ms outage
        buf.push(j)
    window = buf.window(1_500 * MS, (JointsInput("joints.arm", tolerance_ns=20 * MS),))
    assert "gap" in window.missing["joints.arm"]


def test_video_frames_at_or_before_t_ref_resampled():
    buf = buffer()
    for f in frames(30, period_ns=33 * MS):
        buf.push(f)
    t_ref = 1_000 * MS + 500 * MS
    stack = buf.window(t_ref, (VideoInput("camera.front", 4, 40 * MS),)).data["camera.front"]
    for k, frame in enumerate(stack.frames):
        slot = t_ref - (3 - k) * 40 * MS
        assert frame.t_capture_ns <= slot < frame.t_capture_ns + 33 * MS
    recent = buf.window(t_ref, (VideoInput("camera.front", 3),)).data["camera.front"]
    assert [f.seq for f in recent.frames] == [13, 14, 15]


def test_missing_optional_stream_is_masked_not_required():
    buf = buffer()
    for chunk in audio_chunks(100):
        buf.push(chunk)
    window = buf.window(1_500 * MS, SPEC[:2])
    assert window.mask == {"audio.mic": True, "camera.front": False}
    assert window.missing_required == []
    assert "no frame" in window.missing["camera.front"]


def test_latest_input_respects_declared_delay():
    from fusion_node.protocol import Prediction

    buf = buffer()
    for k in range(10):
        buf.push(Prediction("pred.speech", k, 1_000 * MS + k * 33 * MS, 0, "speech", "h", {},
                            {}, {}, {}))
    msg = buf.window(1_200 * MS, (LatestInput("pred.speech", delay_ns=32 * MS),)) \
        .data["pred.speech"]
    assert msg.t_ref_ns <= 1_200 * MS - 32 * MS < msg.t_ref_ns + 33 * MS


def test_ring_is_bounded_and_counts_drops():
    buf = AlignmentBuffer({"audio.mic": 8})
    for chunk in audio_chunks(20):
        buf.push(chunk)
    stats = buf.stats["audio.mic"]
    assert stats.evicted == 12 and stats.received == 20
    # An old sample arriving after the ring moved on is refused, not stored.
    assert not buf.push(audio_chunks(1)[0])
    assert stats.too_old == 1
    assert not buf.push(audio_chunks(20)[19])
    assert stats.duplicates == 1
    assert not buf.push(Frame("camera.other", 0, 0, np.zeros((1, 1, 3), np.uint8)))
    assert buf.unknown_streams["camera.other"] == 1


def test_sequence_gaps_are_counted():
    buf = buffer()
    chunks = audio_chunks(10)
    for c in chunks[:3] + chunks[6:]:
        buf.push(c)
    assert buf.stats["audio.mic"].seq.gaps == 3


@pytest.mark.parametrize("recording", [False, True])
def test_an_evicted_frame_is_released_after_the_locks(recording):
    # Releasing a frame can unmap a dead shared-memory ring (~30 ms): never under a lock
    # that engines cutting windows wait for.
    import weakref

    from fusion_node.clock import ReplayClock
    from fusion_node.logs.recorder import RecordingBuffer

    buffer = (RecordingBuffer({"camera.front": 2}, ReplayClock(0)) if recording
              else AlignmentBuffer({"camera.front": 2}))
    locks = [buffer._lock] + ([buffer._order] if recording else [])
    held_at_release: list[bool] = []
    oldest = Frame("camera.front", 0, 1_000, np.zeros((4, 4, 3), np.uint8))
    weakref.finalize(oldest.image, lambda: held_at_release.append(
        any(lock.locked() for lock in locks)))
    buffer.push(oldest)
    del oldest
    for seq in (1, 2):
        buffer.push(Frame("camera.front", seq, 1_000 + seq, np.zeros((4, 4, 3), np.uint8)))
    assert held_at_release == [False]
    assert buffer.stats["camera.front"].evicted == 1


# -- input from any source is bounded ----------------------------------------------------------

def received(samples: list, at_ns: int) -> list:
    for sample in samples:
        sample.t_receive_ns = at_ns
    return samples


def test_samples_stamped_past_the_future_bound_are_refused_and_the_stream_goes_on():
    buf = buffer()
    now_ns = 1_000 * MS
    day_ns = 86_400 * 1_000 * MS
    # More far-future samples than the ring holds, from a source on the same stream.
    for sample in received(joints(520, t0=now_ns + day_ns), now_ns):
        assert not buf.push(sample)
    good = received(joints(600, t0=now_ns), now_ns)
    for sample in good:
        sample.t_receive_ns = sample.t_capture_ns + 1 * MS
        assert buf.push(sample)
    stats = buf.stats["joints.arm"]
    assert stats.too_new == 520 and stats.too_old == 0
    window = buf.window(good[-10].t_capture_ns, (JointsInput("joints.arm"),))
    assert window.mask["joints.arm"]


def test_the_future_bound_is_the_buffers_own_and_unstamped_messages_pass():
    buf = AlignmentBuffer({"joints.arm": 8}, max_future_ns=10 * MS)
    early, late = joints(2, t0=1_000 * MS)
    early.t_receive_ns = early.t_capture_ns - 10 * MS  # exactly at the bound: kept
    late.t_receive_ns = late.t_capture_ns - 10 * MS - 1
    assert buf.push(early) and not buf.push(late)
    (made_here,) = joints(1, t0=5_000 * MS)  # never received: made in this process
    assert buf.push(made_here)
    assert buf.stats["joints.arm"].too_new == 1


def test_a_jump_in_seq_is_one_restart_not_a_flood_of_gaps():
    buf = buffer()
    samples = joints(6)
    samples[2].seq = 2**63 - 1  # a bogus sender between two good ones
    for sample in samples:
        buf.push(sample)
    stats = buf.stats["joints.arm"]
    # There and back: two restarts; the good samples' count goes on from their own seq.
    assert stats.seq.restarts == 2 and stats.seq.gaps == 0 and stats.seq.last == 5
    more = joints(9)[7:]  # seqs 7, 8: one lost upstream
    for sample in more:
        buf.push(sample)
    assert stats.seq.gaps == 1 and stats.seq.restarts == 2


def test_a_respawned_sender_counting_from_zero_is_a_restart_and_its_losses_count_at_once():
    buf = buffer()
    first_run = joints(6)
    second_run = joints(4, t0=first_run[-1].t_capture_ns + 100 * MS)  # seq 0 to 3 again
    del second_run[2]  # seq 2 lost upstream
    for sample in first_run + second_run:
        buf.push(sample)
    stats = buf.stats["joints.arm"]
    assert stats.seq.restarts == 1 and stats.seq.gaps == 1 and stats.seq.last == 3


def test_stream_summary_is_every_counter_by_its_health_name():
    buf = AlignmentBuffer({"joints.arm": 8}, max_future_ns=10 * MS)
    samples = received(joints(20, t0=1_000 * MS), 1_000 * MS + 200 * MS)
    del samples[5:8]  # three lost upstream
    for sample in samples:
        buf.push(sample)
    buf.push(samples[-1])  # delivered again, twice
    buf.push(samples[-1])
    (late,) = received(joints(1, t0=1_000 * MS), 1_200 * MS)
    late.seq = 20
    buf.push(late)  # older than everything kept
    restarted = received(joints(5, t0=1_300 * MS), 1_400 * MS)  # a sender counting from 0
    for sample in restarted:
        buf.push(sample)
    (ahead,) = received(joints(1, t0=5_000 * MS), 1_000 * MS)
    ahead.seq = 5  # refused before its seq is counted: last_seq stays 4
    buf.push(ahead)  # stamped past the future bound, four times
    for _ in range(3):
        buf.push(ahead)
    # Every push is received, the refused ones too; only kept samples are evicted.
    assert buf.stats["joints.arm"].summary() == {
        "received": 29, "evicted": 14, "duplicates": 2, "too_old": 1, "too_new": 4,
        "seq_gaps": 3, "seq_restarts": 1, "last_seq": 4,
        "last_capture_ns": restarted[-1].t_capture_ns}


def test_a_missing_joint_stream_names_its_age_and_limit_in_ms():
    buf = buffer()
    for sample in joints(10):  # newest at 1.045 s
        buf.push(sample)
    window = buf.window(1_045 * MS + 31_250_000, (JointsInput("joints.arm", tolerance_ns=20 * MS),))
    assert window.missing["joints.arm"] == "newest joint state is 31.2 ms old (limit 20.0 ms)"
