"""Real human speech: klettres-data's recordings of people saying letters and syllables.

Debian's `klettres-data` (KDE's KLettres, GPL-2+; read where the package installs it, nothing
is copied into this repository) ships, per language folder under /usr/share/klettres/<lang>/,
`alpha/*.ogg` (the letters) and mostly `syllab/*.ogg` (syllables or short words), with a
`sounds.xml` naming what each file says. 20 folders hold recordings (1,836 files, 51 minutes);
`id` and `nn` have a `sounds.xml` but no audio in the Debian package.

One language folder is one speaker here, but a folder can hold more than one person: neither
`sounds.xml` nor the package says who recorded what (only ar's `sounds.xml`: "my little
nephew's voice"). Median pitch (a rough autocorrelation estimate) per folder and subfolder
(letters vs syllables) says: `de`'s letters (~225 Hz) and syllables (~120 Hz) are two people;
`pt_BR` (~285 vs ~325 Hz) and `ru` (~200 vs ~230 Hz) may be; `da`'s letters (128 kHz, ~5 s
each) and syllables (44.1 kHz, ~0.5 s) are two sessions at one pitch (~125 Hz); the others
match. Splits are by folder, so whoever is in a test folder is in no other split. Median pitch
(Hz): tn 360, pt_BR 300, ar 290 (a child); cs, en_GB, it, nb, nl, ru, uk 220-255; es 185,
he 175; en, da, lt, fr, hu, ml, nds 115-140.

The text of a recording is the `name` that `sounds.xml` gives its file (e.g. "A", "GO",
"FUß"); files that no entry names take their file name, upper-cased. `sounds.xml` has slips
(tn names bu.ogg "BI"; ml names one file for two syllables): the text is informative, used to
drop command-like recordings (`is_command_like`) and for reports, never as a label to learn.

Audio is decoded with soundfile, made mono and resampled with `scipy.signal.resample_poly` to
16 kHz float32; nothing is trimmed. Stereo files are averaged, except where the two channels
are not alike (correlation under 0.5: one silent or out of phase, 11 files of ar, de, tn): then
the louder channel. Levels are as recorded, except that audio decoding above full scale is
scaled down to peak 1: Vorbis overshoot of clipped recordings (peaks below 2, 685 files), and
24 of tn's 43 files, which decode at peaks of 7-61 (a broken encode; the waveform is speech,
only its scale is wrong).
"""

from __future__ import annotations

import functools
import math
import os
import unicodedata
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.vocabulary import COMMANDS
from fusion_node.errors import FusionError

ROOT = Path(os.environ.get("KLETTRES_DATA", "/usr/share/klettres"))
SAMPLE_RATE = 16_000

# Disjoint speaker (language folder) sets. Test: five folders of five language families,
# one of the two English ones; validation: three; train: the other twelve, Malayalam's 521
# syllables among them. Counts and durations: `summary()`, `python -m training.real_speech`.
REAL_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("ar", "cs", "da", "en", "es", "it", "lt", "ml", "nb", "nl", "tn", "uk"),
    "validation": ("de", "nds", "pt_BR"),
    "test": ("en_GB", "fr", "he", "hu", "ru"),
}

# Texts (case-folded, accents kept) besides the command words themselves that a listener could
# hear as a command word. Checked against every text in the package (`summary()` lists the
# matches): "GO" is said as "go" in es, it and pt_BR (an exact match); Danish and Dutch "OP" is
# "up" with a rounder vowel and Dutch "AAP" with a longer one; Dutch "OOM" ("ohm") is "home"
# without its h. Nothing else comes close: the letters' English names (none is a command), and
# no syllable says stop, left, right, down, red, green, blue, yellow, pick, place, open, close
# or wait.
SOUND_ALIKES: dict[str, tuple[str, ...]] = {
    "up": ("op", "ap", "aap", "ab"),
    "home": ("oom", "hom", "hoom"),
}


class RealSpeechError(FusionError):
    """klettres-data is missing, or a split or speaker is unknown."""


@dataclass(frozen=True)
class Recording:
    """One file: its speaker (the language folder), where it lies, and what it says."""

    speaker: str
    path: Path
    text: str


def _xml_names(folder: Path) -> dict[str, str]:
    """File name (relative to the language folder) -> the text the first entry gives it."""
    xml = folder / "sounds.xml"
    if not xml.is_file():
        return {}
    names: dict[str, str] = {}
    for sound in ET.parse(xml).getroot().iter("sound"):
        file, name = sound.get("file"), sound.get("name")
        if file and name:
            relative = Path(file).relative_to(folder.name).as_posix() if Path(
                file).parts[0] == folder.name else file
            names.setdefault(relative, name.strip())
    return names


