"""Evaluate the speech engine: `fusion-node eval speech --json`.

Everything runs through the node's ONNX Runtime engine and preprocessing. Figures are on the
test split (voices, carriers, sentences, faces and real speakers that neither training nor
checkpoint selection saw; Piper's neural voice is a whole family held out), except the one
`validation` block, which is the split the checkpoint was selected on. The same clips are
scored audio-only, video-only and audio+video, so modalities are compared pairwise.

Reports:
- per synthesizer family: command accuracy clean and in babble at 0 dB, audio-only /
  video-only / audio+video, beside pocketsphinx keyword spotting (a real pretrained peer) on
  the same clips; audio+video accuracy per test voice;
- command accuracy over SNR x noise {pink, babble, motor}, with the paired (McNemar) test of
  audio+video against audio-only;
- `overlap` clips: how often the visible speaker's word wins, and the off-screen one's;
- active speaker: average precision and false activations per hour on `distractor` clips;
- voice activity: frame F1 per SNR beside Silero VAD on the same audio;
- real people (klettres-data's test speakers): voice-activity F1 beside Silero, and false
  commands per hour on their non-command speech as the node would latch them;
- noise alone (white, pink, motor, fan, hum, servo): the share of frames called speech;
- real faces: photographs animated by a viseme track, through the node's landmarker path:
  visible-speaker average precision, a talking face against a still one.
Intervals are 95%: Wilson for accuracies, exact Poisson for rates per hour, a clip-level
bootstrap for F1, AP and frame shares.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.onnxruntime_backend import OnnxRuntimeEngine
from engines.vocabulary import COMMANDS
from fusion_node.progress import progress, progress_seconds
from training.noises import STATIONARY_NOISES
from training.speech_corpus import (
    CLIP_S,
    FRAME_S,
    SAMPLE_RATE,
    WINDOW_FRAMES,
    WINDOW_SAMPLES,
    Clip,
    Generator,
    Window,
)
from training.stats import (
    average_precision,
    bootstrap,
    f1,
    mcnemar_exact,
    poisson_rate,
    proportion,
)

SNRS: tuple[float | None, ...] = (None, 10.0, 5.0, 0.0, -5.0, -10.0)
EVAL_NOISES = ("pink", "babble", "motor")
MODALITIES = ("audio_only", "video_only", "audio_video")
DEFAULT_MODEL = Path(str(importlib.resources.files("engines") / "models" / "speech.onnx"))
SEED_BASE = 900_000


def _snr_name(snr: float | None) -> str:
    return "clean" if snr is None else f"{snr:g}dB"


def _conditions() -> list[tuple[str, str | None, float | None]]:
    """(name, noise, SNR) of the noise conditions: clean once (clean audio has no noise
    type), then every noise at every SNR."""
    return [("clean", None, None) if snr is None else (f"{noise}/{_snr_name(snr)}", noise, snr)
            for noise in EVAL_NOISES for snr in SNRS if snr is not None or noise == EVAL_NOISES[0]]


@dataclass
class SpeechScorer:
    """The speech engine with the node's preprocessing, and modality masking."""

    engine: OnnxRuntimeEngine
    generator: Generator

    def feeds(self, window: Window, modality: str) -> dict[str, np.ndarray]:
        audio_on = modality != "video_only"
        video_on = modality != "audio_only"
        mel = self.generator.logmel(window.audio)
        return {
            "audio_mel": (mel * audio_on)[None].astype(np.float32),
            "audio_valid": np.full((1, mel.shape[0]), float(audio_on), np.float32),
            "video": (window.video * video_on)[None].astype(np.float32),
            "video_valid": np.full((1, WINDOW_FRAMES), float(video_on), np.float32),
        }

    def posterior(self, window: Window, modality: str) -> np.ndarray:
        logits = self.engine.infer(self.feeds(window, modality))["command_logits"][0]
        e = np.exp(logits - logits.max())
        return e / e.sum()

    def run(self, window: Window, modality: str) -> dict[str, np.ndarray]:
        out = self.engine.infer(self.feeds(window, modality))
        return {"vad": 1 / (1 + np.exp(-out["vad_logits"][0])),
                "speaker": 1 / (1 + np.exp(-out["speaker_logits"][0])),
                "command": int(np.argmax(out["command_logits"][0]))}


