"""Closed-loop evaluation of the action model on the arm simulator, timed as in the node.

    python -m training.eval_action --model engines/models/action.onnx [--episodes 200] [--json]

An episode emulates the node's pipeline: every 40 ms (the node's 25 Hz action tick) the scene
at time t is rendered and the joint state read, the ONNX model runs through OnnxRuntimeEngine,
and its chunk (targets for t+20 ms .. t+400 ms) becomes usable 30 ms after t (the chunk's
publication latency). At every 20 ms simulator step the arm is commanded
`ActionFollower.action_at(step time)`, the client library's temporal ensembling, or the last
target while no chunk covers that time. The command is whatever `command_at(step)` says is
latched at that step, so a caller can feed commands that a speech model produced late.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from drivers.sim import arm
from engines.preprocess import image_tensor
from engines.vocabulary import COMMANDS
from fusion_node.client import ActionFollower
from fusion_node.errors import ConfigError
from fusion_node.progress import progress
from fusion_node.protocol import Prediction
from training.stats import wilson

__all__ = [
    "EpisodeResult",
    "Policy",
    "action_feeds",
    "command_feed",
    "evaluate_true_commands",
    "run_episode",
]

STEP_NS = int(arm.STEP_S * 1e9)
TICK_STEPS = 2  # one observation every 40 ms
LATENCY_NS = 30_000_000
EPISODE_S = 4.0
STOP_SETTLE_S = 0.5  # after `stop`, the arm may take this long to come to rest


class Policy(Protocol):
    """What an episode needs of an engine (any `engines.base.Engine` is one)."""

    name: str
    model_hash: str

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The action model's outputs (`actions` [1, horizon, 3]) for its feeds."""
        ...


def command_feed(command: int | None, rng: np.random.Generator | None = None,
                 soft: float = 0.0) -> tuple[np.ndarray, float]:
    """The `command` and `command_valid` feeds for a latched command index (None: none yet).

    One-hot; with `soft` > 0 a posterior-like vector that keeps `command` as its argmax:
    (1 - soft) of the mass on it, the rest spread by a Dirichlet draw from `rng`.
    """
    vector = np.zeros(len(COMMANDS), np.float32)
    if command is None:
        return vector, 0.0
    if not 0 <= command < len(COMMANDS):
        raise ConfigError(f"action feeds: command index {command} outside 0..{len(COMMANDS) - 1}")
    vector[command] = 1.0
    if soft > 0.0:
        if rng is None:
            raise ConfigError("action feeds: a soft command needs an rng")
        spread = rng.dirichlet(np.full(len(COMMANDS), 0.5))
        return ((1.0 - soft) * vector + soft * spread).astype(np.float32), 1.0
    return vector, 1.0


def action_feeds(sim: arm.ArmSim, command: int | None) -> dict[str, np.ndarray]:
    """The action model's feeds for the simulator's current state and a latched command."""
    vector, valid = command_feed(command)
    return {
        "image": image_tensor(sim.render(), "rgb8")[None],
        "image_valid": np.ones((1, 1), np.float32),
        "joints": sim.joint_state()[None],
        "command": vector[None],
        "command_valid": np.array([[valid]], np.float32),
    }


@dataclass
class EpisodeResult:
    """What one closed-loop episode did. Times are seconds from the episode's start."""

    layout_seed: int
    final_distances_m: np.ndarray  # end effector to each block, BLOCK_COLOURS order
    min_distances_m: np.ndarray
    reach_time_s: list[float | None]  # first time within REACH_TOLERANCE_M of each block
    first_reached: str | None  # the first block come within reach of (passing over counts)
    settled_at: str | None  # the block within reach at the episode's end, if any
    moved: bool  # the end effector went more than REACH_TOLERANCE_M from its start
    effector_path_m: np.ndarray = field(repr=False)  # [steps + 1, 2]
    final_joints: np.ndarray = field(repr=False)

    def reached(self, colour: str, within_s: float = EPISODE_S) -> bool:
        time_s = self.reach_time_s[arm.colour_index(colour)]
        return time_s is not None and time_s <= within_s


def start_joints(layout_seed: int) -> np.ndarray:
    """The episode's random start pose, deterministic from its layout seed."""
    return arm.random_joints(np.random.default_rng([layout_seed, 0x73746172]))


