"""WavFileMicrophone on real WAV files, and SoundDeviceMicrophone on real PortAudio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import wave
from pathlib import Path

import numpy as np
import pytest

from drivers.microphone import WavFileMicrophone, WavFileMicrophoneConfig
from fusion_node.errors import DriverError, EndOfStream

REPO = Path(__file__).resolve().parents[2]


def write_wav(path: Path, samples: np.ndarray, rate: int, width: int = 2) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(samples.shape[1])
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(samples.astype(f"<i{width}" if width > 1 else "u1").tobytes())
    return path


def noise(n: int, channels: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(-32768, 32767, (n, channels), dtype=np.int16)


async def read_all(mic: WavFileMicrophone) -> list:
    chunks = []
    while True:
        try:
            chunks.append(await mic.recv())
        except EndOfStream:
            return chunks


@pytest.mark.parametrize("rate, channels", [(16000, 1), (44100, 2)])
async def test_wav_fast_is_sample_exact(tmp_path, stepping_clock, rate, channels):
    samples = noise(rate // 2 + 37, channels)  # not a whole number of chunks
    path = write_wav(tmp_path / "speech.wav", samples, rate)
    start_ns = stepping_clock.now_ns()
    mic = WavFileMicrophone(WavFileMicrophoneConfig("audio.test", str(path), realtime=False),
                            stepping_clock)
    await mic.connect()
    chunks = await read_all(mic)
    await mic.disconnect()

    chunk_samples = rate // 100
    np.testing.assert_array_equal(np.concatenate([c.samples for c in chunks]), samples)
    assert [len(c.samples) for c in chunks[:-1]] == [chunk_samples] * (len(chunks) - 1)
    assert len(chunks[-1].samples) == len(samples) % chunk_samples
    assert [c.sample_index for c in chunks] == list(range(0, len(samples), chunk_samples))
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert c.sample_rate == rate and c.samples.dtype == np.int16
        assert c.t_capture_ns == start_ns + c.sample_index * 1_000_000_000 // rate
    assert stepping_clock.now_ns() == start_ns  # as fast as possible: never waited


async def test_wav_realtime_delivers_each_chunk_at_its_end(tmp_path, stepping_clock):
    path = write_wav(tmp_path / "speech.wav", noise(1600, 1), 16000)
    mic = WavFileMicrophone(WavFileMicrophoneConfig("audio.test", str(path)), stepping_clock)
    await mic.connect()
    for chunk in await read_all_checked(mic, stepping_clock):
        assert chunk.duration_ns == 10_000_000
    await mic.disconnect()


async def read_all_checked(mic, clock) -> list:
    chunks = []
    while True:
        try:
            chunk = await mic.recv()
        except EndOfStream:
            return chunks
        assert clock.now_ns() == chunk.t_capture_ns + chunk.duration_ns
        chunks.append(chunk)


async def test_wav_loop_continues_index_and_content(tmp_path, stepping_clock):
    samples = noise(1000, 1)
    path = write_wav(tmp_path / "speech.wav", samples, 16000)
    mic = WavFileMicrophone(WavFileMicrophoneConfig("audio.test", str(path), realtime=False,
                                                    loop=True), stepping_clock)
    await mic.connect()
    chunks = [await mic.recv() for _ in range(20)]
    await mic.disconnect()
    got = np.concatenate([c.samples for c in chunks])
    np.testing.assert_array_equal(got, np.tile(samples, (4, 1))[:len(got)])
    assert [c.sample_index for c in chunks] == [160 * k for k in range(20)]


async def test_wav_rejects_8_bit(tmp_path, stepping_clock):
    path = write_wav(tmp_path / "byte.wav", np.full((100, 1), 128), 8000, width=1)
    mic = WavFileMicrophone(WavFileMicrophoneConfig("audio.test", str(path)), stepping_clock)
    with pytest.raises(DriverError, match=r"byte\.wav.*8-bit"):
        await mic.connect()


async def test_wav_rejects_float_format(tmp_path, stepping_clock):
    # A minimal IEEE-float WAV (format tag 3), which the 16-bit PCM driver must refuse.
    data = np.zeros(16, "<f4").tobytes()
    fmt = (3).to_bytes(2, "little") + (1).to_bytes(2, "little") + (16000).to_bytes(4, "little")
    fmt += (64000).to_bytes(4, "little") + (4).to_bytes(2, "little") + (32).to_bytes(2, "little")
    body = b"WAVE" + b"fmt " + len(fmt).to_bytes(4, "little") + fmt
    body += b"data" + len(data).to_bytes(4, "little") + data
    path = tmp_path / "float.wav"
    path.write_bytes(b"RIFF" + len(body).to_bytes(4, "little") + body)
    mic = WavFileMicrophone(WavFileMicrophoneConfig("audio.test", str(path)), stepping_clock)
    with pytest.raises(DriverError, match=r"float\.wav"):
        await mic.connect()


async def test_wav_missing_file(tmp_path, stepping_clock):
    mic = WavFileMicrophone(WavFileMicrophoneConfig("audio.test", str(tmp_path / "no.wav")),
                            stepping_clock)
    with pytest.raises(DriverError, match=r"no\.wav"):
        await mic.connect()
    await mic.disconnect()


# A real PortAudio input stream whose ALSA default device is the `file` plugin reading raw
# samples from a file (over a null slave). ALSA does not pace it, so it runs far faster than
# real time; the bounded queue is made large enough that nothing is dropped in the test.
ASOUNDRC = """pcm.!default {{
    type file
    slave.pcm "null"
    file "/dev/null"
    infile "{infile}"
    format "raw"
}}
"""

CAPTURE = textwrap.dedent("""
    import asyncio, json, sys
    import numpy as np
    from drivers.microphone import SoundDeviceMicrophone, SoundDeviceMicrophoneConfig
    from fusion_node.clock import MonotonicClock

    async def main():
        clock = MonotonicClock()
        mic = SoundDeviceMicrophone(
            SoundDeviceMicrophoneConfig("audio.alsa", queue_ms=600_000), clock)
        await mic.connect()
        chunks = [await mic.recv() for _ in range(200)]
        now_ns = clock.now_ns()
        await mic.disconnect()
        np.save(sys.argv[1], np.concatenate([c.samples for c in chunks]))
        print(json.dumps({
            "index": [c.sample_index for c in chunks], "seq": [c.seq for c in chunks],
            "t": [c.t_capture_ns for c in chunks], "now": now_ns,
            "dropped": mic.dropped_samples, "stream": chunks[0].stream}))

    asyncio.run(main())
""")


def test_sounddevice_microphone_reads_real_portaudio_stream(tmp_path):
    probe = subprocess.run([sys.executable, "-c", "import sounddevice"], capture_output=True,
                           check=False)
    if probe.returncode != 0:
        pytest.skip(f"PortAudio unavailable: {probe.stderr.decode().strip().splitlines()[-1]}")
    samples = noise(48000, 1)
    infile = tmp_path / "in.raw"
    infile.write_bytes(samples.astype("<i2").tobytes())
    (tmp_path / ".asoundrc").write_text(ASOUNDRC.format(infile=infile))
    out = tmp_path / "got.npy"
    result = subprocess.run([sys.executable, "-c", CAPTURE, str(out)], cwd=REPO,
                            env={**os.environ, "HOME": str(tmp_path)}, capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    got = np.load(out)

    assert info["stream"] == "audio.alsa" and info["dropped"] == 0
    assert info["index"] == [160 * k for k in range(200)]
    assert info["seq"] == list(range(200))
    np.testing.assert_array_equal(got, samples[:len(got)])
    # Stamps come from PortAudio's ADC time mapped onto the node clock: near "now".
    assert all(abs(t - info["now"]) < 5_000_000_000 for t in info["t"])
