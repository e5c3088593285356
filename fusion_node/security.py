"""Who may talk to the node: the endpoint policy and CurveZMQ authentication (docs/security.md).

Policy: a socket the node binds on loopback TCP or `ipc://` needs no keys (only this host can
reach it; ipc socket files live in a 0700 directory and are made 0600); any other address
(0.0.0.0, a LAN address, `*`, an interface name) is refused unless the socket is CURVE
authenticated. The node holds one CURVE server key; every peer on the network, a control loop
subscribing to predictions or a remote source publishing into the node, is a CURVE client
whose public key must be in the node's `allowed_clients` directory. A ZAP authenticator
(pyzmq's `ThreadAuthenticator`) admits only those keys, and every refused handshake is
counted and reported on `node.health`.

Key files are zmq.auth certificates (`NAME.key` public, `NAME.key_secret` secret, mode 0600),
written by `fusion-node keys generate`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from fusion_node.errors import ConfigError

ZAP_DOMAIN = "fusion-node"
KEY_NAME = re.compile(r"^(server|client-[A-Za-z0-9_.-]+)$")
KEYS_FIX = "create them with `fusion-node keys generate DIR`; see docs/security.md"
_KEY_Z85_CHARS = 40  # a 32-byte CURVE key in Z85 text
_MONITOR_POLL_MS = 50
# Handshake outcomes the monitor counts; the names are what node.health reports.
_REFUSALS = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "unknown_client_key",  # ZAP said no
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "bad_handshake",  # no CURVE, wrong server key, ...
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
}


# -- endpoint policy ------------------------------------------------------------------------

def is_loopback_or_ipc(endpoint: str) -> bool:
    """True for endpoints only this host can reach: ipc://, inproc://, loopback tcp://."""
    scheme = endpoint.split("://", 1)[0]
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    try:
        host = urlsplit(endpoint).hostname or ""
    except ValueError:  # "tcp://[::1:5599": an unclosed IPv6 bracket, not an address at all
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # '*', an interface name, a host name: not provably loopback
        return False


def check_endpoint(endpoint: str, authenticated: bool, where: str) -> None:
    """Refuse an endpoint that would carry unauthenticated data beyond this host.

    `where` names the setting (e.g. "node.pub") so the error says what to change."""
    scheme = endpoint.split("://", 1)[0]
    if scheme not in ("ipc", "inproc", "tcp"):
        raise ConfigError(f"{where} = {endpoint!r}: scheme must be ipc://, inproc:// or tcp://")
    if scheme == "tcp":
        try:
            urlsplit(endpoint)
        except ValueError as exc:
            raise ConfigError(f"{where} = {endpoint!r} is not a valid endpoint ({exc})") from None
    if authenticated or is_loopback_or_ipc(endpoint):
        return
    raise ConfigError(
        f"{where} = {endpoint!r} is not loopback: other hosts could read or inject sensor "
        f"data, so it needs CurveZMQ keys. Set node.server_secret_key and "
        f"node.allowed_clients in the launch file ({KEYS_FIX}), or use tcp://127.0.0.1 or "
        f"ipc://")


def secure_ipc_directory(endpoint: str) -> None:
    """Make sure an ipc:// endpoint's socket file will live in a directory only we can enter:
    create it 0700, or refuse one that group or others can access."""
    path = _ipc_path(endpoint)
    if path is not None:
        private_directory(path.parent, f"ipc endpoint {endpoint!r}: directory")


def private_directory(directory: str | Path, what: str) -> None:
    """Create `directory` 0700, or refuse an existing one that group or others can access
    (never chmod it: it may be shared on purpose, like /tmp)."""
    directory = Path(directory)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = directory.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{what} {str(directory)!r} cannot be created: {exc.strerror}") \
            from None
    if mode & 0o077:
        raise ConfigError(f"{what} {str(directory)!r} is accessible by other users (mode "
                          f"{stat.S_IMODE(mode):04o}); `chmod 700` it or use a private "
                          f"directory")


def restrict_ipc_socket(endpoint: str) -> None:
    """After binding: the socket file itself readable and writable by its owner only."""
    path = _ipc_path(endpoint)
    if path is not None and path.exists():
        path.chmod(0o600)


