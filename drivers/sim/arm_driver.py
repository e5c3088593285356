"""The simulated arm as a robot: joint states and a top-down scene camera out, the node's
action chunks in (a closed loop).

The arm of `drivers.sim.arm` (3 joints, joint limits, actuator lag) is integrated in 5 ms steps on
the clock; its joint states are published at 200 Hz on the driver's stream and the scene,
drawn from above, at `camera_fps` on `camera_stream`. With `actions` set, a control loop
subscribes to the node's `pred.action` chunks, ensembles them (`ActionFollower`, as a robot's
controller would) and commands the joint target for each step: the arm reaches the block the
spoken command names. `video_out` also writes the scene to a video file, to watch a headless
run.
"""

from __future__ import annotations

import asyncio
import math
import threading
from dataclasses import dataclass

import numpy as np

from drivers.sim.arm import (
    HOME,
    JOINT_LOWER,
    JOINT_NAMES,
    JOINT_UPPER,
    LAG_TAU_S,
    MAX_JOINT_SPEED,
    random_layout,
    render,
)
from fusion_node.clock import Clock
from fusion_node.errors import ConfigError, DriverError, ProtocolError
from fusion_node.protocol import Frame, JointState, Prediction

_NS_PER_S = 1_000_000_000
SUBSTEP_NS = 5_000_000
_SUBSTEP_S = SUBSTEP_NS / _NS_PER_S
# The lag's exact per-substep fraction; four substeps equal one of the model's 20 ms steps.
_ALPHA = 1.0 - math.exp(-_SUBSTEP_S / LAG_TAU_S)


@dataclass(frozen=True, slots=True)
class SimulatedArmConfig:
    """A simulated 3-joint arm with a scene camera; `actions` is the endpoint to take
    `pred.action` from ("node.pub" in a launch file: the node's own, as bound; empty: the
    arm holds its pose)."""

    stream: str
    camera_stream: str = "camera.scene"
    camera_fps: float = 25.0
    actions: str = ""
    action_topic: str = "pred.action"
    layout_seed: int = 0
    video_out: str = ""

    def __post_init__(self) -> None:
        if self.camera_fps <= 0:
            raise ConfigError(f"stream {self.stream!r}: camera_fps is {self.camera_fps}, "
                              "must be > 0")
        if self.layout_seed < 0:
            raise ConfigError(f"stream {self.stream!r}: layout_seed must be >= 0")
        if self.camera_stream == self.stream:
            raise ConfigError(f"stream {self.stream!r}: camera_stream must be another name")


class SimulatedArm:
    """Joint states (200 Hz) and scene frames, interleaved in capture order."""

    def __init__(self, config: SimulatedArmConfig, clock: Clock) -> None:
        self.config = config
        self.stream = config.stream
        self._clock = clock
        self.layout = random_layout(config.layout_seed)
        self.position = HOME.copy()
        self.velocity = np.zeros(3)
        self._target = HOME.copy()
        self._t0_ns = 0
        self._substeps = 0
        self._frames = 0
        self._follower_lock = threading.Lock()
        self._follower = None
        self._listener: threading.Thread | None = None
        self._stop = threading.Event()
        self._writer = None
        self.chunks_received = 0
        self.bad_chunks = 0

    async def connect(self) -> None:
        from fusion_node.client import ActionFollower

        self._t0_ns = self._clock.now_ns()
        self._follower = ActionFollower()
        if self.config.actions:
            self._stop.clear()
            self._listener = threading.Thread(target=self._listen, daemon=True,
                                              name=f"{self.stream}-actions")
            self._listener.start()
        if self.config.video_out:
            import cv2

            from drivers.sim.arm import RENDER_HEIGHT, RENDER_WIDTH

            self._writer = cv2.VideoWriter(self.config.video_out,
                                           cv2.VideoWriter_fourcc(*"mp4v"),
                                           self.config.camera_fps,
                                           (RENDER_WIDTH, RENDER_HEIGHT))
            if not self._writer.isOpened():
                raise DriverError(f"stream {self.stream!r}: cannot write video "
                                  f"{self.config.video_out!r}")

    def _listen(self) -> None:
        """The control loop's subscription: every chunk into the follower."""
        import zmq

        from fusion_node.protocol import decode

        context = zmq.Context.instance()
        socket = context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SUBSCRIBE, self.config.action_topic.encode())
        socket.connect(self.config.actions)
        try:
            while not self._stop.is_set():
                if not socket.poll(100):
                    continue
                parts = socket.recv_multipart(copy=False)
                try:
                    message = decode(parts, self._clock.now_ns())
                except ProtocolError:
                    self.bad_chunks += 1
                    continue
                if isinstance(message, Prediction) and "actions" in message.arrays:
                    with self._follower_lock:
                        self._follower.add(message)  # type: ignore[union-attr]
                    self.chunks_received += 1
        finally:
            socket.close()

    def _advance(self, t_ns: int) -> None:
        """One 5 ms substep toward the ensembled target for `t_ns`."""
        with self._follower_lock:
            target = self._follower.action_at(t_ns)  # type: ignore[union-attr]
        if target is not None:
            self._target = np.clip(np.asarray(target, np.float64), JOINT_LOWER, JOINT_UPPER)
        cap = MAX_JOINT_SPEED * _SUBSTEP_S
        moved = np.clip(_ALPHA * (self._target - self.position), -cap, cap)
        new_position = np.clip(self.position + moved, JOINT_LOWER, JOINT_UPPER)
        self.velocity = (new_position - self.position) / _SUBSTEP_S
        self.position = new_position

    async def recv(self) -> JointState | Frame:
        return await asyncio.to_thread(self._recv_blocking)

    def _recv_blocking(self) -> JointState | Frame:
        joint_ns = self._t0_ns + self._substeps * SUBSTEP_NS
        frame_ns = self._t0_ns + round(self._frames * _NS_PER_S / self.config.camera_fps)
        if frame_ns < joint_ns:
            self._clock.sleep_until(frame_ns)
            image = render(self.layout.blocks, self.position)
            if self._writer is not None:
                self._writer.write(image[:, :, ::-1])
            frame = Frame(self.config.camera_stream, self._frames, frame_ns, image, "rgb8")
            self._frames += 1
            return frame
        self._clock.sleep_until(joint_ns)
        if self._substeps:
            self._advance(joint_ns)
        state = JointState(self.stream, self._substeps, joint_ns, JOINT_NAMES,
                           self.position.copy(), self.velocity.copy(), np.zeros(3))
        self._substeps += 1
        return state

    async def disconnect(self) -> None:
        self._stop.set()
        if self._listener is not None:
            await asyncio.to_thread(self._listener.join, 2.0)
        if self._writer is not None:
            self._writer.release()
            self._writer = None
