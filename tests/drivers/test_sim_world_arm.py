"""The arm simulator, its scripted expert, behaviour-cloning training and the shipped action
model in closed loop (drivers.sim.arm, training.train_action, training.eval_action)."""

import math
from collections.abc import Callable

import numpy as np
import pytest

from drivers.sim import arm
from engines.vocabulary import COMMANDS
from fusion_node.errors import ConfigError
from fusion_node.node import model_path
from training.eval_action import (
    command_feed,
    evaluate_true_commands,
    run_episode,
)
from training.stats import wilson


def _layouts(seeds) -> np.ndarray:
    return np.stack([arm.random_layout(int(s)).blocks for s in seeds])


def test_joint_limits_and_speed_cap() -> None:
    sim = arm.ArmSim(arm.random_layout(0), np.zeros(3))
    far = arm.JOINT_UPPER + 5.0
    previous = sim.position.copy()
    for _ in range(150):
        sim.step(far)
        moved = np.abs(sim.position - previous)
        assert np.all(moved <= arm.MAX_JOINT_SPEED * arm.STEP_S + 1e-12)
        np.testing.assert_allclose(sim.velocity, (sim.position - previous) / arm.STEP_S)
        previous = sim.position.copy()
    np.testing.assert_allclose(sim.position, arm.JOINT_UPPER)
    for _ in range(200):
        sim.step(arm.JOINT_LOWER - 5.0)
    np.testing.assert_allclose(sim.position, arm.JOINT_LOWER)
    np.testing.assert_allclose(sim.velocity, 0.0, atol=1e-9)


def test_first_order_lag_time_constant() -> None:
    start = np.array([1.0, 0.5, -0.5])
    sim = arm.ArmSim(arm.random_layout(0), start)
    target = start + 0.05  # small enough that the speed cap never binds
    steps = round(arm.LAG_TAU_S / arm.STEP_S)
    for _ in range(steps):
        sim.step(target)
    # After one time constant, 1/e of a step change remains.
    np.testing.assert_allclose(target - sim.position, 0.05 * math.exp(-1.0), rtol=1e-9)


def test_bad_targets_are_rejected() -> None:
    sim = arm.ArmSim(arm.random_layout(0))
    with pytest.raises(ConfigError, match="3 finite angles"):
        sim.step(np.array([0.0, np.nan, 0.0]))
    with pytest.raises(ConfigError, match="3 finite angles"):
        sim.step(np.zeros(2))
    with pytest.raises(ConfigError, match="unknown block colour"):
        sim.distance_to("purple")


def test_layouts_are_seeded_reachable_and_apart() -> None:
    for seed in range(200):
        blocks = arm.random_layout(seed).blocks
        np.testing.assert_array_equal(blocks, arm.random_layout(seed).blocks)
        gaps = np.linalg.norm(blocks[:, None] - blocks[None], axis=-1)[np.triu_indices(4, 1)]
        assert gaps.min() >= arm.BLOCK_MIN_GAP_M
        for sign in (1.0, -1.0):
            joints = arm.inverse_kinematics(blocks, np.full(4, sign))
            assert np.all(joints >= arm.JOINT_LOWER) and np.all(joints <= arm.JOINT_UPPER)
            np.testing.assert_allclose(arm.end_effector(joints), blocks, atol=1e-9)
    assert not np.array_equal(arm.random_layout(1).blocks, arm.random_layout(2).blocks)


def test_render_is_deterministic_and_shows_the_scene() -> None:
    layout = arm.random_layout(7)
    joints = np.array([0.3, 1.2, -0.4])
    image = arm.ArmSim(layout, joints).render()
    assert image.shape == (arm.RENDER_HEIGHT, arm.RENDER_WIDTH, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, arm.render(layout.blocks, joints))
    assert not np.array_equal(image, arm.render(layout.blocks, joints + 0.1))
    home = arm.render(layout.blocks, arm.HOME)  # folded away from every block
    for colour, centre in zip(arm.BLOCK_COLOURS, layout.blocks, strict=True):
        col = round((centre[0] + 0.5) * arm.PIXELS_PER_M)
        row = round((0.525 - centre[1]) * arm.PIXELS_PER_M)
        assert tuple(home[row, col]) == arm.BLOCK_RGB[colour]
    only_red = arm.render(layout.blocks, arm.HOME, np.array([True, False, False, False]))
    changed = np.any(only_red != home, axis=-1)
    assert changed.any() and not np.any(only_red[changed] == arm.BLOCK_RGB["red"])


