import logging
import threading
from collections.abc import Callable

import numpy as np
import pytest

from engines.onnxruntime_backend import OnnxRuntimeEngine
from fusion_node.alignment import AlignmentBuffer
from fusion_node.bindings import ActionBinding, SpeechBinding
from fusion_node.clock import ReplayClock
from fusion_node.errors import EngineError
from fusion_node.node import model_path
from fusion_node.protocol import AudioChunk, Health, JointState, Prediction, decode
from fusion_node.scheduling import (
    DeadlinePublisher,
    EngineRunner,
    EngineStats,
    LatencyStats,
    TickGrid,
)

MS = 1_000_000


def prediction(seq: int, deadline_ns: int) -> Prediction:
    return Prediction("pred.test", seq, deadline_ns - 10 * MS, deadline_ns, "test", "h", {},
                      {}, {"x": np.arange(3, dtype=np.float32)}, {})


def test_tick_grid_is_absolute_and_exact():
    grid = TickGrid(30)
    assert [grid.t_ref_ns(k) for k in range(4)] == [0, 33_333_333, 66_666_666, 100_000_000]
    assert grid.t_ref_ns(30 * 3600) == 3600 * 1_000_000_000  # no drift after an hour
    k = grid.first_at_or_after(100_000_001)
    assert grid.t_ref_ns(k) == 133_333_333


def test_publisher_sends_in_deadline_order_at_the_deadline():
    clock = ReplayClock(0)
    sent: list[tuple[int, object]] = []
    publisher = DeadlinePublisher(lambda parts: sent.append((clock.now_ns(), decode(parts))),
                                  clock)
    # A daemon: a failing assertion must not leave the process waiting on it.
    thread = threading.Thread(target=publisher.run_blocking, daemon=True)
    thread.start()
    deadlines = [50 * MS, 20 * MS, 40 * MS, 30 * MS]
    for seq, deadline in enumerate(deadlines):
        publisher.schedule(prediction(seq, deadline), deadline)
    for t in range(0, 60 * MS, MS):
        clock.advance_to(t)
        due = sum(d <= t for d in deadlines)
        for _ in range(1000):  # let the publisher thread catch up with the replay clock
            if len(sent) >= due:
                break
            threading.Event().wait(0.002)
        if any(0 < d - t <= 2 * MS for d in deadlines):
            # A deadline is near: give the publisher thread time to act on this instant
            # too, so a message sent early would be here. (None ever is, however long.)
            threading.Event().wait(0.03)
        # What is due has gone out; nothing whose deadline has not come yet went early.
        assert len(sent) == due
    publisher.stop()
    thread.join(5)
    assert [m.deadline_ns for _, m in sent] == [20 * MS, 30 * MS, 40 * MS, 50 * MS]
    for t_sent, msg in sent:
        assert msg.t_publish_ns == msg.deadline_ns == t_sent
    assert publisher.jitter_ns.summary()["max_ms"] == 0.0


def test_publisher_sends_health_at_once_and_feeds_back_predictions():
    clock = ReplayClock(100 * MS)
    sent: list = []
    published: list = []
    publisher = DeadlinePublisher(lambda parts: sent.append(decode(parts)), clock,
                                  on_published=published.append)
    thread = threading.Thread(target=publisher.run_blocking, daemon=True)
    thread.start()
    publisher.schedule(Health("node.health", 0, clock.now_ns(), {"ok": True}), clock.now_ns())
    publisher.schedule(prediction(0, 105 * MS), 105 * MS)
    clock.advance_to(110 * MS)
    publisher.stop()
    thread.join(5)
    assert [type(m).__name__ for m in sent] == ["Health", "Prediction"]
    assert [p.seq for p in published] == [0]


class QueuingPublisher(DeadlinePublisher):
    """Keeps what the runners schedule, in order, instead of sending it."""

    def __init__(self, clock: ReplayClock) -> None:
        super().__init__(lambda parts: None, clock)
        self.queued: list[Prediction] = []

    def schedule(self, msg, deadline_ns):
        self.queued.append(msg)


