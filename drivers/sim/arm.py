"""A planar 3-joint arm on a table with four coloured blocks, and a scripted expert for it.

The world of the action model (numpy and OpenCV only, no torch). The arm's base sits at the
middle of the table's near edge (x = 0, y = 0, metres; y points away from the base); its
joints `shoulder`, `elbow`, `wrist` turn links of 0.20, 0.15 and 0.10 m. The simulator runs at
50 Hz (one step = ACTION_STEP_MS): each joint follows its commanded target with a first-order
lag (time constant 60 ms) capped at a maximum joint speed, inside joint limits. Four blocks,
one per colour word of the command vocabulary, lie at random reachable, non-overlapping
places drawn from a layout seed. `ArmSim.render` draws the scene seen from above.

`expert_targets` is the scripted expert: a colour command drives the end effector to that
block (analytic inverse kinematics, the elbow solution on the current elbow's side, joint
motion along a straight line in joint space at a bounded speed); `home` returns to HOME;
`stop`, every other command and "no command yet" hold the current pose. Its targets depend
only on the joint positions, the layout and the command, so the action model can learn them
from one observation. Everything here is vectorised over a leading batch axis for training.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import cv2
import numpy as np

from engines.vocabulary import COMMANDS
from fusion_node.errors import ConfigError

JOINT_NAMES: tuple[str, ...] = ("shoulder", "elbow", "wrist")
LINK_LENGTHS_M = np.array([0.20, 0.15, 0.10])
STEP_S = 0.02  # 50 Hz: one step per action-chunk entry (ACTION_STEP_MS)
LAG_TAU_S = 0.06
MAX_JOINT_SPEED = np.array([2.5, 3.0, 4.0])  # rad/s
JOINT_LOWER = np.array([-1.0, -2.6, -2.6])  # rad
JOINT_UPPER = np.array([math.pi + 1.0, 2.6, 2.6])
HOME = np.array([math.pi / 2, 2.4, 2.3])  # folded near the base, clear of every block
# The expert's joint-space speed (rad/s, the fastest joint): well below MAX_JOINT_SPEED so the
# lag, not the cap, shapes its motion.
EXPERT_SPEED = 1.5

BLOCK_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
BLOCK_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 205, 20),
}
BLOCK_SIZE_M = 0.045
# Blocks lie on an annular sector in front of the base where the expert's radial reach stays
# inside the joint limits with either elbow sign.
BLOCK_RADIUS_M = (0.24, 0.42)
BLOCK_ANGLE_RAD = (math.radians(20), math.radians(160))
BLOCK_MIN_GAP_M = 0.09
REACH_TOLERANCE_M = 0.02  # "reached" = end effector within 2 cm of the block's centre

# Layout seeds: training draws from [0, 1e9); validation and evaluation use disjoint ranges.
TRAIN_SEEDS = range(1_000_000_000)
VALIDATION_SEED_BASE = 1_000_000_000
EVALUATION_SEED_BASE = 1_500_000_000

# Top-down view: x in [-0.5, 0.5] m, y in [-0.1, 0.525] m at 192 px per metre.
RENDER_WIDTH = 192
RENDER_HEIGHT = 120
PIXELS_PER_M = 192.0
_VIEW_X0_M = -0.5
_VIEW_Y1_M = 0.525
_SHIFT = 4  # OpenCV fixed-point bits: sub-pixel, anti-aliased geometry
_TABLE_RGB = (200, 190, 170)
_ARM_RGB = (70, 70, 80)
_EFFECTOR_RGB = (255, 255, 255)

COMMAND_HOME = COMMANDS.index("home")
COMMAND_STOP = COMMANDS.index("stop")
COLOUR_COMMANDS: tuple[int, ...] = tuple(COMMANDS.index(c) for c in BLOCK_COLOURS)
NO_COMMAND = -1  # "no command heard yet" in integer command arrays

_ALPHA = 1.0 - math.exp(-STEP_S / LAG_TAU_S)  # the lag's exact per-step fraction
# The expert's lead (target minus position) that moves a joint at EXPERT_SPEED through the lag.
_LEAD_MAX = EXPERT_SPEED * STEP_S / _ALPHA


@dataclass(frozen=True)
class Layout:
    """Block centres (metres, [4, 2], in BLOCK_COLOURS order) and the seed they came from."""

    blocks: np.ndarray
    seed: int

    def block(self, colour: str) -> np.ndarray:
        return self.blocks[colour_index(colour)]


def colour_index(colour: str) -> int:
    if colour not in BLOCK_COLOURS:
        raise ConfigError(f"arm: unknown block colour {colour!r}; expected one of {BLOCK_COLOURS}")
    return BLOCK_COLOURS.index(colour)


def random_layout(seed: int) -> Layout:
    """Four non-overlapping reachable blocks, deterministic from `seed`."""
    if seed < 0:
        raise ConfigError(f"arm: layout seed must be >= 0, got {seed}")
    rng = np.random.default_rng([seed, 0x6C61796F])
    blocks: list[np.ndarray] = []
    while len(blocks) < len(BLOCK_COLOURS):
        # Uniform over the sector's area: radius by the square root of a uniform draw.
        r2 = rng.uniform(BLOCK_RADIUS_M[0] ** 2, BLOCK_RADIUS_M[1] ** 2)
        angle = rng.uniform(*BLOCK_ANGLE_RAD)
        point = math.sqrt(r2) * np.array([math.cos(angle), math.sin(angle)])
        if all(np.linalg.norm(point - b) >= BLOCK_MIN_GAP_M for b in blocks):
            blocks.append(point)
    return Layout(np.stack(blocks), seed)


def random_joints(rng: np.random.Generator, count: int | None = None) -> np.ndarray:
    """Random start poses inside the joint limits, a margin away from them."""
    shape = (3,) if count is None else (count, 3)
    margin = 0.2
    return rng.uniform(JOINT_LOWER + margin, JOINT_UPPER - margin, size=shape)


def forward_kinematics(joints: np.ndarray) -> np.ndarray:
    """Joint positions [..., 3] -> base, elbow, wrist and end-effector points [..., 4, 2] (m)."""
    angles = np.cumsum(joints, axis=-1)
    steps = LINK_LENGTHS_M[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    points = np.cumsum(steps, axis=-2)
    base = np.zeros(points.shape[:-2] + (1, 2))
    return np.concatenate([base, points], axis=-2)


def end_effector(joints: np.ndarray) -> np.ndarray:
    """Joint positions [..., 3] -> end-effector position [..., 2] (m)."""
    return forward_kinematics(joints)[..., 3, :]


def inverse_kinematics(points: np.ndarray, elbow_sign: np.ndarray) -> np.ndarray:
    """End-effector points [..., 2] -> joints [..., 3] reaching them radially.

    The last link points away from the base (the hand approaches along the ray from the
    base), which fixes the arm's one redundant degree of freedom; `elbow_sign` (+1 or -1)
    picks the elbow solution. Points out of reach give the nearest stretched or folded pose.
    """
    points = np.asarray(points, np.float64)
    l1, l2, l3 = LINK_LENGTHS_M
    heading = np.arctan2(points[..., 1], points[..., 0])
    wrist_reach = np.linalg.norm(points, axis=-1) - l3
    cos_elbow = (wrist_reach**2 - l1**2 - l2**2) / (2 * l1 * l2)
    elbow = np.sign(elbow_sign) * np.arccos(np.clip(cos_elbow, -1.0, 1.0))
    shoulder = heading - np.arctan2(l2 * np.sin(elbow), l1 + l2 * np.cos(elbow))
    wrist = heading - shoulder - elbow
    return np.stack([shoulder, elbow, wrist], axis=-1)


def lag_step(
    position: np.ndarray, target: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One 20 ms step of every joint toward `target` -> (new position, velocity rad/s).

    First-order lag (tau = LAG_TAU_S, exact for a target held over the step), each joint's
    motion capped at MAX_JOINT_SPEED, the result clamped to the joint limits.
    """
    target = np.clip(target, JOINT_LOWER, JOINT_UPPER)
    cap = MAX_JOINT_SPEED * STEP_S
    moved = np.clip(_ALPHA * (target - position), -cap, cap)
    new_position = np.clip(position + moved, JOINT_LOWER, JOINT_UPPER)
    return new_position, (new_position - position) / STEP_S


