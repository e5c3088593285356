"""How windows become model feeds: the masks the models rely on."""

import numpy as np

from fusion_node.alignment import AudioSpan, FrameStack, Window
from fusion_node.bindings import SPEECH_VIDEO_FRAMES, SpeechBinding
from fusion_node.protocol import AudioChunk, Frame


def speech_window(valid: np.ndarray) -> Window:
    samples = valid.shape[0]
    audio = np.random.default_rng(0).normal(0, 0.1, (samples, 1)).astype(np.float32)
    audio[~valid] = 0.0  # gaps are zero, as the alignment buffer cuts them
    chunk = AudioChunk("audio.mic0", 0, 0, 16_000, 0, audio)
    frames = [Frame("camera.front", k, k * 40_000_000, np.zeros((480, 640, 3), np.uint8))
              for k in range(SPEECH_VIDEO_FRAMES)]
    stack = FrameStack(frames, np.ones(SPEECH_VIDEO_FRAMES, bool))
    return Window(0, data={"audio.mic0": AudioSpan(audio, valid, 16_000, 0, chunk),
                           "camera.front": stack})


def test_speech_binding_masks_exactly_the_mel_frames_that_touch_an_audio_gap():
    binding = SpeechBinding("audio.mic0", "camera.front", (256, 272, 128, 96))
    samples = binding.spec[0].samples
    valid = np.ones(samples, bool)
    valid[3000:3400] = False  # 25 ms lost upstream
    feeds = binding.feeds(speech_window(valid))
    mask = feeds["audio_valid"][0]
    hop, win = binding.logmel.hop_length, binding.logmel.win_length
    expected = [0.0 if not valid[f * hop:f * hop + win].all() else 1.0
                for f in range(mask.shape[0])]
    assert mask.tolist() == expected
    assert 0 < mask.sum() < mask.shape[0] - 3  # some frames masked, most kept
    # Without gaps, nothing is masked.
    full = binding.feeds(speech_window(np.ones(samples, bool)))["audio_valid"][0]
    assert full.tolist() == [1.0] * full.shape[0]
