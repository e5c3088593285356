"""The audio-visual speech corpus: clips generated on the fly from a seed and a speech bank.

A clip is `CLIP_S` seconds of 16 kHz audio and the mouth region seen at 25 fps, with per-frame
voice-activity and active-speaker labels and the visible person's command word. Speech comes
from the split's speech bank (`training.speech_bank`: espeak-ng, flite, festival and Piper
voices, and klettres-data's real people); the phonemes drive the drawn mouth
(`drivers.sim.mouth`), so lips and voice are synchronous by construction, apart from a small
random lip lead, as in real speech. Modes:

- `target`: the visible person says the command;
- `distractor`: an off-screen voice says a command while the visible mouth stays still;
- `overlap`: the visible person says A while an off-screen voice says B;
- `chatter`: the visible person says a sentence that holds no command (`none`);
- `real`: real people off-screen say letters and syllables (voice activity, `none`);
- `silence`: nobody speaks.

With `realism` (the default), each talker is perturbed in speed, pitch and vocal-tract length,
each voice is heard in a simulated room, the mix goes through a random microphone
(`training.augment`), and noise (white, pink, babble, motors, fans, mains hum, servo whine:
`training.noises`) is mixed at a target SNR. The splits are disjoint in voices, carriers,
sentences, real speakers and appearance palettes (`training.speech_bank`).

Windows cut from a clip match what the node gives the speech model (`fusion_node.bindings`):
10,480 samples ending at t_ref (64 log-mel frames) and 16 mouth crops at t_ref - 600 ms ..
t_ref, 40 ms apart, each from the newest camera frame at or before its slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from drivers.sim.espeak import Phoneme
from drivers.sim.mouth import (
    ROI_HEIGHT,
    ROI_WIDTH,
    Appearance,
    mouth_track,
    random_appearance,
    render_mouth,
)
from engines.preprocess import LogMel, mouth_crop
from engines.vocabulary import COMMANDS
from training import augment, noises
from training.speech_bank import SpeechBank, Spoken, load_or_build

SAMPLE_RATE = 16_000
FPS = 25
CLIP_S = 2.4
WINDOW_SAMPLES = 10_480  # LogMel().samples_for(64)
WINDOW_FRAMES = 16
FRAME_S = 1 / FPS
MODES = ("target", "distractor", "overlap", "chatter", "real", "silence")
MODE_WEIGHTS = (0.4, 0.12, 0.15, 0.12, 0.11, 0.1)
NOISES = noises.NOISES
NOISE_WEIGHTS = (0.12, 0.14, 0.12, 0.1, 0.08, 0.08, 0.36)  # babble last: the hardest
IGNORE = -100
"""Command label of a window that holds only part of the command word: not trained on."""
BANK_DIR = Path(__file__).parent / ".bank"
"""Where `Generator` keeps the speech banks it builds (ignored by git)."""


@dataclass(frozen=True)
class Split:
    skins: tuple[int, ...]  # drawn mouths' palettes
    lips: tuple[int, ...]
    photos: tuple[str, ...]  # real photographs (`training.real_faces`)


# Two real faces ship with installed packages: one teaches training what a real mouth looks
# like through the node's tracker crop, the other is kept for the test.
SPLITS = {
    "train": Split((0, 1, 2, 3, 4, 5), (0, 1, 2, 3, 4, 5), ("astronaut",)),
    "validation": Split((6, 7), (6, 7), ()),
    "test": Split((8, 9), (8, 9), ("grace_hopper",)),
}
PHOTO_SHARE = 0.1
"""Share of training clips whose mouth is a real photograph's rather than a drawn one."""
SPOKEN_COMMANDS = COMMANDS[1:]