def test_expert_reaches_every_colour() -> None:
    rng = np.random.default_rng(0)
    count = 800
    blocks = _layouts(arm.EVALUATION_SEED_BASE + np.arange(count))
    joints = arm.random_joints(rng, count)
    colour = np.arange(count) % 4
    command = np.array(arm.COLOUR_COMMANDS)[colour]
    reached = np.zeros(count, bool)
    for _ in range(round(4.0 / arm.STEP_S)):
        joints, _ = arm.lag_step(joints, arm.expert_targets(joints, blocks, command))
        distance = np.linalg.norm(arm.end_effector(joints) - blocks[np.arange(count), colour],
                                  axis=-1)
        reached |= distance <= arm.REACH_TOLERANCE_M
    assert reached.mean() >= 0.99
    for c in range(4):
        assert reached[colour == c].mean() >= 0.99


def test_expert_holds_and_goes_home() -> None:
    layout = arm.random_layout(3)
    sim = arm.ArmSim(layout, np.array([0.4, -1.0, 0.8]))
    for command in (None, arm.COMMAND_STOP, COMMANDS.index("wait"), COMMANDS.index("none")):
        np.testing.assert_array_equal(sim.expert_target(command), sim.position)
    for _ in range(200):
        sim.step(sim.expert_target(arm.COMMAND_HOME))
    np.testing.assert_allclose(sim.position, arm.HOME, atol=1e-6)
    # A colour command moves at most EXPERT_SPEED (after the lag) and ends at that block.
    for _ in range(200):
        sim.step(sim.expert_target(COMMANDS.index("blue")))
        assert np.abs(sim.velocity).max() <= arm.EXPERT_SPEED + 1e-9
    assert sim.distance_to("blue") < 1e-6


def test_command_feed() -> None:
    vector, valid = command_feed(None)
    assert valid == 0.0 and not vector.any()
    vector, valid = command_feed(COMMANDS.index("red"))
    assert valid == 1.0 and vector[COMMANDS.index("red")] == 1.0 and vector.sum() == 1.0
    soft, _ = command_feed(3, np.random.default_rng(0), soft=0.45)
    assert soft.argmax() == 3 and soft.sum() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ConfigError, match="command index 17"):
        command_feed(17)


def test_wilson_interval() -> None:
    low, high = wilson(5, 10)
    assert (low, high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson(0, 10)[0] == 0.0
    assert wilson(10, 10)[1] == pytest.approx(1.0)


def _always(command: int | None) -> Callable[[int], int | None]:
    return lambda step: command


class _ExpertEngine:
    """The scripted expert behind the engine interface: its chunk, from the joints fed."""

    name = "expert"
    model_hash = "expert"

    def __init__(self, layout_seed: int) -> None:
        self._blocks = arm.random_layout(layout_seed).blocks[None]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        joints = feeds["joints"][:, :3].astype(np.float64)
        valid = feeds["command_valid"][0, 0] > 0
        command = int(feeds["command"][0].argmax()) if valid else arm.NO_COMMAND
        chunk = arm.expert_chunk(joints, self._blocks, np.array([command]), 20)
        return {"actions": chunk.astype(np.float32)}


def test_closed_loop_with_latency_and_ensembling_lets_the_expert_reach() -> None:
    for i in range(8):
        seed = arm.EVALUATION_SEED_BASE + i
        colour = arm.BLOCK_COLOURS[i % 4]
        result = run_episode(_ExpertEngine(seed), seed, _always(arm.COLOUR_COMMANDS[i % 4]))
        assert result.reached(colour)
        assert result.settled_at == colour  # it may pass over other blocks on the way
        assert result.moved
    still = run_episode(_ExpertEngine(5), 5, _always(None), duration_s=1.0)
    assert not still.moved and still.first_reached is None and still.settled_at is None


def test_tiny_training_lowers_the_loss() -> None:
    torch = pytest.importorskip("torch")
    from training.train_action import TrainConfig, train

    config = TrainConfig(steps=40, batch=8, pool=16, warmup=5, validation_samples=64,
                         log_every=1000, validate_every=1000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the training command does: the cores are shared
    try:
        _, figures = train(config, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    assert figures["validation_l1"] < 0.8 * figures["initial_validation_l1"]


def test_shipped_action_model_reaches_in_closed_loop() -> None:
    figures = evaluate_true_commands(model_path("action"), episodes=20, seed=1)
    assert figures["colour"]["rate"] >= 0.8
    assert figures["home"]["rate"] >= 0.8
    assert figures["no_command"]["moved"]["rate"] <= 0.2
