"""rosbag2 both ways: a fusion-node log exported as a rosbag2 reads back message for message
(rosbags and mcap-ros2-support), and a rosbag2 written by rosbags from a simulated session
replays through the node deterministically, from MCAP and sqlite3 storage alike."""

from __future__ import annotations

import asyncio
import filecmp
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("rosbags")

from mcap_ros2.reader import read_ros2_messages
from rosbags.rosbag2 import Reader, StoragePlugin, Writer

from drivers.registry import create_driver
from fusion_node.cli import main
from fusion_node.config import load_config, parse_config
from fusion_node.errors import ConfigError, ProtocolError, ReplayError
from fusion_node.logs.mcap_format import LogReader
from fusion_node.protocol import (
    AudioChunk,
    Frame,
    Health,
    JointState,
    Message,
    Prediction,
    decode,
    encode,
)
from fusion_node.ros2 import messages as ros
from fusion_node.ros2.rosbag2 import bag_to_log, input_streams, is_rosbag2
from tests.conftest import ENGINES

SAMPLE = str(Path(__file__).parents[1] / "data" / "sample.mcap")


def _original(path: str) -> list[tuple[str, str, Message]]:
    with LogReader(path) as reader:
        return [(m.topic, m.kind, m.decode(path)) for m in reader.messages()]