def command_window(generator: Generator, clip: Clip) -> Window:
    """The window the node publishes just after the visible command word ends."""
    assert clip.command_span is not None
    t_end = min(CLIP_S, clip.command_span[1] + 0.04)
    t_end = max(t_end, WINDOW_SAMPLES / SAMPLE_RATE)
    return generator.window(clip, round(t_end * SAMPLE_RATE) / SAMPLE_RATE)


def tiling_windows(generator: Generator, clip: Clip) -> list[Window]:
    """Windows whose 16 frames tile the clip without overlap (frames 80 ms .. end)."""
    span = WINDOW_FRAMES * FRAME_S
    ends = np.arange(0.08 + span - FRAME_S, CLIP_S + 1e-9, span)
    return [generator.window(clip, round(t * SAMPLE_RATE) / SAMPLE_RATE) for t in ends]


def evaluate_commands(scorer: SpeechScorer, clips_per_condition: int) -> dict[str, object]:
    generator = scorer.generator
    table: dict[str, dict[str, object]] = {}
    conditions = _conditions()
    with progress(desc="eval speech: commands", total=len(conditions) * clips_per_condition,
                  unit="clip") as bar:
        for name, noise, snr in conditions:
            correct = {m: [] for m in MODALITIES}
            for i in range(clips_per_condition):
                clip = generator.clip(SEED_BASE + i, mode="target", snr_db=snr, noise=noise,
                                      clean=snr is None)
                window = command_window(generator, clip)
                for modality in MODALITIES:
                    correct[modality].append(scorer.run(window, modality)["command"]
                                             == clip.command)
                bar.update()
            row: dict[str, object] = {m: proportion(sum(v), len(v)) for m, v in correct.items()}
            av, ao = np.array(correct["audio_video"]), np.array(correct["audio_only"])
            row["av_vs_audio"] = {
                "av_only_right": int((av & ~ao).sum()), "audio_only_right": int((~av & ao).sum()),
                "p_mcnemar": mcnemar_exact(int((av & ~ao).sum()), int((~av & ao).sum())),
                "difference_points": 100 * float(av.mean() - ao.mean())}
            table[name] = row
    return table


def evaluate_overlap(scorer: SpeechScorer, clips: int, snr_db: float | None = None
                     ) -> dict[str, object]:
    """Visible speaker says A, an off-screen voice says B at a similar level."""
    generator = scorer.generator
    picks = {m: {"visible": 0, "off_screen": 0} for m in MODALITIES}
    for i in progress(range(clips), desc="eval speech: overlap", unit="clip"):
        clip = generator.clip(SEED_BASE + 50_000 + i, mode="overlap", snr_db=snr_db,
                              clean=snr_db is None)
        window = command_window(generator, clip)
        for modality in MODALITIES:
            command = scorer.run(window, modality)["command"]
            if command == clip.command:
                picks[modality]["visible"] += 1
            elif command == clip.other_command:
                picks[modality]["off_screen"] += 1
    return {m: {"visible_word": proportion(v["visible"], clips),
                "off_screen_word": proportion(v["off_screen"], clips)}
            for m, v in picks.items()}


def evaluate_frames(scorer: SpeechScorer, clips_per_snr: int) -> dict[str, object]:
    """Active speaker AP and voice-activity F1 per SNR, with Silero VAD on the same audio."""
    generator = scorer.generator
    silero = SileroVad()
    vad_rows: dict[str, dict[str, float]] = {}
    speaker_scores: list[np.ndarray] = []
    speaker_labels: list[np.ndarray] = []
    modes = ("target", "distractor", "overlap", "chatter", "real", "silence")
    conditions = _conditions()
    with progress(desc="eval speech: voice activity, active speaker",
                  total=len(conditions) * clips_per_snr, unit="clip") as bar:
        for name, noise, snr in conditions:
            labels, ours, audio_only, theirs = [], [], [], []
            for i in range(clips_per_snr):
                clip = generator.clip(SEED_BASE + 100_000 + i, mode=modes[i % len(modes)],
                                      snr_db=snr, noise=noise, clean=snr is None)
                probability = silero.frame_probabilities(clip.audio)
                for window in tiling_windows(generator, clip):
                    av = scorer.run(window, "audio_video")
                    ao = scorer.run(window, "audio_only")
                    labels.append(window.vad)
                    ours.append(av["vad"])
                    audio_only.append(ao["vad"])
                    speaker_scores.append(av["speaker"])
                    speaker_labels.append(window.speaker)
                    theirs.append(probability[_frame_indices(window)])
                bar.update()
            y = np.concatenate(labels) > 0.5
            vad_rows[name] = {
                "audio_video_f1": f1(np.concatenate(ours) > 0.5, y),
                "audio_only_f1": f1(np.concatenate(audio_only) > 0.5, y),
                "silero_f1": f1(np.concatenate(theirs) > 0.5, y),
                "frames": len(y),
            }
    return {"voice_activity_f1": vad_rows,
            "active_speaker_ap": average_precision(np.concatenate(speaker_scores),
                                                   np.concatenate(speaker_labels) > 0.5)}


