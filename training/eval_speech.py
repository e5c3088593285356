"""Evaluate the speech engine on held-out synthetic clips: `fusion-node eval speech --json`.

Everything runs through the node's ONNX Runtime engine and preprocessing, on the validation
split (voices, carrier phrases, babble and faces never seen in training). The same clips are
scored audio-only, video-only and audio+video, so modalities are compared pairwise.

Reports:
- command accuracy over SNR {clean, 10, 5, 0, -5, -10 dB} x noise {pink, babble}, with 95%
  intervals, and the paired (McNemar) test of audio+video against audio-only;
- `overlap` clips: how often the visible speaker's word wins, and the off-screen one's;
- active speaker: average precision (audio+video) and false activations per hour on
  `distractor` clips (visible mouth still, an off-screen voice talking);
- voice activity: frame F1 per SNR, side by side with Silero VAD on the same audio.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.onnxruntime_backend import OnnxRuntimeEngine
from engines.vocabulary import COMMANDS
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
from training.stats import average_precision, f1, mcnemar_exact, proportion

SNRS: tuple[float | None, ...] = (None, 10.0, 5.0, 0.0, -5.0, -10.0)
EVAL_NOISES = ("pink", "babble")
MODALITIES = ("audio_only", "video_only", "audio_video")
DEFAULT_MODEL = Path(str(importlib.resources.files("engines") / "models" / "speech.onnx"))
SEED_BASE = 900_000


def _snr_name(snr: float | None) -> str:
    return "clean" if snr is None else f"{snr:g}dB"


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
    for noise in EVAL_NOISES:
        for snr in SNRS:
            if snr is None and noise != EVAL_NOISES[0]:
                continue  # clean audio has no noise type
            name = "clean" if snr is None else f"{noise}/{_snr_name(snr)}"
            correct = {m: [] for m in MODALITIES}
            for i in range(clips_per_condition):
                clip = generator.clip(SEED_BASE + i, mode="target", snr_db=snr,
                                      noise=None if snr is None else noise,
                                      clean=snr is None)
                window = command_window(generator, clip)
                for modality in MODALITIES:
                    correct[modality].append(scorer.run(window, modality)["command"]
                                             == clip.command)
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
    for i in range(clips):
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
    modes = ("target", "distractor", "overlap", "silence")
    for noise in EVAL_NOISES:
        for snr in SNRS:
            if snr is None and noise != EVAL_NOISES[0]:
                continue
            name = "clean" if snr is None else f"{noise}/{_snr_name(snr)}"
            labels, ours, audio_only, theirs = [], [], [], []
            for i in range(clips_per_snr):
                clip = generator.clip(SEED_BASE + 100_000 + i, mode=modes[i % len(modes)],
                                      snr_db=snr, noise=None if snr is None else noise,
                                      clean=snr is None)
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
    for i in range(clips):
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


def run(model: Path = DEFAULT_MODEL, clips_per_condition: int = 200,
        overlap_clips: int = 200, frame_clips: int = 40, distractor_clips: int = 40
        ) -> dict[str, object]:
    engine = OnnxRuntimeEngine(model, intra_op_threads=1)
    scorer = SpeechScorer(engine, Generator("validation"))
    report: dict[str, object] = {
        "model": str(model), "split": "validation (voices, phrases, babble, faces unseen)",
        "commands": list(COMMANDS),
        "command_accuracy": evaluate_commands(scorer, clips_per_condition),
        "overlap": evaluate_overlap(scorer, overlap_clips),
    }
    report.update(evaluate_frames(scorer, frame_clips))
    report["distractor"] = evaluate_distractor(scorer, distractor_clips)
    return report
