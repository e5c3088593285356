"""`fusion-node bench record`: the recorder and replay at a camera's, a microphone's and an
arm's real rates."""

from __future__ import annotations

import os
import tempfile
from typing import Any

_FRAME_POOL = 30  # distinct frames, cycled: noise is costly to draw at 30 fps
_NOISE_STD = 2.0  # camera-like sensor noise, so frames compress like a real camera's do


def run_record_bench(duration_s: float = 20.0) -> dict[str, Any]:
    """Record 30 fps 640x480 rgb8 + 16 kHz audio (10 ms chunks) + 500 Hz joints in real time
    through the node's recorder (bounded queue, writer thread), then replay the log as fast
    as possible: published without the node, and through the node's engines."""
    import numpy as np
    import zmq

    from drivers.sim.simulated import (
        JOINT_NAMES,
        SimulatedCamera,
        SimulatedCameraConfig,
        joint_motion,
        voice,
    )
    from fusion_node.clock import MonotonicClock, thread_cpu_ns
    from fusion_node.config import load_config
    from fusion_node.logs.recorder import Recorder
    from fusion_node.logs.replay import publish_log, replay_through_node
    from fusion_node.progress import progress_seconds
    from fusion_node.protocol import AudioChunk, Frame, JointState
    from fusion_node.transport import Publisher

    clock = MonotonicClock()
    rng = np.random.default_rng(0)
    camera = SimulatedCamera(SimulatedCameraConfig("camera.front"), clock)
    frames = []
    for i in range(_FRAME_POOL):
        image = camera.render(i * 33_333_333).astype(np.float32)
        noisy = image + rng.normal(0, _NOISE_STD, image.shape)
        frames.append(np.clip(noisy, 0, 255).astype(np.uint8))
    rates_hz = {"frame": 30, "audio": 100, "joints": 500}
    with tempfile.TemporaryDirectory(prefix="fusion-node-bench-") as tmp:
        path = f"{tmp}/bench.mcap"
        recorder = Recorder(path, clock, metadata={"source": "bench record"})
        recorder.start()
        start_ns = clock.now_ns()
        end_ns = start_ns + round(duration_s * 1e9)
        index = {kind: 0 for kind in rates_hz}

        def capture_ns(kind: str, k: int) -> int:
            return start_ns + k * 1_000_000_000 // rates_hz[kind]

        def ready_ns(kind: str) -> int:
            # An audio chunk is delivered once its last sample is captured; the rest at once.
            return capture_ns(kind, index[kind] + (kind == "audio"))

        offer_cpu_ns = raw_bytes = 0
        with progress_seconds(duration_s, desc="bench record") as bar:
            while True:
                active = [k for k in rates_hz if capture_ns(k, index[k]) < end_ns]
                if not active:
                    break
                kind = min(active, key=ready_ns)
                seq = index[kind]
                t_ns = capture_ns(kind, seq)
                clock.sleep_until(ready_ns(kind))
                index[kind] += 1
                msg: Frame | AudioChunk | JointState
                if kind == "frame":
                    msg = Frame("camera.front", seq, t_ns, frames[seq % _FRAME_POOL], "rgb8")
                    raw_bytes += msg.image.nbytes
                elif kind == "audio":
                    times = t_ns + np.arange(160, dtype=np.int64) * 62_500
                    samples = 16000 * voice(times) + rng.normal(0, 30, 160)
                    msg = AudioChunk("audio.mic0", seq, t_ns, 16_000, seq * 160,
                                     samples.astype(np.int16)[:, None])
                    raw_bytes += msg.samples.nbytes
                else:
                    position, velocity, effort = joint_motion(t_ns)
                    msg = JointState("joints.arm", seq, t_ns, JOINT_NAMES, position, velocity,
                                     effort)
                    raw_bytes += 3 * position.nbytes
                msg.t_receive_ns = clock.now_ns()
                cpu_ns = thread_cpu_ns()
                recorder.offer(msg)
                offer_cpu_ns += thread_cpu_ns() - cpu_ns
                bar.at((t_ns - start_ns) / 1e9)
        recorder.close()
        stats = recorder.stats()
        file_bytes = os.path.getsize(path)
        log_s = duration_s

        context = zmq.Context()
        publisher = Publisher(context, f"ipc://{tmp}/replay.ipc")
        started_ns = clock.now_ns()
        published = publish_log(path, publisher.send_parts, clock, fast=True)
        publish_wall_s = (clock.now_ns() - started_ns) / 1e9
        publisher.close()
        context.term()

        started_ns = clock.now_ns()
        replayed = replay_through_node(path, load_config())
        node_wall_s = (clock.now_ns() - started_ns) / 1e9
    counts = dict(index)
    return {
        "duration_s": duration_s,
        "streams": {"camera.front": "30 fps 640x480 rgb8 (simulated face + noise sigma "
                    f"{_NOISE_STD})", "audio.mic0": "16 kHz int16 mono, 10 ms chunks",
                    "joints.arm": "500 Hz, 3 joints"},
        "messages_offered": counts,
        "recorded": stats["written"],
        "dropped": stats["dropped"],
        "peak_queue_mb": stats["peak_queued_mb"],
        "compression": "lz4",
        "raw_mb_per_s": round(raw_bytes / 2**20 / log_s, 2),
        "file_mb_per_s": round(file_bytes / 2**20 / log_s, 2),
        "recorder_cpu_s_per_log_s": round((stats["cpu_s"] + offer_cpu_ns / 1e9) / log_s, 3),
        "writer_thread_cpu_s_per_log_s": round(stats["cpu_s"] / log_s, 3),
        "offer_cpu_us_per_message": round(offer_cpu_ns / 1e3 / max(sum(counts.values()), 1),
                                          2),
        "file_mb": round(file_bytes / 2**20, 1),
        "replay_publish_x_realtime": round(published.log_duration_ns / 1e9 / publish_wall_s, 1),
        "replay_through_node_x_realtime": round(replayed.log_duration_ns / 1e9 / node_wall_s,
                                                2),
        "replay_through_node_predictions": replayed.predictions,
    }

