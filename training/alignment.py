"""Forced alignment of speech to its known text with pocketsphinx 5.

For synthesizers that give no word timings of their own: the audio and the words it says go
in, each word's and each phone's start and end come out. The pocketsphinx wheel ships the
en-us acoustic model and CMUdict, so nothing else is needed; phones are CMUdict's ARPAbet
(upper case) and `SIL` for silence.

Alignment is two passes (pocketsphinx's own recipe): `set_align_text` and a decode give the
word segmentation, `set_alignment` and a second decode of the same audio give the phones.

Synthetic speech trips pocketsphinx's defaults: audio that starts or ends on a word, or whose
pauses are digital zeros, leaves no silence to anchor the ends, so the audio gets silence
either side and a faint fixed dither. Even then the search sometimes ends part-way through the
text (the silence model swallows short fast words) or finds no path at all, and a little more
or less padding often tips it: `ATTEMPTS` are tried in turn, the last ones with pauses all
but forbidden (the first and last words then trimmed to the voiced audio).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from fusion_node.errors import FusionError

SAMPLE_RATE = 16_000
# (decoder, silence padded on either side (s), dither relative to full scale), tried in turn:
# the search is brittle, and a little more or less silence around the speech often tips it.
ATTEMPTS = (("default", 0.3, 1e-4), ("default", 0.1, 1e-4), ("default", 0.5, 1e-3),
            ("no-pauses", 0.3, 1e-4), ("no-pauses", 0.1, 1e-4))
_WORD = re.compile(r"[\w']+")


class AlignmentError(FusionError):
    """The audio cannot be aligned to the text (a word missing from the dictionary, or no
    path through the words fits the audio)."""


@dataclass(frozen=True)
class Segment:
    name: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Alignment:
    """Words (no silences) in text order, and every phone including `SIL`."""

    words: tuple[Segment, ...]
    phones: tuple[Segment, ...]


def text_words(text: str) -> list[tuple[int, str]]:
    """The words of `text` as (1-based character position, lower-case word), the way word
    events number them."""
    return [(m.start() + 1, m.group().lower()) for m in _WORD.finditer(text)]


class Aligner:
    """pocketsphinx decoders kept for many alignments (making one takes ~0.25 s).

    Not thread-safe: one per thread.
    """

    def __init__(self) -> None:
        try:
            import pocketsphinx
        except ImportError as exc:
            raise AlignmentError(f"pocketsphinx is not installed ({exc}); it is in the "
                                 "training extra") from None
        self._pocketsphinx = pocketsphinx
        self._decoders: dict[str, Any] = {}
        self._frame_s = 1.0 / float(self._decoder("default").config["frate"])

    def _decoder(self, kind: str) -> Any:
        if kind not in self._decoders:
            options = {"silprob": 1e-8} if kind == "no-pauses" else {}
            self._decoders[kind] = self._pocketsphinx.Decoder(
                samprate=SAMPLE_RATE, loglevel="FATAL", **options)
        return self._decoders[kind]

    def pronunciation(self, word: str) -> list[str] | None:
        """CMUdict's (first) ARPAbet pronunciation of `word`, None if it has none."""
        phones = self._decoder("default").lookup_word(word.lower())
        return phones.split() if phones else None

    def align(self, samples: np.ndarray, sample_rate: int, text: str) -> Alignment:
        """Word and phone timings (s) of `text` said in `samples` (mono float in [-1, 1])."""
        if sample_rate != SAMPLE_RATE:
            raise AlignmentError(f"alignment needs {SAMPLE_RATE} Hz audio, got {sample_rate}")
        words = [word for _, word in text_words(text)]
        if not words:
            raise AlignmentError(f"nothing to align in {text!r}")
        missing = [w for w in words if self.pronunciation(w) is None]
        if missing:
            raise AlignmentError(f"cannot align {text!r}: not in the pronunciation "
                                 f"dictionary: {', '.join(missing)}")
        peak = float(np.abs(samples).max()) if len(samples) else 0.0
        if peak <= 0:
            raise AlignmentError(f"cannot align {text!r}: the audio is silent")
        for kind, pad_s, dither in ATTEMPTS:
            pad = np.zeros(round(pad_s * SAMPLE_RATE), np.float32)
            padded = np.concatenate([pad, samples / peak * 0.9, pad])
            padded += np.random.default_rng(0).standard_normal(len(padded)) * dither
            pcm = np.round(padded * 32767).astype(np.int16).tobytes()
            alignment = self._align(kind, pcm, words, pad_s)
            if alignment is not None:
                return alignment if kind == "default" else _trim_to_voice(alignment, samples)
        raise AlignmentError(f"cannot align {text!r} to {len(samples) / sample_rate:.2f} s "
                             "of audio: no path through the words fits it")

    def _align(self, kind: str, pcm: bytes, words: list[str],
               pad_s: float) -> Alignment | None:
        """The two passes with the `kind` of decoder; None where the search does not reach
        the last word."""
        decoder = self._decoder(kind)
        try:
            decoder.set_align_text(" ".join(words))
            self._decode(decoder, pcm)
            hypothesis = decoder.hyp()
            # A search that does not reach the last word returns the words it did reach; a
            # second pass over such a partial path can crash pocketsphinx, so stop here.
            if hypothesis is None or hypothesis.hypstr.split() != words:
                return None
            decoder.set_alignment()
            self._decode(decoder, pcm)
            alignment = decoder.get_alignment()
        except RuntimeError:
            # "Failed to stop utterance processing": the search found no path at all. The
            # decoder may be left mid-utterance; use a new one next time.
            del self._decoders[kind]
            return None
        if alignment is None:
            return None
        aligned_words: list[Segment] = []
        phones: list[Segment] = []
        for word in alignment:
            name = re.sub(r"\(\d+\)$", "", word.name)  # "left(2)": an alternate pronunciation
            if not _is_filler(name):
                aligned_words.append(self._segment(name, word.start, word.duration, pad_s))
            for phone in word:
                phones.append(self._segment(phone.name, phone.start, phone.duration, pad_s))
        if [w.name for w in aligned_words] != words:
            return None
        return Alignment(tuple(aligned_words), tuple(phones))

    @staticmethod
    def _decode(decoder: Any, pcm: bytes) -> None:
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()

    def _segment(self, name: str, start: int, duration: int, pad_s: float) -> Segment:
        # Back to the unpadded audio's time; the padding's silence clips to its ends.
        return Segment(name, max(0.0, start * self._frame_s - pad_s),
                       max(0.0, (start + duration) * self._frame_s - pad_s))


