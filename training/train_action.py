"""Train the action model by behaviour cloning of the scripted arm expert, and export it.

    python -m training.train_action --out engines/models/action.onnx [--steps N] [--seed S]
    python -m training.train_action --out /tmp/action.onnx --tiny     # CI smoke training

Data is generated on the fly (`drivers.sim.arm`), deterministic from the seed: a pool of
simulated episodes (random block layouts, random start poses, random commands with changes
mid-episode, `stop`, `home`, non-arm words and "no command yet") advances a few steps per
batch, its executed targets perturbed by correlated noise and delays so that the states
drift off the expert's path the way a learnt policy's do, while every label is the clean
expert's next ACTION_HORIZON targets rolled forward from the sampled state. The loss is L1 on
the joint targets (rad). Validation uses held-out layout seeds. The trained weights are
written as ONNX (`training.export.export_onnx`) and as `MODEL.pt` beside it, which the torch
backend loads.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from drivers.sim import arm
from engines.preprocess import image_tensor
from engines.vocabulary import COMMANDS
from fusion_node.errors import ConfigError
from fusion_node.progress import progress, write
from training.eval_action import command_feed
from training.export import (
    _action_preprocessing,
    export_onnx,
    refuse_to_overwrite,
    stop_on_interrupt,
)
from training.models import ACTION_HORIZON, ActionModel

__all__ = ["BatchSource", "TrainConfig", "main", "train"]

# Latched-command mix of an episode's first command (the rest: "no command yet").
# Mostly colours: reaching a block seen in the image is the hard part to learn.
_FIRST_COMMAND_P = {"colour": 0.70, "home": 0.10, "stop": 0.07, "other": 0.05}
_SWITCH_P = 0.6  # an episode changes its command once, somewhere in its first 2 s
_NON_ARM = tuple(i for i, c in enumerate(COMMANDS)
                 if c not in arm.BLOCK_COLOURS and c not in ("home", "stop"))
_EPISODE_STEPS = (100, 200)
_NO_IMAGE_P = 0.05  # episodes without a camera image: colour commands must hold
_SOFT_COMMAND_P = 0.25  # samples whose command is a soft posterior, not one-hot
# Episodes that start with the hand on a block, mostly not the named one: without them the
# model learns "hand on a block -> hold" whatever the command says.
_START_ON_BLOCK_P = 0.35
# Each episode shows the named blocks plus 0-3 others: with few blocks in view, finding the
# named one is easy to learn, and two or more make the command's colour matter.


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 5000
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 300
    seed: int = 0
    pool: int = 256
    steps_per_batch: int = 2  # simulator steps the pool advances between batches
    validation_samples: int = 1024
    log_every: int = 250
    validate_every: int = 500


class BatchSource:
    """A pool of simulated episodes that yields training batches (see the module docstring).

    Deterministic from `seed`; layouts come from `layout_seed(i)` for the i-th episode.
    """

    def __init__(self, seed: int, pool: int, validation: bool = False) -> None:
        self.rng = np.random.default_rng([seed, 0x61637431])
        self._validation = validation
        self._episodes = 0
        self.size = pool
        self.blocks = np.zeros((pool, 4, 2))
        self.position = np.zeros((pool, 3))
        self.velocity = np.zeros((pool, 3))
        self.first = np.zeros(pool, np.int64)
        self.second = np.zeros(pool, np.int64)
        self.switch_at = np.zeros(pool, np.int64)
        self.length = np.zeros(pool, np.int64)
        self.step = np.zeros(pool, np.int64)
        self.noise = np.zeros((pool, 3))
        self.noise_scale = np.zeros(pool)
        self.delay = np.zeros(pool, np.int64)
        self.recent = np.zeros((pool, 4, 3))  # the expert's last targets, newest first
        self.image_valid = np.ones(pool, bool)
        self.visible = np.ones((pool, 4), bool)
        for i in range(pool):
            self._reset(i)
        # Spread the episodes over their lifetimes so the pool starts in steady state.
        for _ in range(_EPISODE_STEPS[1]):
            self._advance(stagger=True)

    def _layout_seed(self) -> int:
        self._episodes += 1
        if self._validation:
            return arm.VALIDATION_SEED_BASE + self._episodes
        return int(self.rng.integers(arm.TRAIN_SEEDS.start, arm.TRAIN_SEEDS.stop))

    def _command(self, allow_none: bool) -> int:
        draw = self.rng.random()
        for kind, p in _FIRST_COMMAND_P.items():
            if draw < p:
                if kind == "colour":
                    return int(self.rng.choice(arm.COLOUR_COMMANDS))
                if kind == "home":
                    return arm.COMMAND_HOME
                if kind == "stop":
                    return arm.COMMAND_STOP
                return int(self.rng.choice(_NON_ARM))
            draw -= p
        return arm.NO_COMMAND if allow_none else int(self.rng.choice(arm.COLOUR_COMMANDS))

    def _reset(self, i: int) -> None:
        rng = self.rng
        self.blocks[i] = arm.random_layout(self._layout_seed()).blocks
        if rng.random() < _START_ON_BLOCK_P:
            block = self.blocks[i, rng.integers(len(arm.BLOCK_COLOURS))]
            self.position[i] = arm.inverse_kinematics(block, rng.choice([-1.0, 1.0]))
        else:
            self.position[i] = arm.random_joints(rng)
        self.velocity[i] = 0.0
        self.first[i] = self._command(allow_none=True)
        self.second[i] = self._command(allow_none=False)
        switch = rng.random() < _SWITCH_P
        self.switch_at[i] = rng.integers(10, 100) if switch else 1 << 40
        self.length[i] = rng.integers(*_EPISODE_STEPS)
        self.step[i] = 0
        self.noise[i] = 0.0
        self.noise_scale[i] = 0.0 if rng.random() < 0.35 else rng.uniform(0.01, 0.08)
        self.delay[i] = rng.integers(0, 4)
        self.recent[i] = self.position[i]
        self.image_valid[i] = rng.random() >= _NO_IMAGE_P
        visible = np.zeros(4, bool)
        for command in (self.first[i], self.second[i]):
            if command in arm.COLOUR_COMMANDS:
                visible[arm.COLOUR_COMMANDS.index(int(command))] = True
        others = rng.permutation(np.flatnonzero(~visible))
        visible[others[: rng.integers(0, len(others) + 1)]] = True
        self.visible[i] = visible

    def latched(self) -> np.ndarray:
        return np.where(self.step >= self.switch_at, self.second, self.first)

    def _advance(self, stagger: bool = False) -> None:
        target = arm.expert_targets(self.position, self.blocks, self.latched(), self.image_valid)
        self.recent = np.concatenate([target[:, None], self.recent[:, :-1]], axis=1)
        executed = self.recent[np.arange(self.size), self.delay]
        # Correlated (Ornstein-Uhlenbeck) noise: a slow wander off the expert's path.
        self.noise = 0.9 * self.noise + math.sqrt(1 - 0.81) * self.rng.standard_normal(
            self.noise.shape)
        executed = executed + self.noise * self.noise_scale[:, None]
        self.position, self.velocity = arm.lag_step(self.position, executed)
        self.step += 1
        ended = self.step >= self.length
        if stagger:
            # Initial fill: restart some episodes early so their phases spread out.
            ended |= self.rng.random(self.size) < 1.0 / _EPISODE_STEPS[1]
        for i in np.flatnonzero(ended):
            self._reset(int(i))

    def batch(self, size: int, advance: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """`size` samples from distinct episodes -> (model feeds, target chunks [size, H, 3])."""
        for _ in range(advance):
            self._advance()
        rows = self.rng.choice(self.size, size, replace=False)
        command = self.latched()[rows]
        images = np.zeros((size, 3, 96, 96), np.float32)
        commands = np.zeros((size, len(COMMANDS)), np.float32)
        command_valid = np.zeros((size, 1), np.float32)
        for j, i in enumerate(rows):
            if self.image_valid[i]:
                frame = arm.render(self.blocks[i], self.position[i], self.visible[i])
                images[j] = image_tensor(frame, "rgb8")
            soft = (self.rng.uniform(0.0, 0.3) if self.rng.random() < _SOFT_COMMAND_P
                    else 0.0)
            code = None if command[j] == arm.NO_COMMAND else int(command[j])
            commands[j], command_valid[j, 0] = command_feed(code, self.rng, soft)
        joints = np.concatenate([self.position[rows], self.velocity[rows]], axis=1)
        labels = arm.expert_chunk(self.position[rows], self.blocks[rows], command,
                                  ACTION_HORIZON, self.image_valid[rows])
        feeds = {
            "image": images,
            "image_valid": self.image_valid[rows, None].astype(np.float32),
            "joints": joints.astype(np.float32),
            "command": commands,
            "command_valid": command_valid,
        }
        return feeds, labels.astype(np.float32)


def _tensors(feeds: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in feeds.items()}


def validation_loss(model: ActionModel, data: list[tuple[dict[str, np.ndarray], np.ndarray]]
                    ) -> float:
    """Mean absolute target error (rad) over the validation batches."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for feeds, labels in data:
            predicted = model(**_tensors(feeds))["actions"]
            total += float((predicted - torch.from_numpy(labels)).abs().sum())
            count += labels.size
    model.train()
    return total / count


