"""Acoustic realism of the speech corpus: robot noises, talker perturbation, rooms,
microphones."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("audiomentations")
pytest.importorskip("pyroomacoustics")

from training import augment, noises

RATE = 16_000


def _spectrum(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.fft.rfftfreq(len(x), 1 / RATE), np.abs(np.fft.rfft(x)) ** 2


@pytest.mark.parametrize("kind", noises.STATIONARY_NOISES)
def test_every_noise_is_unit_rms_and_differs_by_seed(kind):
    a = noises.noise(kind, RATE, np.random.default_rng(1))
    b = noises.noise(kind, RATE, np.random.default_rng(2))
    assert a.dtype == np.float32 and np.isfinite(a).all()
    assert np.sqrt(np.mean(a**2)) == pytest.approx(1.0, rel=1e-3)
    assert not np.allclose(a, b)


def test_hum_sits_on_the_mains_frequency():
    freqs, power = _spectrum(noises.noise("hum", 4 * RATE, np.random.default_rng(3)))
    low = freqs < 1000
    peak = freqs[low][np.argmax(power[low])]
    # The strongest line is a harmonic of 50 or 60 Hz.
    assert min(peak % 50, 50 - peak % 50) < 1 or min(peak % 60, 60 - peak % 60) < 1


def test_servo_whine_is_high_and_pink_is_low():
    freqs, servo = _spectrum(noises.noise("servo", RATE, np.random.default_rng(4)))
    _, pink = _spectrum(noises.noise("pink", RATE, np.random.default_rng(4)))
    high = freqs > 900
    assert servo[high].sum() / servo.sum() > 0.8
    assert pink[freqs < 500].sum() / pink.sum() > 0.5


def test_babble_needs_its_bank_and_unknown_kinds_are_named():
    with pytest.raises(ValueError, match="babble bank"):
        noises.noise("babble", 100, np.random.default_rng(0))
    with pytest.raises(ValueError, match="'rain'"):
        noises.noise("rain", 100, np.random.default_rng(0))


def test_speed_changes_duration():
    tone = np.sin(2 * np.pi * 440 * np.arange(RATE) / RATE).astype(np.float32)
    assert len(augment.speed(tone, 1.25)) == pytest.approx(RATE / 1.25, abs=2)
    assert len(augment.speed(tone, 0.8)) == pytest.approx(RATE / 0.8, abs=2)


def _vowel(formant_hz: float) -> np.ndarray:
    """A 125 Hz pulse train through one resonance at `formant_hz`."""
    from scipy import signal

    pulses = np.zeros(RATE)
    pulses[:: RATE // 125] = 1.0
    r = 0.95  # a bandwidth of about 250 Hz, as a real formant's
    theta = 2 * np.pi * formant_hz / RATE
    return signal.lfilter([1.0], [1, -2 * r * np.cos(theta), r * r], pulses).astype(np.float32)


def test_vtlp_moves_the_formant_not_the_pitch_or_the_length():
    vowel = _vowel(1000.0)
    warped = augment.vocal_tract(vowel, 1.15)
    assert len(warped) == len(vowel)
    freqs, before = _spectrum(vowel)
    _, after = _spectrum(warped)
    band = (freqs > 300) & (freqs < 3000)
    smooth = np.ones(250) / 250  # 250 Hz: the envelope, not the harmonics

    def envelope_peak(power: np.ndarray) -> float:
        return float(freqs[band][np.argmax(np.convolve(power, smooth, "same")[band])])

    assert abs(envelope_peak(before) - 1000) < 60
    assert envelope_peak(after) > 1.08 * envelope_peak(before)  # the formant moved up
    # The strongest lines stay on multiples of 125 Hz: the pitch is kept.
    for power in (before, after):
        line = freqs[band][np.argmax(power[band])]
        assert min(line % 125, 125 - line % 125) < 3
    with pytest.raises(ValueError, match="alpha"):
        augment.vocal_tract(vowel, 1.5)


def test_rooms_keep_the_direct_path_at_zero_and_add_a_tail():
    responses = augment.room_impulse_responses(4, np.random.default_rng(5))
    assert responses.shape == (4, int(augment.RIR_SECONDS * RATE))
    for response in responses:
        assert int(np.argmax(np.abs(response))) == 0
        assert np.sum(response[160:] ** 2) > 0.01  # energy after 10 ms: reverberation
    click = np.zeros(RATE, np.float32)
    click[1000] = 1.0
    wet = augment.reverberate(click, responses[0])
    assert int(np.argmax(np.abs(wet))) == 1000 and wet[1000] == pytest.approx(1.0)


def test_microphone_is_deterministic_from_its_generator():
    x = np.random.default_rng(6).standard_normal(RATE).astype(np.float32) * 0.1
    a = augment.microphone(x, np.random.default_rng(7))
    b = augment.microphone(x, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert a.shape == x.shape
