"""Replay: a fresh recording of the live node verifies against itself, differences are named,
replays are deterministic, and the timed publisher follows the log's clock."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from mcap.reader import make_reader
from mcap.writer import Writer

from fusion_node.alignment import AlignmentBuffer
from fusion_node.cli import main
from fusion_node.clock import ReplayClock
from fusion_node.config import DEFAULT_MAX_FUTURE_NS, RecordConfig, load_config
from fusion_node.errors import ReplayError
from fusion_node.logs.inspect import log_info
from fusion_node.logs.mcap_format import RECORDING_METADATA, LogReader, frame_parts, unframe
from fusion_node.logs.replay import (
    compare_logs,
    compare_predictions,
    config_from_log,
    publish_log,
    replay_config,
    replay_through_node,
)
from fusion_node.node import Node, build_engine_runners
from fusion_node.protocol import Message, Prediction, decode, encode
from fusion_node.scheduling import EngineRunner

SAMPLE = str(Path(__file__).parents[1] / "data" / "sample.mcap")

def _default_rates_hz() -> dict[str, float]:
    """Each topic's rate as the embedded default declares it."""
    config = load_config()
    drivers = {d.stream: d.config for d in config.drivers}
    return {"camera.front": drivers["camera.front"]["fps"],
            "audio.mic0": 1000 / drivers["audio.mic0"]["chunk_ms"],
            "joints.arm": 200,  # the simulated arm's joint-state rate, not in the launch file
            "camera.scene": drivers["joints.arm"]["camera_fps"],
            **{engine.topic: engine.rate_hz for engine in config.engines}}


EXPECTED_HZ = _default_rates_hz()


@pytest.fixture(scope="module")
def live_log(tmp_path_factory) -> str:
    """About 3 s of the embedded default, recorded by the node itself."""
    path = str(tmp_path_factory.mktemp("live") / "live.mcap")
    config = dataclasses.replace(load_config(), pub="tcp://127.0.0.1:*",
                                 record=RecordConfig(path))

    async def run() -> None:
        node = Node(config)
        stop = asyncio.Event()
        task = asyncio.create_task(node.run(stop))
        await asyncio.wait_for(node.ready.wait(), 30)
        await asyncio.sleep(3.0)
        stop.set()
        await asyncio.wait_for(task, 30)

    asyncio.run(run())
    return path


def copy_log(src: str, dst: str, data_of: Callable[[str, bytes], bytes | None]) -> None:
    """Copy a log, with each message's data replaced by `data_of(topic, data)`; None
    leaves the message out, and a channel whose every message is left out stays declared."""
    with open(src, "rb") as file, open(dst, "wb") as out:
        reader = make_reader(file)
        summary = reader.get_summary()
        assert summary is not None
        writer = Writer(out)
        writer.start()
        schemas = {i: writer.register_schema(s.name, s.encoding, s.data)
                   for i, s in summary.schemas.items()}
        channels = {i: writer.register_channel(c.topic, c.message_encoding,
                                               schemas.get(c.schema_id, 0), c.metadata)
                    for i, c in summary.channels.items()}
        for metadata in reader.iter_metadata():
            writer.add_metadata(metadata.name, metadata.metadata)
        for _, channel, message in reader.iter_messages(log_time_order=False):
            data = data_of(channel.topic, message.data)
            if data is not None:
                writer.add_message(channels[channel.id], message.log_time, data,
                                   message.publish_time, message.sequence)
        writer.finish()


def rewrite(src: str, dst: str, topic: str, change: Callable[[Prediction], None],
            drop: tuple[str, ...] = ()) -> None:
    """Copy a log without the messages of the topics in `drop`, applying `change` to every
    prediction on `topic`."""
    def data_of(channel_topic: str, data: bytes) -> bytes | None:
        if channel_topic in drop:
            return None
        if channel_topic != topic:
            return data
        prediction = decode(unframe(data))
        assert isinstance(prediction, Prediction)
        prediction.arrays = {k: v.copy() for k, v in prediction.arrays.items()}
        change(prediction)
        return frame_parts(encode(prediction))

    copy_log(src, dst, data_of)