def run_episode(engine: Policy, layout_seed: int, command_at: Callable[[int], int | None],
                duration_s: float = EPISODE_S, joints: np.ndarray | None = None) -> EpisodeResult:
    """One closed-loop episode on layout `layout_seed` (see the module docstring).

    `command_at(step)` is the latched command index at simulator step `step` (20 ms each), or
    None while none has been heard. The arm starts at `joints` (default: `start_joints`).
    """
    if duration_s <= 0:
        raise ConfigError(f"action episode: duration_s must be > 0, got {duration_s}")
    sim = arm.ArmSim(arm.random_layout(layout_seed),
                     start_joints(layout_seed) if joints is None else joints)
    follower = ActionFollower()
    pending: list[tuple[int, Prediction]] = []
    hold = sim.position.copy()
    steps = round(duration_s / arm.STEP_S)
    path = np.empty((steps + 1, 2))
    path[0] = sim.end_effector()
    for step in range(steps):
        t_ns = step * STEP_NS
        if step % TICK_STEPS == 0:
            actions = engine.infer(action_feeds(sim, command_at(step)))["actions"][0]
            offsets = STEP_NS * np.arange(1, len(actions) + 1, dtype=np.int64)
            pending.append((t_ns + LATENCY_NS, Prediction(
                stream="pred.action", seq=step // TICK_STEPS, t_ref_ns=t_ns,
                deadline_ns=t_ns + LATENCY_NS, engine=engine.name,
                model_hash=engine.model_hash, mask={}, fields={},
                arrays={"actions": actions, "step_times_ns": t_ns + offsets}, trace={})))
        while pending and pending[0][0] <= t_ns:
            follower.add(pending.pop(0)[1])
        target = follower.action_at(t_ns)
        if target is not None:
            hold = target
        sim.step(hold)
        path[step + 1] = sim.end_effector()
    blocks = sim.layout.blocks
    distances = np.linalg.norm(path[:, None, :] - blocks[None], axis=-1)  # [steps + 1, 4]
    within = distances <= arm.REACH_TOLERANCE_M
    reach_steps = [int(np.argmax(within[:, c])) if within[:, c].any() else None
                   for c in range(len(arm.BLOCK_COLOURS))]
    reached = [(s, c) for c, s in enumerate(reach_steps) if s is not None]
    return EpisodeResult(
        layout_seed=layout_seed,
        final_distances_m=distances[-1],
        min_distances_m=distances.min(axis=0),
        reach_time_s=[None if s is None else s * arm.STEP_S for s in reach_steps],
        first_reached=arm.BLOCK_COLOURS[min(reached)[1]] if reached else None,
        settled_at=(arm.BLOCK_COLOURS[int(np.argmin(distances[-1]))]
                    if within[-1].any() else None),
        moved=bool(np.linalg.norm(path - path[0], axis=-1).max() > arm.REACH_TOLERANCE_M),
        effector_path_m=path,
        final_joints=sim.position.copy(),
    )


def _rate(successes: int, trials: int) -> dict[str, Any]:
    low, high = wilson(successes, trials)
    return {"rate": successes / trials, "ci95": [low, high], "n": trials}


def _constant(command: int | None) -> Callable[[int], int | None]:
    return lambda step: command


def evaluate_true_commands(model_path: str | Path, episodes: int = 200, seed: int = 0,
                           engine: Policy | None = None) -> dict[str, Any]:
    """Closed-loop figures with the true command given at t = 0, on held-out layouts.

    - colour: `episodes` episodes, the colours in turn: success = the end effector within
      2 cm of the named block within 4 s (Wilson 95% interval), mean time to reach, and how
      often the hand ended the episode at another block;
    - home: episodes // 4 episodes: the end effector within 2 cm of HOME's within 4 s;
    - stop: episodes // 4 episodes: a colour command, then `stop` 0.5–1 s later: the distance
      the hand travels in the STOP_SETTLE_S after it, and its drift (largest distance from
      where it was STOP_SETTLE_S after `stop`) over the 2 s that follow;
    - none: episodes // 4 episodes with no command: how often the arm moved more than 2 cm.
    """
    if episodes < 4:
        raise ConfigError(f"evaluate_true_commands: episodes must be >= 4, got {episodes}")
    if engine is None:
        from engines.onnxruntime_backend import OnnxRuntimeEngine

        engine = OnnxRuntimeEngine(model_path)
    return _evaluate(engine, str(model_path), episodes, seed)


