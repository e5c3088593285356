"""The synthetic AV speech corpus: espeak-ng phoneme timings, labels, splits, determinism,
lips in sync with the voice; the command latch; a smoke training run; the shipped model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from engines.command_latch import CommandLatch
from engines.vocabulary import COMMANDS

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                reason="espeak-ng is not installed (scripts/setup.sh --test)")


@pytest.fixture(scope="module")
def train_generator():
    from training.speech_corpus import Generator

    return Generator("train")


@pytest.fixture(scope="module")
def validation_generator():
    from training.speech_corpus import Generator

    return Generator("validation")


def test_espeak_gives_phonemes_and_words_in_time_order():
    from drivers.sim.espeak import Espeak, EspeakError

    espeak = Espeak()
    u = espeak.synthesise("robot go home", "en-us+m3", 160)
    duration = len(u.samples) / u.sample_rate
    assert u.sample_rate == 22050 and 0.5 < duration < 3
    starts = [p.start_s for p in u.phonemes]
    assert len(u.phonemes) >= 8 and starts == sorted(starts) and starts[-1] <= duration
    assert [position for position, _ in u.words] == [1, 7, 10]
    assert 0 <= np.abs(u.samples).max() <= 1
    with pytest.raises(EspeakError, match="no voice"):
        espeak.synthesise("stop", "xx-nonexistent")


def test_splits_share_no_voice_phrase_babble_or_face():
    from training.speech_corpus import SPLITS

    train, validation = SPLITS["train"], SPLITS["validation"]
    for factor in ("variants", "babble", "skins", "lips"):
        assert not set(getattr(train, factor)) & set(getattr(validation, factor)), factor
    # "{}" (the bare command) is in both: a phrase is a carrier around the command.
    assert set(train.carriers) & set(validation.carriers) == {"{}"}


def test_clips_are_deterministic_from_their_seed(train_generator):
    a = train_generator.clip(123)
    b = train_generator.clip(123)
    c = train_generator.clip(124)
    np.testing.assert_array_equal(a.audio, b.audio)
    assert not np.array_equal(a.audio, c.audio)
    wa = train_generator.training_windows(55)
    wb = train_generator.training_windows(55)
    for x, y in zip(wa, wb, strict=True):
        np.testing.assert_array_equal(x.video, y.video)
        assert x.command == y.command


def test_target_clip_labels_and_lips_in_sync(validation_generator):
    from training.speech_corpus import CLIP_S, SAMPLE_RATE

    clip = validation_generator.clip(7, mode="target", clean=True, command=COMMANDS.index("red"))
    assert clip.command == COMMANDS.index("red") and clip.other_command == 0
    _, end = clip.command_span
    t_end = min(CLIP_S, end + 0.04)
    window = validation_generator.window(clip, round(t_end * SAMPLE_RATE) / SAMPLE_RATE)
    assert window.command == COMMANDS.index("red")
    assert window.vad.sum() > 3
    np.testing.assert_array_equal(window.speaker, window.vad)  # only the visible one talks


def test_lips_move_in_sync_with_the_voice(validation_generator):
    """The mouth's opening (dark pixels of the crop) follows the voice's loudness, best at
    a lag within the lip lead and coarticulation (tens of ms), far worse 200 ms off."""
    from engines.preprocess import mouth_crop

    for seed in range(3):
        clip = validation_generator.clip(20 + seed, mode="target", clean=True)
        t = np.arange(0, 2.4, 0.01)
        dark = np.array([(mouth_crop(clip.frame_at(x), "rgb8", (0, 0, 128, 96)) < 0.2).mean()
                         for x in t])
        loudness = np.log(np.sqrt(np.mean(clip.audio[:len(t) * 160].reshape(len(t), 160) ** 2,
                                          axis=1)) + 1e-4)

        def correlation(lag: int, dark=dark, loudness=loudness) -> float:
            n = len(dark)
            a = dark[max(0, lag):n + min(0, lag)]
            b = loudness[max(0, -lag):n - max(0, lag)]
            return float(np.corrcoef(a, b)[0, 1])

        lags = np.arange(-20, 21)
        scores = [correlation(int(lag)) for lag in lags]
        best = int(lags[int(np.argmax(scores))])
        assert abs(best) <= 4 and max(scores) > 0.7, (seed, best, max(scores))
        assert correlation(20) < max(scores) - 0.2


def test_distractor_and_silence_labels(validation_generator):
    from training.speech_corpus import SAMPLE_RATE

    clip = validation_generator.clip(8, mode="distractor", clean=True)
    assert clip.command == 0 and clip.other_command > 0 and clip.mouth is None
    t_end = round(min(2.4, clip.other_span[1] + 0.04) * SAMPLE_RATE) / SAMPLE_RATE
    window = validation_generator.window(clip, max(t_end, 0.655))
    assert window.vad.sum() > 0 and window.speaker.sum() == 0
    assert window.command == 0  # an off-screen voice's command is not the robot's
    silence = validation_generator.clip(9, mode="silence")
    window = validation_generator.window(silence, 1.5)
    assert window.vad.sum() == 0 and window.speaker.sum() == 0 and window.command == 0


def test_noise_is_mixed_at_the_requested_snr(validation_generator):
    clean = validation_generator.clip(10, mode="target", clean=True)
    noisy = validation_generator.clip(10, mode="target", snr_db=0.0, noise="pink")
    assert clean.snr_db is None and noisy.snr_db == 0.0
    voiced = clean.voiced > 0
    # Same seed, same speech: at 0 dB the noise carries as much power as the speech.
    speech = clean.audio / np.abs(clean.audio).max()
    mix = noisy.audio / np.abs(noisy.audio).max()
    ratio = np.mean(mix[~voiced] ** 2) / np.mean(mix[voiced] ** 2)
    assert 0.2 < ratio < 1.0 and np.mean(speech[~voiced] ** 2) < 1e-3


def test_window_shapes_match_the_node_binding(validation_generator):
    from training.models import SPEECH_INPUTS

    window = validation_generator.window(validation_generator.clip(11), 1.0)
    mel = validation_generator.logmel(window.audio)
    assert (1, *mel.shape) == SPEECH_INPUTS["audio_mel"]
    assert (1, *window.video.shape) == SPEECH_INPUTS["video"]
    assert window.video.dtype == np.float32 and 0 <= window.video.min() <= window.video.max() <= 1


def test_command_latch_needs_two_confident_agreeing_predictions():
    latch = CommandLatch(threshold=0.6, confirmations=2)

    def posterior(index: int, p: float) -> np.ndarray:
        out = np.full(len(COMMANDS), (1 - p) / (len(COMMANDS) - 1))
        out[index] = p
        return out

    red, blue = COMMANDS.index("red"), COMMANDS.index("blue")
    assert latch.feeds()[1] == 0.0
    assert latch.update(posterior(red, 0.9)) == 0  # one window is not enough
    assert latch.update(posterior(blue, 0.9)) == 0  # disagreement restarts
    assert latch.update(posterior(blue, 0.5)) == 0  # not confident
    assert latch.update(posterior(red, 0.9)) == 0
    assert latch.update(posterior(red, 0.8)) == red
    assert latch.update(posterior(0, 0.99)) == red  # "none" keeps the command
    one_hot, valid = latch.feeds()
    assert valid == 1.0 and one_hot[red] == 1.0 and one_hot.sum() == 1.0
    with pytest.raises(ValueError, match="finite"):
        latch.update(np.full(len(COMMANDS), np.nan))


def test_tiny_training_lowers_the_loss_and_exports(tmp_path):
    pytest.importorskip("torch")
    from engines.onnxruntime_backend import OnnxRuntimeEngine
    from training.train_speech import train

    out = tmp_path / "speech.onnx"
    result = train(out, steps=24, seed=1, lr=1e-3, validation_windows=32, eval_every=12)
    assert result["final_loss"] < result["first_loss"]
    assert out.with_suffix(".pt").exists()
    engine = OnnxRuntimeEngine(out)
    from training.models import SPEECH_INPUTS, random_feeds

    outputs = engine.infer(random_feeds(SPEECH_INPUTS, np.random.default_rng(0)))
    assert outputs["command_logits"].shape == (1, len(COMMANDS))


def test_shipped_speech_model_recognises_held_out_voices(validation_generator):
    """Smoke accuracy of the shipped weights on clean clips of unseen voices and faces."""
    from engines.onnxruntime_backend import OnnxRuntimeEngine
    from training.eval_speech import DEFAULT_MODEL, SpeechScorer, command_window

    scorer = SpeechScorer(OnnxRuntimeEngine(Path(DEFAULT_MODEL)), validation_generator)
    right = 0
    clips = 40
    for seed in range(clips):
        clip = validation_generator.clip(5000 + seed, mode="target", clean=True)
        right += scorer.run(command_window(validation_generator, clip),
                            "audio_video")["command"] == clip.command
    assert right / clips >= 0.8
