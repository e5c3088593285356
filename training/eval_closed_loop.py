"""Speech to action, closed loop: spoken commands drive the arm through both engines.

Each episode plays a held-out clip (voices, faces and babble never trained on) in which a
colour command is said, here at 0 dB SNR in babble. The speech engine runs on it as the node
runs it (a window every 1/30 s); its posteriors reach the action engine 40 ms later (the
speech engine's declared latency) and go through the same `CommandLatch` as in the node;
the action engine then drives the simulated arm (`eval_action.run_episode`, timed as in the
node). Audio+video and audio-only speech are compared on the same clips and layouts.

- success: the end effector comes within 2 cm of the named block within 4 s of the word's end;
- wrong target: it reaches another block first;
- false action (`distractor` clips, an off-screen voice says the colour while the visible
  mouth stays still): the arm moves at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from drivers.sim import arm
from engines.command_latch import CommandLatch
from engines.onnxruntime_backend import OnnxRuntimeEngine
from engines.vocabulary import COMMANDS
from fusion_node.progress import progress
from training.eval_action import EPISODE_S, run_episode
from training.eval_speech import SpeechScorer
from training.speech_corpus import CLIP_S, SAMPLE_RATE, WINDOW_SAMPLES, Clip, Generator
from training.stats import proportion

SPEECH_PERIOD_S = 1 / 30
SPEECH_LATENCY_S = 0.040
ACTION_TICK_S = 0.040
COLOUR_COMMANDS = tuple(COMMANDS.index(c) for c in arm.BLOCK_COLOURS)
SEED_BASE = 700_000


def latched_commands(scorer: SpeechScorer, clip: Clip, modality: str, duration_s: float
                     ) -> list[int | None]:
    """The latched command at each action tick (every 40 ms from the clip's start)."""
    posteriors: list[tuple[float, np.ndarray]] = []  # (time the action engine may use it, p)
    t = WINDOW_SAMPLES / SAMPLE_RATE
    while t <= CLIP_S + 1e-9:
        end = round(t * SAMPLE_RATE) / SAMPLE_RATE
        window = scorer.generator.window(clip, end)
        logits = scorer.engine.infer(scorer.feeds(window, modality))["command_logits"][0]
        probabilities = np.exp(logits - logits.max())
        posteriors.append((end + SPEECH_LATENCY_S, probabilities / probabilities.sum()))
        t += SPEECH_PERIOD_S
    latch = CommandLatch()
    ticks = round(duration_s / ACTION_TICK_S) + 1
    out: list[int | None] = []
    used = 0
    for k in range(ticks):
        # The action tick sees the newest speech prediction it is allowed to; each one once.
        while used < len(posteriors) and posteriors[used][0] <= k * ACTION_TICK_S + 1e-9:
            latch.update(posteriors[used][1])
            used += 1
        out.append(latch.command or None)
    return out


def _episode(action: OnnxRuntimeEngine, layout_seed: int, commands: list[int | None],
             duration_s: float) -> Any:
    ticks_per_step = ACTION_TICK_S / arm.STEP_S
    return run_episode(action, layout_seed,
                       lambda step: commands[min(len(commands) - 1,
                                                 int(step / ticks_per_step))],
                       duration_s=duration_s)


def run(action_model: Path, speech_model: Path, episodes: int, seed: int = 0,
        snr_db: float = 0.0, noise: str = "babble") -> dict[str, Any]:
    speech = OnnxRuntimeEngine(speech_model)
    action = OnnxRuntimeEngine(action_model)
    scorer = SpeechScorer(speech, Generator("validation"))
    modalities = ("audio_video", "audio_only")
    success = {m: 0 for m in modalities}
    wrong = {m: 0 for m in modalities}
    heard = {m: 0 for m in modalities}
    distractors = max(1, episodes // 2)
    false_action = {m: 0 for m in modalities}
    with progress(desc="eval action: from speech", total=episodes + distractors,
                  unit="episode") as bar:
        for i in range(episodes):
            command = COLOUR_COMMANDS[i % len(COLOUR_COMMANDS)]
            colour = COMMANDS[command]
            clip = scorer.generator.clip(SEED_BASE + seed * 100_000 + i, mode="target",
                                         snr_db=snr_db, noise=noise, command=command)
            assert clip.command_span is not None
            word_end = clip.command_span[1]
            duration = word_end + EPISODE_S
            for modality in modalities:
                commands = latched_commands(scorer, clip, modality, duration)
                heard[modality] += commands[-1] == command
                result = _episode(action, SEED_BASE + i, commands, duration)
                success[modality] += result.reached(colour, within_s=duration)
                wrong[modality] += (result.first_reached is not None
                                    and result.first_reached != colour)
            bar.update()
        for i in range(distractors):
            command = COLOUR_COMMANDS[i % len(COLOUR_COMMANDS)]
            clip = scorer.generator.clip(SEED_BASE + seed * 100_000 + 50_000 + i,
                                         mode="distractor", snr_db=snr_db, noise=noise,
                                         command=command)
            duration = CLIP_S + 1.0
            for modality in modalities:
                commands = latched_commands(scorer, clip, modality, duration)
                result = _episode(action, SEED_BASE + 50_000 + i, commands, duration)
                false_action[modality] += result.moved
            bar.update()
    return {
        "condition": f"{noise} at {snr_db:g} dB SNR, held-out voices and faces",
        "episodes": episodes,
        "success": {m: proportion(success[m], episodes) for m in modalities},
        "command_latched": {m: proportion(heard[m], episodes) for m in modalities},
        "wrong_target": {m: proportion(wrong[m], episodes) for m in modalities},
        "false_action_on_distractor": {m: proportion(false_action[m], distractors)
                                       for m in modalities},
    }