def _ipc_path(endpoint: str) -> Path | None:
    if not endpoint.startswith("ipc://"):
        return None
    raw = endpoint[len("ipc://"):]
    if raw.startswith("@") or raw in ("", "*"):  # abstract namespace or a random name
        return None
    return Path(raw)


# -- key files ------------------------------------------------------------------------------

def _check_key(key: bytes | None, what: str, path: Path) -> bytes:
    if key is None or len(key) != _KEY_Z85_CHARS:
        raise ConfigError(f"{what} {str(path)!r} is malformed: expected a "
                          f"{_KEY_Z85_CHARS}-character Z85 key ({KEYS_FIX})")
    try:
        z85.decode(key)
    except (ValueError, KeyError, IndexError):
        raise ConfigError(f"{what} {str(path)!r} is malformed: not Z85 text ({KEYS_FIX})") \
            from None
    return key


def _read_certificate(path: Path, what: str) -> tuple[bytes | None, bytes | None]:
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist or is not a file ({KEYS_FIX})")
    try:
        return zmq.auth.load_certificate(path)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None
    except ValueError:
        raise ConfigError(f"{what} {str(path)!r} is malformed: no public-key line ({KEYS_FIX})") \
            from None


@dataclass(frozen=True)
class KeyPair:
    """A CURVE identity read from a `.key_secret` certificate."""

    public: bytes
    secret: bytes
    path: Path


def load_key_pair(path: str | Path, what: str = "secret key file") -> KeyPair:
    """Read a `.key_secret` certificate; refuse one that is missing, malformed, readable by
    other users, or whose public key does not belong to its secret key."""
    path = Path(path)
    public, secret = _read_certificate(path, what)
    public = _check_key(public, what, path)
    if secret is None:
        raise ConfigError(f"{what} {str(path)!r} holds no secret-key (is it the public "
                          f"'.key' file? use the '.key_secret' one)")
    secret = _check_key(secret, what, path)
    if zmq.curve_public(secret) != public:
        raise ConfigError(f"{what} {str(path)!r} is malformed: its public key does not match "
                          f"its secret key")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"{what} {str(path)!r} is accessible by other users (mode "
                          f"{mode:04o}); `chmod 600 {path}`")
    return KeyPair(public, secret, path)


def load_public_key(path: str | Path, what: str = "public key file") -> bytes:
    """Read the public key of a `.key` (or `.key_secret`) certificate."""
    path = Path(path)
    public, _ = _read_certificate(path, what)
    return _check_key(public, what, path)


def load_allowed_clients(directory: str | Path) -> frozenset[bytes]:
    """The public keys of the `*.key` certificates in `directory`; at least one."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"allowed_clients directory {str(directory)!r} does not exist or is "
                          f"not a directory ({KEYS_FIX}, then copy each client's .key there)")
    keys = frozenset(load_public_key(p, "allowed client key")
                     for p in sorted(directory.glob("*.key")))
    if not keys:
        raise ConfigError(f"allowed_clients directory {str(directory)!r} holds no '*.key' "
                          f"client public keys: no client could connect")
    return keys


def generate_keys(directory: str | Path, name: str = "server") -> tuple[Path, Path]:
    """Write `NAME.key` (public) and `NAME.key_secret` (secret, created 0600) in
    `directory` (created 0700); never overwrites. Returns (public, secret) paths."""
    if not KEY_NAME.match(name):
        raise ConfigError(f"key name {name!r} must be 'server' or 'client-NAME' (letters, "
                          f"digits, '_', '.', '-')")
    directory = Path(directory)
    public_path = directory / f"{name}.key"
    secret_path = directory / f"{name}.key_secret"
    public, secret = zmq.curve_keypair()
    now = datetime.now().isoformat(timespec="seconds")
    head = f"#   Generated on {now} by fusion-node keys generate\n"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # O_EXCL with mode 0600: the secret is never readable by others, not even briefly.
        _write_new(secret_path, 0o600, head + "#   ZeroMQ CURVE **Secret** Certificate\n"
                   "#   Keep it secret: anyone holding it can impersonate this peer.\n\n"
                   f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
                   f'    secret-key = "{secret.decode()}"\n')
        _write_new(public_path, 0o644, head + "#   ZeroMQ CURVE Public Certificate\n\n"
                   f'metadata\ncurve\n    public-key = "{public.decode()}"\n')
    except FileExistsError as exc:
        raise ConfigError(f"key file {exc.filename!r} already exists; remove it first or "
                          f"pick another --name") from None
    except OSError as exc:
        raise ConfigError(f"cannot write keys in {str(directory)!r}: {exc.strerror}") from None
    return public_path, secret_path


def _write_new(path: Path, mode: int, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as file:
        file.write(text)


# -- applying keys to sockets ---------------------------------------------------------------

@dataclass(frozen=True)
class ClientKeys:
    """A CURVE client identity plus the public key of the server it will talk to."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, client_secret_key: str | Path, server_public_key: str | Path) -> ClientKeys:
        pair = load_key_pair(client_secret_key, "client secret key file")
        return cls(pair.public, pair.secret,
                   load_public_key(server_public_key, "server public key file"))

    def apply(self, socket: zmq.Socket) -> None:
        """Make `socket` a CURVE client; call before bind/connect."""
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_serverkey = self.server_public


