"""The node's live Foxglove server, seen by a real WebSocket client (RFC 6455 over the
stdlib's sockets, speaking Foxglove's WebSocket protocol) against a real node process: every
topic of the file export arrives, decodes, and is stamped in wall time."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

pytest.importorskip("foxglove", reason="the `foxglove` extra (foxglove-sdk) is not installed")

from fusion_node.clock import MonotonicClock
from fusion_node.config import load_config, parse_config
from fusion_node.errors import ConfigError
from fusion_node.protocol import Health, Prediction
from fusion_node.transport import Subscriber
from fusion_node.view.foxglove_live import DropOldestQueue

REPO = Path(__file__).parents[2]
NODE = [sys.executable, "-c", "import sys; from fusion_node.cli import main; sys.exit(main())"]
SUBPROTOCOL = "foxglove.sdk.v1"  # what foxglove-sdk's server selects (foxglove.websocket.v1's
# successor; the Foxglove app offers both)
MESSAGE_DATA = 0x01  # server binary opcode: u32 subscription id, u64 log time, payload
# Every topic the file export writes for launch/sim.toml (fusion_node/view/foxglove.py).
TOPICS = {
    "preview/camera.front": "foxglove.RawImage",
    "preview/camera.scene": "foxglove.RawImage",
    "preview/audio.mic0": "foxglove.RawAudio",
    "/mouth/camera_front": "foxglove.CompressedImage",
    "/camera/camera_front/mouth_box": "foxglove.ImageAnnotations",
    "/camera/camera_front/action_chunk": "foxglove.ImageAnnotations",
    "/camera/camera_scene/action_chunk": "foxglove.ImageAnnotations",
    "/audio/audio_mic0/level": "fusion_node.view.audio/audio_mic0/level",
    "/joints/joints_arm": "fusion_node.view.joints/joints_arm",
    "/pred_speech": "fusion_node.view.pred_speech",
    "/pred_action": "fusion_node.view.pred_action",
    "/health": "fusion_node.view.health",
    "/events": "foxglove.Log",
}
WALL_TOLERANCE_NS = 5_000_000_000


class WebSocketClient:
    """The client half of RFC 6455: the upgrade handshake, masked frames out, fragmented
    frames in, pings answered."""

    def __init__(self, port: int, subprotocol: str = SUBPROTOCOL, timeout_s: float = 5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {subprotocol}\r\n\r\n".encode())
        self._buffer = b""
        while b"\r\n\r\n" not in self._buffer:
            self._fill()
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        self.status = lines[0]
        self.headers = {k.strip().lower(): v.strip()
                        for k, _, v in (line.partition(":") for line in lines[1:])}

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self._buffer += chunk

    def _frame(self) -> tuple[bool, int, bytes] | None:
        """The next whole frame from the buffer, or None (nothing is consumed until a frame
        is complete, so a timeout never cuts one)."""
        data = self._buffer
        if len(data) < 2:
            return None
        length, start = data[1] & 0x7F, 2
        if length == 126:
            if len(data) < 4:
                return None
            length, start = struct.unpack_from(">H", data, 2)[0], 4
        elif length == 127:
            if len(data) < 10:
                return None
            length, start = struct.unpack_from(">Q", data, 2)[0], 10
        if data[1] & 0x80:  # servers never mask (RFC 6455 §5.1)
            raise ConnectionError("a masked frame from the server")
        if len(data) < start + length:
            return None
        self._buffer = data[start + length:]
        return bool(data[0] & 0x80), data[0] & 0x0F, data[start:start + length]

    def recv(self) -> tuple[int, bytes]:
        """The next message: (opcode 1 text / 2 binary, payload)."""
        opcode, parts = 0, b""
        while True:
            frame = self._frame()
            if frame is None:
                self._fill()
                continue
            fin, op, payload = frame
            if op == 0x9:
                self._send(0xA, payload)
                continue
            if op == 0x8:
                raise ConnectionError("the server closed the connection")
            if op:
                opcode, parts = op, b""
            parts += payload
            if fin:
                return opcode, parts

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        if len(payload) < 126:
            head = struct.pack(">BB", 0x80 | opcode, 0x80 | len(payload))
        elif len(payload) < 1 << 16:
            head = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, len(payload))
        else:
            head = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, len(payload))
        masked = (np.frombuffer(payload, np.uint8)
                  ^ np.resize(np.frombuffer(mask, np.uint8), len(payload))).tobytes()
        self.sock.sendall(head + mask + masked)

    def send_json(self, message: dict[str, Any]) -> None:
        self._send(0x1, json.dumps(message).encode())

    def close(self) -> None:
        self.sock.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sim_chunk_samples() -> int:
    (mic,) = [d for d in load_config(str(REPO / "launch" / "sim.toml")).drivers
              if d.kind == "sim_microphone"]
    return mic.config["sample_rate"] * mic.config["chunk_ms"] // 1000


SIM_CHUNK_SAMPLES = _sim_chunk_samples()


def _launch_file(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "live.toml"
    path.write_text((REPO / "launch" / "sim.toml").read_text()
                    + f'\n[view]\nfoxglove = "127.0.0.1:{port}"\n')
    return path


def _connect(port: int, node: subprocess.Popen[str], timeout_s: float = 60.0) -> WebSocketClient:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return WebSocketClient(port)
        except OSError:
            if node.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _subscribe_all(client: WebSocketClient, channels: dict[int, dict[str, Any]],
                   advertise: dict[str, Any]) -> None:
    for channel in advertise["channels"]:
        channels[channel["id"]] = channel
    # One subscription id per channel: its channel id.
    client.send_json({"op": "subscribe", "subscriptions": [
        {"id": c["id"], "channelId": c["id"]} for c in advertise["channels"]]})


def _foxglove_health(subscriber: Subscriber, timeout_s: float = 10.0) -> dict[str, Any]:
    """The `foxglove` entry of the next node.health published from now on."""
    # The subscriber also queues every prediction: skip what waited, keep reading until a
    # node.health stamped after this call.
    since_ns = time.monotonic_ns()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = subscriber.recv(timeout_ms=500)
        if (isinstance(msg, Health) and msg.stream == "node.health"
                and msg.t_capture_ns > since_ns):
            return msg.stats["foxglove"]
    raise AssertionError("no node.health within the timeout")


def _check_body(topic: str, body: dict[str, Any], log_time_ns: int) -> None:
    """The message decodes as its schema says, and its own stamp is its log time."""
    schema = TOPICS[topic]
    if "timestamp" in body:
        assert body["timestamp"]["sec"] * 10**9 + body["timestamp"]["nsec"] == log_time_ns
    if schema == "foxglove.RawImage":
        pixels = base64.b64decode(body["data"])
        assert body["encoding"] in ("rgb8", "bgr8") and body["width"] > 0
        assert len(pixels) == body["step"] * body["height"] == 3 * body["width"] * body["height"]
    elif schema == "foxglove.RawAudio":
        pcm = base64.b64decode(body["data"])
        assert body["format"] == "pcm-s16" and body["sample_rate"] == 16000
        # One chunk of the launch file's microphone, 2 bytes a sample.
        assert len(pcm) == 2 * SIM_CHUNK_SAMPLES * body["number_of_channels"]
    elif schema == "foxglove.CompressedImage":
        assert body["format"] == "jpeg" and base64.b64decode(body["data"])[:2] == b"\xff\xd8"
    elif schema == "foxglove.ImageAnnotations":
        strips = body["points"]
        assert strips and all(len(s["points"]) >= 2 for s in strips)
        for strip in strips:
            assert strip["timestamp"]["sec"] * 10**9 + strip["timestamp"]["nsec"] == log_time_ns
    elif schema == "foxglove.Log":
        assert body["level"] in (2, 3) and body["name"].startswith("pred.") and body["message"]
    elif topic == "/joints/joints_arm":
        assert set(body["position"]) == {"shoulder", "elbow", "wrist"}
    elif topic == "/audio/audio_mic0/level":
        assert 0 <= body["rms"] <= body["peak"] <= 1
    elif topic == "/pred_speech":
        assert body["command"] in body["command_posterior"]
        assert sum(body["command_posterior"].values()) == pytest.approx(1, abs=1e-3)
        assert body["latency_ms"]["capture_to_publish"] > 0
    elif topic == "/pred_action":
        assert set(body["targets"]) == {"shoulder", "elbow", "wrist"}
    elif topic == "/health":
        assert body["status"] in ("ok", "degraded") and set(body["deadline_misses"]) == {
            "speech", "action"}


def test_a_live_node_serves_every_topic_in_wall_time_and_counts_a_slow_client(tmp_path):
    port = _free_port()
    pub = f"ipc://{tmp_path}/pub.ipc"
    node = subprocess.Popen([*NODE, "--log-level", "WARNING", "run", "--config",
                             str(_launch_file(tmp_path, port)), "--pub", pub,
                             "--duration", "120"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    context = zmq.Context()
    subscriber = Subscriber(context, [pub], MonotonicClock())
    clients: list[WebSocketClient] = []
    try:
        client = _connect(port, node)
        clients.append(client)
        assert client.status.startswith("HTTP/1.1 101")
        assert client.headers["sec-websocket-protocol"] == SUBPROTOCOL
        client.sock.settimeout(30)
        channels: dict[int, dict[str, Any]] = {}
        received: dict[str, int] = {}
        statuses = []
        deadline = time.monotonic() + 90
        while set(received) != set(TOPICS) and time.monotonic() < deadline:
            opcode, payload = client.recv()
            if opcode == 0x1:
                message = json.loads(payload)
                if message["op"] == "advertise":
                    _subscribe_all(client, channels, message)
                elif message["op"] == "status":
                    statuses.append(message)
                continue
            assert opcode == 0x2 and payload[0] == MESSAGE_DATA
            subscription, log_time_ns = struct.unpack_from("<IQ", payload, 1)
            now_ns = time.time_ns()
            channel = channels[subscription]
            topic = channel["topic"]
            # Wall time, not time since boot: within a few seconds of now, never ahead.
            assert now_ns - WALL_TOLERANCE_NS < log_time_ns <= now_ns + 10_000_000, topic
            assert channel["encoding"] == "json" and channel["schemaEncoding"] == "jsonschema"
            assert channel["schemaName"] == TOPICS[topic], topic
            _check_body(topic, json.loads(payload[13:]), log_time_ns)
            received[topic] = received.get(topic, 0) + 1
        assert set(received) == set(TOPICS), (sorted(set(TOPICS) - set(received)), statuses)
        assert statuses == []
        # Every channel is made before the server serves (FoxgloveTopics.declare): the same
        # topics as the conversion fills.
        assert {c["topic"] for c in channels.values()} == set(TOPICS)
        previews = [c for c in channels.values() if c["topic"].startswith("preview/")]
        assert {c["metadata"]["fusion_node.preview_of"] for c in previews} == {
            "camera.front", "camera.scene", "audio.mic0"}

        # A client that subscribes to everything and never reads: the SDK's outbox for it
        # fills, and node.health counts it.
        client.close()
        slow = WebSocketClient(port)
        clients.append(slow)
        slow.sock.settimeout(10)
        advertised = 0
        while advertised < len(TOPICS):
            opcode, payload = slow.recv()
            message = json.loads(payload) if opcode == 0x1 else {}
            if message.get("op") == "advertise":
                _subscribe_all(slow, {}, message)
                advertised += len(message["channels"])
        stats = _foxglove_health(subscriber)
        deadline = time.monotonic() + 60
        while stats["slow_client_events"] == 0 and time.monotonic() < deadline:
            stats = _foxglove_health(subscriber)
        assert stats["slow_client_events"] >= 1, stats
        assert stats["address"] == f"ws://127.0.0.1:{port}" and stats["errors"] == 0, stats
        assert stats["converted"] > 0 and isinstance(stats["dropped"], dict), stats
        assert stats["wall_clock_uncertainty_us"] < 1000, stats
    finally:
        for c in clients:
            c.close()
        subscriber.close()
        context.term()
        if node.poll() is None:
            node.send_signal(signal.SIGINT)
        try:
            _, err = node.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
            _, err = node.communicate()
    assert node.returncode == 0, err


def test_a_port_in_use_is_one_clear_error_before_the_node_starts(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = subprocess.run([*NODE, "run", "--config", str(_launch_file(tmp_path, port)),
                                  "--pub", f"ipc://{tmp_path}/pub.ipc", "--duration", "5"],
                                 stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 timeout=60, check=False)
    assert process.returncode == 1
    errors = [line for line in process.stderr.splitlines()
              if line.startswith("fusion-node: error:")]
    assert len(errors) == 1, process.stderr
    assert f"cannot serve Foxglove on 127.0.0.1:{port}" in errors[0]
    assert "Address already in use" in errors[0]
    assert "Traceback" not in process.stderr
    assert "publishing on" not in process.stderr  # nothing else started


@pytest.mark.parametrize("value, message", [
    ('"0.0.0.0:8765"', "not a loopback address"),
    ('"robot.local:8765"', "not a loopback address"),
    ('"127.0.0.1"', "is not HOST:PORT"),
    ('"127.0.0.1:0"', "is not HOST:PORT"),
    ('"127.0.0.1:65536"', "is not HOST:PORT"),
    ("8765", "view.foxglove = 8765 is not a str"),
])
def test_the_view_table_names_a_bad_address(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(f"[view]\nfoxglove = {value}\n", "live.toml")


def test_the_view_table_reads_a_loopback_address():
    assert parse_config('[view]\nfoxglove = "127.0.0.1:8765"\n', "x").view.foxglove == (
        "127.0.0.1", 8765)
    assert parse_config('[view]\nfoxglove = "[::1]:9000"\n', "x").view.foxglove == ("::1", 9000)
    assert parse_config("", "x").view.foxglove is None
    with pytest.raises(ConfigError, match=r"view: unknown key\(s\) \['foxglov'\]"):
        parse_config('[view]\nfoxglov = "127.0.0.1:8765"\n', "x")


def _prediction(seq: int) -> Prediction:
    return Prediction("pred.speech", seq, seq, seq, "speech", "", {}, {}, {}, {})


def test_the_queue_drops_the_oldest_and_counts_them_by_stream():
    queue = DropOldestQueue(max_messages=3, max_bytes=1 << 20)
    for seq in range(5):
        queue.put(_prediction(seq))
    assert queue.stats() == (3, {"pred.speech": 2})
    assert [queue.pop().seq for _ in range(3)] == [2, 3, 4]  # type: ignore[union-attr]
    assert queue.pop() is None
    # The byte bound: a prediction counts about 1 KB, so two do not fit in 1.5 KB.
    small = DropOldestQueue(max_messages=100, max_bytes=1536)
    small.put(_prediction(0))
    small.put(_prediction(1))
    assert small.stats() == (1, {"pred.speech": 1})