@functools.cache
def _catalogue() -> dict[str, tuple[Recording, ...]]:
    """Every recording on disk, by speaker, in path order."""
    out: dict[str, tuple[Recording, ...]] = {}
    if not ROOT.is_dir():
        return out
    for folder in sorted(p for p in ROOT.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*/*.ogg"))
        if not files:
            continue
        names = _xml_names(folder)
        out[folder.name] = tuple(
            Recording(folder.name, path,
                      names.get(path.relative_to(folder).as_posix(), path.stem.upper()))
            for path in files)
    return out


def speakers() -> tuple[str, ...]:
    """The language folders that hold recordings (one speaker each here; see the module
    docstring), sorted; empty when klettres-data is not installed."""
    return tuple(_catalogue())


def _check_split(split: str) -> None:
    if split not in REAL_SPLITS:
        raise RealSpeechError(f"unknown split {split!r}; expected one of {tuple(REAL_SPLITS)}")
    if not _catalogue():
        raise RealSpeechError(f"no klettres-data recordings under {ROOT}: install the Debian "
                              "package klettres-data (or set KLETTRES_DATA)")


def recordings(split: str) -> list[Recording]:
    """The split's recordings, by speaker then path."""
    _check_split(split)
    catalogue = _catalogue()
    return [r for speaker in REAL_SPLITS[split] for r in catalogue.get(speaker, ())]


def load(recording: Recording, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The recording as mono float32 at `sample_rate`: channels averaged, resampled with
    `resample_poly`, nothing trimmed."""
    import soundfile
    from scipy.signal import resample_poly

    samples, rate = soundfile.read(recording.path, dtype="float32", always_2d=True)
    mono = _mono(samples)
    if rate != sample_rate:
        g = math.gcd(int(rate), int(sample_rate))
        mono = resample_poly(mono, sample_rate // g, int(rate) // g)
    peak = float(np.abs(mono).max()) if len(mono) else 0.0
    if peak > 1.0:
        mono = mono / peak
    return np.ascontiguousarray(mono, dtype=np.float32)


def _mono(samples: np.ndarray) -> np.ndarray:
    """The channels' average, or the louder channel where they are not alike."""
    if samples.shape[1] == 1:
        return samples[:, 0]
    left, right = samples[:, 0], samples[:, 1]
    energy = (float(left @ left), float(right @ right))
    correlation = float(left @ right) / (math.sqrt(energy[0] * energy[1]) + 1e-12)
    if samples.shape[1] == 2 and correlation < 0.5:
        return left if energy[0] >= energy[1] else right
    return samples.mean(axis=1)


@functools.lru_cache(maxsize=4)
def load_split(split: str) -> tuple[tuple[Recording, np.ndarray], ...]:
    """Every recording of the split with its 16 kHz audio, cached (the arrays are read-only:
    copy before changing them). The whole package loads in a few seconds."""
    out = []
    for recording in recordings(split):
        samples = load(recording)
        samples.setflags(write=False)
        out.append((recording, samples))
    return tuple(out)


def _fold(text: str) -> str:
    return unicodedata.normalize("NFC", text).casefold().strip()


def is_command_like(text: str) -> bool:
    """Whether a recording saying `text` could be heard as a command word: the word itself, or
    a spelling in `SOUND_ALIKES` (so callers can keep such recordings out of "no command")."""
    folded = _fold(text)
    if folded in COMMANDS[1:]:
        return True
    return any(folded in alikes for alikes in SOUND_ALIKES.values())


def summary() -> dict[str, dict[str, object]]:
    """Per split: speakers, recordings, seconds of audio (from the file headers), and the
    command-like texts found."""
    import soundfile

    out: dict[str, dict[str, object]] = {}
    for split, split_speakers in REAL_SPLITS.items():
        items = recordings(split)
        seconds = sum(soundfile.info(r.path).duration for r in items)
        out[split] = {"speakers": len(split_speakers), "recordings": len(items),
                      "seconds": round(seconds, 1),
                      "command_like": sorted(f"{r.speaker}:{r.text}" for r in items
                                             if is_command_like(r.text))}
    return out


if __name__ == "__main__":  # pragma: no cover - a report for people
    import json

    print(json.dumps(summary(), indent=1, ensure_ascii=False))