class CurveServer:
    """The node's CURVE identity, the authenticator admitting `allowed_clients`, and a count
    of refused handshakes per socket.

    Use one per context: `start()`, then `protect(socket, name)` each socket before it binds
    or connects, `unprotect(socket)` before closing it, and `close()` last."""

    def __init__(self, context: zmq.Context, keys: KeyPair, allowed_clients: str | Path) -> None:
        self._context = context
        self.keys = keys
        self.allowed_dir = Path(allowed_clients)
        self.allowed = load_allowed_clients(self.allowed_dir)
        self._authenticator: zmq.auth.thread.ThreadAuthenticator | None = None
        self._lock = threading.Lock()
        self._refused: Counter[str] = Counter()
        self._monitors: dict[zmq.Socket, tuple[threading.Thread, threading.Event]] = {}

    def start(self) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        authenticator = ThreadAuthenticator(self._context, log=None)
        authenticator.start()
        # The directory was checked (every key parses, at least one) in __init__.
        authenticator.configure_curve(domain=ZAP_DOMAIN, location=str(self.allowed_dir))
        self._authenticator = authenticator

    def protect(self, socket: zmq.Socket, name: str) -> None:
        """Make `socket` a CURVE server (clients must prove a listed key) and count its
        refused handshakes under `name`."""
        if self._authenticator is None:
            raise RuntimeError("CurveServer.start() must be called before protect()")
        socket.curve_secretkey = self.keys.secret
        socket.curve_publickey = self.keys.public
        socket.curve_server = True
        socket.zap_domain = ZAP_DOMAIN.encode()
        monitor = socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        stop = threading.Event()
        thread = threading.Thread(target=self._count_blocking, args=(monitor, name, stop),
                                  name=f"curve monitor {name}", daemon=True)
        thread.start()
        self._monitors[socket] = (thread, stop)

    def _count_blocking(self, monitor: zmq.Socket, name: str, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                if not monitor.poll(_MONITOR_POLL_MS):
                    continue
                event = recv_monitor_message(monitor)
                reason = _REFUSALS.get(event["event"])
                if reason is not None:
                    with self._lock:
                        self._refused[f"{name}.{reason}"] += 1
        except zmq.ZMQError:
            return  # the context was terminated under us: nothing left to count
        finally:
            monitor.close(linger=0)

    def unprotect(self, socket: zmq.Socket) -> None:
        """Stop monitoring `socket`; call before closing it."""
        entry = self._monitors.pop(socket, None)
        if entry is None:
            return
        thread, stop = entry
        stop.set()
        thread.join(2.0)  # within one poll period
        if not socket.closed:
            socket.disable_monitor()

    def refused(self) -> dict[str, int]:
        """Refused handshakes so far, by "socket.reason"."""
        with self._lock:
            return dict(self._refused)

    def summary(self) -> dict[str, object]:
        refused = self.refused()
        return {"curve": True, "allowed_clients": len(self.allowed),
                "refused_handshakes": sum(refused.values()), "refused": refused}

    def close(self) -> None:
        for socket in list(self._monitors):
            self.unprotect(socket)
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
