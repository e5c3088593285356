"""The noise a robot's microphone hears, at unit RMS, drawn from a seed.

Besides white, pink and babble (other talkers, from the split's own babble bank), the kinds a
robot adds itself: its motors (a whine at a speed that ramps, with harmonics and load
modulation), cooling fans (broadband air noise with blade-pass tones), mains hum (50 or 60 Hz
and its harmonics, as from a ground loop) and servo whine (the PWM tone of a hobby servo,
high and wavering). Each is drawn with random parameters, so no one recording is learned.
"""

from __future__ import annotations

import numpy as np
from scipy import signal

SAMPLE_RATE = 16_000
ROBOT_NOISES = ("motor", "fan", "hum", "servo")
STATIONARY_NOISES = ("white", "pink", *ROBOT_NOISES)
NOISES = (*STATIONARY_NOISES, "babble")


def noise(kind: str, n: int, rng: np.random.Generator, babble: np.ndarray | None = None
          ) -> np.ndarray:
    """`n` samples of unit-RMS noise of `kind` (`babble` needs the split's babble bank)."""
    if kind == "white":
        samples = rng.standard_normal(n)
    elif kind == "pink":
        samples = _coloured(rng.standard_normal(n), exponent=0.5)
    elif kind == "motor":
        samples = _motor(n, rng)
    elif kind == "fan":
        samples = _fan(n, rng)
    elif kind == "hum":
        samples = _hum(n, rng)
    elif kind == "servo":
        samples = _servo(n, rng)
    elif kind == "babble":
        if babble is None or len(babble) <= n:
            raise ValueError(f"babble noise needs a babble bank longer than {n} samples")
        start = int(rng.integers(0, len(babble) - n))
        samples = babble[start:start + n].astype(np.float64)
    else:
        raise ValueError(f"unknown noise {kind!r}; expected one of {NOISES}")
    return (samples / (np.sqrt(np.mean(samples**2)) + 1e-12)).astype(np.float32)


def _coloured(white: np.ndarray, exponent: float) -> np.ndarray:
    """White noise shaped to 1 / f**(2 * exponent) power."""
    spectrum = np.fft.rfft(white)
    freqs = np.fft.rfftfreq(len(white))
    spectrum[1:] /= freqs[1:] ** exponent
    spectrum[0] = 0
    return np.fft.irfft(spectrum, len(white))


def _tone(frequency_hz: np.ndarray) -> np.ndarray:
    """A sinusoid following a per-sample frequency, from its integrated phase."""
    return np.sin(2 * np.pi * np.cumsum(frequency_hz) / SAMPLE_RATE)


def _motor(n: int, rng: np.random.Generator) -> np.ndarray:
    """A DC motor or gearbox: a fundamental that ramps between two speeds, its harmonics
    falling off, and torque ripple modulating the amplitude, over broadband brush noise."""
    t = np.arange(n) / SAMPLE_RATE
    f_start, f_end = rng.uniform(60, 400, 2)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.clip(t / max(t[-1], 1e-9) * rng.uniform(0.5, 2), 0, 1))
    fundamental = f_start + (f_end - f_start) * ramp
    samples = np.zeros(n)
    for harmonic in range(1, 9):
        if fundamental.max() * harmonic >= SAMPLE_RATE / 2:
            break
        samples += rng.uniform(0.2, 1.0) / harmonic * _tone(harmonic * fundamental)
    ripple = 1 + rng.uniform(0.1, 0.5) * np.sin(2 * np.pi * rng.uniform(2, 30) * t)
    brush = _bandpass(rng.standard_normal(n), *sorted(rng.uniform(500, 6000, 2)))
    return samples * ripple + rng.uniform(0.1, 0.6) * brush / (np.std(brush) + 1e-12)


def _fan(n: int, rng: np.random.Generator) -> np.ndarray:
    """A cooling fan: low-passed air noise plus the blade-pass tone and a few harmonics."""
    air = _coloured(rng.standard_normal(n), exponent=rng.uniform(0.2, 0.8))
    air = _lowpass(air, rng.uniform(1500, 6000))
    blade_pass = rng.uniform(80, 600) * (1 + 0.01 * _coloured(rng.standard_normal(n), 1.0)
                                         / 50)
    tones = sum(rng.uniform(0.05, 0.5) / k * _tone(k * blade_pass) for k in range(1, 4))
    return air / (np.std(air) + 1e-12) + tones


def _hum(n: int, rng: np.random.Generator) -> np.ndarray:
    """Mains hum: 50 or 60 Hz and odd and even harmonics, as from a ground loop."""
    mains = float(rng.choice([50.0, 60.0])) * rng.uniform(0.998, 1.002)
    t = np.arange(n) / SAMPLE_RATE
    samples = np.zeros(n)
    for harmonic in range(1, 16):
        samples += rng.uniform(0, 1) / harmonic**0.7 * np.sin(
            2 * np.pi * harmonic * mains * t + rng.uniform(0, 2 * np.pi))
    return samples + 0.02 * rng.standard_normal(n)


def _servo(n: int, rng: np.random.Generator) -> np.ndarray:
    """Servo whine: a high PWM tone whose pitch wavers as the servo holds position against
    load, switching on and off in bursts."""
    t = np.arange(n) / SAMPLE_RATE
    carrier = rng.uniform(1000, 6000) * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(1, 8) * t))
    samples = _tone(carrier) + 0.3 * _tone(2 * carrier) * (2 * carrier < SAMPLE_RATE / 2)
    duty = rng.uniform(0.4, 1.0)
    gate_rate = rng.uniform(0.5, 4)
    gate = (np.sin(2 * np.pi * gate_rate * t + rng.uniform(0, 2 * np.pi)) + 1) / 2 < duty
    gate = np.convolve(gate.astype(float), np.ones(160) / 160, mode="same")  # 10 ms edges
    return samples * gate + 0.05 * rng.standard_normal(n)


def _bandpass(samples: np.ndarray, low_hz: float, high_hz: float) -> np.ndarray:
    high_hz = max(high_hz, low_hz * 1.2)
    sos = signal.butter(2, [low_hz, min(high_hz, SAMPLE_RATE / 2 - 100)], "bandpass",
                        fs=SAMPLE_RATE, output="sos")
    return signal.sosfilt(sos, samples)


def _lowpass(samples: np.ndarray, cutoff_hz: float) -> np.ndarray:
    sos = signal.butter(2, cutoff_hz, "lowpass", fs=SAMPLE_RATE, output="sos")
    return signal.sosfilt(sos, samples)