def test_live_recording_holds_every_topic_at_its_rate_without_gaps(live_log):
    info = log_info(live_log)
    assert info["complete"] and info["error"] is None
    topics = info["topics"]
    for topic, rate_hz in EXPECTED_HZ.items():
        if not topic.startswith("pred."):
            assert topics[topic]["rate_hz"] == pytest.approx(rate_hz, rel=0.01), topic
    # An engine on a loaded machine may skip a tick (counted by the node): every prediction
    # is still on its rate's grid, and few slots are empty.
    with LogReader(live_log) as reader:
        for topic in ("pred.speech", "pred.action"):
            t_refs = sorted(m.decode(live_log).t_ref_ns for m in reader.messages([topic]))
            period_ns = 1e9 / EXPECTED_HZ[topic]
            slots = np.diff(t_refs) / period_ns
            assert np.allclose(slots, np.round(slots), atol=1e-3), topic  # ns rounding
            assert np.round(slots).min() >= 1, topic
            assert np.round(slots).sum() - len(slots) <= 0.05 * len(slots), topic
    assert topics["node.health"]["count"] >= 2
    for topic, stats in topics.items():
        assert (stats["gaps"], stats["restarts"]) == (0, 0), topic
    assert topics["audio.mic0"]["lost_samples"] == 0
    assert info["undecodable"] == {} and info["recorder_dropped"] == {}
    assert set(info["other_channels"]) == {"preview/camera.front", "preview/camera.scene",
                                           "preview/audio.mic0", "node.window_cuts"}
    # Every protocol message in the file decoded (log_info decodes each one).
    with LogReader(live_log) as reader:
        assert sum(1 for _ in reader.messages()) == info["messages"]


def test_verify_passes_on_the_untouched_log(live_log):
    config, source = replay_config(live_log, None)
    assert source == "the log's launch config"
    result = replay_through_node(live_log, config, verify=True)
    assert result.difference is None
    topics = log_info(live_log)["topics"]
    assert result.compared == topics["pred.speech"]["count"] + topics["pred.action"]["count"]


def test_the_shipped_sample_log_verifies_against_the_shipped_models():
    """The golden log: recorded by an earlier version of the node, replayed by this one. A
    bug shared by today's recorder and replay cannot hide here."""
    config, _ = replay_config(SAMPLE, None)
    # Recorded on another machine: ONNX Runtime picks its kernels by instruction set, so the
    # last bits of a float may differ (3e-9 seen); commands and masks must still be equal.
    result = replay_through_node(SAMPLE, config, verify=True, tolerance=1e-6)
    assert result.difference is None, (
        f"{result.difference}; if the models or the log format changed on purpose, "
        "regenerate the sample as tests/data/README.md says")
    topics = log_info(SAMPLE)["topics"]
    assert result.compared == topics["pred.speech"]["count"] + topics["pred.action"]["count"]
    assert result.compared > 250


