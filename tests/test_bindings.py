"""How windows become model feeds: the masks the models rely on."""

import re

import numpy as np
import pytest

from engines.base import TensorSpec
from engines.spec import parse_spec
from fusion_node.alignment import (
    AudioInput,
    AudioSpan,
    FrameStack,
    JointsInput,
    VideoInput,
    Window,
)
from fusion_node.bindings import SPEECH_VIDEO_FRAMES, SpecBinding, SpeechBinding
from fusion_node.errors import ConfigError
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


def test_speech_binding_with_a_fixed_mouth_region_reports_no_landmark_health():
    assert SpeechBinding("audio.mic0", "camera.front", (256, 272, 128, 96)).health() == {}


def test_speech_binding_with_landmarks_counts_each_frame_without_a_mouth_once():
    binding = SpeechBinding("audio.mic0", "camera.front", "landmarks")
    assert binding.health() == {"mouth_landmarks": {"found": 0, "missed": 0}}
    window = speech_window(np.ones(binding.spec[0].samples, bool))  # 16 black frames
    binding.feeds(window)
    assert binding.health() == {"mouth_landmarks": {"found": 0, "missed": SPEECH_VIDEO_FRAMES}}
    binding.feeds(window)  # the same frames again: converted once, counted once
    assert binding.health() == {"mouth_landmarks": {"found": 0, "missed": SPEECH_VIDEO_FRAMES}}


SPEC_STREAMS = {"mic": "audio.mic0", "cam": "camera.front", "arm": "joints.arm"}


def spec_binding(inputs: dict, tensors: list[TensorSpec], period_ns: int = 32_000_000,
                 streams: dict[str, str] = SPEC_STREAMS) -> SpecBinding:
    return SpecBinding(parse_spec({"inputs": inputs}, "spec"), streams, tuple(tensors),
                       period_ns, "engine 'user'")


def test_spec_binding_names_the_roles_its_inputs_table_lacks():
    inputs = {"wave": {"kind": "audio", "stream": "mic", "samples": 160, "sample_rate": 16_000},
              "image": {"kind": "image", "stream": "cam", "size": 4}}
    message = ("engine 'user': the spec reads roles ['mic'], not in its inputs table "
               "['arm', 'cam']")
    with pytest.raises(ConfigError, match=re.escape(message)):
        spec_binding(inputs, [], streams={"cam": "camera.front", "arm": "joints.arm"})


def test_spec_binding_refuses_a_stream_read_twice_with_different_settings():
    inputs = {"short": {"kind": "audio", "stream": "mic", "samples": 160, "sample_rate": 16_000},
              "long": {"kind": "audio", "stream": "mic", "samples": 320, "sample_rate": 16_000}}
    message = "engine 'user': stream 'audio.mic0' is read twice with different settings"
    with pytest.raises(ConfigError, match=re.escape(message)):
        spec_binding(inputs, [])


def test_spec_binding_asks_for_each_stream_with_the_spec_s_required_flags():
    binding = spec_binding({
        "wave": {"kind": "audio", "stream": "mic", "samples": 160, "sample_rate": 16_000,
                 "required": False},
        "wave_valid": {"kind": "valid", "of": "wave"},
        "image": {"kind": "image", "stream": "cam", "size": 4, "required": True},
        "joints": {"kind": "joints", "stream": "arm"},
        "rate": {"kind": "constant", "value": 16_000},
    }, [])
    assert binding.spec == (AudioInput("audio.mic0", 160, 16_000, required=False),
                            VideoInput("camera.front", 1, required=True),
                            JointsInput("joints.arm", required=True))
    # The defaults: audio required, images optional (one frame, the newest).
    defaults = spec_binding({
        "wave": {"kind": "audio", "stream": "mic", "samples": 160, "sample_rate": 16_000},
        "image": {"kind": "image", "stream": "cam", "size": 4},
    }, [])
    assert defaults.spec == (AudioInput("audio.mic0", 160, 16_000, required=True),
                             VideoInput("camera.front", 1, required=False))


@pytest.mark.parametrize("period_ns", [32_000_000, 33_333_333])
def test_spec_binding_keeps_state_over_one_and_a_half_periods_and_no_longer(period_ns):
    # The largest whole-ns gap that is not longer than 1.5 periods.
    limit_ns = 3 * period_ns // 2
    binding = spec_binding({"state": {"kind": "state", "output": "stateN", "initial": 0.0}},
                           [TensorSpec("state", (1,), "float64")], period_ns)

    def tick(t_ref_ns: int) -> float:
        window = Window(t_ref_ns)
        state = binding.feeds(window)["state"]
        binding.decode({"stateN": state + 1.0}, window)  # a counter model: state + 1
        return float(state[0])

    assert tick(0) == 0.0
    assert tick(limit_ns) == 1.0  # exactly the limit: state carried
    assert tick(2 * limit_ns) == 2.0
    assert tick(3 * limit_ns + 1) == 0.0  # 1 ns more: restarted from `initial`


def camera_window(seq: int) -> Window:
    image = np.full((48, 64, 3), seq * 20, np.uint8)
    frame = Frame("camera.front", seq, seq * 40_000_000, image)
    return Window(seq * 40_000_000, data={"camera.front": FrameStack([frame], np.ones(1, bool))})


def test_spec_binding_reuses_an_image_feature_while_its_frame_is_among_the_last_eight():
    binding = spec_binding({"image": {"kind": "image", "stream": "cam", "size": 4}},
                           [TensorSpec("image", (1, 3, 4, 4), "float32")])
    first = binding.feeds(camera_window(0))["image"]
    for seq in range(1, 8):  # seven more frames: eight converted in all
        binding.feeds(camera_window(seq))
    again = binding.feeds(camera_window(0))["image"]
    assert np.shares_memory(again, first)  # from the cache
    binding.feeds(camera_window(8))  # a ninth frame pushes the first one out
    remade = binding.feeds(camera_window(0))["image"]
    assert not np.shares_memory(remade, first)
    np.testing.assert_array_equal(remade, first)


def test_spec_binding_refuses_a_constant_its_input_dtype_cannot_hold():
    fits = spec_binding({"x": {"kind": "constant", "value": 200}},
                        [TensorSpec("x", (2,), "uint8")])
    feed = fits.feeds(Window(0))["x"]
    assert feed.dtype == np.uint8 and feed.tolist() == [200, 200]
    too_big = spec_binding({"x": {"kind": "constant", "value": 300}},
                           [TensorSpec("x", (2,), "uint8")])
    with pytest.raises(OverflowError):  # never wrapped round to 44
        too_big.feeds(Window(0))