def assert_same(old: Message, new: Message, compare_seq: bool) -> None:
    """Every field equal (arrays in dtype, shape and value), except the receive time, which
    is the bag's business, and the seq ROS 2 headers lack (`compare_seq` False)."""
    assert type(old) is type(new)
    for name in old.__slots__:  # type: ignore[union-attr]
        if name == "t_receive_ns" or (name == "seq" and not compare_seq):
            continue
        a, b = getattr(old, name), getattr(new, name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name
        elif name == "arrays":
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
                assert np.array_equal(a[key], b[key]), key
        else:
            assert type(a) is type(b) and a == b, (name, a, b)


# -- messages ---------------------------------------------------------------------------------

def test_topic_names_follow_one_rule_both_ways():
    cases = {("camera.front", "frame"): ("/camera/front/image_raw", ros.IMAGE),
             ("audio.mic0", "audio"): ("/audio/mic0/audio", ros.AUDIO),
             ("joints.arm", "joints"): ("/joints/arm/joint_states", ros.JOINT_STATE),
             ("pred.speech", "prediction"): ("/fusion_node/pred/speech", ros.PREDICTION),
             ("node.health", "health"): ("/diagnostics", ros.DIAGNOSTICS)}
    for (stream, kind), (name, ros_type) in cases.items():
        assert ros.ros_topic(stream, kind) == ros.RosTopic(name, ros_type)
        assert ros.stream_of(name) == (stream, kind)
    assert ros.ros_topic("pred.speech", "prediction", "speech").type == ros.SPEECH
    assert ros.ros_topic("pred.action", "prediction", "action").type == ros.ACTION
    with pytest.raises(ProtocolError, match="'camera.0front' has no ROS 2 topic name"):
        ros.ros_topic("camera.0front", "frame")
    with pytest.raises(ProtocolError, match="'/tf' is not one fusion-node names"):
        ros.stream_of("/tf")


def _through_cdr(message: Message, ros_type: str | None = None) -> Message:
    store = ros.typestore()
    ros_msg = ros.to_ros(message, ros_type)
    raw = store.serialize_cdr(ros_msg, ros_msg.__msgtype__)
    return ros.from_ros(ros_msg.__msgtype__, store.deserialize_cdr(raw, ros_msg.__msgtype__),
                        message.stream, seq=message.seq)


def test_every_kind_converts_losslessly_including_generic_predictions():
    originals = _original(SAMPLE)
    kinds = {kind for _, kind, _ in originals}
    assert kinds == {"frame", "audio", "joints", "prediction", "health"}
    for _, _, message in originals:
        assert_same(message, _through_cdr(message), compare_seq=True)
    # A prediction as the generic message (an engine spec's), its fields as JSON.
    speech = next(m for _, _, m in originals if m.stream == "pred.speech")
    assert ros.to_ros(speech).__msgtype__ == ros.SPEECH
    assert_same(speech, _through_cdr(speech, ros.PREDICTION), compare_seq=True)
    with pytest.raises(ProtocolError, match="does not fit fusion_node_msgs/msg/ActionChunk"):
        ros.to_ros(speech, ros.ACTION)


def test_ros_messages_from_elsewhere_become_protocol_messages():
    types = ros.typestore().types
    header = types["std_msgs/msg/Header"](types["builtin_interfaces/msg/Time"](12, 5), "cam")
    # Rows padded to 8 bytes, as some cameras deliver them.
    image = np.arange(2 * 8, dtype=np.uint8)
    frame = ros.from_ros(ros.IMAGE, types[ros.IMAGE](header, 2, 2, "rgb8", 0, 8, image), "cam.a")
    assert isinstance(frame, Frame) and frame.t_capture_ns == 12_000_000_005
    assert frame.image.tolist() == [[[0, 1, 2], [3, 4, 5]], [[8, 9, 10], [11, 12, 13]]]
    decode(encode(frame))  # valid on the wire
    # A position-only JointState: velocity and effort were not measured, so NaN, not zero.
    joints = ros.from_ros(ros.JOINT_STATE, types[ros.JOINT_STATE](
        header, ["a", "b"], np.array([1.0, 2.0]), np.array([], np.float64),
        np.array([], np.float64)), "joints.arm")
    assert isinstance(joints, JointState) and np.isnan(joints.velocity).all()
    with pytest.raises(ProtocolError, match="encoding 'yuv422' is not one of"):
        ros.from_ros(ros.IMAGE, types[ros.IMAGE](header, 1, 1, "yuv422", 0, 2,
                                                 np.zeros(2, np.uint8)), "cam.a")
    with pytest.raises(ProtocolError, match="3 bytes of S16LE in 1 channel"):
        ros.from_ros(ros.AUDIO, types[ros.AUDIO](header, 16000, 1, 0, "S16LE",
                                                 np.zeros(3, np.uint8)), "audio.mic0")
    with pytest.raises(ProtocolError, match="velocity has 1 values for 2 joint names"):
        ros.from_ros(ros.JOINT_STATE, types[ros.JOINT_STATE](
            header, ["a", "b"], np.zeros(2), np.zeros(1), np.zeros(2)), "joints.arm")


# -- export -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("export")
    bags = {"folder": str(folder / "bag"), "file": str(folder / "one.mcap")}
    for out in bags.values():
        assert main(["log", "export", SAMPLE, "--ros2", out]) == 0
    return bags


@pytest.mark.parametrize("form", ["folder", "file"])
def test_exported_bag_round_trips_through_rosbags(exported, form):
    by_topic: dict[str, list[Message]] = {}
    for topic, kind, message in _original(SAMPLE):
        by_topic.setdefault(ros.ros_topic(topic, kind).name, []).append(message)
    store = ros.typestore()
    read: dict[str, list[tuple[int, Message]]] = {}
    with Reader(exported[form]) as reader:
        assert {c.topic: c.msgtype for c in reader.connections} == {
            "/camera/front/image_raw": ros.IMAGE, "/camera/scene/image_raw": ros.IMAGE,
            "/audio/mic0/audio": ros.AUDIO, "/joints/arm/joint_states": ros.JOINT_STATE,
            "/fusion_node/pred/speech": ros.SPEECH, "/fusion_node/pred/action": ros.ACTION,
            "/diagnostics": ros.DIAGNOSTICS}
        for connection, t_ns, raw in reader.messages():
            stream, _ = ros.stream_of(connection.topic)
            message = ros.from_ros(connection.msgtype,
                                   store.deserialize_cdr(raw, connection.msgtype), stream)
            read.setdefault(connection.topic, []).append((t_ns, message))
    assert read.keys() == by_topic.keys()
    for topic, originals in by_topic.items():
        # rosbags reads in bag time, the sensor time; the log is in receive order.
        originals = sorted(originals, key=lambda m: m.t_capture_ns)
        assert len(read[topic]) == len(originals), topic
        for (t_ns, new), old in zip(read[topic], originals):
            assert t_ns == old.t_capture_ns
            assert_same(old, new, compare_seq=isinstance(old, Prediction))


def test_exported_bag_reads_with_mcap_ros2_message_for_message(exported):
    originals: dict[tuple[str, int], list[Message]] = {}
    for topic, kind, message in _original(SAMPLE):
        originals.setdefault((ros.ros_topic(topic, kind).name, message.t_capture_ns),
                             []).append(message)
    count = 0
    for item in read_ros2_messages(exported["file"]):
        count += 1
        msg = item.ros_msg
        topic = item.channel.topic
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        assert item.log_time_ns == stamp and item.schema.encoding == "ros2msg"
        assert (topic, stamp) in originals
        old = originals[(topic, stamp)][0]
        if isinstance(old, Frame):
            assert bytes(msg.data) == old.image.tobytes() and msg.encoding == old.encoding
        elif isinstance(old, AudioChunk):
            assert bytes(msg.data) == old.samples.tobytes()
            assert (msg.sample_rate, msg.sample_index) == (old.sample_rate, old.sample_index)
        elif isinstance(old, JointState):
            assert list(msg.name) == list(old.names)
            assert list(msg.position) == old.position.tolist()
        elif isinstance(old, Prediction):
            assert (msg.info.t_ref_ns, msg.info.deadline_ns, msg.info.model_hash) == (
                old.t_ref_ns, old.deadline_ns, old.model_hash)
            if topic.endswith("speech"):
                assert msg.command == old.fields["command"]
                assert list(msg.command_posterior) == old.arrays["command_posterior"].tolist()
            else:
                assert list(msg.actions) == old.arrays["actions"].reshape(-1).tolist()
        else:
            assert isinstance(old, Health)
            assert msg.status[0].name == "fusion_node"
    assert count == sum(map(len, originals.values()))


def test_export_refuses_to_overwrite_without_force(exported, tmp_path, capsys):
    for out in exported.values():
        before = sorted((p.name, p.stat().st_mtime_ns) for p in Path(out).parent.rglob("*"))
        assert main(["log", "export", SAMPLE, "--ros2", out]) == 1
        assert "exists; pass --force" in capsys.readouterr().err
        assert sorted((p.name, p.stat().st_mtime_ns)
                      for p in Path(out).parent.rglob("*")) == before
    forced = tmp_path / "bag"
    assert main(["log", "export", SAMPLE, "--ros2", str(forced)]) == 0
    assert main(["log", "export", SAMPLE, "--ros2", str(forced), "--force"]) == 0
    assert sorted(p.name for p in forced.iterdir()) == ["bag.mcap", "metadata.yaml"]
    # --force replaces a bag, never a folder that is not one.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["log", "export", SAMPLE, "--ros2", str(other), "--force"]) == 1
    assert "is not a rosbag2 folder" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine"


# -- replay -----------------------------------------------------------------------------------

class SteppingClock:
    """Simulated time that jumps to whatever a driver waits for: the sim drivers then
    produce a session as fast as they can render it, stamped as they would be live."""

    def __init__(self, start_ns: int) -> None:
        self.t_ns = start_ns

    def now_ns(self) -> int:
        return self.t_ns

    def sleep_until(self, t_ns: int) -> None:
        self.t_ns = max(self.t_ns, t_ns)


START_NS = 7_000_000_000
SESSION_NS = 2_500_000_000
# The user's topic names, as a robot's own drivers would publish them.
TOPICS = {"camera.front": "/head_camera/image_raw", "audio.mic0": "/mic/audio",
          "joints.arm": "/arm/joint_states"}
LAUNCH = """
[[streams]]
name = "camera.front"
kind = "frame"

[[streams]]
name = "audio.mic0"
kind = "audio"

[[streams]]
name = "joints.arm"
kind = "joints"

""" + ENGINES + """
[replay]
ros2 = { "/head_camera/image_raw" = "camera.front", "/mic/audio" = "audio.mic0", "/arm/joint_states" = "joints.arm" }
"""


async def _drive(kind: str, stream: str, config: dict[str, Any]) -> list[Message]:
    driver = create_driver(kind, stream, config, SteppingClock(START_NS))
    await driver.connect()
    samples: list[Message] = []
    while not samples or samples[-1].t_capture_ns < START_NS + SESSION_NS:
        samples.append(await driver.recv())
    await driver.disconnect()
    return samples


@pytest.fixture(scope="module")
def simulated() -> list[Message]:
    """A 2.5 s session of the simulated camera, microphone and arm joints, in capture order."""
    async def session() -> list[Message]:
        parts = await asyncio.gather(_drive("sim_camera", "camera.front", {"fps": 30}),
                                     _drive("sim_microphone", "audio.mic0", {}),
                                     _drive("sim_joints", "joints.arm", {}))
        return sorted((m for part in parts for m in part), key=lambda m: m.t_capture_ns)
    return asyncio.run(session())


def write_bag(path: Path, messages: list[Message], storage: StoragePlugin) -> None:
    """What a robot's `ros2 bag record` would hold: the sensors on the user's topic names,
    bag time = receive time (here 1 ms after capture), header stamp = capture time."""
    store = ros.typestore()
    with Writer(path, version=8, storage_plugin=storage) as writer:
        connections = {stream: writer.add_connection(topic, ros.ros_topic(stream, kind).type,
                                                     typestore=store)
                       for stream, topic, kind in (
                           ("camera.front", TOPICS["camera.front"], "frame"),
                           ("audio.mic0", TOPICS["audio.mic0"], "audio"),
                           ("joints.arm", TOPICS["joints.arm"], "joints"))}
        for message in messages:
            connection = connections[message.stream]
            writer.write(connection, message.t_capture_ns + 1_000_000,
                         store.serialize_cdr(ros.to_ros(message), connection.msgtype))


@pytest.fixture(scope="module")
def bags(simulated, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("bags")
    (folder / "launch.toml").write_text(LAUNCH)
    made = {}
    for name, storage in (("mcap", StoragePlugin.MCAP), ("sqlite3", StoragePlugin.SQLITE3)):
        write_bag(folder / name, simulated, storage)
        made[name] = str(folder / name)
    made["db3"] = str(folder / "sqlite3" / "sqlite3.db3")  # the storage file on its own
    return made


def test_the_bag_is_recognised_and_converted_at_its_header_stamps(bags, simulated, tmp_path):
    assert all(is_rosbag2(b) for b in bags.values()) and not is_rosbag2(SAMPLE)
    config = load_config(Path(bags["mcap"]).parent / "launch.toml")
    log = str(tmp_path / "converted.mcap")
    counts = bag_to_log(bags["sqlite3"], log, input_streams(config), config.replay.ros2)
    assert counts == {s: sum(m.stream == s for m in simulated) for s in TOPICS}
    with LogReader(log) as reader:
        converted = [(m.log_time_ns, m.decode(log)) for m in reader.messages()]
    by_stream: dict[str, list[Message]] = {}
    for log_time_ns, message in converted:
        assert log_time_ns == message.t_capture_ns  # received when captured
        by_stream.setdefault(message.stream, []).append(message)
    for stream in TOPICS:
        for old, new in zip([m for m in simulated if m.stream == stream], by_stream[stream],
                            strict=True):
            assert_same(old, new, compare_seq=True)  # the sim's seq starts at 0, as counted


@pytest.mark.parametrize("storage", ["mcap", "sqlite3", "db3"])
def test_a_rosbag2_replays_through_the_node_byte_identically(bags, storage, tmp_path, capsys):
    launch = str(Path(bags["mcap"]).parent / "launch.toml")
    outs = [str(tmp_path / f"run{i}.mcap") for i in range(2)]
    for out in outs:
        assert main(["replay", bags[storage], "--through-node", "--config", launch,
                     "--out", out]) == 0
    assert filecmp.cmp(outs[0], outs[1], shallow=False)
    with LogReader(outs[0]) as reader:
        made = [m.decode(outs[0]) for m in reader.messages()]
        assert reader.metadata()["fusion_node.recording"]["replayed_log"] == bags[storage]
    speech = [m for m in made if m.stream == "pred.speech"]
    action = [m for m in made if m.stream == "pred.action"]
    # 2.5 s at 30 Hz and 25 Hz, less the first window's history.
    assert len(speech) > 55 and len(action) > 45
    assert all(START_NS <= p.t_ref_ns <= START_NS + SESSION_NS for p in speech + action)
    assert all(p.mask["audio.mic0"] and p.mask["camera.front"] for p in speech)
    capsys.readouterr()


def test_storages_give_the_same_predictions(bags, tmp_path):
    made = []
    for storage in ("mcap", "sqlite3"):
        out = str(tmp_path / f"{storage}.mcap")
        assert main(["replay", bags[storage], "--through-node", "--config",
                     str(Path(bags["mcap"]).parent / "launch.toml"), "--out", out]) == 0
        with LogReader(out) as reader:
            made.append([(m.topic, m.log_time_ns, m.data) for m in reader.messages()])
    assert made[0] == made[1]


def test_a_launch_files_ros2_drivers_name_the_topics_to_replay(bags, tmp_path):
    # The launch file that runs on the robot subscribes to the topics its bag recorded.
    launch = LAUNCH.split("[replay]")[0]
    for stream, kind, ros_type in (("camera.front", "frame", ros.IMAGE),
                                   ("audio.mic0", "audio", ros.AUDIO)):
        launch = launch.replace(
            f'[[streams]]\nname = "{stream}"\nkind = "{kind}"',
            f'[[drivers]]\nkind = "ros2"\nstream = "{stream}"\n'
            f'config = {{ topic = "{TOPICS[stream]}", type = "{ros_type}" }}')
    # The joints came from a controller over ZeroMQ: the [replay] table names their topic.
    (tmp_path / "robot.toml").write_text(
        launch + '[replay]\nros2 = { "/arm/joint_states" = "joints.arm" }\n')
    made = []
    for name, config in (("robot", tmp_path / "robot.toml"),
                         ("table", Path(bags["mcap"]).parent / "launch.toml")):
        out = str(tmp_path / f"{name}.mcap")
        assert main(["replay", bags["mcap"], "--through-node", "--config", str(config),
                     "--out", out]) == 0
        with LogReader(out) as reader:
            made.append([(m.topic, m.log_time_ns, m.data) for m in reader.messages()])
    assert made[0] == made[1] and len(made[0]) > 100


def test_an_exported_log_replays_without_a_topic_map(exported, tmp_path, capsys):
    # Named by fusion-node's rule, the bag's topics need no [replay] table.
    out = str(tmp_path / "pred.mcap")
    assert main(["replay", exported["folder"], "--through-node", "--out", out]) == 0
    with LogReader(out) as reader:
        assert set(reader.topics()) == {"pred.speech", "pred.action"}
    assert "from rosbag2" in capsys.readouterr().err


def test_replay_errors_name_what_is_wrong(bags, tmp_path, capsys):
    folder = Path(bags["mcap"]).parent
    bad_map = folder / "bad_map.toml"
    bad_map.write_text(LAUNCH.replace('"/mic/audio" =', '"/microphone/audio" ='))
    assert main(["replay", bags["mcap"], "--through-node", "--config", str(bad_map)]) == 1
    err = capsys.readouterr().err
    assert "names topic(s) ['/microphone/audio'] the bag does not have" in err
    assert "/mic/audio (fusion_node_msgs/msg/AudioChunk)" in err
    # The embedded default's streams follow the rule; this bag's topics do not.
    assert main(["replay", bags["mcap"], "--through-node"]) == 1
    assert "no topic to replay" in capsys.readouterr().err
    swapped = folder / "swapped.toml"
    swapped.write_text(LAUNCH.replace('"/head_camera/image_raw" = "camera.front", '
                                      '"/mic/audio" = "audio.mic0"',
                                      '"/head_camera/image_raw" = "audio.mic0", '
                                      '"/mic/audio" = "camera.front"'))
    assert main(["replay", bags["mcap"], "--through-node", "--config", str(swapped)]) == 1
    assert "maps to stream 'audio.mic0', which the launch file declares as audio" in \
        capsys.readouterr().err
    # --verify needs predictions the bag does not hold; the message names the bag.
    assert main(["replay", bags["mcap"], "--verify", "--config",
                 str(folder / "launch.toml")]) == 1
    err = capsys.readouterr().err
    assert f"{bags['mcap']}: the log holds no predictions" in err
    # An unstamped message is refused, not replayed at time 0.
    write_bag(tmp_path / "zero", [JointState("joints.arm", 0, 0, ("a",), np.zeros(1),
                                             np.zeros(1), np.zeros(1))], StoragePlugin.MCAP)
    assert main(["replay", str(tmp_path / "zero"), "--through-node", "--config",
                 str(folder / "launch.toml")]) == 1
    assert "header stamp is 0 ns" in capsys.readouterr().err
    assert main(["replay", str(tmp_path / "missing.db3"), "--through-node"]) == 1
    assert "missing.db3" in capsys.readouterr().err


def test_launch_file_replay_table_is_checked():
    base = LAUNCH.split("[replay]")[0]
    for table, message in (
            ('ros2 = { "cam" = "camera.front" }', "key 'cam' is not an absolute ROS 2 topic"),
            ('ros2 = { "/cam" = "camera.back" }', "'camera.back' is not a sensor stream"),
            ('ros2 = { "/cam" = "pred.speech" }', "'pred.speech' is not a sensor stream"),
            ('ros2 = { "/a" = "camera.front", "/b" = "camera.front" }',
             "mapped from more than one topic"),
            ('ros2 = { "/cam" = 1 }', "is not a stream name"),
            ('topics = {}', "unknown key(s) ['topics']")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[").replace("]", r"\]")):
            parse_config(base + "[replay]\n" + table + "\n", "launch.toml")
    with pytest.raises(ReplayError, match="cannot read as a rosbag2|does not exist"):
        bag_to_log(str(Path(SAMPLE).parent), "/nonexistent/x.mcap", {}, None)
