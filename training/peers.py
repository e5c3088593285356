"""Real pretrained peers the speech engine is compared with: pocketsphinx keyword spotting.

`PocketsphinxKeywords` spots the 16 command words (`engines.vocabulary.COMMANDS`) with
pocketsphinx 5's keyword-spotting search (KWS) and the en-us acoustic model and CMUdict that
ship in the pocketsphinx wheel (BSD-style licences; nothing is downloaded). KWS runs each
keyword's HMM chain beside a free phone loop and reports a keyword where its path beats the
loop by the keyword's threshold, a likelihood ratio (`word /1e-20/` in the keyphrase list;
pocketsphinx's default is 1e-30, and above 1 is allowed). Every CMUdict pronunciation counts
("close" has two). pocketsphinx's other settings are its defaults (phone-loop probability
`kws_plp` 0.1 included).

Front end. A clip is peak-normalised to 0.9 (the level says nothing about the word, and
pocketsphinx's live cepstral mean normalisation starts from a typical speech level), given a
fixed -50 dB dither (digital silence, as synthetic speech and clean clips have, suits the
model badly: on the 396 clips below the dither takes clean commands from 31% to 43%), and
padded with 0.3 s either side (KWS holds back detections in the last 0.1 s) of noise at the
clip's own floor (its 10th-percentile 10 ms RMS): a silent pad makes an edge that "up" fires
on in white noise at any level, with scores up to 1e+47.

Choice among detections. A detection's score is the base-10 logarithm of the largest
threshold at which it still fires: it fires at threshold t exactly when score >= log10(t), up
to pocketsphinx's integer log scale. `command` takes the detection that clears its own
threshold by the most (thresholds shared: the highest-scoring one). On 396 synthetic
train-voice clips (espeak-ng, flite, festival; carriers and chatter, clean and babble 0 dB)
best, last, first and longest detection came within 2 points of each other (39-40%); best is
the one whose answer does not depend on where the word sits in the clip.

Tuning (`tune_threshold`, `PocketsphinxKeywords.tuned_on`) picks one threshold shared by all
words from `THRESHOLD_GRID`, maximising command accuracy on (audio, command) pairs the caller
gives (validation clips: never test). Each clip is decoded once at the grid's lowest threshold
and the grid is applied to the scores afterwards; for `command` this is exactly what decoding
at each threshold gives (pocketsphinx merges overlapping detections of a word keeping the
best, and a threshold changes only which detections are kept, never the search).

Known weakness: "up" (AH P: any vowel followed by a closure or a pause) and "go" fire on most
speech with high scores, so at thresholds that let the other words through they win many
clips; per-word thresholds (the constructor takes them) helped little when tuned on half of
the 396 clips above (+4 points on the other half). pocketsphinx's accuracy there: 43% of clean
commands, 10% in babble at 0 dB.

Speed: one core spends ~30 ms per second of audio on a long stream and ~39 ms on 2 s clips
(their 0.6 s of padding), i.e. 25-33x real time (a 2-core VM shared with other work); making a
decoder takes 0.1-0.5 s, so keep one instance. Not thread-safe: one instance per thread.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines.vocabulary import COMMANDS
from fusion_node.errors import FusionError

SAMPLE_RATE = 16_000
PAD_S = 0.3
PEAK = 0.9
DITHER = 3e-3  # RMS, after normalising to PEAK: -50 dB, a quiet room's floor
FLOOR_PERCENTILE = 10  # the padding's level: this percentile of the 10 ms frames' RMS
DEFAULT_THRESHOLD = 1e-30  # pocketsphinx's kws_threshold default
# Half-decade steps, 1e-50 .. 1e+20 (a likelihood ratio: above 1 is allowed, and where the
# short words fire on most speech it is needed).
THRESHOLD_GRID: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-100, 41))
# From pocketsphinx's kws_search.c: a detection's reported probability is its score over the
# phone loop less KWS_MAX; thresholds are compared in the search's scale (logmath >> 10).
_KWS_MAX = 1500
_SENSCR_SHIFT = 10
_ALTERNATE = re.compile(r"\(\d+\)$")


class PeerError(FusionError):
    """A peer is missing (its package is not installed) or was given bad settings."""


@dataclass(frozen=True)
class Detection:
    """A spotted command: its index in COMMANDS, where (s, in the audio given) and its score
    (log10 of the largest threshold it passes)."""

    command: int
    start_s: float
    end_s: float
    score: float


class PocketsphinxKeywords:
    """pocketsphinx keyword spotting over the 16 command words; see the module docstring.

    `thresholds`: per command word (missing words: `DEFAULT_THRESHOLD`), each positive.
    """

    def __init__(self, thresholds: Mapping[str, float] | None = None) -> None:
        given = dict(thresholds or {})
        unknown = sorted(set(given) - set(COMMANDS[1:]))
        if unknown:
            raise PeerError(f"thresholds for words that are not commands: {unknown}")
        self.thresholds: dict[str, float] = {
            word: float(given.get(word, DEFAULT_THRESHOLD)) for word in COMMANDS[1:]}
        for word, value in self.thresholds.items():
            if not (value > 0.0 and math.isfinite(value)):
                raise PeerError(f"threshold of {word!r} must be positive, got {value}")
        self.tuning: dict[str, object] | None = None
        self._decoder = self._make_decoder()
        self._logmath = self._decoder.logmath
        # Each word's threshold in the search's own integer scale, as kws_search.c reads it.
        self._limits = np.array([self._search_scale(self.thresholds[w]) for w in COMMANDS[1:]])
        self._frame_s = 1.0 / float(self._decoder.config["frate"])

    @classmethod
    def shared(cls, threshold: float) -> PocketsphinxKeywords:
        """One threshold for every word."""
        return cls({word: threshold for word in COMMANDS[1:]})

    @classmethod
    def tuned_on(cls, pairs: Iterable[tuple[np.ndarray, int]],
                 grid: Sequence[float] = THRESHOLD_GRID) -> PocketsphinxKeywords:
        """A spotter with the shared threshold from `grid` that is most accurate on `pairs`
        ((16 kHz audio, COMMANDS index) each, 0 for no command); `.tuning` says how it did."""
        threshold, accuracy, n = tune_threshold(pairs, grid)
        spotter = cls.shared(threshold)
        spotter.tuning = {"threshold": threshold, "accuracy": accuracy, "clips": n,
                          "grid": [min(grid), max(grid), len(grid)]}
        return spotter

    @property
    def threshold(self) -> float | None:
        """The threshold every word shares, or None where they differ."""
        values = set(self.thresholds.values())
        return values.pop() if len(values) == 1 else None

    # Decoding -------------------------------------------------------------------------

    def _make_decoder(self) -> Any:
        try:
            import pocketsphinx
        except ImportError as exc:
            raise PeerError(f"pocketsphinx is not installed ({exc}); it is in the training "
                            "extra") from None
        probe = pocketsphinx.Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")
        lines = []
        for word in COMMANDS[1:]:
            if probe.lookup_word(word) is None:
                raise PeerError(f"{word!r} is not in pocketsphinx's dictionary")
            # Every pronunciation: "close", "close(2)", ...
            spellings = [word]
            while probe.lookup_word(f"{word}({len(spellings) + 1})") is not None:
                spellings.append(f"{word}({len(spellings) + 1})")
            lines += [f"{s} /{self.thresholds[word]!r}/" for s in spellings]
        handle, path = tempfile.mkstemp(suffix=".kws", text=True)
        try:
            with os.fdopen(handle, "w") as file:
                file.write("\n".join(lines) + "\n")
            return pocketsphinx.Decoder(kws=path, samprate=SAMPLE_RATE, loglevel="FATAL")
        finally:
            os.unlink(path)

    def _search_scale(self, threshold: float) -> int:
        return int(self._logmath.log(threshold)) >> _SENSCR_SHIFT

    def _pcm(self, audio: np.ndarray) -> bytes:
        """16-bit PCM for the decoder: normalised, dithered and padded with noise at the
        audio's own floor (see the module docstring)."""
        samples = np.asarray(audio, dtype=np.float64).reshape(-1)
        peak = float(np.abs(samples).max()) if len(samples) else 0.0
        if peak > 0:
            samples = samples / peak * PEAK
        rng = np.random.default_rng(0)
        hop = SAMPLE_RATE // 100
        frames = samples[: len(samples) // hop * hop].reshape(-1, hop)
        floor = float(np.percentile(np.sqrt(np.mean(frames ** 2, axis=1)), FLOOR_PERCENTILE)
                      ) if len(frames) else 0.0
        pad_rms = max(DITHER, floor)
        n_pad = round(PAD_S * SAMPLE_RATE)
        padded = np.concatenate([rng.standard_normal(n_pad) * pad_rms,
                                 samples + rng.standard_normal(len(samples)) * DITHER,
                                 rng.standard_normal(n_pad) * pad_rms])
        return np.round(np.clip(padded, -1.0, 1.0) * 32767).astype(np.int16).tobytes()

    def _raw(self, audio: np.ndarray) -> list[tuple[int, float, float, int]]:
        """Every detection the decoder keeps that touches the audio (not only the padding):
        (command, start s, end s, score in the search's scale, comparable with `_limits`)."""
        if np.asarray(audio).size == 0:
            return []
        decoder = self._decoder
        decoder.start_utt()
        decoder.process_raw(self._pcm(audio), full_utt=True)
        decoder.end_utt()
        duration = len(np.asarray(audio).reshape(-1)) / SAMPLE_RATE
        out = []
        for segment in decoder.seg() or ():
            word = _ALTERNATE.sub("", segment.word.strip())
            if word not in COMMANDS:
                continue
            start = segment.start_frame * self._frame_s - PAD_S
            end = (segment.end_frame + 1) * self._frame_s - PAD_S
            if end <= 0.0 or start >= duration:
                continue  # wholly inside the padding: not in the audio given
            # The wrapper reports logmath_exp(prob); prob = score over the phone loop - KWS_MAX.
            score = (int(self._logmath.log(segment.prob)) + _KWS_MAX if segment.prob > 0
                     else -(1 << 30))
            out.append((COMMANDS.index(word), max(start, 0.0), min(end, duration), score))
        return out

    def _log10(self, score: int) -> float:
        """A score in the search's scale as log10 of the threshold it corresponds to."""
        return float(self._logmath.log_to_log10(score << _SENSCR_SHIFT))

    def scored(self, audio: np.ndarray) -> list[Detection]:
        """The detections that clear their word's threshold, in time order."""
        kept = [Detection(c, s, e, self._log10(score)) for c, s, e, score in self._raw(audio)
                if score >= self._limits[c - 1]]
        return sorted(kept, key=lambda d: (d.start_s, d.end_s, d.command))

    def detections(self, audio: np.ndarray) -> list[tuple[int, float, float]]:
        """(command, start_s, end_s) of each keyword spotted in `audio` (16 kHz), in time
        order; a word's overlapping detections come out as one. The end is where the
        keyword's path scored best: it can fall before a long final vowel dies away."""
        return [(d.command, d.start_s, d.end_s) for d in self.scored(audio)]

    def command(self, audio: np.ndarray) -> int:
        """The COMMANDS index of the keyword spotted in `audio` that clears its threshold by
        the most (the best-scoring one, thresholds shared); 0 if none is."""
        return _best(self._raw(audio), self._limits)


def _best(raw: list[tuple[int, float, float, int]], limits: np.ndarray) -> int:
    best, margin = 0, -math.inf
    for command, _, _, score in raw:
        over = score - int(limits[command - 1])
        if over >= 0 and over > margin:
            best, margin = command, over
    return best


def tune_threshold(pairs: Iterable[tuple[np.ndarray, int]],
                   grid: Sequence[float] = THRESHOLD_GRID) -> tuple[float, float, int]:
    """(threshold, accuracy, clips): the grid's threshold, shared by all words, with the best
    command accuracy on `pairs` ((16 kHz audio, COMMANDS index), 0 for no command). Ties go to
    the middle of the tied thresholds (in grid order). Pass validation clips only."""
    grid = sorted(float(t) for t in grid)
    if not grid:
        raise PeerError("empty threshold grid")
    floor = PocketsphinxKeywords.shared(grid[0])
    raws, labels = [], []
    for audio, command in pairs:
        raws.append(floor._raw(audio))
        labels.append(int(command))
    if not raws:
        raise PeerError("no clips to tune the keyword spotter's threshold on")
    right = []
    for threshold in grid:
        limits = np.full(len(COMMANDS) - 1, floor._search_scale(threshold))
        right.append(sum(_best(raw, limits) == label for raw, label in zip(raws, labels,
                                                                              strict=True)))
    top = max(right)
    tied = [i for i, r in enumerate(right) if r == top]
    chosen = grid[tied[len(tied) // 2]]
    return chosen, top / len(raws), len(raws)