def expert_targets(
    joints: np.ndarray, blocks: np.ndarray, command: np.ndarray, image_valid: np.ndarray | None = None
) -> np.ndarray:
    """The scripted expert's next joint targets [N, 3] for arms at `joints` [N, 3].

    `blocks` [N, 4, 2] are each arm's block centres, `command` [N] the latched command index
    (NO_COMMAND before one was heard). A colour command moves toward the inverse-kinematics
    pose of that block with the current elbow sign (the nearest of the two solutions, and the
    arm never swings through the singular straight pose); `home` toward HOME; anything else
    holds. Moves follow a straight line in joint space, the lead over the current position
    limited so the fastest joint moves at EXPERT_SPEED. Where `image_valid` is False the
    blocks cannot be seen and colour commands hold too.
    """
    joints = np.asarray(joints, np.float64)
    command = np.asarray(command)
    goal = joints.copy()
    colour = command - COLOUR_COMMANDS[0]  # the colours are consecutive in COMMANDS
    reaching = (colour >= 0) & (colour < len(BLOCK_COLOURS))
    if image_valid is not None:
        reaching &= np.asarray(image_valid, bool)
    if reaching.any():
        rows = np.flatnonzero(reaching)
        points = blocks[rows, colour[rows]]
        sign = np.where(joints[rows, 1] >= 0.0, 1.0, -1.0)
        goal[rows] = inverse_kinematics(points, sign)
    goal[command == COMMAND_HOME] = HOME
    delta = goal - joints
    largest = np.abs(delta).max(axis=-1, keepdims=True)
    scale = np.minimum(1.0, _LEAD_MAX / np.maximum(largest, 1e-12))
    return np.clip(joints + delta * scale, JOINT_LOWER, JOINT_UPPER)


