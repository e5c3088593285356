"""Preprocessing: log-mel against a plain reference, valid masks, mouth crops, image tensors."""

import math

import numpy as np
import pytest

from engines.preprocess import LogMel, image_tensor, mouth_crop
from fusion_node.errors import ConfigError, EngineError

SAMPLE_RATE = 16000


def _hz_to_mel(hz: float) -> float:
    return 2595.0 * math.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: float) -> float:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def _band_centres_hz(n_mels: int = 40) -> list[float]:
    top = _hz_to_mel(SAMPLE_RATE / 2)
    return [_mel_to_hz(top * (i + 1) / (n_mels + 1)) for i in range(n_mels)]


def _reference_log_mel(samples: np.ndarray) -> np.ndarray:
    """The textbook computation, frame by frame in float64, with its own filterbank."""
    n_fft, win, hop, n_mels = 512, 400, 160, 40
    window = [0.5 - 0.5 * math.cos(2 * math.pi * n / win) for n in range(win)]
    freqs = [k * SAMPLE_RATE / n_fft for k in range(n_fft // 2 + 1)]
    top = _hz_to_mel(SAMPLE_RATE / 2)
    edges = [_mel_to_hz(top * i / (n_mels + 1)) for i in range(n_mels + 2)]
    filters = np.zeros((n_mels, len(freqs)))
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        for k, f in enumerate(freqs):
            if lo <= f <= mid:
                filters[m, k] = (f - lo) / (mid - lo)
            elif mid < f <= hi:
                filters[m, k] = (hi - f) / (hi - mid)
    out = []
    for start in range(0, len(samples) - win + 1, hop):
        frame = np.zeros(n_fft)
        frame[:win] = samples[start : start + win].astype(np.float64) * window
        power = np.abs(np.fft.rfft(frame)) ** 2
        out.append(np.log(filters @ power + 1e-6))
    return np.array(out)


def test_samples_for_64_frames() -> None:
    mel = LogMel()
    assert mel.samples_for(64) == 400 + 63 * 160 == 10480
    assert mel.frames_for(10480) == 64
    assert mel.frames_for(10479) == 63
    assert mel.frames_for(399) == 0
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 10480).astype(np.float32)
    out = mel(noise)
    assert out.shape == (64, 40) and out.dtype == np.float32
    assert mel(noise[:-1]).shape == (63, 40)


def test_log_mel_matches_reference() -> None:
    rng = np.random.default_rng(1)
    t = np.arange(10480) / SAMPLE_RATE
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) + rng.normal(0, 0.05, t.size)).astype(np.float32)
    np.testing.assert_allclose(LogMel()(samples), _reference_log_mel(samples), atol=2e-3)


def test_log_mel_of_strided_input() -> None:
    samples = np.random.default_rng(2).uniform(-1, 1, 2 * 10480).astype(np.float32)
    mel = LogMel()
    np.testing.assert_array_equal(mel(samples[::2]), mel(samples[::2].copy()))


@pytest.mark.parametrize("tone_hz", [300.0, 1000.0, 3000.0])
def test_pure_tone_lands_in_its_band(tone_hz: float) -> None:
    t = np.arange(10480) / SAMPLE_RATE
    out = LogMel()(np.sin(2 * np.pi * tone_hz * t).astype(np.float32) * 0.5)
    centres = _band_centres_hz()
    nearest = min(range(40), key=lambda m: abs(centres[m] - tone_hz))
    assert set(np.argmax(out, axis=1)) == {nearest}


def test_frame_valid_needs_every_sample() -> None:
    mel = LogMel()
    valid = np.ones(10480, dtype=bool)
    valid[5000] = False
    valid[10479] = False
    got = mel.frame_valid(valid)
    expected = [valid[i * 160 : i * 160 + 400].all() for i in range(64)]
    np.testing.assert_array_equal(got, np.array(expected, dtype=np.float32))
    assert got.dtype == np.float32 and got.sum() == 64 - 3 - 1
    np.testing.assert_array_equal(mel.frame_valid(valid.astype(np.float32)), got)


def test_log_mel_rejects_bad_input() -> None:
    mel = LogMel()
    with pytest.raises(EngineError, match="int16"):
        mel(np.zeros(10480, dtype=np.int16))
    with pytest.raises(EngineError, match="399 samples"):
        mel(np.zeros(399, dtype=np.float32))
    with pytest.raises(ConfigError, match="win_length=600"):
        LogMel(win_length=600)


def _frame(rgb: tuple[int, int, int], height: int = 120, width: int = 160) -> np.ndarray:
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:] = rgb
    return image


def test_mouth_crop_shape_range_and_content() -> None:
    image = _frame((0, 0, 0))
    image[40:80, 60:100] = 255  # a white square exactly under the ROI
    crop = mouth_crop(image, "rgb8", (60, 40, 40, 40))
    assert crop.shape == (48, 48) and crop.dtype == np.float32
    np.testing.assert_allclose(crop, 1.0, atol=1e-6)
    assert mouth_crop(image, "rgb8", (0, 0, 30, 30), size=32).max() == 0.0


def test_mouth_crop_encodings() -> None:
    red_in_rgb = _frame((255, 0, 0))  # as bgr8 the same bytes are blue
    rgb = mouth_crop(red_in_rgb, "rgb8", (10, 10, 20, 20))
    bgr = mouth_crop(red_in_rgb, "bgr8", (10, 10, 20, 20))
    np.testing.assert_allclose(rgb, 0.299, atol=3e-3)  # ITU-R BT.601 luma weights
    np.testing.assert_allclose(bgr, 0.114, atol=3e-3)


def test_mouth_crop_roi_is_clipped_or_rejected() -> None:
    image = _frame((0, 0, 0))
    image[:20, :20] = 255
    clipped = mouth_crop(image, "bgr8", (-20, -20, 40, 40))  # only the white corner is inside
    np.testing.assert_allclose(clipped, 1.0, atol=1e-6)
    with pytest.raises(EngineError, match=r"outside the 160x120 image"):
        mouth_crop(image, "bgr8", (200, 10, 40, 40))
    with pytest.raises(EngineError, match="no area"):
        mouth_crop(image, "bgr8", (10, 10, 0, 40))


def test_bad_images_and_encodings_are_rejected() -> None:
    with pytest.raises(EngineError, match="'mono8' not supported"):
        mouth_crop(_frame((0, 0, 0)), "mono8", (0, 0, 10, 10))
    with pytest.raises(EngineError, match="float32"):
        image_tensor(_frame((0, 0, 0)).astype(np.float32), "rgb8")
    with pytest.raises(EngineError, match=r"\(120, 160\)"):
        image_tensor(_frame((0, 0, 0))[..., 0], "rgb8")


@pytest.mark.parametrize("size", [(120, 160), (64, 48)])  # shrinking and enlarging
def test_image_tensor_is_rgb_chw(size: tuple[int, int]) -> None:
    pixel = (255, 128, 0)
    for encoding, channels in (("rgb8", (1.0, 128 / 255, 0.0)), ("bgr8", (0.0, 128 / 255, 1.0))):
        tensor = image_tensor(_frame(pixel, *size), encoding)
        assert tensor.shape == (3, 96, 96) and tensor.dtype == np.float32
        for channel, value in enumerate(channels):
            np.testing.assert_allclose(tensor[channel], value, atol=1e-6)
