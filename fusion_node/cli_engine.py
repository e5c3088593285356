"""`fusion-node engine build | info` and `fusion-node bench engines`.

    fusion-node engine build MODEL.onnx [--backend B] [--fp16] [--int8 CALIB.npz]
    fusion-node engine info MODEL.onnx | PLAN.plan
    fusion-node bench engines [--json]

Everything heavy (ONNX Runtime, torch, TensorRT) is imported inside the command that needs it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import time
from typing import TYPE_CHECKING, Any

from fusion_node.errors import ConfigError

if TYPE_CHECKING:  # numpy is imported by the commands, so `fusion-node --help` stays fast
    import numpy as np

# Batch-1 latency: warm-up calls, then timed calls (p50 / p99).
BENCH_WARM_UP = 20
BENCH_ITERATIONS = 200
# Fresh random feeds per backend for the parity columns.
BENCH_PARITY_TRIALS = 5
REFERENCE_MODELS = ("speech", "action")


def add_engine_parser(commands: Any) -> None:
    """Register `engine build` and `engine info` on the top-level subparsers."""
    engine = commands.add_parser("engine", help="build engines, show what a model or plan is")
    actions = engine.add_subparsers(dest="engine_command", required=True)
    build = actions.add_parser("build", help="build (and cache) an engine from an ONNX file")
    build.add_argument("model", help="ONNX file, reference model name, or package:PKG/FILE")
    build.add_argument("--backend", default="auto",
                       help="tensorrt | onnxruntime | torch | auto (default)")
    precision = build.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="fp16 (GPU backends)")
    precision.add_argument("--int8", metavar="CALIB",
                           help="int8, calibrated on CALIB.npz: one array per input, "
                           "samples along axis 0 (TensorRT)")
    build.add_argument("--shape", action="append", default=[], metavar="NAME=D1xD2",
                       help="fix a dynamic input's shape")
    build.add_argument("--value", action="append", default=[], metavar="NAME=NUMBER",
                       help="warm-up value of an input that must not be zero (a sample rate)")
    build.add_argument("--cache-dir", help="TensorRT engine cache (default "
                       "~/.cache/fusion-node/engines)")
    info = actions.add_parser("info", help="inputs, outputs, metadata and cache key of a model, "
                              "or the header of a cached plan")
    info.add_argument("model", help="ONNX file, reference model name, package:PKG/FILE, or "
                      ".plan")
    info.add_argument("--shape", action="append", default=[], metavar="NAME=D1xD2",
                      help="fixed input shapes, for the cache key")


def run_engine_command(args: argparse.Namespace) -> dict[str, Any]:
    if args.engine_command == "build":
        return build_engine(args.model, backend=args.backend,
                            precision="int8" if args.int8 else "fp16" if args.fp16 else "fp32",
                            calibration=args.int8, shapes=parse_shapes(args.shape),
                            values=parse_values(args.value), cache_dir=args.cache_dir)
    return engine_info(args.model, parse_shapes(args.shape))


def parse_shapes(items: list[str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in items:
        name, _, dims = item.partition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.split("x"))
        except ValueError:
            raise ConfigError(f"--shape {item!r} is not NAME=D1xD2...") from None
    return shapes


def parse_values(items: list[str]) -> dict[str, np.ndarray]:
    import numpy as np

    values = {}
    for item in items:
        name, _, number = item.partition("=")
        try:
            values[name] = np.asarray(float(number))
        except ValueError:
            raise ConfigError(f"--value {item!r} is not NAME=NUMBER") from None
    return values


def build_engine(model: str, *, backend: str, precision: str, calibration: str | None,
                 shapes: dict[str, tuple[int, ...]], values: dict[str, np.ndarray],
                 cache_dir: str | None) -> dict[str, Any]:
    """Build `model` on `backend` (TensorRT: into the engine cache), run it once, describe it."""
    from engines.backends import create_engine
    from fusion_node.node import model_path

    path = model_path(model)
    started = time.monotonic()
    engine = create_engine(path, backend=backend, precision=precision, calibration=calibration,
                           input_shapes=shapes or None, example_feeds=values or None,
                           cache_dir=cache_dir)
    engine.warm_up(1)
    result: dict[str, Any] = {
        "model": str(path), "backend": engine.backend, "precision": precision,
        "model_hash": engine.model_hash, "build_s": round(time.monotonic() - started, 3),
        "inputs": [_tensor(s) for s in engine.inputs],
        "outputs": [_tensor(s) for s in engine.outputs]}
    if engine.backend == "tensorrt":  # where the plan is, and whether it was built now
        from engines.tensorrt_backend import TensorRTEngine

        assert isinstance(engine, TensorRTEngine)
        result.update(plan=str(engine.cache.path_for(engine.key)), built=engine.built,
                      cache_key=json.loads(engine.key.to_json()))
    return result


def engine_info(model: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """What `model` is: a cached plan's header, or an ONNX file's tensors, metadata, licence
    (for a model a package ships) and engine-cache key on this machine."""
    from engines.cache import read_entry

    if model.endswith(".plan"):
        header, _ = read_entry(model)
        return {"plan": model, **header}
    from engines.backends import tensorrt_unavailable
    from engines.onnxruntime_backend import describe
    from fusion_node.node import PACKAGE_SCHEME, model_path

    path = model_path(model)
    data = path.read_bytes()
    result: dict[str, Any] = {"model": str(path), **describe(path),
                              "model_hash": hashlib.sha256(data).hexdigest()[:16],
                              "onnx_sha256": hashlib.sha256(data).hexdigest()}
    if model.startswith(PACKAGE_SCHEME):
        result["package"] = _package_licence(model[len(PACKAGE_SCHEME):].partition("/")[0])
    reason = tensorrt_unavailable()
    if reason is not None:
        result["tensorrt"] = f"unavailable: {reason}"
        return result
    from engines.cache import CacheKey, EngineCache
    from engines.tensorrt_backend import device_info, trt

    gpu, capability = device_info()
    keys = {}
    for precision in ("fp32", "fp16"):
        key = CacheKey(hashlib.sha256(data).hexdigest(), trt.__version__, gpu, capability,
                       precision, tuple(sorted(shapes.items())))
        path_for = EngineCache().path_for(key)
        keys[precision] = {"key": json.loads(key.to_json()), "plan": str(path_for),
                           "cached": path_for.exists()}
    result["tensorrt"] = keys
    return result


def _package_licence(package: str) -> dict[str, Any]:
    """Name, version, licence and licence files of the distribution providing `package`."""
    for dist_name in importlib.metadata.packages_distributions().get(package, []):
        dist = importlib.metadata.distribution(dist_name)
        files = [str(dist.locate_file(f)) for f in dist.files or []
                 if "licen" in f.name.lower() or "copying" in f.name.lower()]
        declared = [*(dist.metadata.get_all("License-Expression") or []),
                    *(dist.metadata.get_all("License") or []),
                    *(c for c in dist.metadata.get_all("Classifier") or [] if "License" in c)]
        return {"distribution": dist_name, "version": dist.version,
                "license": "; ".join(declared),
                "license_files": files}
    return {"distribution": None}


def _tensor(spec: Any) -> dict[str, Any]:
    return {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype}


# -- bench engines ---------------------------------------------------------------------------

def run_engine_bench(iterations: int = BENCH_ITERATIONS,
                     samples: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per reference model and backend: batch-1 latency after warm-up, and the largest
    absolute and relative difference from the torch reference on fresh random inputs.

    CPU backends get one intra-op thread each, which leaves the other core of a 2-core robot
    computer for drivers, alignment and publishing (ONNX Runtime also with spinning off, as
    the node runs it). GPU rows (torch CUDA fp16 with a CUDA graph, TensorRT) appear where a
    GPU is usable; otherwise `skipped` says why. `samples`, if given, receives every timed
    call's latency in ms, for plots: `samples[model][backend-precision]`.
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

    from engines import models
    from engines.onnxruntime_backend import OnnxRuntimeEngine
    from engines.torch_backend import TorchEngine
    from fusion_node.node import model_path

    inputs = {"speech": models.SPEECH_INPUTS, "action": models.ACTION_INPUTS}[name]
    path = model_path(name)
    reference = TorchEngine.from_onnx(path, threads=1)
    candidates: list[tuple[str, str, Any]] = [
        ("torch", "fp32", reference),
        ("onnxruntime", "fp32", OnnxRuntimeEngine(path, intra_op_threads=1))]
    if "torch-cuda" not in skipped:
        candidates.append(("torch-cuda", "fp16", TorchEngine.from_onnx(
            path, device="cuda", precision="fp16")))
    for precision in ("fp32", "fp16"):
        if f"tensorrt-{precision}" not in skipped:
            from engines.tensorrt_backend import TensorRTEngine

            candidates.append((f"tensorrt-{precision}", precision,
                               TensorRTEngine(path, precision=precision)))
    rows: list[dict[str, Any]] = []
    for backend, precision, engine in candidates:
        row: dict[str, Any] = {"model": name, "backend": backend, "precision": precision,
                               "threads": 1 if backend in ("torch", "onnxruntime") else None}
        if engine is reference:
            row.update(max_abs_diff=None, max_rel_diff=None)  # it is the reference
        else:
            abs_diff, rel_diff = _parity(engine, reference, inputs, rng)
            row.update(max_abs_diff=float(f"{abs_diff:.3g}"),
                       max_rel_diff=float(f"{rel_diff:.3g}"))
        times_ms = _latency(engine, models.random_feeds(inputs, rng), iterations)
        p50, p99 = (float(v) for v in np.percentile(times_ms, [50, 99]))
        if samples is not None:
            samples[f"{backend} {precision}"] = times_ms.tolist()
        row.update(p50_ms=round(p50, 4), p99_ms=round(p99, 4))
        row["speedup_vs_torch"] = round(rows[0]["p50_ms"] / p50, 2) if rows else 1.0
        if getattr(engine, "last_gpu_ms", None):
            row["last_gpu_ms"] = round(engine.last_gpu_ms, 4)  # CUDA events, last call
        rows.append(row)
    return rows


def _parity(engine: Any, reference: Any, inputs: dict[str, tuple[int, ...]],
            rng: np.random.Generator) -> tuple[float, float]:
    import numpy as np

    from engines import models

    worst_abs = worst_rel = 0.0
    for _ in range(BENCH_PARITY_TRIALS):
        feeds = models.random_feeds(inputs, rng)
        expected = reference.infer(feeds)
        for key, value in engine.infer(feeds).items():
            diff = float(np.max(np.abs(value - expected[key])))
            worst_abs = max(worst_abs, diff)
            worst_rel = max(worst_rel, diff / max(float(np.max(np.abs(expected[key]))), 1e-12))
    return worst_abs, worst_rel


def _latency(engine: Any, feeds: dict[str, np.ndarray], iterations: int) -> np.ndarray:
    """Milliseconds of each of `iterations` timed calls, after warm-up."""
    import numpy as np

    for _ in range(BENCH_WARM_UP):
        engine.infer(feeds)
    times = np.empty(iterations)
    for i in range(iterations):
        start = time.perf_counter_ns()
        engine.infer(feeds)
        times[i] = time.perf_counter_ns() - start
    return times / 1e6