def _frame_indices(window: Window) -> np.ndarray:
    """Indices into a clip's 40 ms frame grid of a window's 16 frames."""
    return np.round(window.slots_s / FRAME_S).astype(int)


def evaluate_distractor(scorer: SpeechScorer, clips: int) -> dict[str, object]:
    """Sliding windows at 25 Hz over `distractor` clips, as the node runs: rising edges of
    `speaker_visible_talking` and of a non-`none` command count as false activations."""
    generator = scorer.generator
    speaker_onsets = {m: 0 for m in ("audio_video", "audio_only")}
    command_onsets = {m: 0 for m in ("audio_video", "audio_only")}
    seconds = 0.0
    for i in progress(range(clips), desc="eval speech: distractor", unit="clip"):
        clip = generator.clip(SEED_BASE + 200_000 + i, mode="distractor", clean=True)
        ends = np.arange(WINDOW_SAMPLES / SAMPLE_RATE + FRAME_S, CLIP_S + 1e-9, FRAME_S)
        seconds += len(ends) * FRAME_S
        for modality in speaker_onsets:
            talking = commanding = False
            for t in ends:
                result = scorer.run(generator.window(clip, round(t * SAMPLE_RATE)
                                                     / SAMPLE_RATE), modality)
                now_talking = bool(result["speaker"][-1] > 0.5)
                now_commanding = result["command"] != 0
                speaker_onsets[modality] += now_talking and not talking
                command_onsets[modality] += now_commanding and not commanding
                talking, commanding = now_talking, now_commanding
    hours = seconds / 3600
    return {"audio_seconds": seconds,
            "speaker_false_activations_per_hour": {m: v / hours
                                                   for m, v in speaker_onsets.items()},
            "command_false_activations_per_hour": {m: v / hours
                                                   for m, v in command_onsets.items()}}


