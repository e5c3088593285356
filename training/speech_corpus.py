"""The synthetic audio-visual speech corpus: clips generated on the fly from a seed.

A clip is `CLIP_S` seconds of 16 kHz audio and the mouth region seen at 25 fps, with per-frame
voice-activity and active-speaker labels and the visible person's command word. Speech comes
from espeak-ng with phoneme timings; the phonemes drive the drawn mouth (`drivers.sim.mouth`), so
lips and voice are synchronous by construction, apart from a small random lip lead, as in
real speech. Modes:

- `target`: the visible person says the command;
- `distractor`: an off-screen voice says a command while the visible mouth stays still;
- `overlap`: the visible person says A while an off-screen voice says B;
- `silence`: nobody speaks.

Noise (white, pink, babble of other espeak voices) is mixed at a target SNR. The `train` and
`validation` splits use disjoint voices, carrier phrases, babble sentences, and appearance
palettes, so validation measures generalisation to unseen people and phrasing.

Windows cut from a clip match what the node gives the speech model (`fusion_node.bindings`):
10,480 samples ending at t_ref (64 log-mel frames) and 16 mouth crops at t_ref − 600 ms ..
t_ref, 40 ms apart, each from the newest camera frame at or before its slot.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from drivers.sim.espeak import Espeak, Utterance
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

SAMPLE_RATE = 16_000
FPS = 25
CLIP_S = 2.4
WINDOW_SAMPLES = 10_480  # LogMel().samples_for(64)
WINDOW_FRAMES = 16
FRAME_S = 1 / FPS
MODES = ("target", "distractor", "overlap", "silence")
NOISES = ("white", "pink", "babble")
IGNORE = -100
"""Command label of a window that holds only part of the command word: not trained on."""

ACCENTS = ("en", "en-us", "en-029", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd", "en-us-nyc")
# Human-sounding espeak-ng variants; validation voices are never heard in training.
TRAIN_VARIANTS = ("m1", "m2", "m4", "m5", "m7", "f1", "f3", "f5", "klatt", "klatt3",
                  "adam", "benjamin", "caleb", "david", "ed", "edward", "john", "linda",
                  "max", "michael", "paul", "pedro", "quincy", "robert", "steph", "travis",
                  "victor", "zac", "annie", "aunty", "belinda", "grandma", "norbert", "iven")
VALIDATION_VARIANTS = ("m3", "m6", "f2", "f4", "klatt2", "andy", "boris", "gustave",
                       "shelby", "steph2", "grandpa", "alicia")
TRAIN_CARRIERS = ("{}", "robot {}", "{} now", "please {}", "{} please", "okay {}",
                  "{} robot", "now {}")
VALIDATION_CARRIERS = ("{}", "hey {}", "{} then", "and {}", "so {}")
TRAIN_BABBLE = (
    "the weather is nice today", "we should meet after lunch", "this is a long sentence",
    "it was a quiet morning", "have you seen the new building", "the train was late again",
    "she bought some bread and cheese", "they talked about the game", "my brother lives there",
    "the coffee is too hot", "we walked along the river", "he forgot his keys at home",
)
VALIDATION_BABBLE = (
    "the meeting starts at nine", "our garden needs more water", "a cat sat by the window",
    "the bus stops near the school", "we painted the kitchen white",
    "she reads a book every week",
)
TRAIN_SKINS = (0, 1, 2, 3, 4, 5, 6)
VALIDATION_SKINS = (7, 8, 9)
TRAIN_LIPS = (0, 1, 2, 3, 4, 5, 6)
VALIDATION_LIPS = (7, 8, 9)


@dataclass(frozen=True)
class Split:
    variants: tuple[str, ...]
    carriers: tuple[str, ...]
    babble: tuple[str, ...]
    skins: tuple[int, ...]
    lips: tuple[int, ...]


SPLITS = {
    "train": Split(TRAIN_VARIANTS, TRAIN_CARRIERS, TRAIN_BABBLE, TRAIN_SKINS, TRAIN_LIPS),
    "validation": Split(VALIDATION_VARIANTS, VALIDATION_CARRIERS, VALIDATION_BABBLE,
                        VALIDATION_SKINS, VALIDATION_LIPS),
}
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

    def frame_at(self, t_s: float) -> np.ndarray:
        """The mouth region (RGB uint8) the camera sees at clip time `t_s`."""
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
        return render_mouth(self.appearance, float(opening + jaw), float(width),
                            float(dx + self.head[6]), float(dy + self.head[7]), float(angle))


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

    def __init__(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
        self.split = split
        self.spec = SPLITS[split]
        self._espeak = Espeak()
        self.logmel = LogMel(sample_rate=SAMPLE_RATE)
        self._babble = self._babble_bank(np.random.default_rng(0 if split == "train" else 1))

    # Speech -----------------------------------------------------------------------------

    def voice(self, rng: np.random.Generator) -> str:
        return f"{rng.choice(ACCENTS)}+{rng.choice(self.spec.variants)}"

    def speak(self, text: str, voice: str, rng: np.random.Generator) -> Utterance:
        """`text` at 16 kHz with a random speaking rate and pitch."""
        rate = int(rng.integers(140, 200))
        pitch = int(rng.integers(30, 71))
        pitch_range = int(rng.integers(30, 71))
        return _speak_cached(self._espeak, text, voice, rate, pitch, pitch_range)

    def _babble_bank(self, rng: np.random.Generator, seconds: float = 60.0) -> np.ndarray:
        """Several off-screen talkers at once, `seconds` long, at unit RMS."""
        n = int(seconds * SAMPLE_RATE)
        bank = np.zeros(n, np.float32)
        for _ in range(4):  # four talkers over the whole bank
            position = 0
            while position < n:
                text = str(rng.choice(self.spec.babble))
                u = self.speak(text, self.voice(rng), rng)
                samples = u.samples / (np.sqrt(np.mean(u.samples**2)) + 1e-9)
                end = min(n, position + len(samples))
                bank[position:end] += samples[: end - position]
                position = end + int(rng.integers(0, SAMPLE_RATE // 4))
        return bank / np.sqrt(np.mean(bank**2))

    def noise(self, kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
        """Unit-RMS noise of `kind`."""
        if kind == "white":
            noise = rng.standard_normal(n)
        elif kind == "pink":
            spectrum = np.fft.rfft(rng.standard_normal(n))
            freqs = np.fft.rfftfreq(n)
            spectrum[1:] /= np.sqrt(freqs[1:])
            spectrum[0] = 0
            noise = np.fft.irfft(spectrum, n)
        elif kind == "babble":
            start = int(rng.integers(0, len(self._babble) - n))
            noise = self._babble[start:start + n].astype(np.float64)
        else:
            raise ValueError(f"unknown noise {kind!r}; expected one of {NOISES}")
        return (noise / (np.sqrt(np.mean(noise**2)) + 1e-12)).astype(np.float32)

    # Clips ------------------------------------------------------------------------------

    def clip(self, seed: int, mode: str | None = None, snr_db: float | None = None,
             noise: str | None = None, clean: bool | None = None,
             command: int | None = None) -> Clip:
        """A clip from `seed`; unspecified factors are drawn from it."""
        rng = np.random.default_rng([seed, 0 if self.split == "train" else 1])
        mode = mode or str(rng.choice(MODES, p=[0.5, 0.15, 0.2, 0.15]))
        if clean is None:
            clean = snr_db is None and rng.random() < 0.15
        if not clean and snr_db is None:
            snr_db = float(rng.uniform(-12, 20))
        if not clean and noise is None:
            noise = str(rng.choice(NOISES, p=[0.2, 0.3, 0.5]))
        n = int(CLIP_S * SAMPLE_RATE)
        visible = np.zeros(n, np.float32)
        other = np.zeros(n, np.float32)
        appearance = random_appearance(rng, self.spec.skins, self.spec.lips)
        head = np.array([rng.uniform(0, 4), rng.uniform(0.1, 0.6), rng.uniform(0, 2 * np.pi),
                         rng.uniform(0, 6), rng.uniform(0, 0.08), rng.uniform(0.2, 1.0),
                         rng.uniform(-6, 6), rng.uniform(-4, 4)])
        visible_command, visible_span, mouth = 0, None, None
        other_command, other_span = 0, None
        if mode in ("target", "overlap"):
            visible_command = (command if command is not None
                               else 1 + int(rng.integers(len(SPOKEN_COMMANDS))))
            u, word, start = self._place(visible_command, rng, n)
            visible[start:start + len(u.samples)] = u.samples[: n - start]
            visible_span = (start / SAMPLE_RATE + word[0], start / SAMPLE_RATE + word[1])
            lead_s = float(rng.uniform(0.0, 0.04))
            mouth = (u.phonemes, start / SAMPLE_RATE,
                     start / SAMPLE_RATE + len(u.samples) / SAMPLE_RATE, lead_s)
        if mode in ("distractor", "overlap"):
            other_command = (command if command is not None and mode == "distractor"
                             else 1 + int(rng.integers(len(SPOKEN_COMMANDS))))
            while mode == "overlap" and other_command == visible_command:
                other_command = 1 + int(rng.integers(len(SPOKEN_COMMANDS)))
            u, word, start = self._place(other_command, rng, n)
            level = 10 ** (rng.uniform(-6, 3) / 20) if mode == "overlap" else 1.0
            other[start:start + len(u.samples)] = level * u.samples[: n - start]
            other_span = (start / SAMPLE_RATE + word[0], start / SAMPLE_RATE + word[1])
        speech = visible + other
        voiced = _voiced(speech)
        visible_voiced = _voiced(visible, reference=speech)
        gain = 10 ** (rng.uniform(-20, 0) / 20)
        if speech.any():
            speech_rms = np.sqrt(np.mean(speech[voiced > 0] ** 2))
        else:
            speech_rms = 0.05
        mix = speech.copy()
        if not clean:
            mix += self.noise(noise, n, rng) * speech_rms * 10 ** (-snr_db / 20)
        mix = mix / (np.abs(mix).max() + 1e-9) * 0.5 * gain
        # The microphone's own noise floor.
        mix += rng.standard_normal(n).astype(np.float32) * float(rng.uniform(1e-5, 3e-4))
        return Clip(mix.astype(np.float32), mode, None if clean else snr_db,
                    None if clean else noise, visible_command, visible_span, other_command,
                    other_span, voiced, visible_voiced, appearance, mouth, head)

    def _place(self, command: int, rng: np.random.Generator,
               n: int) -> tuple[Utterance, tuple[float, float], int]:
        """Speak a carrier phrase with `command`; return it, the command word's span within
        it and a start sample that keeps it inside the clip."""
        carrier = str(rng.choice(self.spec.carriers))
        text = carrier.format(COMMANDS[command])
        u = self.speak(text, self.voice(rng), rng)
        span = _word_span(u, text, carrier.index("{}"))
        latest = max(0, n - len(u.samples))
        start = int(rng.integers(0, latest + 1))
        return u, span, start

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
        video = np.stack([mouth_crop(clip.frame_at(float(t - j)), "rgb8",
                                     (0, 0, ROI_WIDTH, ROI_HEIGHT))
                          for t, j in zip(slots, jitter, strict=True)])
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


def _word_span(u: Utterance, text: str, char_offset: int) -> tuple[float, float]:
    """Start and end (s) of the word at `char_offset` in `text`, from espeak's word events
    (1-based character positions) and the audio."""
    position = char_offset + 1
    events = sorted(u.words)
    starts = [t for p, t in events if p <= position]
    if not starts:
        raise ValueError(f"espeak reported no word at {position} in {text!r}: {events}")
    start = starts[-1]
    later = [t for p, t in events if p > position]
    end = later[0] if later else len(u.samples) / u.sample_rate
    # Trim the pause that ends a word: the span is where the word is voiced.
    voiced = _voiced(u.samples)
    a, b = round(start * u.sample_rate), round(end * u.sample_rate)
    active = np.flatnonzero(voiced[a:b])
    if len(active):
        return ((a + active[0]) / u.sample_rate, (a + active[-1] + 1) / u.sample_rate)
    return (start, end)


def _voiced(samples: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
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


@functools.lru_cache(maxsize=4096)
def _speak_cached(espeak: Espeak, text: str, voice: str, rate: int, pitch: int,
                  pitch_range: int) -> Utterance:
    u = espeak.synthesise(text, voice, rate, pitch, pitch_range)
    samples = _resample(u.samples, u.sample_rate, SAMPLE_RATE)
    return Utterance(samples, SAMPLE_RATE, u.phonemes, u.words)


def _resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling by truncating the spectrum."""
    n_out = round(len(samples) * rate_out / rate_in)
    spectrum = np.fft.rfft(samples)[: n_out // 2 + 1]
    return (np.fft.irfft(spectrum, n_out) * (n_out / len(samples))).astype(np.float32)


# The simulated speaker of the embedded default (drivers/sim/simulated.py): one utterance per
# slot, validation voices (never trained on), some said off-screen while the visible mouth
# stays still. (command, visible) in order.
SIM_SCRIPT: tuple[tuple[str, bool], ...] = (
    ("red", True), ("left", True), ("green", True), ("blue", False), ("yellow", True),
    ("home", True), ("go", True), ("blue", True), ("stop", True), ("up", True),
    ("red", False), ("home", True),
)


def write_sim_script(path: str, seed: int = 0) -> None:
    """Speak SIM_SCRIPT with validation voices and store it for the simulated drivers:
    int16 audio at 16 kHz, phoneme names and starts, the command word's span."""
    generator = Generator("validation")
    rng = np.random.default_rng(seed)
    audio, offsets, commands, visible, spans, phonemes, phoneme_starts, voices = (
        [], [0], [], [], [], [], [], [])
    for word, is_visible in SIM_SCRIPT:
        voice = generator.voice(rng)
        u = generator.speak(word, voice, rng)
        samples = np.clip(np.round(u.samples / (np.abs(u.samples).max() + 1e-9) * 16000),
                          -32768, 32767).astype(np.int16)
        audio.append(samples)
        offsets.append(offsets[-1] + len(samples))
        commands.append(COMMANDS.index(word))
        visible.append(is_visible)
        spans.append(_word_span(u, word, 0))
        phonemes.append(" ".join(p.name for p in u.phonemes))
        phoneme_starts.append(np.array([p.start_s for p in u.phonemes]))
        voices.append(voice)
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
