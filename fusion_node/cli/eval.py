"""`fusion-node eval speech|action`: the reference models measured on held-out data."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any


def add_eval_parser(commands: Any) -> None:
    evaluate = commands.add_parser("eval", help="evaluate the reference models on held-out "
                                   "synthetic data through the ONNX Runtime engine")
    which = evaluate.add_subparsers(dest="what", required=True)
    speech = which.add_parser("speech", help="on the test split: commands per synthesizer "
                              "family and over SNR x noise, audio-only vs video-only vs "
                              "audio+video, beside pocketsphinx; active speaker; voice "
                              "activity vs Silero VAD; real people; noise alone")
    speech.add_argument("--model", type=Path, help="speech .onnx (default: the shipped one)")
    speech.add_argument("--clips", type=int, default=200,
                        help="clips per SNR x noise condition (commands, overlap)")
    speech.add_argument("--frame-clips", type=int, default=40,
                        help="clips per condition for voice activity and active speaker")
    speech.add_argument("--clips-per-voice", type=int, default=20,
                        help="clean clips per test voice (per-voice accuracy)")
    speech.add_argument("--real-minutes", type=float, default=30.0,
                        help="minutes of real non-command speech for false commands")
    speech.add_argument("--bank-size", choices=("full", "tiny"), default="full",
                        help="speech banks to draw clips from (tiny: a smoke run)")
    action = which.add_parser("action", help="closed-loop success of the arm, with the true "
                              "command and with commands from the speech engine")
    action.add_argument("--model", type=Path, help="action .onnx (default: the shipped one)")
    action.add_argument("--speech-model", type=Path,
                        help="speech .onnx (default: the shipped one)")
    action.add_argument("--episodes", type=int, default=200)
    plots = {speech: "eval_speech.json and eval_speech_snr_{pink,babble,motor}.png (command "
                     "accuracy vs SNR per noise)",
             action: "eval_action.json and eval_action.png (closed-loop success rates)"}
    for parser, written in plots.items():
        parser.add_argument("--json", action="store_true", help="one-line JSON")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--plot", metavar="DIR", help=f"also write {written} into DIR, "
                            "with 95%% intervals (needs matplotlib)")


def run_eval_command(args: argparse.Namespace) -> dict[str, Any]:
    if args.plot:
        from fusion_node.bench.plots import plot_directory

        plot_directory(args.plot)  # a missing matplotlib or a bad DIR, before the long run
    if args.what == "speech":
        from training import eval_speech

        kwargs: dict[str, Any] = {"clips_per_condition": args.clips,
                                  "overlap_clips": args.clips,
                                  "frame_clips": args.frame_clips,
                                  "distractor_clips": args.frame_clips,
                                  "clips_per_voice": args.clips_per_voice,
                                  "real_stream_s": 60 * args.real_minutes,
                                  "bank_size": args.bank_size}
        if args.model:
            kwargs["model"] = args.model
        report = eval_speech.run(**kwargs)
    else:
        from training import eval_action, eval_closed_loop

        models = Path(str(resources.files("engines") / "models"))
        action_model = args.model or models / "action.onnx"
        speech_model = args.speech_model or models / "speech.onnx"
        report = {
            "true_command": eval_action.evaluate_true_commands(action_model, args.episodes,
                                                               args.seed),
            "from_speech": eval_closed_loop.run(action_model, speech_model, args.episodes,
                                                args.seed),
        }
    if args.plot:
        for path in write_plots(args.what, report, Path(args.plot)):
            print(f"wrote {path}", file=sys.stderr)
    return report


def write_plots(what: str, report: dict[str, Any], out: Path) -> list[Path]:
    """The report's JSON and PNGs in `out`, as `--plot`'s help lists them."""
    from fusion_node.bench.plots import plot_accuracy_vs_snr, plot_action_eval

    json_path = out / f"eval_{what}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    if what == "action":
        return [json_path, plot_action_eval(report, out / "eval_action.png")]
    from training.eval_speech import EVAL_NOISES

    return [json_path, *(plot_accuracy_vs_snr(
        accuracy_curves(report, noise), out / f"eval_speech_snr_{noise}.png",
        f"command accuracy vs SNR, {noise} noise (test split, 95% intervals)")
        for noise in EVAL_NOISES)]


def accuracy_curves(report: dict[str, Any], noise: str) -> dict[str, Any]:
    """The `noise` rows of the speech report as the curves `plot_accuracy_vs_snr` draws,
    with their 95% intervals and the clean row as its own reference."""
    table = report["command_accuracy"]
    rows = [(float(k.split("/")[1].removesuffix("dB")), v) for k, v in table.items()
            if k.startswith(f"{noise}/")]
    modalities = ("audio_only", "video_only", "audio_video")
    return {"snr": [snr for snr, _ in rows],
            **{m: [row[m]["rate"] for _, row in rows] for m in modalities},
            **{f"{m}_ci95": [row[m]["ci95"] for _, row in rows] for m in modalities},
            "clean": {m: table["clean"][m]["rate"] for m in modalities}}