def _trim_to_voice(alignment: Alignment, samples: np.ndarray) -> Alignment:
    """Without pauses the first and last words take in the silence around the speech: start
    the first at the first voiced 10 ms frame and end the last at the last one (within 35 dB
    of the loudest), with silences outside."""
    hop = SAMPLE_RATE // 100
    frames = len(samples) // hop
    energy = np.mean(samples[:frames * hop].reshape(frames, hop) ** 2, axis=1)
    voiced = np.flatnonzero(energy > energy.max() * 10 ** -3.5)
    if not len(voiced):
        return alignment
    begin = float(voiced[0] * hop / SAMPLE_RATE)
    end = float((voiced[-1] + 1) * hop / SAMPLE_RATE)
    words, phones = list(alignment.words), list(alignment.phones)
    if begin < words[0].end_s and begin < phones[0].end_s:
        words[0] = Segment(words[0].name, max(words[0].start_s, begin), words[0].end_s)
        phones[0] = Segment(phones[0].name, max(phones[0].start_s, begin), phones[0].end_s)
        if begin > 0:
            phones.insert(0, Segment("SIL", 0.0, phones[0].start_s))
    if end > words[-1].start_s and end > phones[-1].start_s:
        duration = len(samples) / SAMPLE_RATE
        words[-1] = Segment(words[-1].name, words[-1].start_s, min(words[-1].end_s, end))
        phones[-1] = Segment(phones[-1].name, phones[-1].start_s, min(phones[-1].end_s, end))
        if phones[-1].end_s < duration:
            phones.append(Segment("SIL", phones[-1].end_s, duration))
    return Alignment(tuple(words), tuple(phones))


def _is_filler(name: str) -> bool:
    """Silence and noise entries (<s>, </s>, <sil>, [NOISE], +SPN+), not words."""
    return name[:1] in "<[+"
