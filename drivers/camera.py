"""OpenCV camera driver: a live device (V4L2 index or path, network URL) or a video file.

Frames go out as "bgr8", OpenCV's native order, so no colour conversion is paid per frame.
Given a publisher's loans (`use_loans`), OpenCV decodes each frame straight into a slot of the
publisher's shared-memory ring, so nothing copies it again on its way to the subscribers.

Live sources are read continuously by a capture thread (a camera's own buffer would otherwise
hand out stale frames) and stamped at grab time minus the calibrated pipeline delay; frames
wait for `recv` in a bounded queue that drops the oldest, and a dropped frame shows up as a
gap in `seq`. Video files are read on demand and stamped at the clock time of `connect` plus
the frame's position in the file, delivered either when the clock reaches that time
(`realtime`) or as fast as they are read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from drivers.base import Loan
from fusion_node.clock import Clock
from fusion_node.errors import ConfigError, DriverError, EndOfStream
from fusion_node.protocol import Frame

log = logging.getLogger(__name__)

_NS_PER_S = 1_000_000_000
_LIVE_QUEUE_FRAMES = 2  # enough to absorb loop jitter; more only adds latency
_STOP_TIMEOUT_S = 2.0
# Reopening a live source that went away: first retry after this, doubling up to the max.
_RECONNECT_INITIAL_S = 0.1
_RECONNECT_MAX_S = 2.0


def is_live_source(source: int | str) -> bool:
    """A device index, a /dev path or a URL is live; anything else is a video file."""
    return isinstance(source, int) or source.startswith("/dev/") or "://" in source


@dataclass(frozen=True, slots=True)
class OpenCVCameraConfig:
    """An OpenCV camera or video file.

    Live sources only: `fps`, `width`, `height` (None: the device's default), `delay_ms`
    (calibrated delay from exposure to grab), `timeout_ms` (no frame for this long from an
    open device is a fault), `reconnect` (a device that stops delivering, unplugged or a
    network camera gone, is reopened with back-off until it returns, instead of failing the
    driver; meanwhile no frames are sent and the node masks the stream). Files only: `realtime` (pace by the file's frame times), `loop` (restart at the
    end, stamps continuing).
    """

    stream: str
    source: int | str
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    delay_ms: float = 0.0
    timeout_ms: float = 2000.0
    realtime: bool = True
    loop: bool = False
    reconnect: bool = True

    def __post_init__(self) -> None:
        where = f"stream {self.stream!r}"
        for key in ("fps", "width", "height", "timeout_ms"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{where}: {key} is {value}, must be > 0")
        if self.delay_ms < 0:
            raise ConfigError(f"{where}: delay_ms is {self.delay_ms}, must be >= 0")
        if is_live_source(self.source):
            if self.loop or not self.realtime:
                raise ConfigError(f"{where}: loop/realtime apply to video files only, "
                                  f"not to live source {self.source!r}")
        else:
            for key in ("fps", "width", "height"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"{where}: {key} applies to live sources only; video "
                                      f"file {self.source!r} has its own")
            if self.delay_ms:
                raise ConfigError(f"{where}: delay_ms applies to live sources only, not to "
                                  f"video file {self.source!r}")


class OpenCVCamera:
    """Frames from `cv2.VideoCapture`, stamped at capture on the node clock.

    `dropped_frames` counts live frames lost because `recv` fell behind; `disconnects` and
    `reconnects` count a live source going away and coming back.
    """

    def __init__(self, config: OpenCVCameraConfig, clock: Clock) -> None:
        self.config = config
        self.stream = config.stream
        self.live = is_live_source(config.source)
        self.dropped_frames = 0
        self._clock = clock
        self._delay_ns = round(config.delay_ms * 1e6)
        self._capture: cv2.VideoCapture | None = None
        self._seq = 0
        # Files: read under a lock so disconnect never releases the capture mid-read.
        self._lock = threading.Lock()
        self._start_ns = 0
        self._loop_offset_ns = 0
        self._last_pos_ns = -1
        self._period_ns = 0
        self._ended = False
        # Live: the capture thread hands frames (or its failure) to the loop.
        self._frames: collections.deque[Frame] = collections.deque(maxlen=_LIVE_QUEUE_FRAMES)
        self._wakeup = asyncio.Event()
        self._failure = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_seq = 0
        # The capture thread's current capture (replaced on reconnect) and whether it is
        # reopening the source now.
        self._live_capture: cv2.VideoCapture | None = None
        self._reconnecting = False
        self.disconnects = 0
        self.reconnects = 0
        self._loan: Loan | None = None
        # The next frame's shape: the source's reported size, then the last frame's.
        self._shape: tuple[int, ...] | None = None
        self.decoded_in_place = 0  # frames decoded straight into a lent array

    def use_loans(self, loan: Loan) -> None:
        """Decode into arrays `loan(stream, shape, dtype)` lends (`Publisher.loan`)."""
        self._loan = loan

    def _decode(self, read: Callable[..., tuple[bool, np.ndarray]]
                ) -> tuple[bool, np.ndarray]:
        """`read()` (`capture.read` or `capture.retrieve`), into a lent array if there is one
        of the right shape; OpenCV allocates anew when the shape differs, and the unused loan
        is given back when it is dropped here."""
        if self._loan is None or self._shape is None:
            ok, image = read()
        else:
            target = self._loan(self.stream, self._shape, np.dtype(np.uint8))
            ok, image = read(target)
            self.decoded_in_place += ok and image is target
        if ok:
            self._shape = image.shape
        return ok, image

    @property
    def _name(self) -> str:
        kind = "camera" if self.live else "video file"
        return f"{kind} {self.config.source!r} ({self.stream})"

    async def connect(self) -> None:
        capture = await asyncio.to_thread(self._open_blocking)
        self._capture = capture
        size = (int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)))
        self._shape = (*size, 3) if min(size) > 0 else None
        self._seq = self._next_seq = 0
        self._ended, self._failure = False, ""
        self._loop_offset_ns, self._last_pos_ns = 0, -1
        self._start_ns = self._clock.now_ns()
        if self.live:
            self._loop = asyncio.get_running_loop()
            self._frames.clear()
            self._stop.clear()
            self._thread = threading.Thread(target=self._capture_blocking, args=(capture,),
                                            name=f"camera-{self.stream}", daemon=True)
            self._thread.start()

    def _open_blocking(self) -> cv2.VideoCapture:
        cfg = self.config
        capture = cv2.VideoCapture(cfg.source)
        if not capture.isOpened():
            capture.release()
            raise DriverError(f"{self._name}: cannot open")
        if not self.live:
            fps = capture.get(cv2.CAP_PROP_FPS)
            if not fps > 0:
                capture.release()
                raise DriverError(f"{self._name}: reports frame rate {fps}, cannot time "
                                  "its frames")
            self._period_ns = round(_NS_PER_S / fps)
            return capture
        for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, cfg.width),
                            (cv2.CAP_PROP_FRAME_HEIGHT, cfg.height), (cv2.CAP_PROP_FPS, cfg.fps)):
            if value is not None:
                capture.set(prop, value)
        size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        wanted = (cfg.width or size[0], cfg.height or size[1])
        if size != wanted:
            capture.release()
            raise DriverError(f"{self._name}: gives {size[0]}x{size[1]}, configured "
                              f"{wanted[0]}x{wanted[1]}")
        return capture

    async def recv(self) -> Frame:
        if self._capture is None:
            raise DriverError(f"{self._name} is not connected")
        if self.live:
            return await self._recv_live()
        return await asyncio.to_thread(self._recv_file_blocking)

    # Video files --------------------------------------------------------------------------

    def _recv_file_blocking(self) -> Frame:
        with self._lock:
            frame = self._read_file_locked()
        if self.config.realtime:
            self._clock.sleep_until(frame.t_capture_ns)
        return frame

    def _read_file_locked(self) -> Frame:
        capture = self._capture
        if capture is None:
            raise DriverError(f"{self._name} is not connected")
        if self._ended:
            raise EndOfStream(f"{self._name} ended")
        ok, image = self._decode(capture.read)
        if not ok and self.config.loop and self._last_pos_ns >= 0:
            # Restart one frame period after the last frame, so stamps stay evenly spaced.
            self._loop_offset_ns += self._last_pos_ns + self._period_ns
            self._last_pos_ns = -1
            capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = self._decode(capture.read)
        if not ok:
            self._ended = True
            raise EndOfStream(f"{self._name} ended after {self._seq} frames")
        pos_ns = round(capture.get(cv2.CAP_PROP_POS_MSEC) * 1e6)
        if pos_ns <= self._last_pos_ns:
            raise DriverError(f"{self._name}: frame {self._seq} is at {pos_ns / 1e6} ms, not "
                              f"after the previous frame at {self._last_pos_ns / 1e6} ms")
        self._last_pos_ns = pos_ns
        return self._frame(self._start_ns + self._loop_offset_ns + pos_ns, image)

    def _frame(self, t_capture_ns: int, image: np.ndarray) -> Frame:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise DriverError(f"{self._name}: frame is {image.dtype} {list(image.shape)}, "
                              "expected uint8 [H, W, 3]")
        frame = Frame(self.stream, self._seq, t_capture_ns, image, "bgr8")
        self._seq += 1
        return frame

    # Live sources -------------------------------------------------------------------------

    def _capture_blocking(self, capture: cv2.VideoCapture) -> None:
        self._live_capture = capture
        while not self._stop.is_set():
            # Stamp between grab (the frame has arrived) and retrieve (decoding), so decode
            # time does not shift the stamp.
            grabbed = capture.grab()
            t_capture_ns = self._clock.now_ns() - self._delay_ns
            if self._stop.is_set():
                return
            if not grabbed:
                if not self.config.reconnect:
                    self._fail("grab failed (device disconnected?)")
                    return
                reopened = self._reconnect_blocking(capture)
                if reopened is None:  # stopped while the source was away
                    return
                capture = reopened
                continue
            ok, image = self._decode(capture.retrieve)
            if not ok:
                self._fail("cannot decode the grabbed frame")
                return
            try:
                frame = self._frame(t_capture_ns, image)
            except DriverError as exc:
                self._fail(str(exc))
                return
            self._frames.append(frame)  # a full deque drops its oldest frame
            self._wake()

    def _reconnect_blocking(self, capture: cv2.VideoCapture) -> cv2.VideoCapture | None:
        """Release a source that stopped delivering and reopen it with exponential back-off
        until it opens (returned) or the driver stops (None)."""
        self._reconnecting = True
        self._live_capture = None
        capture.release()
        self.disconnects += 1
        log.warning("%s: grab failed (device disconnected?); reopening with back-off",
                    self._name)
        backoff_s = _RECONNECT_INITIAL_S
        attempts = 0
        try:
            while not self._stop.wait(backoff_s):
                attempts += 1
                try:
                    reopened = self._open_blocking()
                except DriverError:
                    backoff_s = min(2 * backoff_s, _RECONNECT_MAX_S)
                    continue
                self._live_capture = reopened
                self.reconnects += 1
                log.warning("%s: reopened after %d attempt(s)", self._name, attempts)
                return reopened
            return None
        finally:
            self._reconnecting = False

    def _fail(self, reason: str) -> None:
        self._failure = reason
        self._wake()

    def _wake(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            # The loop may close between the check and the call.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wakeup.set)

    async def _recv_live(self) -> Frame:
        while not self._frames:
            if self._failure:
                raise DriverError(f"{self._name}: {self._failure}")
            self._wakeup.clear()
            if self._frames:
                break
            try:
                async with asyncio.timeout(self.config.timeout_ms / 1000):
                    await self._wakeup.wait()
            except TimeoutError:
                if self._reconnecting:
                    continue  # the source went away; the capture thread is reopening it
                raise DriverError(f"{self._name}: no frame for {self.config.timeout_ms} ms"
                                  ) from None
        frame = self._frames.popleft()
        self.dropped_frames += frame.seq - self._next_seq
        self._next_seq = frame.seq + 1
        return frame

    async def disconnect(self) -> None:
        capture, self._capture = self._capture, None
        if capture is None:
            return
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, _STOP_TIMEOUT_S)
            if thread.is_alive():
                # Releasing under a thread still inside grab() could crash the process.
                raise DriverError(f"{self._name}: capture thread did not stop within "
                                  f"{_STOP_TIMEOUT_S} s")
            # After a reconnect the thread held a newer capture (None: released already).
            capture, self._live_capture = self._live_capture, None
        if capture is not None:
            await asyncio.to_thread(self._release_blocking, capture)
        self._loop = None

    def _release_blocking(self, capture: cv2.VideoCapture) -> None:
        with self._lock:  # waits for a file read in progress
            capture.release()
