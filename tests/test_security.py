"""Security (docs/security.md): endpoint policy, CurveZMQ keys, and refusals, with real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from fusion_node.cli import main as cli_main
from fusion_node.client import Client
from fusion_node.clock import MonotonicClock
from fusion_node.config import load_config, parse_config
from fusion_node.errors import ConfigError, ProtocolError
from fusion_node.node import Node
from fusion_node.protocol import MAX_HEADER_BYTES, JointState, decode, encode
from fusion_node.remote_clock import ClockResponder
from fusion_node.security import (
    ClientKeys,
    CurveServer,
    check_endpoint,
    generate_keys,
    is_loopback_or_ipc,
    load_key_pair,
    load_public_key,
)
from fusion_node.transport import Publisher, Subscriber

REPO = Path(__file__).resolve().parent.parent
RECV_TIMEOUT_MS = 1500


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """server, client-good (allowed) and client-bad (not allowed) key pairs."""
    generate_keys(tmp_path / "keys", "server")
    generate_keys(tmp_path / "keys", "client-good")
    generate_keys(tmp_path / "keys", "client-bad")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "client-good.key").write_bytes((tmp_path / "keys/client-good.key").read_bytes())
    return tmp_path


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def curve(keys: Path, context: zmq.Context) -> Iterator[CurveServer]:
    server = CurveServer(context, load_key_pair(keys / "keys/server.key_secret"),
                         keys / "allowed")
    server.start()
    yield server
    server.close()


def client_keys(keys: Path, name: str) -> ClientKeys:
    return ClientKeys.load(keys / f"keys/{name}.key_secret", keys / "keys/server.key")


def joints(seq: int) -> JointState:
    values = np.arange(2, dtype=np.float64)
    return JointState("joints.arm", seq, time.monotonic_ns(), ("shoulder", "elbow"), values,
                      values, values)


def publish_until(publisher: Publisher, receive, timeout_s: float = 3.0):
    """Publish a message every 10 ms (a late joiner misses earlier ones) until `receive`
    returns one or the timeout passes; what it returned, or None."""
    deadline = time.monotonic() + timeout_s
    seq = 0
    while time.monotonic() < deadline:
        publisher.send(joints(seq))
        seq += 1
        msg = receive()
        if msg is not None:
            return msg
    return None


def handshake_failures(refused: dict[str, int], socket: str) -> int:
    """Refusals of peers without CURVE (libzmq reports them as a protocol error or with no
    detail, depending on how far the handshake got)."""
    return refused.get(f"{socket}.bad_handshake", 0) + refused.get(f"{socket}.handshake_failed", 0)


def wait_for(condition, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# -- CURVE publisher: who can subscribe ------------------------------------------------------

def test_only_listed_clients_receive_from_a_curve_publisher(keys, context, curve):
    # Binding every interface is allowed because the socket is CURVE protected.
    publisher = Publisher(context, "tcp://0.0.0.0:*", curve=curve)
    port = publisher.endpoint.rsplit(":", 1)[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    plain = Client(endpoint, topics=("joints.",), context=context)
    stranger = Client(endpoint, topics=("joints.",), context=context,
                      client_key=keys / "keys/client-bad.key_secret",
                      server_public_key=keys / "keys/server.key")
    good = Client(endpoint, topics=("joints.",), context=context,
                  client_key=keys / "keys/client-good.key_secret",
                  server_public_key=keys / "keys/server.key")
    try:
        received = publish_until(publisher, lambda: good.recv(timeout_ms=10))
        assert received is not None and received.stream == "joints.arm"
        # The refused ones never complete a handshake, however long they wait.
        for _ in range(20):
            publisher.send(joints(1000))
        assert plain.recv(timeout_ms=RECV_TIMEOUT_MS) is None
        assert stranger.recv(timeout_ms=200) is None
        assert wait_for(lambda: curve.refused().get("pub.unknown_client_key", 0) >= 1
                        and handshake_failures(curve.refused(), "pub") >= 1), curve.refused()
        summary = curve.summary()
        assert summary["allowed_clients"] == 1
        assert summary["refused_handshakes"] == sum(curve.refused().values())
    finally:
        for client in (plain, stranger, good):
            client.close()
        publisher.close()


def test_client_with_the_wrong_server_key_gets_nothing(keys, context, curve):
    publisher = Publisher(context, "tcp://127.0.0.1:*", curve=curve)
    impostor_server = keys / "keys/client-bad.key"  # not the node's public key
    client = Client(publisher.endpoint, topics=("joints.",), context=context,
                    client_key=keys / "keys/client-good.key_secret",
                    server_public_key=impostor_server)
    try:
        assert publish_until(publisher, lambda: client.recv(timeout_ms=10), 1.5) is None
    finally:
        client.close()
        publisher.close()


# -- CURVE subscriber: who can publish into the node ----------------------------------------

def _remote_name() -> str:
    """A name for this host that is not literally loopback, so the node treats it as remote."""
    name = socket.gethostname()
    try:
        socket.gethostbyname(name)
    except OSError:
        pytest.skip(f"host name {name!r} does not resolve")
    return name


def test_only_listed_sources_publish_into_the_node_subscriber(keys, context, curve):
    host = _remote_name()
    # Sources on the network bind (Publisher) and are CURVE clients of the node.
    good_source = Publisher(context, "tcp://0.0.0.0:*", curve=client_keys(keys, "client-good"),
                            shm=None)
    bad_source = Publisher(context, "tcp://0.0.0.0:*", curve=client_keys(keys, "client-bad"),
                           shm=None)
    port_of = {name: p.endpoint.rsplit(":", 1)[1]
               for name, p in (("good", good_source), ("bad", bad_source))}
    plain_source = context.socket(zmq.PUB)  # a source with no keys at all
    plain_port = plain_source.bind_to_random_port("tcp://0.0.0.0")
    subscribers = {
        name: Subscriber(context, [f"tcp://{host}:{port}"], MonotonicClock(), curve=curve)
        for name, port in port_of.items()}
    plain_subscriber = Subscriber(context, [f"tcp://{host}:{plain_port}"], MonotonicClock(),
                                  curve=curve)
    try:
        got = publish_until(good_source, lambda: subscribers["good"].recv(timeout_ms=10))
        assert got is not None and got.stream == "joints.arm"
        assert publish_until(bad_source, lambda: subscribers["bad"].recv(timeout_ms=10),
                             1.0) is None
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            plain_source.send_multipart(encode(joints(0)))
            assert plain_subscriber.recv(timeout_ms=10) is None
        assert wait_for(lambda: curve.refused().get("sub.unknown_client_key", 0) >= 1
                        and handshake_failures(curve.refused(), "sub") >= 1), curve.refused()
    finally:
        for subscriber in (*subscribers.values(), plain_subscriber):
            subscriber.close()
        good_source.close()
        bad_source.close()
        plain_source.close(linger=0)


def test_local_sources_stay_plain_next_to_protected_remote_ones(keys, context, curve,
                                                                 tmp_path):
    """The node's own drivers (ipc) need no keys even when the node has them."""
    endpoint = f"ipc://{tmp_path}/driver.ipc"
    source = Publisher(context, endpoint)
    subscriber = Subscriber(context, [endpoint], MonotonicClock(), curve=curve)
    try:
        assert publish_until(source, lambda: subscriber.recv(timeout_ms=10)) is not None
    finally:
        subscriber.close()
        source.close()


