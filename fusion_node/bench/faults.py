"""Fault injection for the fault tests and `fusion-node bench soak`: real processes and
sockets that misbehave the way hardware and software do on a robot.

- `camera-server`: a network camera (HTTP MJPEG, as IP cameras serve) showing the simulated
  face; stopping the process unplugs it, starting it again on the same port replugs it.
- `microphone`: the real PortAudio microphone driver (`SoundDeviceMicrophone`) with PortAudio
  replaced at its edge by a device paced in real time that overruns on a schedule: samples
  are lost inside the device and the next callback carries the input-overflow flag.
- `joints`: a robot controller publishing joint states at any rate (10x for a flood), with
  stalls on a schedule.
- `shm-attack`: a publisher that abuses shared memory: a ring it truncates under the node
  (an unsealed file, as protocol.md §10 forbids), and a genuine sealed ring it tries to
  truncate, rewrites with garbage and unlinks.
- `future-stamps`: a publisher that stamps joint states a day ahead (more than the ring
  holds) and sends a seq of 2^63 - 1, on a stream another source also publishes.
- `FaultyEngine`: wraps a loaded engine so a test can make it raise or hang.
- Wall-clock jumps: `time.time()` jumping in this process and in child processes (through a
  `sitecustomize` module), to show the node never reads the wall clock.

Run the processes as `python -m fusion_node.bench.faults KIND ...`; each prints a JSON summary of
what it did on exit (SIGTERM or SIGINT stop it cleanly). The two attackers send a
`fault.probe` health message every 10 ms until a line arrives on their standard input, so
the caller can wait until the node is connected (it counts the probes as an unknown stream)
before the attack starts: nothing is lost to ZeroMQ's slow joiner.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusion_node.host.signals import cancel_on_signals, stop_on_signals

if TYPE_CHECKING:

    from fusion_node.clock import Clock
    from fusion_node.node import Node

_NS_PER_S = 1_000_000_000


# -- helpers for starting fault processes ---------------------------------------------------

def free_tcp_port() -> int:
    """A loopback TCP port that is free now (for a server that must come back on it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_tcp_port(port: int, timeout_s: float = 10.0) -> None:
    """Block until something accepts connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after "
                                   f"{timeout_s} s") from None
            time.sleep(0.05)


def fault_process_argv(kind: str, *args: str) -> list[str]:
    """The command line that runs fault process `kind` with this Python."""
    return [sys.executable, "-m", "fusion_node.bench.faults", kind, *args]


# -- a network camera that can be unplugged -------------------------------------------------

_BOUNDARY = b"frame"


def serve_camera(port: int, fps: float, stop: threading.Event) -> None:
    """Serve the simulated face as an HTTP MJPEG stream on 127.0.0.1:`port` until `stop`."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import cv2

    from drivers.sim.simulated import SimulatedCamera, SimulatedCameraConfig
    from fusion_node.clock import MonotonicClock

    # OpenCV's worker pool, torn down at exit while a request thread is still encoding,
    # aborts the process ("terminate called without an active exception"); one frame
    # at a time needs no pool.
    cv2.setNumThreads(0)
    clock = MonotonicClock()
    camera = SimulatedCamera(SimulatedCameraConfig("camera.server", fps), clock)
    period_ns = round(_NS_PER_S / fps)

    class Handler(BaseHTTPRequestHandler):
        timeout = 5.0  # a client that stops reading must not keep the server from exiting

        def log_message(self, *args: Any) -> None:  # one line per request is noise here
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type",
                             f"multipart/x-mixed-replace; boundary={_BOUNDARY.decode()}")
            self.end_headers()
            next_ns = clock.now_ns()
            try:
                while not stop.is_set():
                    # Frames on a fixed grid, as a camera's sensor clock gives them.
                    time.sleep(max(0, next_ns - clock.now_ns()) / 1e9)
                    image = camera.render(clock.now_ns())
                    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
                    if not ok:
                        raise RuntimeError("JPEG encoding failed")
                    body = jpeg.tobytes()
                    self.wfile.write(b"--" + _BOUNDARY + b"\r\nContent-Type: image/jpeg\r\n"
                                     b"Content-Length: %d\r\n\r\n" % len(body) + body + b"\r\n")
                    next_ns += period_ns
            except OSError:
                pass  # the client went away, or stopped reading

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    # Request threads are joined on close (they see `stop` within a frame), so none is
    # still inside OpenCV when the interpreter finalizes.
    server.daemon_threads = False
    server.block_on_close = True
    thread = threading.Thread(target=server.serve_forever, name="camera server", daemon=True)
    thread.start()
    stop.wait()
    server.shutdown()
    server.server_close()


