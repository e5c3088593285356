"""The evaluation commands run end to end on the shipped models (small counts: the figures
in the model cards come from the full runs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fusion_node.cli import main as cli_main
from training.stats import average_precision, f1, mcnemar_exact, wilson

MODELS = Path(__file__).parents[2] / "engines" / "models"
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (scripts/setup.sh --test)")


def test_statistics_against_known_values():
    low, high = wilson(8, 10)
    assert abs(low - 0.4902) < 1e-3 and abs(high - 0.9433) < 1e-3
    assert mcnemar_exact(0, 0) == 1.0
    assert abs(mcnemar_exact(10, 0) - 2 / 1024) < 1e-12  # two-sided, all discordant one way
    assert average_precision(np.array([0.9, 0.8, 0.1]), np.array([1, 0, 1])) == pytest.approx(
        (1 + 2 / 3) / 2)
    assert f1(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == 0.5


@needs_espeak
def test_eval_speech_prints_every_table(capsys, tmp_path):
    pytest.importorskip("silero_vad")
    assert cli_main(["eval", "speech", "--clips", "2", "--frame-clips", "4", "--json",
                     "--clips-per-voice", "1", "--real-minutes", "0.1", "--bank-size", "tiny",
                     "--plot", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    table = report["command_accuracy"]
    assert set(table) == {"clean"} | {f"{noise}/{snr}dB" for noise in ("pink", "babble", "motor")
                                      for snr in (10, 5, 0, -5, -10)}
    assert report["split"].startswith("test")
    assert set(report["families"]) == {"espeak", "flite", "festival", "piper"}
    for family in report["families"].values():
        for condition in ("clean", "babble/0dB"):
            assert {"audio_only", "audio_video", "pocketsphinx"} <= set(family[condition])
        assert family["clean"]["per_voice_audio_video"]
    real = report["real_speech"]
    assert real["false_commands_per_hour"]["audio_only"]["exposure"] > 0
    assert set(real["voice_activity_f1"]["clean"]) == {"audio_video", "audio_only", "silero"}
    assert set(report["noise_alone"]) == {"white", "pink", "motor", "fan", "hum", "servo"}
    for shares in report["noise_alone"].values():
        assert 0 <= shares["audio_only"]["value"] <= 1
    for row in table.values():
        for modality in ("audio_only", "video_only", "audio_video"):
            assert row[modality]["n"] == 2 and 0 <= row[modality]["rate"] <= 1
        assert 0 <= row["av_vs_audio"]["p_mcnemar"] <= 1
    assert set(report["voice_activity_f1"]["clean"]) >= {"audio_video_f1", "silero_f1"}
    assert 0 <= report["active_speaker_ap"] <= 1
    assert (tmp_path / "eval_speech.json").exists()
    for noise in ("pink", "babble", "motor"):
        assert (tmp_path / f"eval_speech_snr_{noise}.png").stat().st_size > 1000


@needs_espeak
def test_spoken_commands_move_the_arm_to_the_named_block():
    """Both shipped engines in a closed loop on clean held-out speech: the arm reaches the
    block that was named, and a command said off-screen does not move it (audio+video)."""
    from training import eval_closed_loop

    report = eval_closed_loop.run(MODELS / "action.onnx", MODELS / "speech.onnx", episodes=8,
                                  snr_db=20.0, noise="pink")
    assert report["success"]["audio_video"]["rate"] >= 0.75
    assert report["false_action_on_distractor"]["audio_video"]["rate"] <= 0.25
