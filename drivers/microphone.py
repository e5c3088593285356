"""Audio drivers: a PortAudio microphone and a WAV file, both cut into chunks by `AudioChunker`.

Audio is int16 `[n, channels]`. Every chunk carries `sample_index`, the index of its first
sample since the stream started, and `t_capture_ns`, that sample's capture time on the node
clock. Dropped samples show up as a jump in `sample_index`, never as invented samples.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusion_node.clock import Clock
from fusion_node.errors import ConfigError, DriverError, EndOfStream
from fusion_node.protocol import AudioChunk

_NS_PER_S = 1_000_000_000


class AudioChunker:
    """Turns blocks of any size into fixed-size `AudioChunk`s with exact sample indices.

    `push` takes a block and the capture time of its first sample; each chunk is stamped with
    the time of its own first sample, derived from the stamp of the block it starts in. Chunks
    may be views of the pushed block, so a block must not be modified after it is pushed.
    """

    def __init__(self, stream: str, sample_rate: int, channels: int,
                 chunk_ms: float = 10.0) -> None:
        self.stream = stream
        self.sample_rate = sample_rate
        self.channels = channels
        self.chunk_samples = round(sample_rate * chunk_ms / 1000)
        if self.chunk_samples < 1:
            raise ConfigError(f"stream {stream!r}: chunk_ms {chunk_ms} is shorter than one "
                              f"sample at {sample_rate} Hz")
        self._pending: list[np.ndarray] = []
        self._pending_samples = 0
        self._pending_index = 0
        self._pending_t_ns = 0
        self._next_index = 0
        self._seq = 0

    @property
    def next_index(self) -> int:
        """Index of the sample that the next pushed block is expected to start with."""
        return self._next_index

    def push(self, block: np.ndarray, t_first_ns: int,
             sample_index: int | None = None) -> list[AudioChunk]:
        """Add a block whose first sample was captured at `t_first_ns`; return full chunks.

        `sample_index` is the block's first sample index (default: right after the previous
        block). A jump forward is a gap (samples were dropped upstream): the partial chunk
        before it is emitted short rather than joined to samples that do not follow it.
        """
        if block.dtype != np.int16 or block.ndim != 2 or block.shape[1] != self.channels:
            raise ValueError(f"stream {self.stream!r}: block is {block.dtype} "
                             f"{list(block.shape)}, expected int16 [n, {self.channels}]")
        if sample_index is None:
            sample_index = self._next_index
        if sample_index < self._next_index:
            raise ValueError(f"stream {self.stream!r}: block starts at sample {sample_index}, "
                             f"before the expected {self._next_index}")
        chunks: list[AudioChunk] = []
        if sample_index > self._next_index:
            partial = self.flush()
            if partial is not None:
                chunks.append(partial)
        self._next_index = sample_index + len(block)

        offset = 0
        if self._pending:
            offset = min(self.chunk_samples - self._pending_samples, len(block))
            self._pending.append(block[:offset])
            self._pending_samples += offset
            if self._pending_samples == self.chunk_samples:
                chunks.append(self._emit(self._pending_index, self._pending_t_ns,
                                         np.concatenate(self._pending)))
                self._pending = []
                self._pending_samples = 0
        while len(block) - offset >= self.chunk_samples:
            chunks.append(self._emit(sample_index + offset, self._stamp(t_first_ns, offset),
                                     block[offset:offset + self.chunk_samples]))
            offset += self.chunk_samples
        if offset < len(block):
            self._pending = [block[offset:]]
            self._pending_samples = len(block) - offset
            self._pending_index = sample_index + offset
            self._pending_t_ns = self._stamp(t_first_ns, offset)
        return chunks

    def flush(self) -> AudioChunk | None:
        """Emit the pending partial chunk (shorter than `chunk_samples`), if any."""
        if not self._pending:
            return None
        chunk = self._emit(self._pending_index, self._pending_t_ns,
                           np.concatenate(self._pending))
        self._pending = []
        self._pending_samples = 0
        return chunk

    def _stamp(self, t_first_ns: int, offset: int) -> int:
        return t_first_ns + offset * _NS_PER_S // self.sample_rate

    def _emit(self, sample_index: int, t_ns: int, samples: np.ndarray) -> AudioChunk:
        chunk = AudioChunk(self.stream, self._seq, t_ns, self.sample_rate, sample_index,
                           samples)
        self._seq += 1
        return chunk


@dataclass(frozen=True, slots=True)
class SoundDeviceMicrophoneConfig:
    """A PortAudio input device.

    `device` is a PortAudio device index or name substring (None: the default input).
    `delay_ms` is a calibrated fixed delay not covered by PortAudio's ADC time.
    `queue_ms` bounds the audio held between the PortAudio callback and `recv` (oldest
    dropped first); `timeout_ms` without any audio is a device fault.
    """

    stream: str
    device: int | str | None = None
    sample_rate: int = 16000
    channels: int = 1
    chunk_ms: float = 10.0
    delay_ms: float = 0.0
    queue_ms: float = 1000.0
    timeout_ms: float = 1000.0

    def __post_init__(self) -> None:
        _check_positive(self.stream, sample_rate=self.sample_rate, channels=self.channels,
                        chunk_ms=self.chunk_ms, queue_ms=self.queue_ms,
                        timeout_ms=self.timeout_ms)
        if self.delay_ms < 0:
            raise ConfigError(f"stream {self.stream!r}: delay_ms is {self.delay_ms}, "
                              "must be >= 0")


class SoundDeviceMicrophone:
    """A microphone read through PortAudio (sounddevice), stamped with the ADC time.

    The PortAudio callback only copies the block, stamps it and appends it to a bounded
    deque; chunking happens in `recv` on the event loop. `dropped_samples` counts samples
    lost to the bound or to an input overflow, `overflows` counts PortAudio input-overflow
    flags. After an overflow the samples the device lost are measured by the ADC time and
    skipped in `sample_index`, so the gap is marked downstream, never closed up.
    """

    def __init__(self, config: SoundDeviceMicrophoneConfig, clock: Clock) -> None:
        self.config = config
        self.stream = config.stream
        self._clock = clock
        self._delay_ns = round(config.delay_ms * 1e6)
        self._timeout_s = config.timeout_ms / 1000
        self._chunker = AudioChunker(config.stream, config.sample_rate, config.channels,
                                     config.chunk_ms)
        max_blocks = max(1, round(config.queue_ms / config.chunk_ms))
        self._blocks: collections.deque[tuple[np.ndarray, int, int]] = collections.deque(
            maxlen=max_blocks)
        self._ready: collections.deque[AudioChunk] = collections.deque()
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sd_stream: Any = None
        self._frames_seen = 0
        self._next_adc_s: float | None = None  # ADC time the next block should start at
        self._failure = ""
        self.dropped_samples = 0
        self.overflows = 0

    @property
    def _name(self) -> str:
        return f"microphone {self.config.device!r} ({self.stream})"

    async def connect(self) -> None:
        try:
            import sounddevice as sd  # type: ignore[import-untyped]
        except OSError as exc:  # sounddevice raises OSError when libportaudio is missing
            raise DriverError(f"{self._name}: PortAudio is unavailable ({exc})") from None
        self._chunker = AudioChunker(self.stream, self.config.sample_rate, self.config.channels,
                                     self.config.chunk_ms)
        self._blocks.clear()
        self._ready.clear()
        self._frames_seen = 0
        self._next_adc_s = None
        self._failure = ""
        self._loop = asyncio.get_running_loop()
        self._sd_stream = await asyncio.to_thread(self._open_blocking, sd)

    def _open_blocking(self, sd: Any) -> Any:
        try:
            stream = sd.InputStream(
                device=self.config.device, samplerate=self.config.sample_rate,
                channels=self.config.channels, dtype="int16",
                blocksize=self._chunker.chunk_samples, latency="low",
                callback=self._callback, finished_callback=self._finished)
            stream.start()
        except (sd.PortAudioError, ValueError) as exc:
            raise DriverError(f"{self._name}: cannot open input at "
                              f"{self.config.sample_rate} Hz x {self.config.channels} "
                              f"channel(s): {exc}") from None
        return stream

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        # Runs on PortAudio's thread: copy, stamp, append, wake the loop; nothing else.
        now_ns = self._clock.now_ns()
        adc_s = time_info.inputBufferAdcTime
        if adc_s > 0:
            # PortAudio's stream clock mapped onto ours at this instant.
            t_first_ns = now_ns - round((time_info.currentTime - adc_s) * 1e9)
        else:  # some host APIs report no ADC time: the block ended about now
            t_first_ns = now_ns - frames * _NS_PER_S // self.config.sample_rate
        rate = self.config.sample_rate
        if status.input_overflow:
            self.overflows += 1
            # Samples lost inside the device, measured on PortAudio's own clock (free of the
            # jitter of mapping it onto ours): skip their indices.
            if self._next_adc_s is not None and adc_s > self._next_adc_s:
                self._frames_seen += round((adc_s - self._next_adc_s) * rate)
        self._next_adc_s = adc_s + frames / rate if adc_s > 0 else None
        self._blocks.append((indata.copy(), t_first_ns - self._delay_ns, self._frames_seen))
        self._frames_seen += frames
        self._wake()

    def _finished(self) -> None:
        self._failure = self._failure or "PortAudio stream stopped"
        self._wake()

    def _wake(self) -> None:
        loop = self._loop  # disconnect may clear it meanwhile
        if loop is not None and not loop.is_closed():
            # The loop may close between the check and the call.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wakeup.set)

    async def recv(self) -> AudioChunk:
        if self._sd_stream is None:
            raise DriverError(f"{self._name} is not connected")
        while not self._ready:
            block, t_first_ns, index = await self._next_block()
            if index > self._chunker.next_index:
                self.dropped_samples += index - self._chunker.next_index
            self._ready.extend(self._chunker.push(block, t_first_ns, index))
        return self._ready.popleft()

    async def _next_block(self) -> tuple[np.ndarray, int, int]:
        while not self._blocks:
            if self._failure:
                raise DriverError(f"{self._name}: {self._failure}")
            self._wakeup.clear()
            if self._blocks:
                break
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._wakeup.wait()
            except TimeoutError:
                raise DriverError(f"{self._name}: no audio for {self.config.timeout_ms} ms"
                                  ) from None
        return self._blocks.popleft()

    async def disconnect(self) -> None:
        stream, self._sd_stream = self._sd_stream, None
        if stream is not None:
            self._failure = "disconnected"
            await asyncio.to_thread(stream.close)
        self._loop = None


@dataclass(frozen=True, slots=True)
class WavFileMicrophoneConfig:
    """A 16-bit PCM WAV file played as a microphone.

    `realtime` delivers each chunk when the clock passes its end (as a microphone would);
    otherwise as fast as the consumer reads. `loop` restarts the file at its end, with
    `sample_index` and stamps continuing.
    """

    stream: str
    path: str
    chunk_ms: float = 10.0
    realtime: bool = True
    loop: bool = False

    def __post_init__(self) -> None:
        _check_positive(self.stream, chunk_ms=self.chunk_ms)


class WavFileMicrophone:
    """Audio from a WAV file, stamped as if captured from `connect` on at its sample rate."""

    def __init__(self, config: WavFileMicrophoneConfig, clock: Clock) -> None:
        self.config = config
        self.stream = config.stream
        self._clock = clock
        self._wav: wave.Wave_read | None = None
        self._chunker: AudioChunker | None = None
        self._ready: collections.deque[AudioChunk] = collections.deque()
        self._lock = threading.Lock()  # serialises file reads with close
        self._start_ns = 0
        self._ended = False

    async def connect(self) -> None:
        self._wav = await asyncio.to_thread(self._open_blocking)
        self._chunker = AudioChunker(self.stream, self._wav.getframerate(),
                                     self._wav.getnchannels(), self.config.chunk_ms)
        self._ready.clear()
        self._ended = False
        self._start_ns = self._clock.now_ns()

    def _open_blocking(self) -> wave.Wave_read:
        path = self.config.path
        try:
            wav = wave.open(str(Path(path)), "rb")  # noqa: SIM115 - open until disconnect
        except FileNotFoundError:
            raise DriverError(f"WAV file {path!r} does not exist") from None
        except (wave.Error, EOFError, OSError) as exc:
            raise DriverError(f"WAV file {path!r} cannot be read as PCM WAV ({exc})") from None
        if wav.getsampwidth() != 2:
            wav.close()
            raise DriverError(f"WAV file {path!r} has {8 * wav.getsampwidth()}-bit samples; "
                              "only 16-bit PCM is supported")
        if wav.getnframes() == 0:
            wav.close()
            raise DriverError(f"WAV file {path!r} has no samples")
        return wav

    async def recv(self) -> AudioChunk:
        return await asyncio.to_thread(self._recv_blocking)

    def _recv_blocking(self) -> AudioChunk:
        with self._lock:
            chunk = self._next_chunk_locked()
        if self.config.realtime:
            self._clock.sleep_until(chunk.t_capture_ns + chunk.duration_ns)
        return chunk

    def _next_chunk_locked(self) -> AudioChunk:
        wav, chunker = self._wav, self._chunker
        if wav is None or chunker is None:
            raise DriverError(f"WAV file {self.config.path!r} is not connected")
        while not self._ready:
            if self._ended:
                raise EndOfStream(f"WAV file {self.config.path!r} ended")
            data = wav.readframes(chunker.chunk_samples)
            if data:
                block = np.frombuffer(data, dtype="<i2").reshape(-1, chunker.channels)
                t_ns = self._start_ns + chunker.next_index * _NS_PER_S // chunker.sample_rate
                self._ready.extend(chunker.push(block, t_ns))
            elif self.config.loop:
                wav.rewind()
            else:
                self._ended = True
                partial = chunker.flush()
                if partial is not None:
                    self._ready.append(partial)
        return self._ready.popleft()

    async def disconnect(self) -> None:
        wav, self._wav = self._wav, None
        if wav is not None:
            await asyncio.to_thread(self._close_blocking, wav)

    def _close_blocking(self, wav: wave.Wave_read) -> None:
        with self._lock:  # waits for a read in progress
            wav.close()


def _check_positive(stream: str, **values: float) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ConfigError(f"stream {stream!r}: {key} is {value}, must be > 0")