@dataclass
class Clip:
    """One generated clip; times are seconds from the clip's start."""

    audio: np.ndarray  # float32 [CLIP_S * SAMPLE_RATE], noisy mix
    mode: str
    snr_db: float | None  # None: clean
    noise: str | None
    command: int  # index into COMMANDS said by the visible person (0: none)
    command_span: tuple[float, float] | None  # the visible command word's start and end
    other_command: int  # the off-screen voice's command (0: none)
    other_span: tuple[float, float] | None
    voiced: np.ndarray = field(repr=False)  # float32 per audio sample: any clean speech
    visible_voiced: np.ndarray = field(repr=False)  # per sample: the visible person's speech
    appearance: Appearance = field(repr=False)
    mouth: tuple = field(repr=False)  # (phonemes, start_s, end_s, lead_s) or None
    head: np.ndarray = field(repr=False)  # head motion parameters
    family: str | None = None  # the visible (or off-screen) talker's synthesizer family
    voice: str | None = None

    photo: str | None = None  # a real photograph's mouth instead of the drawn one
    crop_jitter: np.ndarray = field(default_factory=lambda: np.zeros(3), repr=False)

    def _pose(self, t_s: float) -> tuple[float, float, float, float, float]:
        """(opening, width, dx, dy, angle) of the mouth at clip time `t_s`."""
        opening, width = REST_SHAPE
        if self.mouth is not None:
            phonemes, start_s, end_s, lead_s = self.mouth
            shape = mouth_track(phonemes, end_s - start_s, np.array([t_s - start_s + lead_s]))
            opening, width = shape[0]
        # Idle motion: a slow sway and small jaw movement, present in every mode, so a mouth
        # that merely moves is not a mouth that talks.
        a, f, phase = self.head[:3]
        dx = a * np.sin(2 * np.pi * f * t_s + phase)
        dy = 0.5 * a * np.cos(2 * np.pi * 0.7 * f * t_s + phase)
        angle = self.head[3] * np.sin(2 * np.pi * 0.5 * f * t_s)
        jaw = self.head[4] * (0.5 + 0.5 * np.sin(2 * np.pi * self.head[5] * t_s + phase))
        return (float(opening + jaw), float(width), float(dx + self.head[6]),
                float(dy + self.head[7]), float(angle))

    def frame_at(self, t_s: float) -> np.ndarray:
        """What the camera sees at clip time `t_s` (RGB uint8): the drawn mouth region, or the
        whole real photograph."""
        opening, width, dx, dy, angle = self._pose(t_s)
        if self.photo is not None:
            return _talking_photo(self.photo).frame(opening, width, dx, dy, angle)
        return render_mouth(self.appearance, opening, width, dx, dy, angle)

    def crop_at(self, t_s: float) -> np.ndarray:
        """The model's mouth crop at `t_s`: the drawn region whole (as the simulated camera's
        fixed mouth region gives it), or, on a photograph, the square the node's mouth
        tracker would take (`engines.face.MouthTracker`: centred on the lips, 1.8 mouth widths
        a side), placed with the clip's small tracking error."""
        if self.photo is None:
            return mouth_crop(self.frame_at(t_s), "rgb8", (0, 0, ROI_WIDTH, ROI_HEIGHT))
        opening, width, dx, dy, angle = self._pose(t_s)
        photo = _talking_photo(self.photo)
        image = photo.frame(opening, width, dx, dy, angle)
        upper, lower, right, left = photo.landmarks.mouth()
        centre = (np.asarray(upper) + lower + right + left)[:2] / 4
        rotation = cv2.getRotationMatrix2D((float(photo.centre[0]), float(photo.centre[1])),
                                           -angle, 1.0)
        centre = rotation[:, :2] @ centre + rotation[:, 2] + (dx, dy)
        side = photo.mouth_width * _photo_width_scale(width) * 1.8
        side *= 1 + self.crop_jitter[2]
        x = centre[0] - side / 2 + self.crop_jitter[0] * side
        y = centre[1] - side / 2 + self.crop_jitter[1] * side
        return mouth_crop(image, "rgb8", (float(x), float(y), float(side), float(side)))


def _said_by(spoken: Spoken, family: str | None, voice: str | None) -> bool:
    """Whether `spoken` is by `family` and `voice` (None: any; an espeak-ng voice matches by
    its variant alone, "m3" for "en-us+m3")."""
    return ((family is None or spoken.family == family)
            and (voice is None or voice in (spoken.voice, spoken.voice.split("+")[-1])))


def _talking_photo(name: str) -> object:
    from training.real_faces import talking_photo  # the face models load on first use

    return talking_photo(name)


