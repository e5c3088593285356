"""Acoustic realism for the speech corpus: the talker, the room and the microphone.

- The talker: speed (resampling, as Kaldi's speed perturbation: tempo, pitch and formants move
  together), pitch (audiomentations' `PitchShift`, duration kept) and vocal-tract length
  (VTLP: the spectral envelope's frequency axis warped piecewise-linearly, as Jaitly and
  Hinton 2013 warp the filterbank, with the harmonics and phases kept).
  Speed returns the factor so phoneme and word times can follow it.
- The room: image-method impulse responses from pyroomacoustics (shoebox rooms of random size
  and absorption, the talker and the microphone at random places), made once per split into a
  bank because one takes about 0.4 s, then applied by convolution. Each response is shifted so
  its direct path lands at sample 0: reverberation trails the word, it does not move it.
- The microphone: band-limiting, a seven-band EQ, gain and clipping (audiomentations).
"""

from __future__ import annotations

import random

import numpy as np
from scipy import signal

SAMPLE_RATE = 16_000
RIR_SECONDS = 0.5


def speed(samples: np.ndarray, factor: float) -> np.ndarray:
    """`samples` played `factor` times faster (shorter by 1 / factor)."""
    if not 0.5 <= factor <= 2.0:
        raise ValueError(f"speed factor {factor} outside [0.5, 2]")
    up = 1000
    down = round(1000 * factor)
    return signal.resample_poly(samples, up, down).astype(np.float32)


def vocal_tract(samples: np.ndarray, alpha: float, boundary_hz: float = 4800.0,
                lifter: int = 30) -> np.ndarray:
    """Vocal-tract length perturbation: the spectral envelope (cepstrally smoothed, so the
    formants and not the pitch harmonics) is warped piecewise-linearly, f below
    `boundary_hz` to alpha * f and the rest onto the band left up to Nyquist; the harmonics
    and phases stay, so pitch and timing do not move."""
    if not 0.8 <= alpha <= 1.2:
        raise ValueError(f"VTLP alpha {alpha} outside [0.8, 1.2]")
    nyquist = SAMPLE_RATE / 2
    _, _, spectrum = signal.stft(samples, SAMPLE_RATE, nperseg=512, noverlap=384)
    bins = spectrum.shape[0]
    freqs = np.linspace(0, nyquist, bins)
    knee = boundary_hz * min(alpha, 1.0) / alpha
    warped = np.where(freqs <= knee, freqs * alpha,
                      nyquist - (nyquist - alpha * knee) / (nyquist - knee) * (nyquist - freqs))
    # The envelope at output frequency g is the one found at the source frequency warped onto g.
    source = np.interp(freqs, warped, freqs)
    log_magnitude = np.log(np.abs(spectrum) + 1e-9)
    cepstrum = np.fft.irfft(log_magnitude, axis=0)
    cepstrum[lifter:-lifter] = 0
    envelope = np.fft.rfft(cepstrum, axis=0).real[:bins]
    warped_envelope = np.stack([np.interp(source, freqs, frame) for frame in envelope.T], 1)
    gain = np.exp(np.clip(warped_envelope - envelope, -6, 6))
    _, out = signal.istft(spectrum * gain, SAMPLE_RATE, nperseg=512, noverlap=384)
    out = out[: len(samples)]
    # Keep the loudness: the warp moves energy between bands.
    out *= np.sqrt(np.mean(samples**2) / (np.mean(out**2) + 1e-12))
    return out.astype(np.float32)


def pitch(samples: np.ndarray, semitones: float) -> np.ndarray:
    """Pitch moved by `semitones`, duration kept."""
    from audiomentations import PitchShift  # imports librosa (about 1 s): only when used

    shift = PitchShift(min_semitones=semitones, max_semitones=semitones, p=1.0,
                       method="signalsmith_stretch")
    return shift(samples.astype(np.float32), sample_rate=SAMPLE_RATE)


