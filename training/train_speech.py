"""Train the reference speech model on the synthetic AV corpus and export it.

    python -m training.train_speech --out engines/models/speech.onnx          # shipped weights
    python -m training.train_speech --out /tmp/tiny.onnx --tiny                # CI smoke run

Clips are generated on the fly by a worker process (`training.speech_corpus`, train split)
while the model trains on one thread; the model is selected on the validation split (unseen
voices, phrases, babble and appearances) and written as ONNX plus its torch weights (`.pt`).
The data of step k is drawn from the seed and k alone. The runs are not bit-identical: the
rendered audio of a few clips was found to differ between two runs of the same command (the
video and labels did not), so retraining gives close, not identical, weights.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from engines.vocabulary import COMMANDS
from fusion_node.progress import progress, write
from training import models
from training.export import (
    _speech_preprocessing,
    export_onnx,
    refuse_to_overwrite,
    stop_on_interrupt,
)
from training.speech_bank import SpeechBank, bank_path, load_or_build
from training.speech_corpus import BANK_DIR, IGNORE, WINDOW_FRAMES, Generator, Window

BATCH = 64
PER_CLIP = 4


def window_arrays(generator: Generator, windows: list[Window]) -> dict[str, np.ndarray]:
    """Stack windows into model feeds (all modalities valid) and labels."""
    mel = np.stack([generator.logmel(w.audio) for w in windows])
    return {
        "audio_mel": mel,
        "audio_valid": np.ones(mel.shape[:2], np.float32),
        "video": np.stack([w.video for w in windows]),
        "video_valid": np.ones((len(windows), WINDOW_FRAMES), np.float32),
        "vad": np.stack([w.vad for w in windows]),
        "speaker": np.stack([w.speaker for w in windows]),
        "command": np.array([w.command for w in windows], np.int64),
    }


def curriculum(batch_index: int, ramp_batches: int, rng: np.random.Generator
               ) -> dict[str, object]:
    """Noise for one clip: mostly clean and mild at first, down to -12 dB SNR after
    `ramp_batches`. From noisy audio alone the model learns nothing at the start, and
    with the lips to lean on it would never learn to listen. 30% of clips stay clean: with
    15%, most of the model's errors on clean audio were lips read wrongly overruling a
    word heard rightly."""
    ramp = min(1.0, batch_index / max(1, ramp_batches))
    if rng.random() < 0.5 - 0.2 * ramp:
        return {"clean": True}
    return {"clean": False, "snr_db": float(rng.uniform(20 - 32 * ramp, 20))}


def _produce(seed: int, clips: int, bank: Path, ramp_batches: int, worker: int, workers: int,
             queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """Worker: batches worker, worker + workers, ... forever; batch b holds clips
    b * clips ... (b + 1) * clips - 1, so the data does not depend on the worker count."""
    # Ctrl-C reaches the whole process group: the parent stops its workers, they need not
    # each print a KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # one process per core: a thread pool each would oversubscribe
    generator = Generator("train", bank=SpeechBank.load(bank))
    for batch_index in itertools.count(worker, workers):
        windows: list[Window] = []
        for clip in range(batch_index * clips, (batch_index + 1) * clips):
            clip_seed = seed * 10_000_000 + clip
            noise = curriculum(batch_index, ramp_batches, np.random.default_rng([clip_seed, 3]))
            windows += generator.training_windows(clip_seed, PER_CLIP, **noise)
        queue.put(window_arrays(generator, windows))


def batches(seed: int, batch: int, ramp_batches: int, workers: int, bank: Path
            ) -> Iterator[dict[str, np.ndarray]]:
    """Training batches from `workers` processes, in a fixed order. Rendering the mouth video
    costs about twice the training step, so one worker would leave the model waiting."""
    context = multiprocessing.get_context("spawn")
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                     "NUMBA_NUM_THREADS"):
        os.environ.setdefault(variable, "1")  # inherited by the data processes
    queues = [context.Queue(maxsize=4) for _ in range(workers)]
    processes = [context.Process(target=_produce, args=(seed, batch // PER_CLIP, bank,
                                                        ramp_batches, w, workers, queues[w]),
                                 daemon=True) for w in range(workers)]
    for process in processes:
        process.start()
    try:
        for batch_index in itertools.count():
            yield queues[batch_index % workers].get(timeout=600)
    finally:
        for process in processes:
            process.terminate()


def validation_set(windows_count: int, bank: SpeechBank, seed: int = 12345
                   ) -> dict[str, np.ndarray]:
    generator = Generator("validation", bank=bank)
    windows: list[Window] = []
    clip = 0
    while len(windows) < windows_count:
        windows += generator.training_windows(seed * 1000 + clip, 2)
        clip += 1
    return window_arrays(generator, windows)


def drop_modalities(feeds: dict[str, torch.Tensor], generator: torch.Generator,
                    p_audio: float = 0.15, p_video: float = 0.4) -> dict[str, torch.Tensor]:
    """Modality dropout: per window, audio or video (never both) is marked missing; some
    windows also lose a run of video frames, as when a camera stutters."""
    batch = feeds["audio_mel"].shape[0]
    device = feeds["audio_mel"].device
    u = torch.rand(batch, generator=generator).to(device)
    audio_on = (u >= p_audio).float()
    video_on = ((u < p_audio) | (u >= p_audio + p_video)).float()
    out = dict(feeds)
    out["audio_valid"] = feeds["audio_valid"] * audio_on[:, None]
    out["audio_mel"] = feeds["audio_mel"] * audio_on[:, None, None]
    video_valid = feeds["video_valid"] * video_on[:, None]
    # Drawn on the CPU generator, so a run's dropout is the same on any device.
    gaps = (torch.rand(batch, generator=generator) < 0.1).to(device)
    starts = torch.randint(0, WINDOW_FRAMES, (batch,), generator=generator).to(device)
    lengths = torch.randint(1, 6, (batch,), generator=generator).to(device)
    frame = torch.arange(WINDOW_FRAMES, device=device)[None, :]
    gap = gaps[:, None] & (frame >= starts[:, None]) & (frame < (starts + lengths)[:, None])
    video_valid = video_valid * (~gap).float()
    out["video_valid"] = video_valid
    out["video"] = feeds["video"] * video_valid[:, :, None, None]
    return out


def losses(outputs: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]
           ) -> dict[str, torch.Tensor]:
    command = F.cross_entropy(outputs["command_logits"], labels["command"],
                              ignore_index=IGNORE, label_smoothing=0.05)
    vad = F.binary_cross_entropy_with_logits(outputs["vad_logits"], labels["vad"])
    speaker = F.binary_cross_entropy_with_logits(outputs["speaker_logits"], labels["speaker"])
    return {"command": command, "vad": vad, "speaker": speaker,
            "total": command + 0.5 * vad + 0.5 * speaker}


MODEL_INPUTS = tuple(models.SPEECH_INPUTS)


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


@torch.no_grad()
def evaluate(model: models.SpeechModel, data: dict[str, np.ndarray], device: str = "cpu"
             ) -> dict[str, float]:
    """Command accuracy (windows with a label) for audio+video, audio only and video only,
    and per-frame accuracy of the two frame heads (audio+video)."""
    model.eval()
    tensors = {k: v.to(device) for k, v in _tensors(data).items()}
    labelled = tensors["command"] != IGNORE
    result: dict[str, float] = {}
    for name, audio_on, video_on in (("av", 1.0, 1.0), ("audio", 1.0, 0.0),
                                     ("video", 0.0, 1.0)):
        feeds = {k: tensors[k] for k in MODEL_INPUTS}
        feeds["audio_valid"] = feeds["audio_valid"] * audio_on
        feeds["audio_mel"] = feeds["audio_mel"] * audio_on
        feeds["video_valid"] = feeds["video_valid"] * video_on
        feeds["video"] = feeds["video"] * video_on
        out = {k: torch.cat(v) for k, v in _chunked(model, feeds).items()}
        predicted = out["command_logits"].argmax(-1)
        result[f"command_acc_{name}"] = float(
            (predicted[labelled] == tensors["command"][labelled]).float().mean())
        if name == "av":
            result["vad_acc"] = float(((out["vad_logits"] > 0) == (tensors["vad"] > 0.5))
                                      .float().mean())
            result["speaker_acc"] = float(((out["speaker_logits"] > 0)
                                           == (tensors["speaker"] > 0.5)).float().mean())
    model.train()
    return result


def _chunked(model: models.SpeechModel, feeds: dict[str, torch.Tensor],
             size: int = 256) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {}
    total = feeds["audio_mel"].shape[0]
    for start in range(0, total, size):
        part = model(**{k: v[start:start + size] for k, v in feeds.items()})
        for k, v in part.items():
            out.setdefault(k, []).append(v)
    return out


def train(out: Path, steps: int, seed: int, lr: float, validation_windows: int,
          eval_every: int, workers: int = 2, bank_dir: Path = BANK_DIR,
          bank_size: str = "full", device: str = "cpu", max_minutes: float | None = None,
          init: Path | None = None) -> dict[str, float]:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    # Built here, once, before the data processes start: each of them loads the file.
    load_or_build(bank_dir, "train", bank_size)
    validation_bank = load_or_build(bank_dir, "validation", bank_size)
    model = models.SpeechModel(seed)
    if init is not None:
        model.load_state_dict(torch.load(init, map_location="cpu"))
        print(f"initialised from {init}", flush=True)
    model = model.to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)

    limit_s = None if max_minutes is None else 60 * max_minutes

    def fraction_done(step: int) -> float:
        """How far training is: by steps, or by time when a time limit comes first."""
        by_steps = (step - warmup) / max(1, steps - warmup)
        if limit_s is None:
            return by_steps
        return max(by_steps, (time.monotonic() - started) / limit_s)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, fraction_done(step))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)
    dropout_rng = torch.Generator().manual_seed(seed)
    print(f"validation set: {validation_windows} windows (unseen voices, phrases, faces)",
          flush=True)
    validation = validation_set(validation_windows, validation_bank)
    best: dict[str, float] = {"score": -1.0}
    best_state = None
    started = time.monotonic()
    running: dict[str, float] = {}
    first_loss = None
    data = batches(seed, BATCH, ramp_batches=steps // 3, workers=workers,
                   bank=bank_path(bank_dir, "train", bank_size))
    with progress(range(steps), desc="train speech", unit="step") as bar:
        for step in bar:
            if limit_s is not None and time.monotonic() - started > limit_s:
                write(f"time limit of {max_minutes} min reached at step {step}")
                metrics = evaluate(model, validation, device)
                score = metrics["command_acc_av"] + 0.1 * (metrics["vad_acc"]
                                                           + metrics["speaker_acc"])
                if score > best["score"]:
                    best = {"score": score, "step": step, **metrics}
                    best_state = {k: v.clone() for k, v in model.state_dict().items()}
                break
            arrays = next(data)
            tensors = {k: v.to(device) for k, v in _tensors(arrays).items()}
            feeds = drop_modalities({k: tensors[k] for k in MODEL_INPUTS}, dropout_rng)
            parts = losses(model(**feeds), tensors)
            optimiser.zero_grad(set_to_none=True)
            parts["total"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            scheduler.step()
            for k, v in parts.items():
                running[k] = 0.98 * running.get(k, v.item()) + 0.02 * v.item()
            if first_loss is None:
                first_loss = parts["total"].item()
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                metrics = evaluate(model, validation, device)
                # Selection: audio+video command accuracy first, the frame heads break ties.
                score = metrics["command_acc_av"] + 0.1 * (metrics["vad_acc"]
                                                           + metrics["speaker_acc"])
                marker = ""
                if score > best["score"]:
                    best = {"score": score, "step": step + 1, **metrics}
                    best_state = {k: v.clone() for k, v in model.state_dict().items()}
                    marker = " *"
                elapsed = time.monotonic() - started
                write(f"step {step + 1}/{steps} {elapsed:.0f} s loss "
                      + " ".join(f"{k} {v:.3f}" for k, v in running.items()) + " | val "
                      + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + marker)
    assert best_state is not None
    model.load_state_dict(best_state)
    model = model.cpu().eval()
    best["train_seconds"] = time.monotonic() - started
    best["first_loss"] = float(first_loss or 0.0)
    best["final_loss"] = running["total"]
    options = f"--steps {steps} --seed {seed} --lr {lr} --device {device}"
    if max_minutes is not None:
        options += f" --max-minutes {max_minutes}"
    if init is not None:
        options += f" --init {init.name}"
    _export(model, out, seed, best, options)
    return best


def _export(model: models.SpeechModel, out: Path, seed: int, metrics: dict[str, float],
            options: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    training = (f"python -m training.train_speech --out {out.name} {options}: AV corpus "
                f"(espeak-ng, flite and festival voices, klettres-data real speech, drawn and "
                f"photographed mouths; rooms, microphones, robot noise), selected at step "
                f"{metrics['step']} on the validation split")
    model_hash = export_onnx(
        model, models.random_feeds(models.SPEECH_INPUTS, rng), out, name="speech",
        version=f"2+bank.seed{seed}.step{metrics['step']}",
        metadata={"commands": json.dumps(COMMANDS),
                  "preprocessing": json.dumps(_speech_preprocessing()),
                  "training": training,
                  "validation": json.dumps({k: round(v, 4) for k, v in metrics.items()})},
        init_kwargs={"seed": seed})
    torch.save(model.state_dict(), out.with_suffix(".pt"))
    print(f"{out}: validation {json.dumps(metrics)}", flush=True)
    # Every model has its own lip-to-voice delay; without it in the file, `calibrate
    # av-offset --method sync` would report that delay as an offset.
    from training.sync_bias import BIAS_KEY, store_bias

    print(f"{out}: {BIAS_KEY} = {store_bias(out)} (export hash was {model_hash}, the bias "
          f"changes the file's)", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.train_speech",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--force", action="store_true",
                        help="replace --out (and its .pt) if it exists")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--validation-windows", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--workers", type=int, default=2,
                        help="data processes (the data does not depend on their number)")
    parser.add_argument("--bank-dir", type=Path, default=BANK_DIR,
                        help="where the speech banks are (built there when missing)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda")
    parser.add_argument("--init", type=Path, help="start from these torch weights (.pt)")
    parser.add_argument("--max-minutes", type=float,
                        help="stop after this long (the learning rate schedule follows "
                             "whichever of steps and time runs out first)")
    parser.add_argument("--tiny", action="store_true",
                        help="a smoke run: 40 steps, small banks and validation set")
    args = parser.parse_args(argv)
    bank_size = "full"
    if args.tiny:
        args.steps, args.validation_windows, args.eval_every = 40, 64, 20
        bank_size = "tiny"
    refuse_to_overwrite(parser, args.out, args.force)
    with stop_on_interrupt(parser.prog, args.out):
        train(args.out, args.steps, args.seed, args.lr, args.validation_windows,
              args.eval_every, args.workers, args.bank_dir, bank_size, args.device,
              args.max_minutes, args.init)


if __name__ == "__main__":
    main()