def train(config: TrainConfig, log=write, checkpoint: Path | None = None
          ) -> tuple[ActionModel, dict[str, float]]:
    """Behaviour-clone the expert for `config.steps` steps -> (model, figures).

    With `checkpoint`, the weights are also saved there at every validation.
    """
    if config.steps < 1 or config.batch < 1 or config.batch > config.pool:
        raise ConfigError(f"train_action: need steps >= 1 and 1 <= batch <= pool, got {config}")
    torch.manual_seed(config.seed)
    model = ActionModel(seed=config.seed)
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)
    validation_source = BatchSource(config.seed, pool=config.pool, validation=True)
    per_batch = min(config.pool, config.validation_samples)
    validation = [validation_source.batch(per_batch, advance=40)
                  for _ in range(max(1, config.validation_samples // per_batch))]
    source = BatchSource(config.seed, config.pool)
    first_val = validation_loss(model, validation)
    log(f"step 0: validation L1 {first_val:.4f} rad")
    started = time.perf_counter()
    running, seen = 0.0, 0
    figures = {"initial_validation_l1": first_val}
    with progress(range(1, config.steps + 1), desc="train action", unit="step") as bar:
        for step in bar:
            feeds, labels = source.batch(config.batch, config.steps_per_batch)
            predicted = model(**_tensors(feeds))["actions"]
            loss = (predicted - torch.from_numpy(labels)).abs().mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            scheduler.step()
            running += loss.item()
            seen += 1
            if step == 1:
                figures["first_train_l1"] = loss.item()
            if step % config.log_every == 0 or step == config.steps:
                elapsed = time.perf_counter() - started
                log(f"step {step}/{config.steps}: train L1 {running / seen:.4f} rad, "
                    f"lr {scheduler.get_last_lr()[0]:.2e}, {elapsed:.0f} s")
                figures["train_l1"] = running / seen
                running, seen = 0.0, 0
            if step % config.validate_every == 0 and step != config.steps:
                log(f"step {step}: validation L1 {validation_loss(model, validation):.4f} rad")
                if checkpoint is not None:
                    torch.save(model.state_dict(), checkpoint)
    figures["validation_l1"] = validation_loss(model, validation)
    figures["train_s"] = time.perf_counter() - started
    log(f"final validation L1 {figures['validation_l1']:.4f} rad "
        f"({config.validation_samples} samples, held-out layouts), "
        f"{figures['train_s']:.0f} s")
    return model.eval(), figures


def export(model: ActionModel, out: Path, config: TrainConfig, figures: dict[str, float],
           command_line: str) -> str:
    """Write `out` (ONNX) and its `.pt` weights; returns the ONNX file's hash."""
    source = BatchSource(config.seed + 1, pool=8, validation=True)
    feeds, _ = source.batch(1, advance=1)
    preprocessing = _action_preprocessing()
    preprocessing["command"] = {
        "source": "the latched command: one-hot over `commands` (a softmax posterior also "
                  "works, trained with its argmax kept); command_valid 0 until one is heard",
    }
    image = dict(cast(dict[str, object], preprocessing["image"]))
    image["scene"] = f"drivers.sim.arm.render: {arm.RENDER_WIDTH}x{arm.RENDER_HEIGHT} top-down view"
    preprocessing["image"] = image
    training = (
        f"behaviour cloning of drivers.sim.arm's scripted expert: `{command_line}`; "
        f"{config.steps} steps x batch {config.batch} = {config.steps * config.batch} samples "
        f"generated on the fly (seed {config.seed}, training layouts from seeds below "
        f"{arm.TRAIN_SEEDS.stop}); L1 on joint targets, AdamW lr {config.lr}, cosine; "
        f"validation L1 {figures['validation_l1']:.4f} rad on held-out layouts"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out.with_suffix(".pt"))
    return export_onnx(
        model, feeds, out, name="action", version=f"1+bc.seed{config.seed}.steps{config.steps}",
        metadata={"commands": json.dumps(COMMANDS), "preprocessing": json.dumps(preprocessing),
                  "training": training},
        init_kwargs={"seed": config.seed},
    )


def main(argv: list[str] | None = None) -> None:
    """Train the action model on the scripted expert and export it."""
    parser = argparse.ArgumentParser(prog="python -m training.train_action",
                                     description=main.__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output .onnx file")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true",
                        help="smoke training: 300 steps of batch 16 (CI)")
    parser.add_argument("--checkpoint", type=Path,
                        help="also save the weights here at every validation")
    args = parser.parse_args(argv)
    refuse_to_overwrite(parser, args.out, args.force)
    torch.set_num_threads(1)  # the other core trains the speech model
    if args.tiny:
        config = TrainConfig(steps=300, batch=16, seed=args.seed, pool=64, warmup=30,
                             validation_samples=256, log_every=50, validate_every=10**9)
    else:
        config = TrainConfig(steps=args.steps, seed=args.seed)
    # The command that reproduces these weights (a checkpoint path does not change them).
    command_line = (f"python -m training.train_action --out {args.out}"
                    + (" --tiny" if args.tiny else f" --steps {config.steps}")
                    + f" --seed {config.seed}")
    with stop_on_interrupt(parser.prog, args.out):
        model, figures = train(config, checkpoint=args.checkpoint)
        model_hash = export(model, args.out, config, figures, command_line)
    print(f"{args.out}: hash {model_hash}, validation L1 {figures['validation_l1']:.4f} rad")


if __name__ == "__main__":
    main()
