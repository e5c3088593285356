"""`fusion-node bench engines`: the reference models on every usable backend.

Latency at batch 1 and parity with the torch reference; everything heavy (torch, ONNX
Runtime, TensorRT) is imported inside the bench.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

# Batch-1 latency: warm-up calls, then timed calls (p50 / p99).
BENCH_WARM_UP = 20
BENCH_ITERATIONS = 200
# Fresh random feeds per backend for the parity columns.
BENCH_PARITY_TRIALS = 5
# Calls in the GIL-watch pass, run apart from the timed calls (the watcher costs CPU).
GIL_WATCH_CALLS = 50
REFERENCE_MODELS = ("speech", "action")


def run_engine_bench(iterations: int = BENCH_ITERATIONS,
                     samples: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per reference model and backend: batch-1 latency after warm-up, and the largest
    absolute and relative difference from the torch reference on fresh random inputs.

    CPU backends get one intra-op thread each, which leaves the other core of a 2-core robot
    computer for drivers, alignment and publishing (ONNX Runtime also with spinning off, as
    the node runs it). GPU rows (torch CUDA fp32 and fp16 with a CUDA graph, TensorRT)
    appear where a GPU is usable; otherwise `skipped` says why. `samples`, if given, receives
    every timed call's latency in ms, for plots: `samples[model][backend-precision]`.

    `cpu_ms_per_call` is the process's CPU time per timed call (a GPU backend that spins
    while it waits shows it here); `gil_free_share` is how fast another Python thread runs
    during inference, as a share of its speed while this one sleeps: near 1 where the
    backend releases the GIL, the CPU share of a call where it holds it.
    """
    import numpy as np
    import torch

    from engines.backends import tensorrt_unavailable

    rng = np.random.default_rng()  # fresh inputs on every run, as the parity claim needs
    skipped: dict[str, str] = {}
    if not torch.cuda.is_available():
        skipped["torch-cuda"] = "torch sees no CUDA GPU"
    for precision in ("fp32", "fp16"):
        reason = tensorrt_unavailable(precision)
        if reason is not None:
            skipped[f"tensorrt-{precision}"] = reason
    rows = []
    threads = torch.get_num_threads()
    try:
        for name in REFERENCE_MODELS:
            rows += _bench_model(name, skipped, rng, iterations,
                                 None if samples is None else samples.setdefault(name, {}))
    finally:
        torch.set_num_threads(threads)  # the bench's 1 thread is process-wide in torch
    return {"cpus": os.cpu_count(), "iterations": iterations, "results": rows,
            "skipped": skipped}


