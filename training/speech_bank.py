"""The speech the corpus is made of: every utterance of one split, synthesised once.

    python -m training.speech_bank --split train --out banks/train.npz

A bank holds, for one split (`train`, `validation`, `test`):
- command utterances: a carrier phrase around a command word, from every synthesizer family
  of the split, with its phonemes (they drive the mouth) and the command word's span;
- chatter: sentences that hold no command, from the same voices (the `none` class said by the
  visible person, and the babble of other talkers);
- real speech: klettres-data's recordings of real people (letters and syllables) of the
  split's speakers: voice activity and `none` from real voices, and real babble.

Synthesis happens here, once, so that training draws clips from a file (on a machine without
the synthesizers, too) and every clip of a seed is the same everywhere. The splits are
disjoint in speakers within and across families (flite's `kal` and festival's `kal_diphone`
are one man, both in validation; `slt` of both families is in test), in carriers, in chatter
sentences, and in real speakers; Piper's neural voice is held out of training and selection
altogether, as a stand-in for a new real speaker.

Audio is stored as FLAC (lossless, half the size of int16), the rest as arrays, in one `.npz`.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from drivers.sim.espeak import Phoneme, Utterance
from engines.vocabulary import COMMANDS

SAMPLE_RATE = 16_000
SPLIT_NAMES = ("train", "validation", "test")
HELD_OUT_FAMILY = "piper"

ESPEAK_ACCENTS = ("en", "en-us", "en-029", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
                  "en-gb-x-gbcwmd", "en-us-nyc")
# Human-sounding espeak-ng variants (file names in espeak-ng-data/voices/!v, case-sensitive).
ESPEAK_VARIANTS = {
    "train": ("m1", "m2", "m4", "m5", "m7", "f1", "f3", "f5", "klatt", "klatt3", "klatt5",
              "adam", "benjamin", "caleb", "david", "ed", "edward", "john", "linda", "max",
              "Michael", "paul", "pedro", "quincy", "robert", "steph", "travis", "victor",
              "zac", "Annie", "aunty", "belinda", "grandma", "norbert", "iven", "iven3",
              "Alex", "Andrea", "Diogo", "Gene", "Hugo", "Lee", "Marco", "Mike", "antonio"),
    "validation": ("m3", "m6", "f2", "klatt2", "Andy", "boris", "gustave", "shelby",
                   "steph2", "grandpa", "Alicia", "Jacky", "Mario", "edward2", "iven2"),
    "test": ("m8", "f4", "klatt4", "klatt6", "Denis", "Henrique", "Nguyen", "anika",
             "kaukovalta", "marcelo", "michel", "miguel", "pablo", "rob", "sandro", "steph3",
             "Gene2", "iven4"),
}
# Voices of the other families, by the real speaker behind them.
FAMILY_VOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {"flite": ("awb", "rms"), "festival": ("ked_diphone",)},
    "validation": {"flite": ("kal", "kal16"), "festival": ("kal_diphone",)},
    "test": {"flite": ("slt",), "festival": ("cmu_us_slt_arctic_hts",), "piper": ("joe",)},
}
CARRIERS = {
    "train": ("{}", "robot {}", "{} now", "please {}", "{} please", "okay {}", "{} robot",
              "now {}"),
    "validation": ("{}", "hey {}", "{} then", "and {}", "so {}"),
    "test": ("{}", "robot please {}", "just {}", "{} for me", "hey robot {}"),
}
CHATTER = {
    "train": (
        "the weather is nice today", "we should meet after lunch", "this is a long sentence",
        "it was a quiet morning", "have you seen the new building",
        "the train was late again", "she bought some bread and cheese",
        "they talked about the game", "my brother lives there", "the coffee is too hot",
        "we walked along the river", "he forgot his keys again"),
    "validation": (
        "the meeting starts at nine", "our garden needs more water",
        "a cat sat by the window", "the bus was full this morning",
        "we painted the kitchen white", "she reads a book every week"),
    "test": (
        "my sister sings in a choir", "the shop sells fresh fish", "it rained all night",
        "the children laughed at the clown", "we need new tyres for the car",
        "a bird sang in the tree"),
}
SIZES = {
    # Per split: (command utterances per family and command, chatter utterances per family,
    # real recordings kept per speaker). Training draws many clips from each utterance
    # (placement, speed, pitch, vocal tract, room, microphone, noise); validation only
    # selects a checkpoint; the test split is measured per voice. Training's is the largest:
    # with 16 utterances per command and family the model learnt its few real-speaker voices'
    # utterances by heart (73% audio-only on them, 9-18% on the test split's).
    "full": {"train": (80, 120, 40), "validation": (6, 12, 20), "test": (24, 24, 60)},
    "tiny": {"train": (1, 2, 4), "validation": (1, 2, 4), "test": (1, 2, 4)},
}


@dataclass(frozen=True)
class Spoken:
    """One synthesised utterance of the bank."""

    family: str
    voice: str
    text: str
    command: int  # COMMANDS index of the command word in it; 0 for chatter
    span_s: tuple[float, float] | None  # the command word's voiced span
    phonemes: tuple[Phoneme, ...]
    samples: np.ndarray  # float32, 16 kHz


@dataclass(frozen=True)
class RealSpeech:
    speaker: str
    text: str
    samples: np.ndarray  # float32, 16 kHz


@dataclass
class SpeechBank:
    split: str
    commands: list[Spoken]
    chatter: list[Spoken]
    real: list[RealSpeech]
    skipped: list[str] = field(default_factory=list)  # utterances that failed, and why

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(sorted({s.family for s in self.commands}))

    def voices(self, family: str | None = None) -> tuple[str, ...]:
        return tuple(sorted({s.voice for s in self.commands
                             if family is None or s.family == family}))

    # Building ---------------------------------------------------------------------------

    @classmethod
    def build(cls, split: str, size: str = "full", seed: int = 0) -> SpeechBank:
        from training import real_speech, synthesizers

        if split not in SPLIT_NAMES:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLIT_NAMES}")
        per_command, per_chatter, per_speaker = SIZES[size][split]
        rng = np.random.default_rng([seed, SPLIT_NAMES.index(split)])
        families = {"espeak": synthesizers.Espeak(), "flite": synthesizers.Flite(),
                    "festival": synthesizers.Festival(), "piper": synthesizers.Piper()}
        voices = {"espeak": tuple(f"{a}+{v}" for a in ESPEAK_ACCENTS
                                  for v in ESPEAK_VARIANTS[split]),
                  **FAMILY_VOICES[split]}
        commands: list[Spoken] = []
        chatter: list[Spoken] = []
        skipped: list[str] = []
        for family_name, family_voices in voices.items():
            family = families[family_name]
            jobs: list[tuple[str, str, float, int, int]] = []  # text, voice, speed, command, at
            for command in range(1, len(COMMANDS)):
                for _ in range(per_command):
                    carrier = str(rng.choice(CARRIERS[split]))
                    jobs.append((carrier.format(COMMANDS[command]),
                                 str(rng.choice(family_voices)),
                                 float(rng.uniform(0.85, 1.2)), command,
                                 carrier.index("{}")))
            for _ in range(per_chatter):
                jobs.append((str(rng.choice(CHATTER[split])), str(rng.choice(family_voices)),
                             float(rng.uniform(0.85, 1.2)), 0, -1))
            spoken = _synthesise_all(family, [(text, voice, speed)
                                              for text, voice, speed, _, _ in jobs], skipped)
            for (text, voice, _, command, at), u in zip(jobs, spoken, strict=True):
                if u is None:
                    continue
                samples = _at_rate(u)
                span = word_span(u, text, at) if command else None
                item = Spoken(family_name, voice, text, command, span, u.phonemes, samples)
                (commands if command else chatter).append(item)
        real = []
        for speaker in real_speech.REAL_SPLITS[split]:
            # A syllable that sounds like a command would be a wrong `none` label.
            recordings = [r for r in real_speech.recordings(split) if r.speaker == speaker
                          and not real_speech.is_command_like(r.text)]
            chosen = rng.permutation(len(recordings))[:per_speaker]
            for index in sorted(chosen):
                recording = recordings[int(index)]
                real.append(RealSpeech(speaker, recording.text, real_speech.load(recording)))
        return cls(split, commands, chatter, real, skipped)

    # Storage ----------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        import soundfile

        items = self.commands + self.chatter
        encoded = [_flac(s.samples) for s in items] + [_flac(r.samples) for r in self.real]
        offsets = np.cumsum([0] + [len(e) for e in encoded])
        meta = {
            "split": self.split,
            "spoken": [{"family": s.family, "voice": s.voice, "text": s.text,
                        "command": s.command, "span_s": s.span_s,
                        "phonemes": [[p.name, round(p.start_s, 5)] for p in s.phonemes]}
                       for s in items],
            "real": [{"speaker": r.speaker, "text": r.text} for r in self.real],
            "soundfile": soundfile.__version__,
        }
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, flac=np.frombuffer(b"".join(encoded), np.uint8), offsets=offsets,
                 meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path | str) -> SpeechBank:
        with np.load(path) as data:
            flac, offsets = data["flac"], data["offsets"]
            meta = json.loads(data["meta"].tobytes())
        audio = [_unflac(flac[a:b].tobytes()) for a, b in itertools.pairwise(offsets)]
        spoken = [Spoken(m["family"], m["voice"], m["text"], m["command"],
                         tuple(m["span_s"]) if m["span_s"] else None,
                         tuple(Phoneme(n, t) for n, t in m["phonemes"]), samples)
                  for m, samples in zip(meta["spoken"], audio, strict=False)]
        real = [RealSpeech(m["speaker"], m["text"], samples)
                for m, samples in zip(meta["real"], audio[len(spoken):], strict=True)]
        return cls(meta["split"], [s for s in spoken if s.command],
                   [s for s in spoken if not s.command], real)


def _synthesise_all(family: object, items: list[tuple[str, str, float]],
                    skipped: list[str]) -> list[Utterance | None]:
    """Every item, in order; one that fails (forced alignment finds no path, say) is None
    and its reason is added to `skipped`."""
    from fusion_node.errors import FusionError

    try:
        return list(family.synthesise_many(items))  # type: ignore[attr-defined]
    except FusionError:
        pass
    out: list[Utterance | None] = []
    for text, voice, speed in items:
        try:
            out.append(family.synthesise(text, voice, speed))  # type: ignore[attr-defined]
        except FusionError as error:
            skipped.append(f"{type(family).__name__} {voice} {text!r}: {error}")
            out.append(None)
    return out


def _flac(samples: np.ndarray) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype(np.int16)
    soundfile.write(buffer, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def _unflac(data: bytes) -> np.ndarray:
    import soundfile

    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    if rate != SAMPLE_RATE:
        raise ValueError(f"speech bank audio at {rate} Hz, expected {SAMPLE_RATE}")
    return samples


def _at_rate(u: Utterance) -> np.ndarray:
    """Peak-normalised float32 audio at 16 kHz."""
    if u.sample_rate != SAMPLE_RATE:
        raise ValueError(f"synthesizer gave {u.sample_rate} Hz, expected {SAMPLE_RATE}")
    return (u.samples / (np.abs(u.samples).max() + 1e-9) * 0.9).astype(np.float32)


def word_span(u: Utterance, text: str, char_offset: int) -> tuple[float, float]:
    """Start and end (s) of the word at `char_offset` in `text`, from the word timings (1-based
    character positions) and the audio, trimmed to where the word is voiced."""
    from training.speech_corpus import voiced_samples

    position = char_offset + 1
    events = sorted(u.words)
    starts = [t for p, t in events if p <= position]
    if not starts:
        raise ValueError(f"no word timing at {position} in {text!r}: {events}")
    start = starts[-1]
    later = [t for p, t in events if p > position]
    end = later[0] if later else len(u.samples) / u.sample_rate
    voiced = voiced_samples(u.samples)
    a, b = round(start * u.sample_rate), round(end * u.sample_rate)
    active = np.flatnonzero(voiced[a:b])
    if len(active):
        return ((a + active[0]) / u.sample_rate, (a + active[-1] + 1) / u.sample_rate)
    return (start, end)


def bank_path(directory: Path, split: str, size: str) -> Path:
    # The counts are in the name: a bank built with other SIZES is never loaded as this one.
    counts = "-".join(map(str, SIZES[size][split]))
    return directory / f"{split}-{size}-{counts}.npz"


def load_or_build(directory: Path, split: str, size: str = "full") -> SpeechBank:
    """The bank of `split` from `directory`, built there first if it is missing."""
    path = bank_path(directory, split, size)
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        SpeechBank.build(split, size).save(path)
    return SpeechBank.load(path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.speech_bank",
                                     description="synthesise one split's speech bank")
    parser.add_argument("--split", choices=SPLIT_NAMES, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the .npz file to write")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--force", action="store_true", help="overwrite --out")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.force:
        parser.error(f"{args.out} exists; pass --force to overwrite it")
    bank = SpeechBank.build(args.split, args.size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    bank.save(args.out)
    seconds = sum(len(s.samples) for s in bank.commands + bank.chatter) / SAMPLE_RATE
    for reason in bank.skipped:
        print(f"skipped {reason}")
    print(f"{args.out}: {len(bank.commands)} command utterances, {len(bank.chatter)} chatter, "
          f"{len(bank.real)} real recordings ({len(bank.skipped)} utterances skipped); "
          f"{seconds:.0f} s synthesised; families "
          f"{', '.join(bank.families)}; {args.out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