def speech_runner(clock: ReplayClock, publisher: DeadlinePublisher,
                  buffer: AlignmentBuffer) -> EngineRunner:
    engine = OnnxRuntimeEngine(model_path("speech"), name="speech")
    binding = SpeechBinding("audio.mic0", "camera.front", (256, 272, 128, 96))
    return EngineRunner(name="speech", topic="pred.speech", engine=engine, binding=binding,
                        rate_hz=30, latency_ns=40 * MS, align_delay_ns=16 * MS, clock=clock,
                        buffer=buffer, sink=publisher)


def audio_buffer() -> AlignmentBuffer:
    buffer = AlignmentBuffer({"audio.mic0": 256, "camera.front": 8})
    rng = np.random.default_rng(0)
    for k in range(150):
        samples = rng.integers(-3000, 3000, (160, 1)).astype(np.int16)
        buffer.push(AudioChunk("audio.mic0", k, 1_000 * MS + k * 10 * MS, 16_000, k * 160,
                               samples))
    return buffer


def test_prediction_ready_after_its_deadline_is_flagged_late():
    clock = ReplayClock(0)
    queued: list = []

    class Recorder(DeadlinePublisher):
        def schedule(self, msg, deadline_ns):
            queued.append((msg, deadline_ns))

    runner = speech_runner(clock, Recorder(lambda parts: None, clock), audio_buffer())
    t_ref = 2_000 * MS
    clock.advance_to(t_ref + 16 * MS)
    on_time = runner.tick(t_ref)
    assert on_time is not None and not on_time.late
    clock.advance_to(t_ref + 100 * MS)  # inference "took" past the 40 ms deadline
    late = runner.tick(t_ref + 33 * MS)
    assert late is not None and late.late
    assert runner.stats.deadline_misses == 1
    assert late.deadline_ns == t_ref + 33 * MS + 40 * MS
    assert late.mask == {"audio.mic0": True, "camera.front": False}


def test_same_window_gives_identical_prediction():
    clock = ReplayClock(3_000 * MS)
    publisher = QueuingPublisher(clock)
    buffer = audio_buffer()
    a = speech_runner(clock, publisher, buffer)
    b = speech_runner(clock, publisher, buffer)
    for runner in (a, b):
        runner.tick(2_000 * MS)
    first, second = publisher.queued
    for name in first.arrays:
        assert first.arrays[name].tobytes() == second.arrays[name].tobytes()
    assert first.fields == second.fields


def test_missing_required_stream_publishes_nothing_and_says_why():
    clock = ReplayClock(10_000 * MS)
    runner = speech_runner(clock, DeadlinePublisher(lambda parts: None, clock), audio_buffer())
    assert runner.tick(9_000 * MS) is None
    assert runner.stats.missing_required == 1
    assert "audio.mic0" in runner.stats.last_missing


def test_rehearsal_infers_once_and_publishes_counts_and_changes_nothing():
    clock = ReplayClock(2_016 * MS)
    publisher = QueuingPublisher(clock)
    buffer = audio_buffer()
    runner = speech_runner(clock, publisher, buffer)
    calls = []
    infer = runner.engine.infer
    runner.engine.infer = lambda feeds: calls.append(feeds) or infer(feeds)
    binding_before = vars(runner.binding).copy()

    runner.rehearse()

    assert runner.rehearsed.is_set()
    assert len(calls) == 1
    assert publisher.queued == [] and runner.stats.ticks == 0 and runner.stats.published == 0
    assert all(vars(runner.binding)[k] is v for k, v in binding_before.items())
    # The tick after it is the same as a tick with no rehearsal before it.
    fresh = speech_runner(clock, publisher, buffer)
    runner.tick(2_000 * MS)
    fresh.tick(2_000 * MS)
    rehearsed, unrehearsed = publisher.queued
    assert rehearsed.fields == unrehearsed.fields
    for name in rehearsed.arrays:
        assert rehearsed.arrays[name].tobytes() == unrehearsed.arrays[name].tobytes()


