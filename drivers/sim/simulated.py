"""Simulated sensors so the node runs on a machine with no devices.

Each source is paced on the clock: sample k is captured at `t0 + k * period` (t0 = the clock
at `connect`), delivered once the clock passes the end of its capture, and stamped with its
true capture time. Camera and microphone follow one speech script, a pure function of clock
time (relative to the clock's zero), so the mouth moves exactly with the voice, even when
the two run in different processes.

The script (`drivers/data/sim_speech.npz`, written by `python -m training.speech_corpus
--write-sim-script`) is real speech: robot commands spoken by espeak-ng voices that the
speech model never heard in training, with phoneme timings that drive the drawn mouth. Some
commands are said off-screen, with the visible mouth still.
"""

from __future__ import annotations

import asyncio
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drivers.base import Loan
from drivers.microphone import AudioChunker
from drivers.sim.espeak import Phoneme
from drivers.sim.mouth import REST, Appearance, mouth_track, render_mouth
from fusion_node.clock import Clock
from fusion_node.errors import ConfigError
from fusion_node.protocol import AudioChunk, Frame, JointState

_NS_PER_S = 1_000_000_000

SLOT_NS = 3_000_000_000
"""One utterance per slot of the speech script."""
UTTERANCE_START_NS = 500_000_000
"""Where in its slot each utterance starts."""

FRAME_WIDTH = 640
FRAME_HEIGHT = 480
MOUTH_ROI = (256, 272, 128, 96)
"""(x, y, w, h) of the rectangle in simulated frames that contains the whole mouth."""

SCRIPT_PATH = Path(__file__).parents[1] / "data" / "sim_speech.npz"
_APPEARANCE = Appearance(skin=(225, 175, 140), lips=(160, 60, 70), mouth_half_width=38.0,
                         lip_thickness=5.0, max_opening=22.0, teeth=True)


@dataclass(frozen=True)
class Utterance:
    """One entry of the speech script."""

    samples: np.ndarray  # float32 at SAMPLE_RATE
    command: int  # index into engines.vocabulary.COMMANDS
    visible: bool  # said by the person in view (else off-screen)
    phonemes: tuple[Phoneme, ...]


SAMPLE_RATE = 16_000


@functools.cache
def script() -> tuple[Utterance, ...]:
    """The speech script, loaded once per process."""
    try:
        data = np.load(SCRIPT_PATH)
    except OSError as exc:
        raise ConfigError(f"simulated speech script {SCRIPT_PATH}: {exc}") from None
    if int(data["sample_rate"]) != SAMPLE_RATE:
        raise ConfigError(f"simulated speech script {SCRIPT_PATH}: sample rate "
                          f"{int(data['sample_rate'])}, expected {SAMPLE_RATE}")
    audio = data["audio"].astype(np.float32) / 32768.0
    offsets = data["offsets"]
    entries = []
    for i, (command, visible) in enumerate(zip(data["commands"], data["visible"],
                                               strict=True)):
        names = str(data["phonemes"][i]).split(" ")
        starts = [float(t) for t in str(data["phoneme_starts"][i]).split(",")]
        entries.append(Utterance(audio[offsets[i]:offsets[i + 1]], int(command),
                                 bool(visible), tuple(map(Phoneme, names, starts))))
    return tuple(entries)


def utterance_at(t_ns: int) -> tuple[Utterance, float]:
    """The script's utterance of the slot holding `t_ns`, and `t_ns`'s time (s) relative to
    the utterance's start (negative before it)."""
    entries = script()
    slot, within_ns = divmod(int(t_ns), SLOT_NS)
    return entries[slot % len(entries)], (within_ns - UTTERANCE_START_NS) / _NS_PER_S


def speaking(t_ns: int) -> bool:
    """Whether anyone (in view or not) is speaking at clock time `t_ns`."""
    utterance, t_s = utterance_at(t_ns)
    return 0 <= t_s < len(utterance.samples) / SAMPLE_RATE


def mouth_shape(t_ns: int) -> tuple[float, float]:
    """(opening, width) of the visible mouth at clock time `t_ns`."""
    utterance, t_s = utterance_at(t_ns)
    if not utterance.visible:
        return REST
    duration = len(utterance.samples) / SAMPLE_RATE
    opening, width = mouth_track(utterance.phonemes, duration, np.array([t_s]))[0]
    return float(opening), float(width)