def test_verify_reports_a_different_model_hash(live_log, tmp_path, capsys):
    changed = str(tmp_path / "other_model.mcap")
    rewrite(live_log, changed, "pred.speech",
            lambda p: setattr(p, "model_hash", "0123456789abcdef"))
    config, _ = replay_config(changed, None)
    result = replay_through_node(changed, config, verify=True)
    assert result.difference is not None
    assert result.difference.startswith("pred.speech: model hash differs")
    assert "0123456789abcdef" in result.difference

    assert main(["--log-level", "WARNING", "replay", changed, "--verify"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("fusion-node: error: verify failed")
    assert "model hash differs" in error[0]


def test_verify_names_the_first_changed_value(live_log, tmp_path):
    with LogReader(live_log) as reader:
        t_refs = [m.decode(live_log).t_ref_ns for m in reader.messages(["pred.action"])]
    target = t_refs[5]

    def nudge(prediction: Prediction) -> None:
        if prediction.t_ref_ns == target:
            prediction.arrays["actions"][2, 1] += 0.5

    changed = str(tmp_path / "nudged.mcap")
    rewrite(live_log, changed, "pred.action", nudge)
    config, _ = replay_config(changed, None)
    result = replay_through_node(changed, config, verify=True)
    assert result.difference is not None
    assert result.difference.startswith(f"pred.action at t_ref {target}: array 'actions' "
                                        "differs at [2, 1]")
    assert "1 of 60 elements differ, max by 0.5" in result.difference
    # A tolerance forgives the last bits of a float, never a real change.
    assert replay_through_node(changed, config, verify=True,
                               tolerance=0.1).difference == result.difference
    assert replay_through_node(changed, config, verify=True, tolerance=0.5).difference is None


def test_verify_tolerance_covers_float_fields_only(live_log, tmp_path, capsys):
    with LogReader(live_log) as reader:
        first = next(m.decode(live_log) for m in reader.messages(["pred.speech"]))
    field = next(k for k, v in first.fields.items() if isinstance(v, float))

    def nudge(prediction: Prediction) -> None:
        if prediction.t_ref_ns == first.t_ref_ns:
            prediction.fields[field] += 1e-7

    changed = str(tmp_path / "last_bits.mcap")
    rewrite(live_log, changed, "pred.speech", nudge)
    assert main(["--log-level", "WARNING", "replay", changed, "--verify"]) == 1
    assert f"field {field!r} differs" in capsys.readouterr().err
    assert main(["--log-level", "WARNING", "replay", changed, "--verify",
                 "--tolerance", "1e-6"]) == 0
    capsys.readouterr()
    with pytest.raises(ReplayError, match="tolerance -1.0"):
        replay_through_node(changed, replay_config(changed, None)[0], verify=True,
                            tolerance=-1.0)


@pytest.mark.parametrize("timing", ["log", "schedule"])
def test_two_replays_give_byte_identical_predictions(tmp_path, timing):
    config = load_config()
    outputs = []
    for run in range(2):
        out = str(tmp_path / f"run{run}.mcap")
        result = replay_through_node(SAMPLE, config, out_path=out, timing=timing)
        assert result.predictions["pred.speech"] > 100 and result.predictions["pred.action"] > 80
        with LogReader(out) as reader:
            outputs.append([(m.topic, m.log_time_ns, m.data) for m in reader.messages()])
    assert outputs[0] == outputs[1]
    assert sum(result.predictions.values()) == len(outputs[0])


def test_the_log_stores_the_config_it_ran():
    with LogReader(SAMPLE) as reader:
        config = config_from_log(SAMPLE, reader.metadata())
    assert config is not None
    # The embedded default the sample was recorded from, with the arm's scene camera.
    assert set(config.capacities()) == {"camera.front", "camera.scene", "audio.mic0",
                                        "joints.arm", "pred.speech", "pred.action"}
    assert [e.name for e in config.engines] == ["speech", "action"]


class FakeClock:
    def __init__(self) -> None:
        self.sleeps: list[int] = []

    def now_ns(self) -> int:
        return 1_000

    def sleep_until(self, t_ns: int) -> None:
        self.sleeps.append(t_ns)


def test_timed_replay_follows_the_log_clock_scaled_by_rate():
    with LogReader(SAMPLE) as reader:
        times = [m.log_time_ns for m in reader.messages(["pred.speech", "pred.action"])]
    clock = FakeClock()
    sent: list = []
    stats = publish_log(SAMPLE, sent.append, clock, rate=2.0, topics=["pred."])
    assert clock.sleeps == [1_000 + round((t - times[0]) / 2) for t in times]
    assert stats.messages == len(sent) == len(times) and stats.passes == 1
    assert all(isinstance(decode(parts), Prediction) for parts in sent)

    clock = FakeClock()
    stop = threading.Event()

    def send(parts: list) -> None:
        sent.append(parts)
        if len(sent) >= 3 * len(times):
            stop.set()

    sent.clear()
    stats = publish_log(SAMPLE, send, clock, fast=True, loop=True, topics=["pred."], stop=stop)
    assert clock.sleeps == [] and stats.passes == 3 and stats.messages == 3 * len(times)


def test_timed_replay_publishes_on_a_socket(tmp_path, capsys):
    endpoint = f"ipc://{tmp_path}/replay.ipc"
    assert main(["replay", SAMPLE, "--fast", "--pub", endpoint, "--start-delay", "0",
                 "--topics", "node.health"]) == 0
    health = log_info(SAMPLE)["topics"]["node.health"]["count"]
    assert f'"messages": {health}' in capsys.readouterr().out


def prediction_times() -> list[int]:
    with LogReader(SAMPLE) as reader:
        return [m.log_time_ns for m in reader.messages(["pred.speech", "pred.action"])]


def test_timed_replay_runs_at_the_log_rate_by_default():
    times = prediction_times()
    clock = FakeClock()
    stats = publish_log(SAMPLE, lambda parts: None, clock, topics=["pred."])
    assert clock.sleeps == [1_000 + t - times[0] for t in times]
    assert stats.log_duration_ns == times[-1] - times[0]


def test_timed_replay_takes_any_positive_rate():
    times = prediction_times()
    clock = FakeClock()
    publish_log(SAMPLE, lambda parts: None, clock, rate=0.5, topics=["pred."])
    assert clock.sleeps == [1_000 + 2 * (t - times[0]) for t in times]


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan")])
def test_timed_replay_refuses_a_rate_that_is_not_positive(rate):
    with pytest.raises(ReplayError) as raised:
        publish_log(SAMPLE, lambda parts: None, FakeClock(), rate=rate, topics=["pred."])
    assert str(raised.value) == f"replay rate {rate} must be positive"
    # Back to back, the rate is not used.
    sent: list = []
    stats = publish_log(SAMPLE, sent.append, FakeClock(), rate=rate, fast=True, topics=["pred."])
    assert stats.messages == len(sent) == len(prediction_times())


def test_timed_replay_refuses_topics_the_log_lacks():
    with LogReader(SAMPLE) as reader:
        topics = reader.topics()
    with pytest.raises(ReplayError) as raised:
        publish_log(SAMPLE, lambda parts: None, FakeClock(), topics=["lidar."])
    assert str(raised.value) == f"{SAMPLE}: no topic matches ['lidar.']; the log has {topics}"


def test_timed_replay_stopped_mid_pass_counts_what_it_sent():
    times = prediction_times()
    stop = threading.Event()
    sent: list = []

    def send(parts: list) -> None:
        sent.append(parts)
        if len(sent) == 5:
            stop.set()

    stats = publish_log(SAMPLE, send, FakeClock(), loop=True, topics=["pred."], stop=stop)
    assert (stats.messages, stats.passes) == (5, 1)
    assert stats.log_duration_ns == times[4] - times[0]


def test_timed_replay_sums_the_duration_of_every_pass():
    times = prediction_times()
    stop = threading.Event()
    sent: list = []

    def send(parts: list) -> None:
        sent.append(parts)
        if len(sent) == 3 * len(times):
            stop.set()

    stats = publish_log(SAMPLE, send, FakeClock(), fast=True, loop=True, topics=["pred."],
                        stop=stop)
    assert stats.passes == 3 and stats.log_duration_ns == 3 * (times[-1] - times[0])


def test_timed_replay_names_the_log_of_a_corrupt_message(tmp_path):
    corrupt = str(tmp_path / "corrupt.mcap")
    written: list[str] = []

    def first_prediction_corrupt(topic: str, data: bytes) -> bytes | None:
        if topic != "pred.speech" or written:
            return None
        written.append(topic)
        return b"\x01"

    copy_log(SAMPLE, corrupt, first_prediction_corrupt)
    with pytest.raises(ReplayError) as raised:
        publish_log(corrupt, lambda parts: None, FakeClock(), fast=True)
    assert str(raised.value).startswith(f"{corrupt}: message on 'pred.speech' at log time ")
    assert str(raised.value).endswith("message data is 1 bytes, too short for a part count")


def replayed(path: str) -> dict[str, list[Prediction]]:
    with LogReader(path) as reader:
        return {topic: [m.decode(path) for m in reader.messages([topic])]
                for topic in ("pred.speech", "pred.action")}


def test_schedule_timing_ticks_at_t_ref_plus_align_delay_and_delivers_at_deadline(tmp_path):
    config, _ = replay_config(SAMPLE, None)
    align_ns = {e.topic: e.align_delay_ns for e in config.engines}
    out = str(tmp_path / "scheduled.mcap")
    replay_through_node(SAMPLE, config, out_path=out, timing="schedule")
    for topic, predictions in replayed(out).items():
        assert len(predictions) > 100, topic
        for p in predictions:
            assert p.trace["t_window_start_ns"] == p.t_ref_ns + align_ns[topic], topic
            assert p.t_publish_ns == p.deadline_ns, topic


def test_log_timing_without_window_cuts_ticks_when_the_traces_say(tmp_path):
    """A log recorded from sockets has no node.window_cuts: each window is cut when the
    recorded prediction's trace says, but never before t_ref + align_delay."""
    config, _ = replay_config(SAMPLE, None)
    align_ns = next(e.align_delay_ns for e in config.engines if e.topic == "pred.speech")
    late_ns = 3_000_000
    with LogReader(SAMPLE) as reader:
        t_refs = sorted(m.decode(SAMPLE).t_ref_ns for m in reader.messages(["pred.speech"]))
    expected: dict[int, int] = {}

    def retrace(prediction: Prediction) -> None:
        t_ref = prediction.t_ref_ns
        scheduled = t_ref + align_ns
        case = t_refs.index(t_ref) % 3
        if case == 0:  # cut late: the trace's time
            prediction.trace["t_window_start_ns"] = expected[t_ref] = scheduled + late_ns
        elif case == 1:  # a trace before the schedule (another clock): the schedule
            prediction.trace["t_window_start_ns"] = t_ref
            expected[t_ref] = scheduled
        else:  # no trace: the schedule
            del prediction.trace["t_window_start_ns"]
            expected[t_ref] = scheduled

    traced = str(tmp_path / "traced.mcap")
    rewrite(SAMPLE, traced, "pred.speech", retrace, drop=("node.window_cuts",))
    out = str(tmp_path / "replayed.mcap")
    replay_through_node(traced, config, out_path=out, timing="log")
    speech = replayed(out)["pred.speech"]
    assert len(speech) == len(t_refs)
    assert {p.t_ref_ns: p.trace["t_window_start_ns"] for p in speech} == expected


def speech_prediction(**changes: object) -> Prediction:
    prediction = Prediction("pred.speech", 0, 1_000, 41_000, "speech", "h", {"audio.mic0": True},
                            {"p_speech": 0.25, "command": "stop", "frames": 3, "speaking": True},
                            {}, {})
    return dataclasses.replace(prediction, **changes)


def test_compare_predictions_names_the_first_difference_with_its_size():
    old = speech_prediction()
    assert compare_predictions(old, speech_prediction()) is None
    assert (compare_predictions(old, speech_prediction(engine="other"))
            == "engine differs: log 'speech', now 'other'")
    assert (compare_predictions(old, speech_prediction(deadline_ns=41_030))
            == "deadline_ns differs: log 41000, now 41030 (by 30)")
    assert (compare_predictions(old, speech_prediction(fields={**old.fields, "frames": 5}))
            == "field 'frames' differs: log 3, now 5 (by 2)")
    # Neither a bool nor a missing value has a size.
    assert (compare_predictions(old, speech_prediction(fields={**old.fields, "speaking": False}))
            == "field 'speaking' differs: log True, now False")
    assert (compare_predictions(old, speech_prediction(fields={"p_speech": 0.25, "frames": 3,
                                                               "speaking": True}))
            == "field 'command' differs: log 'stop', now None")
    no_frames = {k: v for k, v in old.fields.items() if k != "frames"}
    assert (compare_predictions(speech_prediction(fields=no_frames), old)
            == "field 'frames' differs: log None, now 3")


def test_compare_predictions_forgives_float_fields_up_to_the_tolerance_only():
    old = speech_prediction()
    new = speech_prediction(fields={**old.fields, "p_speech": 0.75})
    assert compare_predictions(old, new) == "field 'p_speech' differs: log 0.25, now 0.75 (by 0.5)"
    assert compare_predictions(old, new, tolerance=0.5) is None
    assert compare_predictions(old, new, tolerance=0.4) is not None


def test_compare_predictions_names_a_mask_stream_only_one_side_has():
    old = speech_prediction()
    both = speech_prediction(mask={"audio.mic0": True, "camera.front": False})
    assert (compare_predictions(old, both)
            == "mask['camera.front'] differs: log None, now False")
    assert (compare_predictions(both, old)
            == "mask['camera.front'] differs: log False, now None")


def test_compare_predictions_names_the_side_an_array_is_only_on():
    old = speech_prediction()
    new = speech_prediction(arrays={"logits": np.zeros(2)})
    assert compare_predictions(old, new) == "array 'logits' is only in the replay"
    assert compare_predictions(new, old) == "array 'logits' is only in the log"


def test_compare_predictions_names_an_arrays_dtype_or_shape_change():
    old = speech_prediction(arrays={"logits": np.array([0.5, 1.0])})
    as_float32 = speech_prediction(arrays={"logits": np.array([0.5, 1.0], np.float32)})
    assert (compare_predictions(old, as_float32)
            == "array 'logits' is float64 [2] in the log, float32 [2] now")
    longer = speech_prediction(arrays={"logits": np.array([0.5, 1.0, 1.5])})
    assert (compare_predictions(old, longer)
            == "array 'logits' is float64 [2] in the log, float64 [3] now")


def test_compare_predictions_takes_equal_nans_and_infinities_as_equal():
    values = [np.nan, np.inf, -np.inf, 1.0]
    old = speech_prediction(arrays={"logits": np.array(values)})
    assert compare_predictions(old, speech_prediction(arrays={"logits": np.array(values)})) is None


def test_compare_predictions_names_a_nan_against_a_number():
    old = speech_prediction(arrays={"logits": np.array([np.nan, 1.0])})
    new = speech_prediction(arrays={"logits": np.array([0.5, 1.0])})
    assert compare_predictions(old, new, tolerance=1.0) == (
        "array 'logits' differs at [0]: log np.float64(nan), now np.float64(0.5) "
        "(1 of 2 elements differ, max by nan)")


def test_compare_predictions_names_where_an_int_array_differs_and_by_how_much():
    old = speech_prediction(arrays={"boxes": np.array([[1, 2], [3, 4]])})
    new = speech_prediction(arrays={"boxes": np.array([[1, 2], [3, 9]])})
    assert compare_predictions(old, new) == (
        "array 'boxes' differs at [1, 1]: log np.int64(4), now np.int64(9) "
        "(1 of 4 elements differ, max by 5)")


def test_compare_predictions_looks_past_arrays_that_are_equal_or_within_the_tolerance():
    old = speech_prediction(arrays={"a": np.array([1, 2]), "b": np.array([1.0, 2.0]),
                                    "c": np.array([1.0, 2.0])})
    new = speech_prediction(arrays={"a": np.array([1, 2]), "b": np.array([1.0, 2.05]),
                                    "c": np.array([1.0, 3.0])})
    assert compare_predictions(old, new, tolerance=0.1) == (
        "array 'c' differs at [1]: log np.float64(2.0), now np.float64(3.0) "
        "(1 of 2 elements differ, max by 1)")


def test_compare_predictions_takes_equal_infinities_as_equal_beside_a_real_difference():
    old = speech_prediction(arrays={"x": np.array([np.inf, 1.0])})
    new = speech_prediction(arrays={"x": np.array([np.inf, 2.0])})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # inf - inf is computed, not warned
        assert compare_predictions(old, new) == (
            "array 'x' differs at [1]: log np.float64(1.0), now np.float64(2.0) "
            "(1 of 2 elements differ, max by 1)")


# -- config_from_log and compare_logs, called directly ---------------------------------------

def sample_config_data() -> dict:
    """The launch config stored in the sample log, as the JSON object it is stored as."""
    with LogReader(SAMPLE) as reader:
        return json.loads(reader.metadata()[RECORDING_METADATA]["config"])


def stored(data: dict) -> dict[str, dict[str, str]]:
    return {RECORDING_METADATA: {"config": json.dumps(data)}}


def test_config_from_log_returns_none_for_a_log_without_recording_metadata():
    assert config_from_log("old.mcap", {}) is None
    assert config_from_log("old.mcap", {"other": {"config": "{}"}}) is None


def test_config_from_log_restores_the_stored_pub_periods_and_future_bound():
    data = sample_config_data()
    data.update(pub="tcp://127.0.0.1:6123", health_period_ns=2_000_000_000,
                startup_timeout_ns=7_000_000_000, max_future_ns=123_000_000)
    config = config_from_log("x.mcap", stored(data))
    assert config is not None
    assert config.pub == "tcp://127.0.0.1:6123"
    assert config.run_dir is None
    assert config.health_period_ns == 2_000_000_000
    assert config.startup_timeout_ns == 7_000_000_000
    assert config.max_future_ns == 123_000_000
    assert config.max_future_ns != DEFAULT_MAX_FUTURE_NS


def test_config_from_log_of_an_older_log_defaults_the_future_bound_and_streams():
    data = sample_config_data()
    del data["max_future_ns"], data["streams"]
    config = config_from_log("x.mcap", stored(data))
    assert config is not None
    assert config.max_future_ns == DEFAULT_MAX_FUTURE_NS
    assert config.streams == ()
    assert [e.name for e in config.engines] == ["speech", "action"]


class ListSink:
    """A PredictionSink that keeps what it is given."""

    def __init__(self) -> None:
        self.scheduled: list[tuple[Message, int]] = []

    def schedule(self, msg: Message, deadline_ns: int) -> None:
        self.scheduled.append((msg, deadline_ns))


@pytest.fixture(scope="module")
def runners() -> list[EngineRunner]:
    """The embedded default's engine runners, speech first, then action (never started)."""
    config = load_config()
    built = build_engine_runners(config, ReplayClock(),
                                 AlignmentBuffer(config.capacities(), config.max_future_ns),
                                 ListSink())
    assert [r.topic for r in built] == ["pred.speech", "pred.action"]
    return built


def made_by(runner: EngineRunner, t_ref_ns: int, **changes: object) -> Prediction:
    return speech_prediction(**{"stream": runner.topic, "t_ref_ns": t_ref_ns,
                                "engine": runner.name, "model_hash": runner.engine.model_hash,
                                **changes})


def test_compare_logs_takes_no_tolerance_by_default(runners):
    speech = runners[0]
    recorded = {"pred.speech": {1_000: made_by(speech, 1_000)}}
    replayed = {"pred.speech": {1_000: made_by(speech, 1_000, fields={
        **speech_prediction().fields, "p_speech": 0.75})}}
    assert compare_logs(recorded, replayed, {"pred.speech": {1_000}}, runners) == (
        1, "pred.speech at t_ref 1000: field 'p_speech' differs: log 0.25, now 0.75 (by 0.5)")
    assert compare_logs(recorded, replayed, {"pred.speech": {1_000}}, runners,
                        tolerance=0.5) == (1, None)


def test_compare_logs_goes_on_to_the_next_engine_past_one_the_log_lacks(runners):
    action = runners[1]
    recorded = {"pred.action": {1_000: made_by(action, 1_000)}}
    replayed = {"pred.action": {1_000: made_by(action, 1_000, deadline_ns=42_000)}}
    assert compare_logs(recorded, replayed, {"pred.action": {1_000}}, runners) == (
        1, "pred.action at t_ref 1000: deadline_ns differs: log 41000, now 42000 (by 1e+03)")


def test_compare_logs_names_every_model_hash_the_log_holds(runners):
    speech = runners[0]
    recorded = {"pred.speech": {1_000: made_by(speech, 1_000, model_hash="bbb"),
                                2_000: made_by(speech, 2_000, model_hash="aaa")}}
    assert compare_logs(recorded, {}, {"pred.speech": {1_000, 2_000}}, runners) == (
        0, (f"pred.speech: model hash differs: the log's predictions were made by aaa, bbb, "
           f"engine 'speech' now runs {speech.engine.model_hash} (a different model file)"))


def test_compare_logs_names_a_recorded_prediction_the_replay_did_not_make(runners):
    speech = runners[0]
    recorded = {"pred.speech": {1_000: made_by(speech, 1_000), 2_000: made_by(speech, 2_000)}}
    assert speech.stats.last_missing == ""
    assert compare_logs(recorded, {}, {"pred.speech": {1_000, 2_000}}, runners) == (
        0, ("pred.speech at t_ref 1000: the log has a prediction, the replay made none "
           "(last missing input: none)"))


def test_compare_logs_compares_nothing_for_an_engine_that_never_ticked(runners):
    speech = runners[0]
    recorded = {"pred.speech": {1_000: made_by(speech, 1_000)}}
    assert compare_logs(recorded, {}, {}, runners) == (0, None)


def test_compare_logs_names_a_replayed_prediction_the_log_does_not_have(runners):
    speech = runners[0]
    recorded = {"pred.speech": {1_000: made_by(speech, 1_000), 3_000: made_by(speech, 3_000)}}
    replayed = {"pred.speech": {t: made_by(speech, t) for t in (1_000, 2_000, 3_000)}}
    assert compare_logs(recorded, replayed, {"pred.speech": {1_000, 2_000, 3_000}},
                        runners) == (
        1, ("pred.speech at t_ref 2000: the replay made a prediction the log does not have "
           "(the live node lacked a required input, or the recorder dropped it)"))


def test_compare_logs_skips_a_tick_neither_side_predicted_and_compares_the_next(runners):
    speech = runners[0]
    recorded = {"pred.speech": {1_000: made_by(speech, 1_000), 3_000: made_by(speech, 3_000)}}
    replayed = {"pred.speech": {1_000: made_by(speech, 1_000),
                                3_000: made_by(speech, 3_000, engine="other")}}
    assert compare_logs(recorded, replayed, {"pred.speech": {1_000, 2_000, 3_000}},
                        runners) == (
        2, "pred.speech at t_ref 3000: engine differs: log 'speech', now 'other'")