def test_a_failed_rehearsal_still_lets_the_runner_start():
    clock = ReplayClock(2_000 * MS)  # the audio buffer holds 1.0-2.5 s: inference is reached
    publisher = QueuingPublisher(clock)
    runner = speech_runner(clock, publisher, audio_buffer())
    working = runner.engine.infer
    calls = []

    def broken(feeds):
        calls.append(feeds)
        raise RuntimeError("backend not ready")

    runner.engine.infer = broken
    runner.rehearse()  # logged, not raised
    assert len(calls) == 1 and runner.rehearsed.is_set()
    assert runner.stats.errors == 0 and publisher.queued == []  # a rehearsal counts nothing
    runner.engine.infer = working
    runner.tick(2_000 * MS)  # and the first real tick goes ahead
    assert runner.stats.published == 1 and len(publisher.queued) == 1

def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Whether `condition` became true within `timeout_s` (a thread catching up)."""
    waiter = threading.Event()
    for _ in range(int(timeout_s / 0.002)):
        if condition():
            return True
        waiter.wait(0.002)
    return condition()


def settle() -> None:
    """Give another thread time to act on the present instant, so a step taken too early
    would show. (The code under test never takes one, however long this is.)"""
    threading.Event().wait(0.1)


def scheduling_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "fusion_node.scheduling"]


def test_latency_summary_is_count_percentiles_and_max_in_ms_to_four_places():
    stats = LatencyStats()
    assert stats.summary() == {"count": 0}
    for value_ns in (2_000_000, 1_000_000, 40_987_654, 3_123_456, 10_000_000):
        stats.add(value_ns)
    # p99 interpolates between the two largest values: it is not the maximum.
    assert stats.summary() == {"count": 5, "p50_ms": 3.1235, "p99_ms": 39.7481,
                               "max_ms": 40.9877}


def test_latency_summary_keeps_only_the_most_recent_values():
    stats = LatencyStats(size=2)
    for value_ns in (90_000_000, 1_000_000, 3_000_000):
        stats.add(value_ns)
    assert stats.summary() == {"count": 2, "p50_ms": 2.0, "p99_ms": 2.98, "max_ms": 3.0}


def test_engine_stats_summary_names_every_counter_and_latency():
    stats = EngineStats(ticks=9, published=5, missing_required=1, last_missing="audio: gap",
                        deadline_misses=2, skipped_ticks=3, errors=4, last_error="boom",
                        timeouts=6)
    stats.infer_ns.add(2_500_000)
    assert stats.summary() == {
        "ticks": 9, "published": 5, "missing_required": 1, "last_missing": "audio: gap",
        "deadline_misses": 2, "skipped_ticks": 3, "errors": 4, "last_error": "boom",
        "timeouts": 6, "window": {"count": 0}, "window_cpu": {"count": 0},
        "infer": {"count": 1, "p50_ms": 2.5, "p99_ms": 2.5, "max_ms": 2.5},
        "ready_after_ref": {"count": 0}}


def test_engine_stats_summary_counts_what_ticks_measured():
    clock = ReplayClock(2_016 * MS)
    runner = speech_runner(clock, QueuingPublisher(clock), audio_buffer())
    runner.tick(2_000 * MS)
    clock.advance_to(2_049 * MS + MS // 2)
    runner.tick(2_033 * MS)
    summary = runner.stats.summary()
    assert (summary["ticks"], summary["published"]) == (2, 2)
    # The replay clock stands still during a tick: window and inference take 0 ms on it.
    assert summary["window"] == {"count": 2, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    assert summary["infer"] == {"count": 2, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    assert summary["window_cpu"]["count"] == 2
    assert summary["ready_after_ref"] == {"count": 2, "p50_ms": 16.25, "p99_ms": 16.495,
                                          "max_ms": 16.5}


def test_publisher_counts_what_it_sent_and_reports_the_priority_it_got():
    clock = ReplayClock(100 * MS)
    publisher = DeadlinePublisher(lambda parts: None, clock)
    assert publisher.priority == "default" and publisher.sent == 0  # before it runs
    thread = threading.Thread(target=publisher.run_blocking, daemon=True)
    thread.start()
    publisher.schedule(Health("node.health", 0, clock.now_ns(), {"ok": True}), clock.now_ns())
    for seq, deadline in enumerate((101 * MS, 102 * MS)):
        publisher.schedule(prediction(seq, deadline), deadline)
    clock.advance_to(102 * MS)
    assert wait_for(lambda: publisher.sent >= 3)
    publisher.stop()
    thread.join(5)
    assert publisher.sent == 3
    assert publisher.priority in {"SCHED_FIFO 10", "nice -5", "default"}


def test_stopped_publisher_sends_what_is_queued_at_its_deadline_then_returns():
    clock = ReplayClock(100 * MS)
    sent: list[tuple[int, Prediction]] = []
    publisher = DeadlinePublisher(lambda parts: sent.append((clock.now_ns(), decode(parts))),
                                  clock)
    thread = threading.Thread(target=publisher.run_blocking, daemon=True)
    thread.start()
    publisher.schedule(prediction(0, 130 * MS), 130 * MS)
    publisher.stop()
    clock.advance_to(130 * MS - 1)
    settle()
    assert sent == [] and thread.is_alive()  # never early, even when stopping
    clock.advance_to(130 * MS)
    thread.join(5)
    assert not thread.is_alive()
    assert [(t, m.seq) for t, m in sent] == [(130 * MS, 0)]


def test_stopped_idle_publisher_returns():
    clock = ReplayClock(0)
    publisher = DeadlinePublisher(lambda parts: None, clock)
    thread = threading.Thread(target=publisher.run_blocking, daemon=True)
    thread.start()
    publisher.stop()
    thread.join(5)
    assert not thread.is_alive() and publisher.sent == 0


def test_message_within_the_wake_margin_of_its_deadline_is_committed_to():
    deadline = 200 * MS
    clock = ReplayClock(deadline - 1 * MS)  # exactly the publisher's wake margin before it
    sent: list[tuple[int, Prediction]] = []
    publisher = DeadlinePublisher(lambda parts: sent.append((clock.now_ns(), decode(parts))),
                                  clock)
    thread = threading.Thread(target=publisher.run_blocking, daemon=True)
    thread.start()
    publisher.schedule(prediction(0, deadline), deadline)
    # Taken off the queue: the publisher now sleeps until that deadline.
    assert wait_for(lambda: not publisher._queue)
    publisher.schedule(prediction(1, deadline - 1 * MS), deadline - 1 * MS)
    settle()
    assert sent == []  # the later arrival, though due, waits its turn
    clock.advance_to(deadline)
    assert wait_for(lambda: len(sent) == 2)
    publisher.stop()
    thread.join(5)
    assert [(t, m.seq) for t, m in sent] == [(deadline, 0), (deadline, 1)]
    assert publisher.jitter_ns.summary()["max_ms"] == 1.0


def test_hang_status_reports_the_running_inference_against_its_timeout():
    clock = ReplayClock(2_016 * MS)
    runner = speech_runner(clock, QueuingPublisher(clock), audio_buffer())
    idle = {"inferring_ms": 0.0, "hung": False, "infer_timeout_ms": 1000.0}
    assert runner.hang_status(clock.now_ns()) == idle
    during = []
    infer = runner.engine.infer

    def observed(feeds):
        started = clock.now_ns()
        for running_ns in (1_234_551_000, 1_000 * MS, 1_000 * MS + 1):
            during.append(runner.hang_status(started + running_ns))
        return infer(feeds)

    runner.engine.infer = observed
    assert runner.tick(2_000 * MS) is not None
    assert during == [
        {"inferring_ms": 1234.6, "hung": True, "infer_timeout_ms": 1000.0},
        {"inferring_ms": 1000.0, "hung": False, "infer_timeout_ms": 1000.0},  # at the limit
        {"inferring_ms": 1000.0, "hung": True, "infer_timeout_ms": 1000.0}]
    assert runner.hang_status(clock.now_ns() + 5_000 * MS) == idle  # returned: none running


def test_rehearsal_of_a_good_window_logs_no_failure(caplog):
    caplog.set_level(logging.INFO, logger="fusion_node.scheduling")
    clock = ReplayClock(2_016 * MS)
    runner = speech_runner(clock, QueuingPublisher(clock), audio_buffer())
    runner.rehearse()
    assert runner.rehearsed.is_set() and scheduling_records(caplog) == []


def action_runner(clock: ReplayClock, publisher: DeadlinePublisher,
                  buffer: AlignmentBuffer) -> EngineRunner:
    engine = OnnxRuntimeEngine(model_path("action"), name="action")
    binding = ActionBinding("camera.front", "joints.arm", "pred.speech", 0)
    return EngineRunner(name="action", topic="pred.action", engine=engine, binding=binding,
                        rate_hz=50, latency_ns=30 * MS, align_delay_ns=10 * MS, clock=clock,
                        buffer=buffer, sink=publisher)


def command_buffer() -> AlignmentBuffer:
    """Joint states 1.0-2.0 s, and a speech prediction at 1.99 s sure of one command."""
    buffer = AlignmentBuffer({"camera.front": 8, "joints.arm": 512, "pred.speech": 4})
    names = ("a", "b", "c")
    for k in range(200):
        position = np.full(3, k / 200)
        buffer.push(JointState("joints.arm", k, 1_000 * MS + k * 5 * MS, names, position,
                               np.ones(3), np.zeros(3)))
    posterior = np.full(17, 0.01, np.float32)
    posterior[3] = 1 - 0.01 * 16
    buffer.push(Prediction("pred.speech", 0, 1_990 * MS, 2_030 * MS, "speech", "h", {}, {},
                           {"command_posterior": posterior}, {}))
    return buffer


def test_rehearsal_leaves_a_latched_command_untouched(caplog):
    caplog.set_level(logging.INFO, logger="fusion_node.scheduling")
    clock = ReplayClock(2_000 * MS)
    publisher = QueuingPublisher(clock)
    buffer = command_buffer()
    runner = action_runner(clock, publisher, buffer)
    runner.rehearse()
    assert scheduling_records(caplog) == []  # decoding (which reads the window) succeeded
    fresh = action_runner(clock, publisher, buffer)
    runner.tick(1_995 * MS)
    fresh.tick(1_995 * MS)
    # One confident posterior does not latch a command, two in a row do: had the rehearsal
    # fed it to the runner's own latch, the real tick would have latched it.
    assert runner.binding.latch.command == 0
    rehearsed, unrehearsed = publisher.queued
    for name in rehearsed.arrays:
        assert rehearsed.arrays[name].tobytes() == unrehearsed.arrays[name].tobytes()


def test_failed_rehearsal_logs_the_engine_and_the_error(caplog):
    caplog.set_level(logging.INFO, logger="fusion_node.scheduling")
    clock = ReplayClock(2_000 * MS)
    runner = speech_runner(clock, QueuingPublisher(clock), audio_buffer())

    def broken(feeds):
        raise RuntimeError("backend not ready")

    runner.engine.infer = broken
    runner.rehearse()
    assert [(r.levelname, r.getMessage()) for r in scheduling_records(caplog)] == [
        ("INFO", ("engine speech: rehearsal tick failed (backend not ready); its first "
                  "tick pays the one-off costs"))]


def test_runner_starts_at_start_ns_and_skips_ticks_it_cannot_finish_in_time():
    # A whole latency behind after its first tick: t_ref 2100 ms, at 2273.33 ms, when the
    # deadline of t_ref 2233.33 ms (2273.33 ms) can still just be met.
    clock = ReplayClock(2_273_333_333)
    publisher = QueuingPublisher(clock)
    runner = speech_runner(clock, publisher, audio_buffer())
    thread = threading.Thread(target=runner.run_blocking, args=(2_100 * MS,), daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: len(publisher.queued) >= 2)
        assert runner.stats.skipped_ticks == 3  # t_ref 2133.33, 2166.67 and 2200 ms
        assert [p.t_ref_ns for p in publisher.queued] == [2_100_000_000, 2_233_333_333]
        assert [p.late for p in publisher.queued] == [True, False]
        # The next tick cuts its window at t_ref + align delay, not a nanosecond before.
        clock.advance_to(2_282_666_666 - 1)
        settle()
        assert len(publisher.queued) == 2
        clock.advance_to(2_282_666_666)
        assert wait_for(lambda: len(publisher.queued) >= 3)
        assert publisher.queued[2].t_ref_ns == 2_266_666_666
        assert publisher.queued[2].trace["t_window_start_ns"] == 2_282_666_666
        assert runner.stats.ticks == 3 and runner.stats.skipped_ticks == 3
        assert runner.priority in {"SCHED_FIFO 5", "nice -5", "default"}
    finally:
        runner.stop()
        clock.close()
        thread.join(5)
    assert not thread.is_alive()


def test_engine_error_is_counted_with_its_message_and_logged_without_traceback(caplog):
    caplog.set_level(logging.INFO, logger="fusion_node.scheduling")
    clock = ReplayClock(2_016 * MS)
    publisher = QueuingPublisher(clock)
    runner = speech_runner(clock, publisher, audio_buffer())

    def broken(feeds):
        raise EngineError("model exploded")

    runner.engine.infer = broken
    assert runner.tick(2_000 * MS) is None
    assert runner.tick(2_000 * MS) is None
    assert (runner.stats.errors, runner.stats.last_error) == (2, "model exploded")
    assert publisher.queued == [] and runner.stats.published == 0
    records = scheduling_records(caplog)
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("WARNING", "engine speech at t_ref 2000000000: model exploded")] * 2
    assert [bool(r.exc_info) for r in records] == [False, False]


def test_inference_over_the_timeout_is_discarded_and_counted_as_an_error():
    clock = ReplayClock(2_016 * MS)
    publisher = QueuingPublisher(clock)
    runner = speech_runner(clock, publisher, audio_buffer())
    infer = runner.engine.infer

    def hung(feeds):
        clock.advance_to(clock.now_ns() + 1_000 * MS + 1)
        return infer(feeds)

    runner.engine.infer = hung
    assert runner.tick(2_000 * MS) is None
    assert (runner.stats.timeouts, runner.stats.errors) == (1, 1)
    assert runner.stats.last_error == ("inference took 1000 ms, over the 1000 ms timeout; "
                                       "result discarded")
    assert publisher.queued == []


def test_unexpected_error_is_named_and_its_traceback_logged_once_per_type(caplog):
    caplog.set_level(logging.INFO, logger="fusion_node.scheduling")
    clock = ReplayClock(2_016 * MS)
    runner = speech_runner(clock, QueuingPublisher(clock), audio_buffer())
    errors = [RuntimeError("backend not ready"), RuntimeError("still not ready"),
              ValueError("bad shape")]

    last_raised = []

    def broken(feeds):
        last_raised.append(errors.pop(0))
        raise last_raised[-1]

    runner.engine.infer = broken
    last_errors = []
    for _ in range(3):
        runner.tick(2_000 * MS)
        last_errors.append(runner.stats.last_error)
    assert last_errors == ["RuntimeError: backend not ready", "RuntimeError: still not ready",
                           "ValueError: bad shape"]
    assert runner.stats.errors == 3
    records = scheduling_records(caplog)
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("WARNING", f"engine speech at t_ref 2000000000: {text}") for text in last_errors]
    # The traceback of the first error of each type only: a repeating error would flood.
    assert [bool(r.exc_info) for r in records] == [True, False, True]
    assert [records[0].exc_info[1], records[2].exc_info[1]] == [last_raised[0], last_raised[2]]