# -- the node: config-load policy, health counters ------------------------------------------

def launch_file(tmp_path: Path, node_table: str) -> Path:
    path = tmp_path / "robot.toml"
    path.write_text(f"[node]\n{node_table}\nhealth_period_ms = 100\n")
    return path


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5599", "tcp://*:5599",
                                      "tcp://192.168.1.20:5599", "tcp://eth0:5599",
                                      "tcp://[::]:5599"])
def test_binding_beyond_loopback_without_keys_is_refused_at_config_load(endpoint):
    with pytest.raises(ConfigError) as info:
        parse_config(f"[node]\npub = '{endpoint}'", "robot.toml")
    message = str(info.value)
    assert "node.pub" in message and endpoint in message
    assert "server_secret_key" in message and "fusion-node keys generate" in message


@pytest.mark.parametrize("table, where", [
    ("connect = ['tcp://10.0.0.5:6000']", "node.connect[0]"),
    ("\n[[streams]]\nname = 'joints.arm'\nkind = 'joints'\nclock = 'tcp://10.0.0.5:5601'",
     "clock"),
    ("\n[[drivers]]\nkind = 'sim_joints'\nstream = 'joints.arm'\nendpoint = 'tcp://0.0.0.0:1'",
     "driver 'joints.arm' endpoint"),
    (("\n[[drivers]]\nkind = 'joints_zmq'\nstream = 'joints.arm'\n"
      "config = { endpoint = 'tcp://10.0.0.5:6000' }"), "config.endpoint"),
])
def test_every_network_endpoint_is_checked(table, where):
    with pytest.raises(ConfigError, match="not loopback") as info:
        parse_config(f"[node]\n{table}", "robot.toml")
    assert where in str(info.value)