def _bench_model(name: str, skipped: dict[str, str], rng: np.random.Generator,
                 iterations: int, samples: dict[str, list[float]] | None = None
                 ) -> list[dict[str, Any]]:
    import numpy as np

    from engines.onnxruntime_backend import OnnxRuntimeEngine
    from engines.torch_backend import TorchEngine
    from fusion_node.node import model_path
    from fusion_node.progress import progress
    from training import models

    inputs = {"speech": models.SPEECH_INPUTS, "action": models.ACTION_INPUTS}[name]
    path = model_path(name)
    reference = TorchEngine.from_onnx(path, threads=1)
    candidates: list[tuple[str, str, Any]] = [
        ("torch", "fp32", reference),
        ("onnxruntime", "fp32", OnnxRuntimeEngine(path, intra_op_threads=1))]
    if "torch-cuda" not in skipped:
        for precision in ("fp32", "fp16"):
            candidates.append(("torch-cuda", precision, TorchEngine.from_onnx(
                path, device="cuda", precision=precision)))
    for precision in ("fp32", "fp16"):
        if f"tensorrt-{precision}" not in skipped:
            from engines.tensorrt_backend import TensorRTEngine

            candidates.append((f"tensorrt-{precision}", precision,
                               TensorRTEngine(path, precision=precision)))
    rows: list[dict[str, Any]] = []
    # One step per backend, not per call: nothing of the bar runs among the timed calls.
    for backend, precision, engine in progress(candidates, desc=f"bench engines: {name}",
                                               unit="backend"):
        row: dict[str, Any] = {"model": name, "backend": backend, "precision": precision,
                               "threads": 1 if backend in ("torch", "onnxruntime") else None}
        if engine is reference:
            row.update(max_abs_diff=None, max_rel_diff=None)  # it is the reference
        else:
            abs_diff, rel_diff = _parity(engine, reference, inputs, rng)
            row.update(max_abs_diff=float(f"{abs_diff:.3g}"),
                       max_rel_diff=float(f"{rel_diff:.3g}"))
        feeds = models.random_feeds(inputs, rng)
        times_ms, cpu_ms = _latency(engine, feeds, iterations)
        row.update(cpu_ms_per_call=round(cpu_ms, 4), gil_free_share=round(
            _gil_free_share(engine, feeds), 3))
        p50, p99 = (float(v) for v in np.percentile(times_ms, [50, 99]))
        if samples is not None:
            samples[f"{backend} {precision}"] = times_ms.tolist()
        row.update(p50_ms=round(p50, 4), p99_ms=round(p99, 4))
        row["speedup_vs_torch"] = round(rows[0]["p50_ms"] / p50, 2) if rows else 1.0
        if getattr(engine, "last_gpu_ms", None):
            row["last_gpu_ms"] = round(engine.last_gpu_ms, 4)  # CUDA events, last call
        rows.append(row)
    for _, _, engine in candidates:
        engine.close()  # GPU buffers and streams go now, not at exit
    return rows


def _parity(engine: Any, reference: Any, inputs: dict[str, tuple[int, ...]],
            rng: np.random.Generator) -> tuple[float, float]:
    import numpy as np

    from training import models

    worst_abs = worst_rel = 0.0
    for _ in range(BENCH_PARITY_TRIALS):
        feeds = models.random_feeds(inputs, rng)
        expected = reference.infer(feeds)
        for key, value in engine.infer(feeds).items():
            diff = float(np.max(np.abs(value - expected[key])))
            worst_abs = max(worst_abs, diff)
            worst_rel = max(worst_rel, diff / max(float(np.max(np.abs(expected[key]))), 1e-12))
    return worst_abs, worst_rel


def _latency(engine: Any, feeds: dict[str, np.ndarray], iterations: int
             ) -> tuple[np.ndarray, float]:
    """Milliseconds of each of `iterations` timed calls after warm-up, and the process's CPU
    milliseconds per call."""
    import numpy as np

    for _ in range(BENCH_WARM_UP):
        engine.infer(feeds)
    times = np.empty(iterations)
    cpu_start = time.process_time_ns()
    for i in range(iterations):
        start = time.perf_counter_ns()
        engine.infer(feeds)
        times[i] = time.perf_counter_ns() - start
    cpu_ms = (time.process_time_ns() - cpu_start) / 1e6 / iterations
    return times / 1e6, cpu_ms


def _count_while(work: Any) -> float:
    """Increments per second a second Python thread makes while `work()` runs."""
    count = 0
    stop = threading.Event()

    def spin() -> None:
        nonlocal count
        while not stop.is_set():
            count += 1

    watcher = threading.Thread(target=spin, daemon=True)
    start = time.perf_counter()
    watcher.start()
    try:
        work()
    finally:
        stop.set()
        watcher.join()
    return count / (time.perf_counter() - start)


def _gil_free_share(engine: Any, feeds: dict[str, np.ndarray]) -> float:
    started = time.perf_counter()

    def run() -> None:
        for _ in range(GIL_WATCH_CALLS):
            engine.infer(feeds)

    busy = _count_while(run)
    idle = _count_while(lambda: time.sleep(time.perf_counter() - started))
    return busy / idle if idle else 0.0