class SileroVad:
    """Silero VAD (the `silero-vad` wheel's ONNX model, MIT) streamed over a clip."""

    CHUNK = 512
    CONTEXT = 64

    def __init__(self) -> None:
        import onnxruntime as ort

        path = importlib.resources.files("silero_vad") / "data" / "silero_vad.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(path), options,
                                             providers=["CPUExecutionProvider"])

    def chunk_probabilities(self, audio: np.ndarray) -> np.ndarray:
        """Speech probability of each 32 ms chunk of `audio` (16 kHz)."""
        state = np.zeros((2, 1, 128), np.float32)
        context = np.zeros(self.CONTEXT, np.float32)
        out = []
        for start in range(0, len(audio) - self.CHUNK + 1, self.CHUNK):
            chunk = audio[start:start + self.CHUNK].astype(np.float32)
            x = np.concatenate([context, chunk])[None]
            probability, state = self._session.run(
                None, {"input": x, "state": state, "sr": np.array(SAMPLE_RATE, np.int64)})
            out.append(float(probability.reshape(-1)[0]))
            context = chunk[-self.CONTEXT:]
        return np.array(out)

    def frame_probabilities(self, audio: np.ndarray) -> np.ndarray:
        """Per 40 ms frame k (audio (k-1)*40 ms .. k*40 ms): the probability of the chunk
        holding the frame's midpoint."""
        chunks = self.chunk_probabilities(audio)
        frames = int(len(audio) / SAMPLE_RATE / FRAME_S) + 1
        mid = (np.arange(frames) - 0.5) * FRAME_S * SAMPLE_RATE
        index = np.clip((mid // self.CHUNK).astype(int), 0, len(chunks) - 1)
        return chunks[index]


def _paired(right: dict[str, list[bool]], a: str = "audio_video", b: str = "audio_only"
            ) -> dict[str, object]:
    x, y = np.array(right[a]), np.array(right[b])
    return {"av_only_right": int((x & ~y).sum()), "audio_only_right": int((~x & y).sum()),
            "p_mcnemar": mcnemar_exact(int((x & ~y).sum()), int((~x & y).sum())),
            "difference_points": 100 * float(x.mean() - y.mean())}


def evaluate_families(scorer: SpeechScorer, peer: object | None, clips_per_voice: int,
                      clips_per_family: int) -> dict[str, object]:
    """Per family of the split: clean and babble 0 dB command accuracy of each modality and
    of the keyword-spotting peer (on the whole clip: more context than our window), and
    audio+video accuracy per voice (espeak-ng voices grouped by variant)."""
    generator = scorer.generator
    out: dict[str, object] = {}
    voices_of = {family: sorted({v.split("+")[-1] for v in generator.bank.voices(family)})
                 for family in generator.bank.families}
    clips_of = {family: max(clips_per_family, clips_per_voice * len(voices))
                for family, voices in voices_of.items()}
    conditions = (("clean", None), ("babble/0dB", 0.0))
    with progress(desc="eval speech: families", total=len(conditions) * sum(clips_of.values()),
                  unit="clip") as bar:
        for family, voices in voices_of.items():
            clips = clips_of[family]
            row: dict[str, object] = {"voices": len(voices)}
            for condition, snr in conditions:
                right: dict[str, list[bool]] = {m: [] for m in (*MODALITIES, "pocketsphinx")}
                per_voice: dict[str, list[bool]] = {v: [] for v in voices}
                for i in range(clips):
                    voice = voices[i % len(voices)]
                    clip = generator.clip(SEED_BASE + 300_000 + i, mode="target", snr_db=snr,
                                          noise=None if snr is None else "babble",
                                          clean=snr is None, family=family, voice=voice)
                    window = command_window(generator, clip)
                    for modality in MODALITIES:
                        right[modality].append(scorer.run(window, modality)["command"]
                                               == clip.command)
                    per_voice[voice].append(right["audio_video"][-1])
                    if peer is not None:
                        right["pocketsphinx"].append(peer.command(clip.audio)  # type: ignore
                                                     == clip.command)
                    bar.update()
                result: dict[str, object] = {m: proportion(sum(v), len(v))
                                             for m, v in right.items() if v}
                result["av_vs_audio"] = _paired(right)
                if peer is not None:
                    result["av_vs_pocketsphinx"] = _paired(right, "audio_video", "pocketsphinx")
                    result["audio_vs_pocketsphinx"] = _paired(right, "audio_only", "pocketsphinx")
                if condition == "clean":
                    result["per_voice_audio_video"] = {v: proportion(sum(r), len(r))
                                                       for v, r in per_voice.items()}
                row[condition] = result
            out[family] = row
    return out


def evaluate_validation(scorer: SpeechScorer, clips: int) -> dict[str, object]:
    """Clean command accuracy on the split the checkpoint was selected on."""
    generator = scorer.generator
    right: dict[str, list[bool]] = {m: [] for m in MODALITIES}
    for i in progress(range(clips), desc="eval speech: validation", unit="clip"):
        clip = generator.clip(SEED_BASE + i, mode="target", clean=True)
        window = command_window(generator, clip)
        for modality in MODALITIES:
            right[modality].append(scorer.run(window, modality)["command"] == clip.command)
    return {"clean": {m: proportion(sum(v), len(v)) for m, v in right.items()}}


def command_events(posteriors: list[np.ndarray], threshold: float = 0.6,
                   confirmations: int = 2) -> int:
    """How many commands the node's latch (`engines.command_latch`) would take from this
    stream of posteriors: runs of `confirmations` agreeing confident non-`none` windows,
    each run counted once."""
    events, candidate, streak = 0, 0, 0
    for posterior in posteriors:
        best = int(np.argmax(posterior))
        if best == 0 or posterior[best] < threshold:
            candidate, streak = 0, 0
            continue
        streak = streak + 1 if best == candidate else 1
        candidate = best
        events += streak == confirmations
    return events


def evaluate_real_speech(scorer: SpeechScorer, clips: int, stream_s: float
                         ) -> dict[str, object]:
    """The split's real people (off-screen, the visible mouth still): voice-activity frame F1
    against the dry recordings' energy labels beside Silero, clean and at 10 dB pink; and
    false commands per hour, audio-only and audio+video, sliding at 25 Hz over a stream of
    their speech (none of it a command)."""
    generator = scorer.generator
    silero = SileroVad()
    vad: dict[str, object] = {}
    conditions = (("clean", None), ("pink/10dB", 10.0))
    with progress(desc="eval speech: real speech, voice activity",
                  total=len(conditions) * clips, unit="clip") as bar:
        for condition, snr in conditions:
            groups: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {
                "audio_video": [], "audio_only": [], "silero": []}
            for i in range(clips):
                clip = generator.clip(SEED_BASE + 400_000 + i, mode="real", snr_db=snr,
                                      noise=None if snr is None else "pink", clean=snr is None)
                probability = silero.frame_probabilities(clip.audio)
                for window in tiling_windows(generator, clip):
                    labels = window.vad > 0.5
                    for modality in ("audio_video", "audio_only"):
                        groups[modality].append((scorer.run(window, modality)["vad"] > 0.5,
                                                 labels))
                    groups["silero"].append((probability[_frame_indices(window)] > 0.5, labels))
                bar.update()
            vad[condition] = {name: bootstrap(f1, g) for name, g in groups.items()}
    # False commands: real syllables back to back, as a person talking near the robot.
    events = {"audio_video": 0, "audio_only": 0}
    seconds = 0.0
    i = 0
    with progress_seconds(stream_s, desc="eval speech: false commands, seconds of real "
                          "speech") as bar:
        while seconds < stream_s:
            clip = generator.clip(SEED_BASE + 500_000 + i, mode="real", clean=True)
            i += 1
            ends = np.arange(WINDOW_SAMPLES / SAMPLE_RATE, CLIP_S + 1e-9, FRAME_S)
            seconds += CLIP_S - WINDOW_SAMPLES / SAMPLE_RATE
            for modality in events:
                posteriors = [scorer.posterior(generator.window(
                    clip, round(t * SAMPLE_RATE) / SAMPLE_RATE), modality) for t in ends]
                events[modality] += command_events(posteriors)
            bar.at(seconds)
    return {"voice_activity_f1": vad,
            "false_commands_per_hour": {m: poisson_rate(e, seconds / 3600)
                                        for m, e in events.items()},
            "speakers": sorted({r.speaker for r in generator.bank.real})}


def evaluate_noise_alone(scorer: SpeechScorer, clips: int) -> dict[str, object]:
    """`silence` clips with one kind of noise and nobody talking: the share of frames each
    model calls speech."""
    generator = scorer.generator
    silero = SileroVad()
    out: dict[str, object] = {}
    with progress(desc="eval speech: noise alone", total=len(STATIONARY_NOISES) * clips,
                  unit="clip") as bar:
        for kind in STATIONARY_NOISES:
            groups: dict[str, list[tuple[np.ndarray]]] = {"audio_video": [], "audio_only": [],
                                                          "silero": []}
            for i in range(clips):
                clip = generator.clip(SEED_BASE + 600_000 + i, mode="silence", snr_db=0.0,
                                      noise=kind, clean=False)
                probability = silero.frame_probabilities(clip.audio)
                for window in tiling_windows(generator, clip):
                    for modality in ("audio_video", "audio_only"):
                        groups[modality].append((scorer.run(window, modality)["vad"] > 0.5,))
                    groups["silero"].append((probability[_frame_indices(window)] > 0.5,))
                bar.update()
            out[kind] = {name: bootstrap(np.mean, g) for name, g in groups.items()}
    return out


def evaluate_real_faces(scorer: SpeechScorer, utterances: int) -> dict[str, object]:
    """Real photographs (`training.real_faces`) whose mouths a viseme track animates, through
    the node's own path (alignment buffer, speech binding, face landmarker, mouth tracker)
    at 25 fps: for each utterance of the test bank, the face says it, and then the same
    audio plays while the face stays still (someone off-screen says it). Average precision
    of the visible-speaker output over the frames where the utterance is audible."""
    from training.real_faces import HeadMotion, SpokenTrack, StillTrack, mouth_windows

    generator = scorer.generator
    spoken = generator.bank.commands + generator.bank.chatter
    rng = np.random.default_rng(SEED_BASE + 800_000)
    out: dict[str, object] = {}
    photos = ("grace_hopper", "astronaut")
    with progress(desc="eval speech: real faces", total=len(photos) * utterances,
                  unit="utterance") as bar:
        for photo in photos:
            groups: list[tuple[np.ndarray, np.ndarray]] = []
            for k in range(utterances):
                utterance = spoken[int(rng.integers(len(spoken)))]
                start_s = 0.3
                audio = np.zeros(int(CLIP_S * SAMPLE_RATE), np.float32)
                begin = int(start_s * SAMPLE_RATE)
                samples = utterance.samples[: len(audio) - begin]
                audio[begin:begin + len(samples)] = samples * 0.3
                duration = len(utterance.samples) / SAMPLE_RATE
                talking = SpokenTrack(utterance.phonemes, start_s, duration, 0.02)
                ends = np.arange(WINDOW_SAMPLES / SAMPLE_RATE + 0.2, CLIP_S + 1e-9,
                                 WINDOW_FRAMES * FRAME_S)
                head = HeadMotion.random(rng)
                for track, label in ((talking, 1.0), (StillTrack.random(rng), 0.0)):
                    windows = mouth_windows(photo, track, list(ends), head=head, audio=audio,
                                            fps=25.0, rate_hz=25.0)
                    for window in windows:
                        heard = talking.speaking(window.slots_s)
                        if not heard.any():
                            continue
                        logits = scorer.engine.infer(window.feeds)["speaker_logits"][0]
                        groups.append((1 / (1 + np.exp(-logits[heard])),
                                       np.full(int(heard.sum()), label)))
                bar.update()
            out[photo] = bootstrap(average_precision, groups)
            out[photo]["held_out"] = photo not in generator_split_photos("train")
    return out


def generator_split_photos(split: str) -> tuple[str, ...]:
    from training.speech_corpus import SPLITS

    return SPLITS[split].photos


def run(model: Path = DEFAULT_MODEL, clips_per_condition: int = 200,
        overlap_clips: int = 200, frame_clips: int = 40, distractor_clips: int = 40,
        clips_per_voice: int = 20, real_stream_s: float = 1800.0,
        peer: bool = True, bank_size: str = "full") -> dict[str, object]:
    """The whole report; see the module docstring."""
    from training.peers import PocketsphinxKeywords

    engine = OnnxRuntimeEngine(model, intra_op_threads=1)
    validation = SpeechScorer(engine, Generator("validation", realism=False,
                                                     bank_size=bank_size))
    keywords = None
    if peer:
        keywords = PocketsphinxKeywords.tuned_on(validation_clips(validation.generator,
                                                                  clips_per_condition))
    scorer = SpeechScorer(engine, Generator("test", realism=False, bank_size=bank_size))
    report: dict[str, object] = {
        "model": str(model),
        "split": "test (voices, carriers, sentences, faces and real speakers never used in "
                 "training or selection; the piper family held out whole)",
        "commands": list(COMMANDS),
        "validation": evaluate_validation(validation, clips_per_condition),
        "families": evaluate_families(scorer, keywords, clips_per_voice, clips_per_condition),
        "command_accuracy": evaluate_commands(scorer, clips_per_condition),
        "overlap": evaluate_overlap(scorer, overlap_clips),
    }
    report.update(evaluate_frames(scorer, frame_clips))
    report["distractor"] = evaluate_distractor(scorer, distractor_clips)
    report["real_speech"] = evaluate_real_speech(scorer, frame_clips, real_stream_s)
    report["noise_alone"] = evaluate_noise_alone(scorer, frame_clips)
    report["real_faces"] = evaluate_real_faces(scorer, max(2, frame_clips // 2))
    if keywords is not None:
        report["pocketsphinx"] = {"threshold": keywords.threshold,
                                  "tuned_on": "validation split, clean and babble 0 dB"}
    return report


def validation_clips(generator: Generator, count: int) -> list[tuple[np.ndarray, int]]:
    """(clip audio, command) pairs of the validation split, clean and babble 0 dB, to tune
    the keyword spotter's threshold on."""
    pairs = []
    for i in progress(range(count), desc="eval speech: clips to tune pocketsphinx on",
                      unit="clip"):
        snr = None if i % 2 else 0.0
        clip = generator.clip(SEED_BASE + 700_000 + i, mode="target" if i % 4 else "chatter",
                              snr_db=snr, noise=None if snr is None else "babble",
                              clean=snr is None)
        pairs.append((clip.audio, clip.command))
    return pairs