@pytest.mark.parametrize("text", [
    "[node]\npub = 'tcp://127.0.0.1:5599'", "[node]\npub = 'tcp://localhost:5599'",
    "[node]\npub = 'tcp://[::1]:5599'", "[node]\npub = 'ipc:///run/fusion/pub.ipc'",
    "[node]\npub = 'tcp://127.0.0.2:5599'"])
def test_loopback_and_ipc_need_no_keys(text):
    assert parse_config(text, "robot.toml").server_secret_key is None


def test_shipped_configs_expose_nothing_beyond_loopback():
    from fusion_node.security import is_loopback_or_ipc

    configs = [load_config()] + [load_config(p) for p in sorted(REPO.glob("launch/*.toml"))]
    assert len(configs) > 1
    for config in configs:
        endpoints = [config.pub, *config.connect, *(s.clock for s in config.streams if s.clock),
                     *(d.endpoint for d in config.drivers if d.endpoint)]
        assert all(is_loopback_or_ipc(e) for e in endpoints), endpoints
        assert config.server_secret_key is None


def test_key_paths_resolve_against_the_launch_file(keys):
    path = launch_file(keys, "pub = 'tcp://0.0.0.0:5599'\n"
                       "server_secret_key = 'keys/server.key_secret'\n"
                       "allowed_clients = 'allowed'")
    config = load_config(path)  # loaded from another working directory
    assert config.server_secret_key == str(keys / "keys/server.key_secret")
    assert config.allowed_clients == str(keys / "allowed")


@pytest.mark.parametrize("table, message", [
    ("server_secret_key = 'keys/server.key_secret'", "go together"),
    ("server_secret_key = 'keys/missing.key_secret'\nallowed_clients = 'allowed'",
     "does not exist"),
    ("server_secret_key = 'keys/server.key'\nallowed_clients = 'allowed'", "holds no secret"),
    ("server_secret_key = 'keys/server.key_secret'\nallowed_clients = 'nowhere'",
     "allowed_clients directory"),
    ("server_secret_key = 'keys/server.key_secret'\nallowed_clients = 'empty'",
     "holds no"),
])
def test_bad_key_settings_name_the_problem(keys, table, message):
    (keys / "empty").mkdir()
    with pytest.raises(ConfigError, match=message) as info:
        load_config(launch_file(keys, table))
    assert "node.server_secret_key" in str(info.value) or "allowed_clients" in str(info.value)


def test_malformed_and_exposed_key_files_are_refused(keys):
    bad = keys / "keys/garbled.key_secret"
    text = (keys / "keys/server.key_secret").read_text()
    bad.write_text(text.replace('secret-key = "', 'secret-key = "xx'))
    bad.chmod(0o600)
    with pytest.raises(ConfigError, match="malformed"):
        load_key_pair(bad)
    swapped = keys / "keys/swapped.key_secret"  # a secret key with another pair's public key
    good_public = load_public_key(keys / "keys/client-good.key").decode()
    server_public = load_public_key(keys / "keys/server.key").decode()
    swapped.write_text(text.replace(server_public, good_public))
    swapped.chmod(0o600)
    with pytest.raises(ConfigError, match="does not match"):
        load_key_pair(swapped)
    (keys / "keys/server.key_secret").chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_key_pair(keys / "keys/server.key_secret")
    (keys / "allowed/junk.key").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="junk.key"):
        CurveServer(zmq.Context.instance(), load_key_pair(keys / "keys/client-good.key_secret"),
                    keys / "allowed")


def test_keys_generate_writes_secret_files_0600(tmp_path, capsys):
    directory = tmp_path / "new" / "keys"
    assert cli_main(["keys", "generate", str(directory), "--name", "client-arm"]) == 0
    secret = directory / "client-arm.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    pair = load_key_pair(secret)
    assert load_public_key(directory / "client-arm.key") == pair.public
    assert pair.public.decode() in capsys.readouterr().out
    # Never overwrites an identity; names are checked.
    assert cli_main(["keys", "generate", str(directory), "--name", "client-arm"]) == 1
    assert cli_main(["keys", "generate", str(directory), "--name", "../evil"]) == 1
    assert load_key_pair(secret) == pair