def expert_chunk(
    joints: np.ndarray, blocks: np.ndarray, command: np.ndarray, horizon: int,
    image_valid: np.ndarray | None = None,
) -> np.ndarray:
    """The expert's targets for the next `horizon` steps [N, horizon, 3], rolled forward
    through the simulator from `joints` [N, 3]: entry k is the target it commands k steps
    (k * 20 ms) from now, after its own earlier targets moved the arm."""
    position = np.asarray(joints, np.float64)
    chunk = np.empty(position.shape[:1] + (horizon, 3))
    position, _ = lag_step(position, expert_targets(position, blocks, command, image_valid))
    for k in range(horizon):
        target = expert_targets(position, blocks, command, image_valid)
        chunk[:, k] = target
        position, _ = lag_step(position, target)
    return chunk


class ArmSim:
    """One arm on one block layout: `step(target)` advances 20 ms; `render()` draws it."""

    def __init__(self, layout: Layout, joints: np.ndarray | None = None) -> None:
        self.layout = layout
        start = HOME if joints is None else np.asarray(joints, np.float64)
        if start.shape != (3,) or not np.all(np.isfinite(start)):
            raise ConfigError(f"arm: start joints must be 3 finite angles, got {start!r}")
        self.position = np.clip(start, JOINT_LOWER, JOINT_UPPER)
        self.velocity = np.zeros(3)
        self.steps = 0

    @property
    def time_s(self) -> float:
        return self.steps * STEP_S

    def step(self, target: np.ndarray) -> None:
        """Command joint `target` (rad, clamped to the limits) for one 20 ms step."""
        target = np.asarray(target, np.float64)
        if target.shape != (3,) or not np.all(np.isfinite(target)):
            raise ConfigError(f"arm: a joint target must be 3 finite angles, got {target!r}")
        self.position, self.velocity = lag_step(self.position, target)
        self.steps += 1

    def joint_state(self) -> np.ndarray:
        """Positions (rad) then velocities (rad/s), float32 [6]: the action model's `joints`."""
        return np.concatenate([self.position, self.velocity]).astype(np.float32)

    def end_effector(self) -> np.ndarray:
        return end_effector(self.position)

    def distance_to(self, colour: str) -> float:
        """End effector to the centre of the `colour` block (m)."""
        return float(np.linalg.norm(self.end_effector() - self.layout.block(colour)))

    def distances(self) -> np.ndarray:
        """End effector to every block centre (m), [4] in BLOCK_COLOURS order."""
        return np.linalg.norm(self.layout.blocks - self.end_effector(), axis=-1)

    def expert_target(self, command: int | None) -> np.ndarray:
        """The scripted expert's next target for latched `command` (None: none heard yet)."""
        code = NO_COMMAND if command is None else command
        return expert_targets(self.position[None], self.layout.blocks[None],
                              np.array([code]))[0]

    def render(self) -> np.ndarray:
        """The scene from above: RGB uint8 [RENDER_HEIGHT, RENDER_WIDTH, 3]."""
        return render(self.layout.blocks, self.position)


def render(blocks: np.ndarray, joints: np.ndarray, visible: np.ndarray | None = None
           ) -> np.ndarray:
    """Table, blocks [4, 2] (those `visible`, default all) and the arm at `joints` from above,
    RGB uint8 [H, W, 3].

    Blocks are drawn first and the arm over them with thin links and a hollow end-effector
    ring, so a block under the hand stays visible. Geometry is anti-aliased at sub-pixel
    precision: a block's drawn position moves smoothly with its true position.
    """
    image = np.empty((RENDER_HEIGHT, RENDER_WIDTH, 3), np.uint8)
    image[:] = _TABLE_RGB
    half = BLOCK_SIZE_M / 2
    corners = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
    shown = np.ones(len(BLOCK_COLOURS), bool) if visible is None else visible
    for colour, centre, show in zip(BLOCK_COLOURS, blocks, shown, strict=True):
        if not show:
            continue
        cv2.fillConvexPoly(image, _pixels(centre + corners), BLOCK_RGB[colour], cv2.LINE_AA,
                           _SHIFT)
    points = _pixels(forward_kinematics(np.asarray(joints, np.float64)))
    scale = 1 << _SHIFT
    for a, b in itertools.pairwise(points):
        cv2.line(image, tuple(a), tuple(b), _ARM_RGB, 3, cv2.LINE_AA, _SHIFT)
    for joint in points[:-1]:
        cv2.circle(image, tuple(joint), 3 * scale, _ARM_RGB, -1, cv2.LINE_AA, _SHIFT)
    cv2.circle(image, tuple(points[-1]), 5 * scale, _EFFECTOR_RGB, 2, cv2.LINE_AA, _SHIFT)
    return image


def _pixels(points_m: np.ndarray) -> np.ndarray:
    """Metres [..., 2] -> fixed-point pixel coordinates (int32, _SHIFT fraction bits)."""
    col = (points_m[..., 0] - _VIEW_X0_M) * PIXELS_PER_M
    row = (_VIEW_Y1_M - points_m[..., 1]) * PIXELS_PER_M
    return np.round(np.stack([col, row], axis=-1) * (1 << _SHIFT)).astype(np.int32)
