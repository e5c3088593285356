"""Simulated sensors so the node runs on a machine with no devices.

Each source is paced on the clock: sample k is captured at `t0 + k * period` (t0 = the clock
at `connect`), delivered once the clock passes the end of its capture, and stamped with its
true capture time. Camera and microphone follow one speech script, a pure function of clock
time (relative to the clock's zero), so the mouth opens exactly when the audio is voiced,
even when the two run in different processes.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import numpy as np

from drivers.microphone import AudioChunker
from fusion_node.clock import Clock
from fusion_node.errors import ConfigError
from fusion_node.protocol import AudioChunk, Frame, JointState

_NS_PER_S = 1_000_000_000

# Speech script: speak for 1.2 s, pause for 0.8 s, repeating; syllables at 4 Hz.
SPEECH_ON_NS = 1_200_000_000
SPEECH_PERIOD_NS = 2_000_000_000
SYLLABLE_HZ = 4

FRAME_WIDTH = 640
FRAME_HEIGHT = 480
MOUTH_ROI = (256, 272, 128, 96)
"""(x, y, w, h) of the rectangle in simulated frames that contains the whole mouth."""


def speaking(t_ns: int) -> bool:
    """Whether the simulated person is speaking at clock time `t_ns`."""
    return t_ns % SPEECH_PERIOD_NS < SPEECH_ON_NS


def mouth_opening(t_ns: np.ndarray | int) -> np.ndarray:
    """Mouth opening in [0, 1] at clock time(s) `t_ns`: one open-close cycle per syllable
    while speaking, closed otherwise. Also the envelope of the simulated voice."""
    phase_ns = np.asarray(t_ns, dtype=np.int64) % SPEECH_PERIOD_NS
    syllable = 0.5 - 0.5 * np.cos(2 * np.pi * SYLLABLE_HZ * phase_ns / _NS_PER_S)
    return np.where(phase_ns < SPEECH_ON_NS, syllable, 0.0)


class _Pacer:
    """Capture times on a fixed grid from `connect`, and waiting for a capture to end."""

    def __init__(self, clock: Clock, rate_hz: float) -> None:
        self._clock = clock
        self._rate_hz = rate_hz
        self._t0_ns = 0
        self.index = 0

    def start(self) -> None:
        self._t0_ns = self._clock.now_ns()
        self.index = 0

    def capture_ns(self, index: int) -> int:
        # From the index, not accumulated, so a non-integer period never drifts.
        return self._t0_ns + round(index * _NS_PER_S / self._rate_hz)

    def wait_until(self, t_ns: int) -> None:
        self._clock.sleep_until(t_ns)


@dataclass(frozen=True, slots=True)
class SimulatedCameraConfig:
    """A simulated 640x480 rgb8 camera showing a face that speaks by the speech script."""

    stream: str
    fps: float = 30.0

    def __post_init__(self) -> None:
        if self.fps <= 0:
            raise ConfigError(f"stream {self.stream!r}: fps is {self.fps}, must be > 0")


class SimulatedCamera:
    """Frames of a face whose mouth (inside `MOUTH_ROI`) opens and closes with the script.

    The static face is rendered once; each frame copies it and draws only the mouth.
    """

    def __init__(self, config: SimulatedCameraConfig, clock: Clock) -> None:
        self.config = config
        self.stream = config.stream
        self._pacer = _Pacer(clock, config.fps)
        self._background = _render_face()
        _, _, w, h = MOUTH_ROI
        ys, xs = np.mgrid[0:h, 0:w]
        self._mouth_dx2 = ((xs - w / 2) / (0.4 * w)) ** 2
        self._mouth_dy = ys - h / 2

    async def connect(self) -> None:
        self._pacer.start()

    async def recv(self) -> Frame:
        return await asyncio.to_thread(self._recv_blocking)

    def _recv_blocking(self) -> Frame:
        index = self._pacer.index
        self._pacer.index += 1
        t_ns = self._pacer.capture_ns(index)
        # A frame is exposed at one instant: it is complete at its capture time.
        self._pacer.wait_until(t_ns)
        return Frame(self.stream, index, t_ns, self.render(t_ns), "rgb8")

    def render(self, t_ns: int) -> np.ndarray:
        """The frame the camera sees at clock time `t_ns` (a new array)."""
        image = self._background.copy()
        x, y, w, h = MOUTH_ROI
        roi = image[y:y + h, x:x + w]
        half_height = 4 + 0.4 * h * float(mouth_opening(t_ns))
        lips = self._mouth_dx2 + (self._mouth_dy / half_height) ** 2 <= 1.0
        roi[lips] = (150, 40, 50)
        inner = self._mouth_dx2 / 0.8 + (self._mouth_dy / max(half_height - 4, 1e-3)) ** 2 <= 1.0
        roi[inner] = (40, 10, 15)
        return image

    async def disconnect(self) -> None:
        pass


def _render_face() -> np.ndarray:
    image = np.empty((FRAME_HEIGHT, FRAME_WIDTH, 3), np.uint8)
    image[:] = (70, 80, 90)
    ys, xs = np.mgrid[0:FRAME_HEIGHT, 0:FRAME_WIDTH]
    x, _, w, _ = MOUTH_ROI
    cx = x + w / 2

    def ellipse(centre_x: float, centre_y: float, a: float, b: float) -> np.ndarray:
        return ((xs - centre_x) / a) ** 2 + ((ys - centre_y) / b) ** 2 <= 1.0

    image[ellipse(cx, 250, 150, 200)] = (225, 175, 140)
    for eye_x in (cx - 60, cx + 60):
        image[ellipse(eye_x, 180, 22, 12)] = (245, 245, 245)
        image[ellipse(eye_x, 180, 9, 9)] = (50, 40, 30)
    image[ellipse(cx, 240, 12, 24)] = (200, 150, 120)
    return image


@dataclass(frozen=True, slots=True)
class SimulatedMicrophoneConfig:
    """A simulated microphone: a voiced harmonic signal while the script speaks, low noise
    otherwise. `seed` fixes the noise."""

    stream: str
    sample_rate: int = 16000
    chunk_ms: float = 10.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for key in ("sample_rate", "chunk_ms"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"stream {self.stream!r}: {key} is {getattr(self, key)}, "
                                  "must be > 0")


_F0_HZ = 120  # integer, so the phase is exact from the time modulo one second
_HARMONICS = 8
_VOICE_PEAK = 8000.0
_NOISE_STD = 30.0


class SimulatedMicrophone:
    """Mono int16 audio in fixed chunks through `AudioChunker`, following the speech script."""

    def __init__(self, config: SimulatedMicrophoneConfig, clock: Clock) -> None:
        self.config = config
        self.stream = config.stream
        self._chunker = AudioChunker(config.stream, config.sample_rate, 1, config.chunk_ms)
        self._pacer = _Pacer(clock, config.sample_rate)
        self._rng = np.random.default_rng(config.seed)
        harmonics = np.arange(1, _HARMONICS + 1)
        self._harmonic_hz = _F0_HZ * harmonics
        self._harmonic_gain = _VOICE_PEAK / harmonics / np.sum(1 / harmonics)

    async def connect(self) -> None:
        self._pacer.start()
        self._chunker = AudioChunker(self.stream, self.config.sample_rate, 1,
                                     self.config.chunk_ms)

    async def recv(self) -> AudioChunk:
        return await asyncio.to_thread(self._recv_blocking)

    def _recv_blocking(self) -> AudioChunk:
        n = self._chunker.chunk_samples
        start = self._chunker.next_index
        t_first_ns = self._pacer.capture_ns(start)
        t_ns = t_first_ns + np.arange(n, dtype=np.int64) * _NS_PER_S // self.config.sample_rate
        (chunk,) = self._chunker.push(self._synthesise(t_ns), t_first_ns)
        self._pacer.wait_until(self._pacer.capture_ns(start + n))
        return chunk

    def _synthesise(self, t_ns: np.ndarray) -> np.ndarray:
        t_s = (t_ns % _NS_PER_S) / _NS_PER_S
        voice = np.sin(2 * np.pi * np.outer(t_s, self._harmonic_hz)) @ self._harmonic_gain
        signal = voice * mouth_opening(t_ns) + self._rng.normal(0, _NOISE_STD, len(t_ns))
        return np.clip(np.round(signal), -32768, 32767).astype(np.int16)[:, None]

    async def disconnect(self) -> None:
        pass


JOINT_NAMES = ("shoulder", "elbow", "wrist")
_JOINT_AMPLITUDE = np.array([0.8, 0.6, 0.4])  # rad
_JOINT_HZ = np.array([0.25, 0.2, 0.5])  # all periods divide 20 s
_JOINT_PHASE = np.array([0.0, 1.0, 2.0])  # rad
_JOINT_INERTIA = np.array([0.5, 0.2, 0.05])  # kg m^2, for a plausible effort
_JOINT_CYCLE_NS = 20 * _NS_PER_S


@dataclass(frozen=True, slots=True)
class SimulatedJointsConfig:
    """A simulated 3-joint arm (shoulder, elbow, wrist) moving in smooth sinusoids."""

    stream: str
    rate_hz: float = 200.0

    def __post_init__(self) -> None:
        if self.rate_hz <= 0:
            raise ConfigError(f"stream {self.stream!r}: rate_hz is {self.rate_hz}, "
                              "must be > 0")


class SimulatedJoints:
    """Joint states whose velocity is the exact derivative of the position."""

    def __init__(self, config: SimulatedJointsConfig, clock: Clock) -> None:
        self.config = config
        self.stream = config.stream
        self._pacer = _Pacer(clock, config.rate_hz)

    async def connect(self) -> None:
        self._pacer.start()

    async def recv(self) -> JointState:
        return await asyncio.to_thread(self._recv_blocking)

    def _recv_blocking(self) -> JointState:
        index = self._pacer.index
        self._pacer.index += 1
        t_ns = self._pacer.capture_ns(index)
        self._pacer.wait_until(t_ns)
        position, velocity, effort = joint_motion(t_ns)
        return JointState(self.stream, index, t_ns, JOINT_NAMES, position, velocity, effort)

    async def disconnect(self) -> None:
        pass


def joint_motion(t_ns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Position (rad), velocity (rad/s) and effort (N m) of the simulated arm at `t_ns`."""
    # Time within a 20 s cycle keeps float precision on a clock that has run for days.
    t_s = (t_ns % _JOINT_CYCLE_NS) / _NS_PER_S
    omega = 2 * math.pi * _JOINT_HZ
    angle = omega * t_s + _JOINT_PHASE
    position = _JOINT_AMPLITUDE * np.sin(angle)
    velocity = _JOINT_AMPLITUDE * omega * np.cos(angle)
    effort = -_JOINT_INERTIA * omega**2 * position
    return position, velocity, effort