def mouth_opening(t_ns: np.ndarray | int) -> np.ndarray:
    """Opening in [0, 1] of the visible mouth at clock time(s) `t_ns`."""
    times = np.atleast_1d(np.asarray(t_ns, dtype=np.int64))
    return np.array([mouth_shape(int(t))[0] for t in times]).reshape(np.shape(t_ns))


def voice(t_ns: np.ndarray) -> np.ndarray:
    """The script's audio samples (float, [-1, 1]) at clock times `t_ns`."""
    times = np.asarray(t_ns, dtype=np.int64)
    out = np.zeros(len(times), np.float32)
    entries = script()
    slots, within_ns = np.divmod(times, SLOT_NS)
    index = (within_ns - UTTERANCE_START_NS) * SAMPLE_RATE // _NS_PER_S
    for slot in np.unique(slots):
        samples = entries[int(slot) % len(entries)].samples
        mine = (slots == slot) & (index >= 0) & (index < len(samples))
        out[mine] = samples[index[mine]]
    return out


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

    The static face is rendered once; each frame copies it and draws only the mouth, into
    an array the publisher lends when it has one (`use_loans`: a shared-memory slot).
    """

    def __init__(self, config: SimulatedCameraConfig, clock: Clock) -> None:
        self.config = config
        self.stream = config.stream
        self._pacer = _Pacer(clock, config.fps)
        self._background = _render_face()
        self._loan: Loan | None = None

    def use_loans(self, loan: Loan) -> None:
        self._loan = loan

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
        out = (self._loan(self.stream, self._background.shape, self._background.dtype)
               if self._loan is not None else None)
        return Frame(self.stream, index, t_ns, self.render(t_ns, out), "rgb8")

    def render(self, t_ns: int, out: np.ndarray | None = None) -> np.ndarray:
        """The frame the camera sees at clock time `t_ns`, in `out` or a new array."""
        image = np.empty_like(self._background) if out is None else out
        np.copyto(image, self._background)
        x, y, w, h = MOUTH_ROI
        opening, width = mouth_shape(t_ns)
        render_mouth(_APPEARANCE, opening, width, out=image[y:y + h, x:x + w])
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
    """A simulated microphone: the speech script's voice plus a low noise floor. `seed`
    fixes the noise. `channels` > 1 is an array whose channels hear the same voice with
    their own noise (what `bench scale` grows)."""

    stream: str
    sample_rate: int = 16000
    chunk_ms: float = 10.0
    seed: int | None = None
    channels: int = 1

    def __post_init__(self) -> None:
        for key in ("sample_rate", "chunk_ms", "channels"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"stream {self.stream!r}: {key} is {getattr(self, key)}, "
                                  "must be > 0")


_VOICE_GAIN = 0.5  # the script peaks at about half of full scale
_NOISE_STD = 30.0


def microphone_samples(t_ns: np.ndarray, rng: np.random.Generator,
                       channels: int = 1) -> np.ndarray:
    """int16 [n, channels]: what the simulated microphone hears at clock times `t_ns`, the
    script's voice plus a little sensor noise, independent per channel."""
    speech = voice(t_ns) * (_VOICE_GAIN * 32768)
    if channels == 1:  # the same draws as ever: recordings of the default stay identical
        signal = (speech + rng.normal(0, _NOISE_STD, len(t_ns)))[:, None]
    else:
        signal = speech[:, None] + rng.normal(0, _NOISE_STD, (len(t_ns), channels))
    return np.clip(np.round(signal), -32768, 32767).astype(np.int16)


class SimulatedMicrophone:
    """int16 audio (mono unless `channels` says otherwise) in fixed chunks through
    `AudioChunker`, following the speech script."""

    def __init__(self, config: SimulatedMicrophoneConfig, clock: Clock) -> None:
        self.config = config
        self.stream = config.stream
        self._chunker = AudioChunker(config.stream, config.sample_rate, config.channels,
                                     config.chunk_ms)
        self._pacer = _Pacer(clock, config.sample_rate)
        self._rng = np.random.default_rng(config.seed)

    async def connect(self) -> None:
        self._pacer.start()
        self._chunker = AudioChunker(self.stream, self.config.sample_rate,
                                     self.config.channels, self.config.chunk_ms)

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
        return microphone_samples(t_ns, self._rng, self.config.channels)

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