def test_node_refusals_appear_on_node_health(keys):
    config = load_config(launch_file(keys, "pub = 'tcp://0.0.0.0:0'\n"
                                     "server_secret_key = 'keys/server.key_secret'\n"
                                     "allowed_clients = 'allowed'"))

    async def scenario() -> dict:
        node = Node(config)
        stop = asyncio.Event()
        task = asyncio.create_task(node.run(stop))
        await asyncio.wait_for(node.ready.wait(), 10)
        port = node.pub_endpoint.rsplit(":", 1)[1]
        endpoint = f"tcp://127.0.0.1:{port}"
        try:
            plain = Client(endpoint, topics=("node.health",))
            good = Client(endpoint, topics=("node.health",),
                          client_key=keys / "keys/client-good.key_secret",
                          server_public_key=keys / "keys/server.key")
            try:
                assert await asyncio.to_thread(plain.recv, RECV_TIMEOUT_MS) is None
                for _ in range(50):  # health every 100 ms: wait for one counting the refusal
                    health = await asyncio.to_thread(good.recv, 1000)
                    assert health is not None, "the allowed client receives node.health"
                    if health.stats["security"]["refused_handshakes"] >= 1:
                        return health.stats["security"]
                raise AssertionError(f"refusal never counted: {health.stats['security']}")
            finally:
                plain.close()
                good.close()
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)

    security = asyncio.run(scenario())
    assert security["curve"] is True and handshake_failures(security["refused"], "pub") >= 1


def test_node_without_keys_reports_curve_off():
    node = Node(parse_config("[node]\npub = 'tcp://127.0.0.1:0'", "t"))
    assert node.health()["security"] == {"curve": False}


# -- ipc permissions ------------------------------------------------------------------------

def test_ipc_sockets_live_in_private_directories(tmp_path, context):
    run_dir = tmp_path / "run" / "fusion"
    endpoint = f"ipc://{run_dir}/pub.ipc"
    publisher = Publisher(context, endpoint)
    try:
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(os.stat(run_dir / "pub.ipc").st_mode) & 0o077 == 0
    finally:
        publisher.close()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(ConfigError, match="accessible by other users"):
        Publisher(context, f"ipc://{shared}/pub.ipc")


def test_clock_responder_beyond_loopback_needs_keys(keys, context):
    with pytest.raises(ConfigError, match="not loopback"):
        ClockResponder(context, "tcp://0.0.0.0:0", MonotonicClock())
    responder = ClockResponder(context, "tcp://0.0.0.0:0", MonotonicClock(),
                               keys=client_keys(keys, "client-good"))
    responder.close()


# -- msgpack limits -------------------------------------------------------------------------

def test_header_with_an_extension_type_is_rejected():
    parts = encode(joints(0))
    header = msgpack.unpackb(parts[1])
    header["note"] = msgpack.ExtType(1, b"boom")  # a key no field check looks at
    parts[1] = msgpack.packb(header, use_bin_type=True)
    with pytest.raises(ProtocolError) as info:
        decode(parts)
    assert info.value.reason == "bad_header" and "extension type" in str(info.value)


def test_oversized_header_is_rejected_before_unpacking():
    header = msgpack.packb({"v": 1, "pad": "x" * MAX_HEADER_BYTES})
    with pytest.raises(ProtocolError) as info:
        decode([b"joints.arm", header])
    assert info.value.reason == "header_too_large"


def test_a_model_file_cannot_make_the_torch_backend_call_anything(tmp_path):
    """`torch_module` in a model's metadata names a class to build: a plain callable such
    as os:system is refused before it is called."""
    pytest.importorskip("torch")
    import onnx

    from engines.torch_backend import TorchEngine
    from fusion_node.errors import EngineError

    model = onnx.load(Path(__file__).parents[1] / "engines" / "models" / "action.onnx")
    marker = tmp_path / "executed"
    for prop in model.metadata_props:
        if prop.key == "torch_module":
            prop.value = "os:system"
        elif prop.key == "torch_init":
            prop.value = json.dumps({"command": f"touch {marker}"})
    hostile = tmp_path / "hostile.onnx"
    onnx.save(model, hostile)
    with pytest.raises(EngineError, match="not a torch.nn.Module class"):
        TorchEngine.from_onnx(hostile)
    assert not marker.exists()


def test_an_endpoint_that_is_not_a_url_is_one_config_error():
    # Found by `bench fuzz` (launch target): urlsplit raised a bare ValueError.
    with pytest.raises(ConfigError, match=r"node.pub = 'tcp://\[::1:5599' is not a valid"):
        check_endpoint("tcp://[::1:5599", False, "node.pub")
    assert not is_loopback_or_ipc("tcp://[::1:5599")