# -- a microphone whose device overruns -----------------------------------------------------

@dataclass(frozen=True)
class Overrun:
    """At `at_s` after the device starts, `lost_ms` of audio are lost inside the device."""

    at_s: float
    lost_ms: float


def parse_schedule(text: str, what: str) -> list[tuple[float, float]]:
    """"AT:DURATION,..." (seconds, and ms or s as the option says) into pairs."""
    pairs = []
    for item in filter(None, text.split(",")):
        try:
            at, duration = item.split(":")
            pairs.append((float(at), float(duration)))
        except ValueError:
            raise ValueError(f"{what}: {item!r} is not AT:DURATION (two numbers)") from None
    return pairs


class _TimeInfo:
    """PortAudio's time info for an input callback, in seconds on CLOCK_MONOTONIC."""

    def __init__(self, adc_s: float, current_s: float) -> None:
        self.inputBufferAdcTime = adc_s  # PortAudio's field names
        self.currentTime = current_s
        self.outputBufferDacTime = 0.0


class PacedInputDevice:
    """Stands in for `sounddevice.InputStream`: calls the driver's callback with one block
    every block period, as PortAudio's thread does, stamped with the block's ADC time.

    At each overrun the device loses `lost_ms` of samples: no callback carries them, and
    the next one has `input_overflow` set and an ADC time that shows the jump."""

    def __init__(self, sd: Any, callback: Callable[..., None],
                 finished_callback: Callable[[], None], sample_rate: int, blocksize: int,
                 overruns: Sequence[Overrun], clock: Clock) -> None:
        self._sd = sd
        self._callback = callback
        self._finished = finished_callback
        self._rate = sample_rate
        self._block = blocksize
        self._overruns = sorted(overruns, key=lambda o: o.at_s)
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paced input", daemon=True)
        self.lost_samples = 0
        # Per overrun, the capture times of the first lost sample and of the next delivered one.
        self.overrun_spans_ns: list[tuple[int, int]] = []

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def _time_of(self, t0_ns: int, index: int) -> int:
        return t0_ns + index * _NS_PER_S // self._rate

    def _run(self) -> None:
        import numpy as np

        from drivers.sim.simulated import microphone_samples

        rng = np.random.default_rng(0)
        t0_ns = self._clock.now_ns()
        index = 0
        pending = list(self._overruns)
        overflow = False
        try:
            while not self._stop.is_set():
                if pending and self._time_of(t0_ns, index) >= t0_ns + pending[0].at_s * 1e9:
                    lost = round(pending.pop(0).lost_ms * self._rate / 1000)
                    self.overrun_spans_ns.append((self._time_of(t0_ns, index),
                                                  self._time_of(t0_ns, index + lost)))
                    index += lost  # these samples never reach the host
                    self.lost_samples += lost
                    overflow = True
                end_ns = self._time_of(t0_ns, index + self._block)
                # A block is handed over once its last sample has been captured.
                self._stop.wait(max(0, end_ns - self._clock.now_ns()) / 1e9)
                if self._stop.is_set():
                    return
                t_ns = self._time_of(t0_ns, index) + (
                    np.arange(self._block, dtype=np.int64) * _NS_PER_S // self._rate)
                block = microphone_samples(t_ns, rng)
                status = self._sd.CallbackFlags()
                status.input_overflow = overflow
                overflow = False
                # The stream time is read just before the callback, as PortAudio does.
                info = _TimeInfo(self._time_of(t0_ns, index) / 1e9, self._clock.now_ns() / 1e9)
                self._callback(block, self._block, info, status)
                index += self._block
        finally:
            self._finished()


def overrunning_microphone(stream: str, overruns: Sequence[Overrun], clock: Clock,
                           sample_rate: int = 16000, chunk_ms: float = 10.0) -> Any:
    """A `SoundDeviceMicrophone` whose PortAudio device is a `PacedInputDevice`: the
    driver's own callback, overflow handling, chunking and publishing all run unchanged."""
    from drivers.microphone import SoundDeviceMicrophone, SoundDeviceMicrophoneConfig

    class OverrunningMicrophone(SoundDeviceMicrophone):
        device: PacedInputDevice | None = None

        def _open_blocking(self, sd: Any) -> Any:
            self.device = PacedInputDevice(sd, self._callback, self._finished,
                                           self.config.sample_rate, self._chunker.chunk_samples,
                                           overruns, self._clock)
            self.device.start()
            return self.device

    config = SoundDeviceMicrophoneConfig(stream, device="paced input", sample_rate=sample_rate,
                                         chunk_ms=chunk_ms)
    return OverrunningMicrophone(config, clock)


async def _publish_until_signal(driver: Any, endpoint: str) -> None:
    import zmq

    from drivers.process import publish_driver
    from fusion_node.transport import Publisher

    context = zmq.Context()
    publisher = Publisher(context, endpoint)
    task = asyncio.current_task()
    assert task is not None
    try:
        with cancel_on_signals(task):
            await publish_driver(driver, publisher)
    except asyncio.CancelledError:
        pass  # stopped by a signal, after the driver disconnected
    finally:
        publisher.close()
        context.term()


# -- a robot controller that floods or stalls ------------------------------------------------

def run_joint_controller(endpoint: str, stream: str, rate_hz: float, seconds: float,
                         stalls: Sequence[tuple[float, float]] = (),
                         stop: threading.Event | None = None) -> dict[str, Any]:
    """Publish simulated arm states on `endpoint` at `rate_hz` for `seconds`, stamped on the
    controller's sample grid; during each (at_s, stall_s) stall nothing is sent.

    Returns what was sent: `sent`, `last_seq`, and per stall the stamps of the last state
    before it and the first after it (`stall_gaps_ns`)."""
    import zmq

    from drivers.sim.simulated import JOINT_NAMES, joint_motion
    from fusion_node.clock import MonotonicClock
    from fusion_node.protocol import JointState
    from fusion_node.transport import Publisher

    stop = stop or threading.Event()
    clock = MonotonicClock()
    context = zmq.Context()
    publisher = Publisher(context, endpoint)
    period_ns = _NS_PER_S / rate_hz
    start_ns = clock.now_ns()
    end_ns = start_ns + round(seconds * _NS_PER_S)
    windows = [(start_ns + round(at * _NS_PER_S), start_ns + round((at + dur) * _NS_PER_S))
               for at, dur in stalls]
    gaps: list[list[int]] = [[0, 0] for _ in windows]
    seq = 0
    last_t_ns = 0
    k = 0
    try:
        while not stop.is_set():
            t_ns = start_ns + round(k * period_ns)
            if t_ns >= end_ns:
                break
            k += 1
            stalled = [i for i, (a, b) in enumerate(windows) if a <= t_ns < b]
            if stalled:
                continue
            # Sleep, never spin: at 2 kHz a spinning sender would take a whole core.
            wait_ns = t_ns - clock.now_ns()
            if wait_ns > 0:
                time.sleep(wait_ns / 1e9)
            for i, (a, _) in enumerate(windows):
                if last_t_ns < a <= t_ns:
                    gaps[i] = [last_t_ns, t_ns]
            position, velocity, effort = joint_motion(t_ns)
            publisher.send(JointState(stream, seq, t_ns, JOINT_NAMES, position, velocity,
                                      effort))
            seq += 1
            last_t_ns = t_ns
    finally:
        publisher.close()
        context.term()
    return {"sent": seq, "last_seq": seq - 1, "stall_gaps_ns": gaps,
            "first_ns": start_ns, "last_ns": last_t_ns}


# -- outside publishers that attack the node ---------------------------------------------------

ATTACK_PROBE = "fault.probe"


def _probe_until_go(publisher: Any, stop: threading.Event) -> None:
    """Send probes until a line arrives on stdin (the caller saw the node connect)."""
    import select

    from fusion_node.protocol import Health

    seq = 0
    while not stop.is_set() and not select.select([sys.stdin], [], [], 0.01)[0]:
        publisher.send(Health(ATTACK_PROBE, seq, time.monotonic_ns(), {}))
        seq += 1
    if not stop.is_set():
        sys.stdin.readline()


def _shm_header(stream: str, seq: int, image: Any, shm: dict[str, Any]) -> list[bytes]:
    """The parts of a frame message whose payload an `shm` entry points at."""
    import msgpack

    from fusion_node.protocol import Frame, encode

    topic, header, _ = encode(Frame(stream, seq, time.monotonic_ns(), image))
    fields = msgpack.unpackb(bytes(header), raw=False)
    fields["shm"] = shm
    return [bytes(topic), msgpack.packb(fields, use_bin_type=True)]


def run_shm_attack(endpoint: str, stream: str, stop: threading.Event) -> dict[str, Any]:
    """Abuse shared memory from outside, as one process that may publish on an endpoint the
    node connects to can; returns what it did.

    1. An unsealed ring (a plain /dev/shm file, fusion-node's layout and name) with a frame
       in slot 0; the header is sent, the file truncated to 0 bytes, and slot 0 named again.
       A receiver that maps an unsealed file dies of SIGBUS here.
    2. A genuine sealed ring (the Publisher's own): frames are sent, then it tries to
       truncate it, rewrites its header and slot table with garbage and names slot 0 again,
       then unlinks it and sends once more.
    """
    import mmap
    import struct

    import numpy as np
    import zmq

    from fusion_node import shm as shm_module
    from fusion_node.protocol import Frame
    from fusion_node.shm import ShmConfig
    from fusion_node.transport import Publisher

    context = zmq.Context()
    publisher = Publisher(context, endpoint, shm=ShmConfig(slots=8, lease_ms=3000))
    result: dict[str, Any] = {"unsealed_headers": 0, "truncate_refused": 0,
                              "rewritten_headers": 0, "unlinked_headers": 0}
    image = np.full((240, 320, 3), 77, np.uint8)
    try:
        _probe_until_go(publisher, stop)
        # 1. An unsealed ring, truncated under whoever mapped it.
        # Named as a live publisher's (this process's own start time): any publisher on the
        # host that starts meanwhile reclaims the segments of dead ones.
        start = shm_module._start_time(os.getpid())
        name = f"{shm_module.SEGMENT_PREFIX}-{os.getpid()}-{start}-9999"
        path = shm_module.SHM_DIR / name
        slot_size = -(-image.nbytes // 4096) * 4096
        data_offset, size = 4096, 4096 + slot_size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            with mmap.mmap(fd, size) as ring:
                struct.pack_into("<8sQQQQQ", ring, 0, b"FNSHM\x00\x00\x01", 1, slot_size,
                                 data_offset, 3_000_000_000, size)
                ring[data_offset:data_offset + image.nbytes] = image.tobytes()
                struct.pack_into("<QqQ", ring, 64, 2, time.monotonic_ns(), image.nbytes)
            entry = {"segment": name, "slot": 0, "generation": 2, "offset": data_offset,
                     "length": image.nbytes}
            publisher.send_parts(_shm_header(stream, 0, image, entry))
            time.sleep(0.2)  # long enough for the receiver to map it
            os.ftruncate(fd, 0)
            publisher.send_parts(_shm_header(stream, 1, image, entry))
            result["unsealed_headers"] = 2
        finally:
            os.close(fd)
        time.sleep(0.2)
        os.unlink(path)
        # 2. A sealed ring: the same tries fail, or end in a counted rejection.
        for seq in range(2, 6):
            publisher.send(Frame(stream, seq, time.monotonic_ns(), image))
            time.sleep(0.05)
        assert publisher.shm is not None
        link = shm_module.SHM_DIR / publisher.shm.segments[0]
        try:
            os.truncate(link, 0)
        except PermissionError:
            result["truncate_refused"] += 1
        fd = os.open(link, os.O_RDWR)
        try:
            with mmap.mmap(fd, os.fstat(fd).st_size) as ring:
                data_offset = struct.unpack_from("<8sQQQQQ", ring, 0)[3]
                ring[0:4096] = bytes([0xA5]) * 4096  # header and slot table: garbage
        finally:
            os.close(fd)
        entry = {"segment": link.name, "slot": 0, "generation": 2, "offset": data_offset,
                 "length": image.nbytes}
        publisher.send_parts(_shm_header(stream, 6, image, entry))
        result["rewritten_headers"] = 1
        time.sleep(0.1)
        os.unlink(link)
        publisher.send_parts(_shm_header(stream, 7, image, entry))
        result["unlinked_headers"] = 1
        time.sleep(0.2)  # let the last messages leave before the socket closes
    finally:
        publisher.close()
        context.term()
    return result


def run_future_stamps(endpoint: str, stream: str, count: int, ahead_s: float,
                      stop: threading.Event) -> dict[str, Any]:
    """Publish `count` joint states on `stream` stamped `ahead_s` in the future, then one
    stamped now with seq 2^63 - 1; returns what was sent."""
    import numpy as np
    import zmq

    from drivers.sim.simulated import JOINT_NAMES, joint_motion
    from fusion_node.protocol import JointState
    from fusion_node.transport import Publisher

    context = zmq.Context()
    publisher = Publisher(context, endpoint, hwm=10 * count)
    ahead_ns = round(ahead_s * _NS_PER_S)
    try:
        _probe_until_go(publisher, stop)
        start_ns = time.monotonic_ns()
        for seq in range(count):
            t_ns = start_ns + ahead_ns + seq * 5_000_000
            position, velocity, effort = joint_motion(t_ns)
            publisher.send(JointState(stream, seq, t_ns, JOINT_NAMES, position, velocity,
                                      effort))
        now_ns = time.monotonic_ns()
        position, velocity, effort = joint_motion(now_ns)
        publisher.send(JointState(stream, 2**63 - 1, now_ns, JOINT_NAMES,
                                  np.asarray(position), np.asarray(velocity),
                                  np.asarray(effort)))
        time.sleep(0.2)  # let the messages leave before the socket closes
    finally:
        publisher.close()
        context.term()
    return {"future": count, "ahead_s": ahead_s, "huge_seq": 1, "first_ns": start_ns,
            "last_ns": now_ns}


# -- engines that raise or hang ---------------------------------------------------------------

class FaultyEngine:
    """An engine wrapper that, on demand, raises on its next calls or hangs on its next call
    (blocked, as a backend stuck in a driver call is, without holding the GIL); otherwise
    it runs the real engine."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.name = inner.name
        self.model_hash = inner.model_hash
        self._lock = threading.Lock()
        self._raise_calls = 0
        self._error: Exception | None = None
        self._hang_s = 0.0
        self.raised = 0
        self.hangs = 0

    def __getattr__(self, name: str) -> Any:  # inputs, outputs, backend, ...
        return getattr(self._inner, name)

    def raise_next(self, calls: int, error: Exception) -> None:
        with self._lock:
            self._raise_calls, self._error = calls, error

    def hang_next(self, seconds: float) -> None:
        with self._lock:
            self._hang_s = seconds

    def infer(self, feeds: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            hang_s, self._hang_s = self._hang_s, 0.0
            error = self._error if self._raise_calls > 0 else None
            self._raise_calls = max(0, self._raise_calls - 1)
        if hang_s:
            self.hangs += 1
            threading.Event().wait(hang_s)
        if error is not None:
            self.raised += 1
            # A copy each time: raising the stored instance would hang this tick's frames
            # (its window, frames in a shared-memory ring) on its traceback until the next
            # fault, keeping a restarted camera's dead ring mapped.
            raise copy.copy(error)
        return self._inner.infer(feeds)  # type: ignore[no-any-return]


def inject_faulty_engine(node: Node, engine_name: str) -> FaultyEngine:
    """Wrap the running node's engine `engine_name` in a `FaultyEngine` and return it."""
    for runner in node.runners:
        if runner.name == engine_name:
            faulty = FaultyEngine(runner.engine)
            runner.engine = faulty
            return faulty
    raise KeyError(f"no engine {engine_name!r} in the node "
                   f"({[r.name for r in node.runners]})")


# -- wall-clock jumps ------------------------------------------------------------------------

WALL_JUMPS_ENV = "FUSION_NODE_FAULT_WALL_JUMPS"


@dataclass(frozen=True)
class WallClockJumps:
    """A wall clock that jumps: in each `period_ns` of CLOCK_MONOTONIC it reads the next
    of `offsets_s` away from the truth (cycling), e.g. (0, 3600, -3600): an hour forward,
    two hours back, an hour forward, ... whenever the process happens to run."""

    period_ns: int
    offsets_s: tuple[float, ...]

    def offset_ns(self, monotonic_ns: int) -> int:
        return round(self.offsets_s[monotonic_ns // self.period_ns % len(self.offsets_s)] * 1e9)


def install_wall_clock_jumps(jumps: WallClockJumps) -> Callable[[], None]:
    """Make `time.time()`, `time.time_ns()` and `clock_gettime(CLOCK_REALTIME)` of this
    process jump as `jumps` says. Returns a function that undoes it."""
    real_time, real_time_ns = time.time, time.time_ns
    real_gettime, real_gettime_ns = time.clock_gettime, time.clock_gettime_ns

    def offset_ns() -> int:
        return jumps.offset_ns(time.monotonic_ns())

    def fake_time() -> float:
        return real_time() + offset_ns() / 1e9

    def fake_time_ns() -> int:
        return real_time_ns() + offset_ns()

    def fake_gettime(clk_id: int) -> float:
        shift = offset_ns() / 1e9 if clk_id == time.CLOCK_REALTIME else 0.0
        return real_gettime(clk_id) + shift

    def fake_gettime_ns(clk_id: int) -> int:
        shift = offset_ns() if clk_id == time.CLOCK_REALTIME else 0
        return real_gettime_ns(clk_id) + shift

    time.time, time.time_ns = fake_time, fake_time_ns
    time.clock_gettime, time.clock_gettime_ns = fake_gettime, fake_gettime_ns

    def undo() -> None:
        time.time, time.time_ns = real_time, real_time_ns
        time.clock_gettime, time.clock_gettime_ns = real_gettime, real_gettime_ns

    return undo


def install_wall_clock_jumps_from_env() -> None:
    """Install the jumps described in $FUSION_NODE_FAULT_WALL_JUMPS, if set."""
    text = os.environ.get(WALL_JUMPS_ENV)
    if text:
        data = json.loads(text)
        install_wall_clock_jumps(WallClockJumps(int(data["period_ns"]),
                                                tuple(map(float, data["offsets_s"]))))


def wall_clock_jump_env(jumps: WallClockJumps, directory: Path) -> dict[str, str]:
    """Environment variables under which every Python child process (driver processes
    included) gets the same wall-clock jumps: a `sitecustomize` module in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    # This module's own source, so a child that runs `-m fusion_node.bench.faults` does not find
    # it imported already.
    (directory / "sitecustomize.py").write_text(
        Path(__file__).read_text() + "\n\ninstall_wall_clock_jumps_from_env()\n")
    path = os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))
    return {WALL_JUMPS_ENV: json.dumps({"period_ns": jumps.period_ns,
                                        "offsets_s": list(jumps.offsets_s)}),
            "PYTHONPATH": path}


# -- command line ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusion_node.bench.faults",
                                     description="Processes that inject faults into a node.")
    kinds = parser.add_subparsers(dest="kind", required=True)
    camera = kinds.add_parser("camera-server", help="an HTTP MJPEG camera (the simulated face)")
    camera.add_argument("--port", type=int, required=True)
    camera.add_argument("--fps", type=float, default=30.0)
    mic = kinds.add_parser("microphone", help="the PortAudio driver on an overrunning device")
    mic.add_argument("--stream", required=True)
    mic.add_argument("--endpoint", required=True)
    mic.add_argument("--overruns", default="", help="AT_S:LOST_MS,... after the start")
    joints = kinds.add_parser("joints", help="a joint-state controller (flood, stalls)")
    joints.add_argument("--stream", required=True)
    joints.add_argument("--endpoint", required=True)
    joints.add_argument("--rate-hz", type=float, default=200.0)
    joints.add_argument("--seconds", type=float, required=True)
    joints.add_argument("--stalls", default="", help="AT_S:STALL_S,... after the start")
    attack = kinds.add_parser("shm-attack", help="truncate and rewrite shared-memory rings")
    attack.add_argument("--stream", required=True)
    attack.add_argument("--endpoint", required=True)
    future = kinds.add_parser("future-stamps", help="joint states stamped far in the future")
    future.add_argument("--stream", required=True)
    future.add_argument("--endpoint", required=True)
    future.add_argument("--count", type=int, default=520)
    future.add_argument("--ahead-s", type=float, default=86_400.0)
    args = parser.parse_args(argv)
    stop = threading.Event()
    with stop_on_signals(stop):
        return _run_fault(args, stop)


def _run_fault(args: argparse.Namespace, stop: threading.Event) -> int:
    if args.kind == "shm-attack":
        print(json.dumps(run_shm_attack(args.endpoint, args.stream, stop)),
              flush=True)
        return 0
    if args.kind == "future-stamps":
        print(json.dumps(run_future_stamps(args.endpoint, args.stream, args.count,
                                           args.ahead_s, stop)), flush=True)
        return 0
    if args.kind == "camera-server":
        serve_camera(args.port, args.fps, stop)
        return 0
    if args.kind == "joints":
        result = run_joint_controller(args.endpoint, args.stream, args.rate_hz, args.seconds,
                                      parse_schedule(args.stalls, "--stalls"), stop)
        print(json.dumps(result), flush=True)
        return 0
    from fusion_node.clock import MonotonicClock

    overruns = [Overrun(at, lost) for at, lost in parse_schedule(args.overruns, "--overruns")]
    microphone = overrunning_microphone(args.stream, overruns, MonotonicClock())
    asyncio.run(_publish_until_signal(microphone, args.endpoint))
    device = microphone.device
    print(json.dumps({"overflows": microphone.overflows,
                      "dropped_samples": microphone.dropped_samples,
                      "lost_in_device": device.lost_samples if device else 0,
                      "overrun_spans_ns": device.overrun_spans_ns if device else []}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