def _photo_width_scale(width: float) -> float:
    from training.real_faces import width_scale

    return width_scale(width)


REST_SHAPE = (0.02, 0.55)


@dataclass
class Window:
    """Model inputs and labels for one window ending at clip time `t_end_s`."""

    audio: np.ndarray  # float32 [WINDOW_SAMPLES]
    video: np.ndarray  # float32 [WINDOW_FRAMES, 48, 48] mouth crops in [0, 1]
    vad: np.ndarray  # float32 [WINDOW_FRAMES]
    speaker: np.ndarray  # float32 [WINDOW_FRAMES]
    command: int  # COMMANDS index, or IGNORE
    slots_s: np.ndarray  # clip time of each video slot (the end of its audio token)


class Generator:
    """Clips and windows of one split, deterministic from the seed of each call."""

    def __init__(self, split: str, bank: SpeechBank | None = None, realism: bool = True,
                 bank_size: str = "full") -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
        self.split = split
        self.spec = SPLITS[split]
        self.bank = bank if bank is not None else load_or_build(BANK_DIR, split, bank_size)
        if self.bank.split != split:
            raise ValueError(f"a {self.bank.split} bank given to the {split} generator")
        self.realism = realism
        self.logmel = LogMel(sample_rate=SAMPLE_RATE)
        split_seed = list(SPLITS).index(split)
        self._babble = self._babble_bank(np.random.default_rng([split_seed, 1]))
        self._rooms = augment.room_impulse_responses(
            96, np.random.default_rng([split_seed, 2])) if realism else None

    def _babble_bank(self, rng: np.random.Generator, seconds: float = 60.0) -> np.ndarray:
        """Four talkers at once, `seconds` long, at unit RMS: the split's chatter voices and
        its real speakers."""
        sources = [s.samples for s in self.bank.chatter] + [r.samples for r in self.bank.real]
        if not sources:
            raise ValueError(f"the {self.split} speech bank holds no chatter or real speech")
        n = int(seconds * SAMPLE_RATE)
        bank = np.zeros(n, np.float32)
        for _ in range(4):
            position = 0
            while position < n:
                samples = sources[int(rng.integers(len(sources)))]
                samples = samples / (np.sqrt(np.mean(samples**2)) + 1e-9)
                end = min(n, position + len(samples))
                bank[position:end] += samples[: end - position]
                position = end + int(rng.integers(0, SAMPLE_RATE // 4))
        return bank / np.sqrt(np.mean(bank**2))

    def noise(self, kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
        """Unit-RMS noise of `kind` (`training.noises.NOISES`)."""
        return noises.noise(kind, n, rng, self._babble)

    # Clips ------------------------------------------------------------------------------

    def clip(self, seed: int, mode: str | None = None, snr_db: float | None = None,
             noise: str | None = None, clean: bool | None = None,
             command: int | None = None, family: str | None = None,
             voice: str | None = None) -> Clip:
        """A clip from `seed`; unspecified factors are drawn from it. `family` and `voice`
        choose the talker of the command (or chatter)."""
        rng = np.random.default_rng([seed, list(SPLITS).index(self.split)])
        mode = mode or str(rng.choice(MODES, p=MODE_WEIGHTS))
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if clean is None:
            clean = snr_db is None and rng.random() < 0.15
        if not clean and snr_db is None:
            snr_db = float(rng.uniform(-12, 20))
        if not clean and noise is None:
            noise = str(rng.choice(NOISES, p=NOISE_WEIGHTS))
        n = int(CLIP_S * SAMPLE_RATE)
        visible = np.zeros(n, np.float32)
        other = np.zeros(n, np.float32)
        appearance = random_appearance(rng, self.spec.skins, self.spec.lips)
        photo = None
        if self.spec.photos and self.split == "train" and rng.random() < PHOTO_SHARE:
            photo = str(rng.choice(self.spec.photos))
        crop_jitter = rng.normal(0, [0.03, 0.03, 0.05])
        head = np.array([rng.uniform(0, 4), rng.uniform(0.1, 0.6), rng.uniform(0, 2 * np.pi),
                         rng.uniform(0, 6), rng.uniform(0, 0.08), rng.uniform(0.2, 1.0),
                         rng.uniform(-6, 6), rng.uniform(-4, 4)])
        visible_command, visible_span, mouth = 0, None, None
        other_command, other_span = 0, None
        talker: Spoken | None = None
        if mode in ("target", "overlap", "chatter"):
            if mode == "chatter":
                visible_command = 0
            else:
                available = self._commands_said_by(family, voice)
                visible_command = (command if command is not None
                                   else available[int(rng.integers(len(available)))])
            talker = self._pick(visible_command, rng, family, voice)
            samples, phonemes, span, start = self._place(talker, rng, n)
            visible[start:start + len(samples)] = samples[: n - start]
            if span is not None:
                visible_span = (start / SAMPLE_RATE + span[0], start / SAMPLE_RATE + span[1])
            lead_s = float(rng.uniform(0.0, 0.04))
            mouth = (phonemes, start / SAMPLE_RATE,
                     start / SAMPLE_RATE + len(samples) / SAMPLE_RATE, lead_s)
        if mode in ("distractor", "overlap"):
            other_command = (command if command is not None and mode == "distractor"
                             else 1 + int(rng.integers(len(SPOKEN_COMMANDS))))
            while mode == "overlap" and other_command == visible_command:
                other_command = 1 + int(rng.integers(len(SPOKEN_COMMANDS)))
            spoken = self._pick(other_command, rng, family if mode == "distractor" else None,
                                voice if mode == "distractor" else None)
            talker = talker or spoken
            samples, _, span, start = self._place(spoken, rng, n)
            level = 10 ** (rng.uniform(-6, 3) / 20) if mode == "overlap" else 1.0
            other[start:start + len(samples)] = level * samples[: n - start]
            other_span = (start / SAMPLE_RATE + span[0], start / SAMPLE_RATE + span[1])
        if mode == "real":
            self._add_real_speech(other, rng)
        speech = visible + other
        voiced = voiced_samples(speech)
        visible_voiced = voiced_samples(visible, reference=speech)
        if self.realism and not clean:
            # Each voice in the room; labels stay those of the dry speech.
            for source in (visible, other):
                if source.any() and rng.random() < 0.6:
                    room = self._rooms[int(rng.integers(len(self._rooms)))]
                    source[:] = augment.reverberate(source, room)
            speech = visible + other
        if speech.any():
            speech_rms = np.sqrt(np.mean(speech[voiced > 0] ** 2))
        else:
            speech_rms = 0.05
        mix = speech.copy()
        if not clean:
            mix += self.noise(noise, n, rng) * speech_rms * 10 ** (-snr_db / 20)
        if self.realism and not clean:
            mix = augment.microphone(mix, rng)
        gain = 10 ** (rng.uniform(-20, 0) / 20)
        mix = mix / (np.abs(mix).max() + 1e-9) * 0.5 * gain
        # The microphone's own noise floor.
        mix += rng.standard_normal(n).astype(np.float32) * float(rng.uniform(1e-5, 3e-4))
        return Clip(mix.astype(np.float32), mode, None if clean else snr_db,
                    None if clean else noise, visible_command, visible_span, other_command,
                    other_span, voiced, visible_voiced, appearance, mouth, head,
                    talker.family if talker else None, talker.voice if talker else None,
                    photo, crop_jitter)

    def _pick(self, command: int, rng: np.random.Generator, family: str | None,
              voice: str | None) -> Spoken:
        """An utterance of `command` (0: chatter) from the bank, from `family` / `voice` when
        given."""
        pool = self.bank.commands if command else self.bank.chatter
        choices = [s for s in pool if (not command or s.command == command)
                   and _said_by(s, family, voice)]
        if not choices:
            raise ValueError(f"the {self.split} speech bank has no utterance of "
                             f"{COMMANDS[command]!r} by family={family} voice={voice}")
        return choices[int(rng.integers(len(choices)))]

    def _commands_said_by(self, family: str | None, voice: str | None) -> list[int]:
        commands = sorted({s.command for s in self.bank.commands if _said_by(s, family, voice)})
        if not commands:
            raise ValueError(f"the {self.split} speech bank has no command by family={family} "
                             f"voice={voice}")
        return commands

    def _place(self, spoken: Spoken, rng: np.random.Generator, n: int
               ) -> tuple[np.ndarray, tuple[Phoneme, ...], tuple[float, float] | None, int]:
        """The utterance as this talker says it (perturbed with `realism`), its phonemes and
        command span in its own time, and a start sample that keeps it inside the clip."""
        samples, factor = spoken.samples, 1.0
        if self.realism:
            samples, factor = augment.perturb_talker(
                samples, rng, "wide" if self.split == "train" else "narrow")
        phonemes = tuple(Phoneme(p.name, p.start_s / factor) for p in spoken.phonemes)
        span = (None if spoken.span_s is None
                else (spoken.span_s[0] / factor, spoken.span_s[1] / factor))
        latest = max(0, n - len(samples))
        return samples, phonemes, span, int(rng.integers(0, latest + 1))

    def _add_real_speech(self, out: np.ndarray, rng: np.random.Generator) -> None:
        """One to three real recordings, off-screen, at random places and levels."""
        if not self.bank.real:
            raise ValueError(f"the {self.split} speech bank holds no real speech")
        for _ in range(int(rng.integers(1, 4))):
            recording = self.bank.real[int(rng.integers(len(self.bank.real)))].samples
            recording = recording[: len(out)] / (np.abs(recording).max() + 1e-9) * 0.9
            start = int(rng.integers(0, len(out) - len(recording) + 1))
            out[start:start + len(recording)] += recording * 10 ** (rng.uniform(-6, 0) / 20)

    # Windows ----------------------------------------------------------------------------

    def window(self, clip: Clip, t_end_s: float, frame_jitter_s: Sequence[float] | None = None
               ) -> Window:
        """Inputs and labels for the window ending at `t_end_s`.

        `frame_jitter_s[k]`: how long before slot k the camera frame used for it was taken
        (the node takes the newest frame at or before each slot; 0 for a 25 fps camera in
        phase with the grid).
        """
        end = round(t_end_s * SAMPLE_RATE)
        start = end - WINDOW_SAMPLES
        if start < 0 or end > len(clip.audio):
            raise ValueError(f"window ending at {t_end_s} s does not fit the clip")
        slots = t_end_s - FRAME_S * np.arange(WINDOW_FRAMES - 1, -1, -1)
        jitter = np.zeros(WINDOW_FRAMES) if frame_jitter_s is None else np.asarray(
            frame_jitter_s)
        video = np.stack([clip.crop_at(float(t - j)) for t, j in zip(slots, jitter,
                                                                           strict=True)])
        # Label k: speech during the 40 ms audio token that ends at slot k.
        token_ends = np.round(slots * SAMPLE_RATE).astype(int)
        token_starts = token_ends - int(FRAME_S * SAMPLE_RATE)
        vad = np.array([clip.voiced[a:b].mean() > 0.25 for a, b in
                        zip(token_starts, token_ends, strict=True)], np.float32)
        speaker = np.array([clip.visible_voiced[a:b].mean() > 0.25 for a, b in
                            zip(token_starts, token_ends, strict=True)], np.float32)
        return Window(clip.audio[start:end], video, vad, speaker,
                      _window_command(clip, start / SAMPLE_RATE, end / SAMPLE_RATE), slots)

    def training_windows(self, seed: int, per_clip: int = 3, **clip_factors: object
                         ) -> list[Window]:
        """`per_clip` windows of the clip from `seed`: two holding the command word when there
        is one, the others anywhere; camera frame jitter as from a 25-30 fps camera."""
        clip = self.clip(seed, **clip_factors)  # type: ignore[arg-type]
        rng = np.random.default_rng([seed, 7])
        earliest = WINDOW_SAMPLES / SAMPLE_RATE
        latest = CLIP_S
        windows = []
        for k in range(per_clip):
            span = clip.command_span or clip.other_span
            if k < 2 and span is not None:
                lo = max(earliest, span[1])
                hi = min(latest, span[0] + earliest)
                t_end = rng.uniform(lo, hi) if hi > lo else rng.uniform(earliest, latest)
            else:
                t_end = rng.uniform(earliest, latest)
            t_end = round(t_end * SAMPLE_RATE) / SAMPLE_RATE
            jitter = rng.uniform(0, 1 / 30, WINDOW_FRAMES) if rng.random() < 0.7 else None
            windows.append(self.window(clip, t_end, jitter))
        return windows


def _window_command(clip: Clip, start_s: float, end_s: float) -> int:
    """The visible command if its word lies inside [start_s, end_s], none if it is (mostly)
    outside, IGNORE if the window cuts it."""
    if clip.command_span is None:
        return 0
    word_start, word_end = clip.command_span
    inside = max(0.0, min(end_s, word_end) - max(start_s, word_start))
    length = word_end - word_start
    if word_start >= start_s - 0.01 and word_end <= end_s + 0.01:
        return clip.command
    if inside < 0.3 * length:
        return 0
    return IGNORE


def voiced_samples(samples: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Per-sample speech activity: 10 ms frames within 35 dB of the loudest frame of
    `reference` (default: the same signal)."""
    hop = SAMPLE_RATE // 100
    n = len(samples)
    frames = -(-n // hop)
    padded = np.zeros(frames * hop, np.float32)
    padded[:n] = samples
    energy = np.mean(padded.reshape(frames, hop) ** 2, axis=1)
    ref = reference if reference is not None else samples
    ref_padded = np.zeros(frames * hop, np.float32)
    ref_padded[:len(ref)] = ref
    peak = np.max(np.mean(ref_padded.reshape(frames, hop) ** 2, axis=1))
    if peak <= 0:
        return np.zeros(n, np.float32)
    active = (energy > peak * 10 ** (-35 / 10)).astype(np.float32)
    return np.repeat(active, hop)[:n]


# The simulated speaker of the embedded default (drivers/sim/simulated.py): one utterance per
# slot, validation voices (never trained on), some said off-screen while the visible mouth
# stays still. (command, visible) in order.
SIM_SCRIPT: tuple[tuple[str, bool], ...] = (
    ("red", True), ("left", True), ("green", True), ("blue", False), ("yellow", True),
    ("home", True), ("go", True), ("blue", True), ("stop", True), ("up", True),
    ("red", False), ("home", True),
)


def write_sim_script(path: str, seed: int = 0) -> None:
    """Speak SIM_SCRIPT with validation voices (the word alone, from the validation speech
    bank) and store it for the simulated drivers: int16 audio at 16 kHz, phoneme names and
    starts, the command word's span."""
    bank = Generator("validation", realism=False).bank
    rng = np.random.default_rng(seed)
    audio, offsets, commands, visible, spans, phonemes, phoneme_starts, voices = (
        [], [0], [], [], [], [], [], [])
    for word, is_visible in SIM_SCRIPT:
        alone = [s for s in bank.commands if s.text == word]
        if not alone:
            raise ValueError(f"the validation speech bank never says {word!r} alone")
        spoken = alone[int(rng.integers(len(alone)))]
        samples = np.clip(np.round(spoken.samples / (np.abs(spoken.samples).max() + 1e-9)
                                   * 16000), -32768, 32767).astype(np.int16)
        audio.append(samples)
        offsets.append(offsets[-1] + len(samples))
        commands.append(COMMANDS.index(word))
        visible.append(is_visible)
        spans.append(spoken.span_s)
        phonemes.append(" ".join(p.name for p in spoken.phonemes))
        phoneme_starts.append(np.array([p.start_s for p in spoken.phonemes]))
        voices.append(f"{spoken.family}:{spoken.voice}")
    np.savez_compressed(
        path, audio=np.concatenate(audio), offsets=np.array(offsets), sample_rate=SAMPLE_RATE,
        commands=np.array(commands), visible=np.array(visible), spans=np.array(spans),
        phonemes=np.array(phonemes), phoneme_starts=np.array(
            [",".join(f"{t:.4f}" for t in s) for s in phoneme_starts]),
        voices=np.array(voices))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.speech_corpus",
                                     description="write the simulated speaker's script")
    parser.add_argument("--write-sim-script", required=True, metavar="OUT.npz")
    write_sim_script(parser.parse_args().write_sim_script)
