"""The AV speech corpus: espeak-ng phoneme timings, the speech bank and its splits, labels,
determinism, lips in sync with the voice, realism; the command latch; a smoke training run;
the shipped model. The generators use the small (`tiny`) banks, built on first use."""

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

    return Generator("train", bank_size="tiny")


@pytest.fixture(scope="module")
def validation_generator():
    from training.speech_corpus import Generator

    return Generator("validation", bank_size="tiny")


def test_espeak_gives_phonemes_and_words_in_time_order():
    from drivers.sim.espeak import Espeak, EspeakError

    espeak = Espeak()
    u = espeak.synthesise("robot go home", "en-us+m3", 160)
    duration = len(u.samples) / u.sample_rate
    assert u.sample_rate == 22050 and 0.5 < duration < 3
    starts = [p.start_s for p in u.phonemes]
    assert len(u.phonemes) >= 8 and starts == sorted(starts) and starts[-1] <= duration
    assert [position for position, _ in u.words] == [1, 7, 10]
    # espeak-ng often closes an utterance with a word event at text position 0: no word.
    for voice in ("en+m1", "en-us+f2", "en+Annie"):
        for text in ("robot go home", "hello", "my brother lives there"):
            assert all(p > 0 for p, _ in espeak.synthesise(text, voice).words), (voice, text)
    assert 0 <= np.abs(u.samples).max() <= 1
    with pytest.raises(EspeakError, match="no voice"):
        espeak.synthesise("stop", "xx-nonexistent")


def test_splits_share_no_voice_phrase_sentence_speaker_or_face():
    from training import real_speech
    from training.speech_bank import CARRIERS, CHATTER, ESPEAK_VARIANTS, FAMILY_VOICES
    from training.speech_corpus import SPLITS

    names = ("train", "validation", "test")
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not set(ESPEAK_VARIANTS[a]) & set(ESPEAK_VARIANTS[b]), (a, b)
            # "{}" (the bare command) is in all: a phrase is a carrier around the command.
            assert set(CARRIERS[a]) & set(CARRIERS[b]) == {"{}"}, (a, b)
            assert not set(CHATTER[a]) & set(CHATTER[b]), (a, b)
            assert not set(SPLITS[a].skins) & set(SPLITS[b].skins), (a, b)
            assert not set(SPLITS[a].lips) & set(SPLITS[b].lips), (a, b)
            assert not set(real_speech.REAL_SPLITS[a]) & set(real_speech.REAL_SPLITS[b])
            # One real speaker behind several voices (kal, kal16, kal_diphone) stays in one
            # split: compare speakers, not voice names.
            speakers = [{_speaker(v) for voices in FAMILY_VOICES[s].values() for v in voices}
                        for s in (a, b)]
            assert not speakers[0] & speakers[1], (a, b)
    # The neural family is held out of training and selection.
    assert "piper" in FAMILY_VOICES["test"]
    assert all("piper" not in FAMILY_VOICES[s] for s in ("train", "validation"))


def test_no_chatter_sentence_holds_a_command():
    """Chatter is labelled `none`: a command word in it (or one a letter away, "stops",
    "plays") would teach the model to ignore that command."""
    from training.speech_bank import CHATTER

    for sentences in CHATTER.values():
        for sentence in sentences:
            for word in sentence.split():
                for command in COMMANDS[1:]:
                    assert word.rstrip("sz") != command and word != command + "s", sentence
                    assert not (len(word) == len(command) + 1 and word.startswith(command)), \
                        sentence


def _speaker(voice: str) -> str:
    return {"kal16": "kal", "kal_diphone": "kal", "ked_diphone": "ked",
            "cmu_us_slt_arctic_hts": "slt"}.get(voice, voice)


def test_every_bank_voice_exists():
    """espeak-ng falls back to its default voice for a variant it does not know (and its
    names are case-sensitive): a split listing such a name would hear one voice twice."""
    from training import synthesizers
    from training.speech_bank import ESPEAK_ACCENTS, ESPEAK_VARIANTS, FAMILY_VOICES

    espeak = synthesizers.Espeak()
    for split, variants in ESPEAK_VARIANTS.items():
        for variant in variants:
            espeak.synthesise("go", f"{ESPEAK_ACCENTS[0]}+{variant}")
    families = {"flite": synthesizers.Flite(), "festival": synthesizers.Festival(),
                "piper": synthesizers.Piper()}
    for split, voices in FAMILY_VOICES.items():
        for family, names in voices.items():
            assert set(names) <= set(families[family].voices()), (split, family)


def test_bank_round_trips_and_holds_every_family(tmp_path):
    from training.speech_bank import SpeechBank, load_or_build
    from training.speech_corpus import BANK_DIR

    bank = load_or_build(BANK_DIR, "test", "tiny")
    assert bank.families == ("espeak", "festival", "flite", "piper")
    assert {s.command for s in bank.commands} == set(range(1, len(COMMANDS)))
    assert bank.chatter and bank.real
    for spoken in bank.commands[:8]:
        start, end = spoken.span_s
        assert 0 <= start < end <= len(spoken.samples) / 16_000, spoken.text
    bank.save(tmp_path / "bank.npz")
    again = SpeechBank.load(tmp_path / "bank.npz")
    assert [s.text for s in again.commands] == [s.text for s in bank.commands]
    np.testing.assert_allclose(again.commands[0].samples, bank.commands[0].samples,
                               atol=2 / 32767)  # int16 written as x*32767, read as /32768


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
    result = train(out, steps=24, seed=1, lr=1e-3, validation_windows=32, eval_every=12,
                   bank_size="tiny")
    assert result["final_loss"] < result["first_loss"]
    assert out.with_suffix(".pt").exists()
    engine = OnnxRuntimeEngine(out)
    # The export measured the model's lip-to-voice delay for the sync calibration.
    from training.sync_bias import BIAS_KEY

    assert np.isfinite(float(engine.metadata[BIAS_KEY]))
    from training.models import SPEECH_INPUTS, random_feeds

    outputs = engine.infer(random_feeds(SPEECH_INPUTS, np.random.default_rng(0)))
    assert outputs["command_logits"].shape == (1, len(COMMANDS))


@pytest.fixture(scope="module")
def test_generator():
    from training.speech_corpus import Generator

    return Generator("test", bank_size="tiny", realism=False)


def test_shipped_speech_model_recognises_held_out_voices(test_generator):
    """Smoke accuracy of the shipped weights on clean clips of test voices and faces: the
    test split's flite, festival and Piper voices included, which no training or selection
    heard. Chance is 1 in 17; the card gives the measured figure per family with its
    interval (`fusion-node eval speech`). 40 clips of the tiny bank carry about ±15 points of
    sampling error, so this checks the weights and the node's preprocessing still agree,
    not the card's figure."""
    from engines.onnxruntime_backend import OnnxRuntimeEngine
    from training.eval_speech import DEFAULT_MODEL, SpeechScorer, command_window

    scorer = SpeechScorer(OnnxRuntimeEngine(Path(DEFAULT_MODEL)), test_generator)
    right = 0
    clips = 40
    for seed in range(clips):
        clip = test_generator.clip(5000 + seed, mode="target", clean=True)
        right += scorer.run(command_window(test_generator, clip),
                            "audio_video")["command"] == clip.command
    assert right / clips >= 0.5