def _evaluate(engine: Policy, model_path: str, episodes: int, seed: int) -> dict[str, Any]:
    base = arm.EVALUATION_SEED_BASE + seed * 100_000
    extra = episodes // 4
    with progress(desc="eval action: true command", total=episodes + 3 * extra,
                  unit="episode") as bar:
        successes, wrong_block = 0, 0
        times: list[float] = []
        per_colour = {c: [0, 0] for c in arm.BLOCK_COLOURS}
        final_errors = []
        for i in range(episodes):
            colour = arm.BLOCK_COLOURS[i % len(arm.BLOCK_COLOURS)]
            command = arm.COLOUR_COMMANDS[i % len(arm.BLOCK_COLOURS)]
            result = run_episode(engine, base + i, _constant(command))
            ok = result.reached(colour)
            successes += ok
            per_colour[colour][0] += ok
            per_colour[colour][1] += 1
            final_errors.append(result.final_distances_m[arm.colour_index(colour)])
            reach_time = result.reach_time_s[arm.colour_index(colour)]
            if ok and reach_time is not None:
                times.append(reach_time)
            if result.settled_at not in (None, colour):
                wrong_block += 1
            bar.update()

        home_effector = arm.end_effector(arm.HOME)
        home_ok = 0
        for i in range(extra):
            result = run_episode(engine, base + 10_000 + i, _constant(arm.COMMAND_HOME))
            home_ok += bool((np.linalg.norm(result.effector_path_m - home_effector, axis=-1)
                             <= arm.REACH_TOLERANCE_M).any())
            bar.update()

        stop_rng = np.random.default_rng([seed, 0x73746F70])
        travel, drift = [], []
        settle = round(STOP_SETTLE_S / arm.STEP_S)
        for i in range(extra):
            stop_step = int(stop_rng.integers(25, 51))
            colour_command = arm.COLOUR_COMMANDS[i % len(arm.BLOCK_COLOURS)]

            def stop_after(step: int, at: int = stop_step, go: int = colour_command) -> int:
                return go if step < at else arm.COMMAND_STOP

            duration = (stop_step + settle) * arm.STEP_S + 2.0
            result = run_episode(engine, base + 20_000 + i, stop_after, duration_s=duration)
            path = result.effector_path_m
            rest = path[stop_step + settle]
            travel.append(float(np.linalg.norm(rest - path[stop_step])))
            drift.append(float(np.linalg.norm(path[stop_step + settle:] - rest, axis=-1).max()))
            bar.update()

        moved = 0
        for i in range(extra):
            moved += run_episode(engine, base + 30_000 + i, _constant(None)).moved
            bar.update()
    return {
        "model": model_path,
        "model_hash": engine.model_hash,
        "episodes": episodes,
        "seed": seed,
        "timing": {"step_ms": arm.STEP_S * 1e3, "tick_ms": TICK_STEPS * arm.STEP_S * 1e3,
                   "latency_ms": LATENCY_NS / 1e6, "episode_s": EPISODE_S},
        "colour": {
            **_rate(successes, episodes),
            "per_colour": {c: _rate(*v) for c, v in per_colour.items()},
            "mean_time_to_reach_s": float(np.mean(times)) if times else None,
            "ended_at_another_block": _rate(wrong_block, episodes),
            "median_final_error_m": float(np.median(final_errors)),
        },
        "home": _rate(home_ok, extra),
        "stop": {"n": extra, "mean_travel_after_stop_m": float(np.mean(travel)),
                 "mean_hold_drift_m": float(np.mean(drift)),
                 "max_hold_drift_m": float(np.max(drift))},
        "no_command": {"moved": _rate(moved, extra)},
    }


def main(argv: list[str] | None = None) -> None:
    """Closed-loop evaluation of an action model with the true commands."""
    parser = argparse.ArgumentParser(prog="python -m training.eval_action",
                                     description=main.__doc__)
    parser.add_argument("--model", type=Path, default=Path("engines/models/action.onnx"))
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    figures = evaluate_true_commands(args.model, args.episodes, args.seed)
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    colour = figures["colour"]
    low, high = colour["ci95"]
    print(f"colour commands: {colour['rate']:.1%} reached within 4 s "
          f"(95% CI {low:.1%}-{high:.1%}, n={colour['n']}), "
          f"mean time {colour['mean_time_to_reach_s']} s")
    print(f"home: {figures['home']['rate']:.1%}  stop: travel "
          f"{figures['stop']['mean_travel_after_stop_m'] * 100:.1f} cm, drift "
          f"{figures['stop']['mean_hold_drift_m'] * 100:.2f} cm  no command: moved "
          f"{figures['no_command']['moved']['rate']:.1%}")


if __name__ == "__main__":
    main()
