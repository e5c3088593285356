import threading

import numpy as np

from engines.onnxruntime_backend import OnnxRuntimeEngine
from fusion_node.alignment import AlignmentBuffer
from fusion_node.bindings import SpeechBinding
from fusion_node.clock import ReplayClock
from fusion_node.node import model_path
from fusion_node.protocol import AudioChunk, Health, Prediction, decode
from fusion_node.scheduling import DeadlinePublisher, EngineRunner, TickGrid

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