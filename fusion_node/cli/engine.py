"""`fusion-node engine build | info`.

    fusion-node engine build MODEL.onnx [--backend B] [--fp16] [--int8 CALIB.npz]
    fusion-node engine info MODEL.onnx | PLAN.plan

Everything heavy (ONNX Runtime, torch, TensorRT) is imported inside the command that needs it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import time
from typing import TYPE_CHECKING, Any

from fusion_node.errors import ConfigError

if TYPE_CHECKING:  # numpy is imported by the commands, so `fusion-node --help` stays fast
    import numpy as np



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
    from engines.cache import EngineCache
    from engines.tensorrt_backend import cache_key

    keys = {}
    for precision in ("fp32", "fp16"):
        key = cache_key(hashlib.sha256(data).hexdigest(), precision, shapes)
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