# Training only (`wide`): the real-speaker voices a training split has are a few men
# (flite's awb and rms, festival's ked); test speakers include a woman (slt) and a neural
# voice. Pitch up to +8 semitones with a shorter vocal tract (VTLP up to 1.2) turns a man's
# voice into a plausible woman's, so the model hears many speakers, not three.
TALKER_RANGES = {"narrow": {"speed": (0.88, 1.12), "vtlp": (0.9, 1.1), "semitones": (-2.5, 2.5),
                            "p": 0.5},
                 "wide": {"speed": (0.85, 1.15), "vtlp": (0.82, 1.2), "semitones": (-4.0, 8.0),
                          "p": 0.7}}


def perturb_talker(samples: np.ndarray, rng: np.random.Generator, ranges: str = "narrow"
                   ) -> tuple[np.ndarray, float]:
    """A random speed, pitch and vocal-tract length; returns the audio and its speed factor
    (utterance times divide by it)."""
    r = TALKER_RANGES[ranges]
    factor = float(rng.uniform(*r["speed"]))
    out = speed(samples, factor)
    if rng.random() < r["p"]:
        out = vocal_tract(out, float(rng.uniform(*r["vtlp"])))
    if rng.random() < r["p"]:
        out = pitch(out, float(rng.uniform(*r["semitones"])))
    return out, factor


def room_impulse_responses(count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` image-method room impulse responses [count, RIR_SECONDS * rate], direct path
    at sample 0, unit energy."""
    import pyroomacoustics as pra

    length = int(RIR_SECONDS * SAMPLE_RATE)
    responses = np.zeros((count, length), np.float32)
    for k in range(count):
        size = np.array([rng.uniform(3, 10), rng.uniform(3, 8), rng.uniform(2.4, 4)])
        rt60 = float(rng.uniform(0.15, 0.9))
        try:
            absorption, max_order = pra.inverse_sabine(rt60, size)
        except ValueError:  # a reverberation time this room cannot have: take a dry one
            absorption, max_order = 0.6, 3
        room = pra.ShoeBox(size, fs=SAMPLE_RATE, materials=pra.Material(absorption),
                           max_order=min(max_order, 12))
        talker = size * rng.uniform(0.15, 0.85, 3)
        talker[2] = rng.uniform(1.2, 1.9)
        microphone = size * rng.uniform(0.15, 0.85, 3)
        microphone[2] = rng.uniform(0.3, 1.5)  # a robot's head or base
        room.add_source(talker)
        room.add_microphone(microphone)
        room.compute_rir()
        response = np.asarray(room.rir[0][0], np.float64)
        response = response[int(np.argmax(np.abs(response))):][:length]
        responses[k, : len(response)] = response / (np.sqrt(np.sum(response**2)) + 1e-12)
    return responses


def reverberate(samples: np.ndarray, response: np.ndarray) -> np.ndarray:
    """`samples` in the room of `response`, same length, direct path kept at unit gain."""
    wet = signal.fftconvolve(samples, response)[: len(samples)]
    direct = response[0] if response[0] != 0 else 1.0
    return (wet / direct).astype(np.float32)


def microphone(samples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random cheap or good microphone: its band, its EQ, its gain and, sometimes, clipping."""
    from audiomentations import (
        BandPassFilter,
        ClippingDistortion,
        Compose,
        SevenBandParametricEQ,
    )

    seed = int(rng.integers(2**31))
    chain = Compose([
        BandPassFilter(min_center_freq=900.0, max_center_freq=2200.0, min_bandwidth_fraction=1.4,
                       max_bandwidth_fraction=1.95, p=0.5),
        SevenBandParametricEQ(min_gain_db=-6.0, max_gain_db=6.0, p=0.5),
        ClippingDistortion(min_percentile_threshold=0, max_percentile_threshold=10, p=0.1),
    ])
    # audiomentations draws from numpy's and Python's global generators.
    numpy_state, python_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        return chain(samples.astype(np.float32), sample_rate=SAMPLE_RATE)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
