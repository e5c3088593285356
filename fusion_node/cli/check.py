"""`fusion-node check`: which optional parts load on this machine, and why not.

Each part is loaded the way the node loads it (the face landmarker builds its two engines,
the viewer imports rerun, TensorRT is asked whether it can build an engine), so a part
missing or of a release with another API is named here in one line, not met as an
AttributeError from deep inside a run. With a launch file, only the parts it uses are
checked, and any that cannot load fails the command: run it before deploying.

`--launch-schema` prints the launch files' JSON Schema instead, generated from the parser
(fusion_node.launch_schema), for editors that complete and check TOML against one.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusion_node.cli.files import add_force, check_output
from fusion_node.errors import LOAD_FAILURES, ConfigError, FusionError


def _face_landmarker() -> str:
    from engines.face import FaceLandmarker

    landmarker = FaceLandmarker()
    return f"face models on {landmarker.backend}"


def _rerun() -> str:
    import rerun

    from fusion_node.view import rerun as viewer  # noqa: F401  (what `fusion-node view` imports)

    return f"rerun-sdk {rerun.__version__}"


def _tensorrt() -> str:
    from engines.backends import tensorrt_unavailable

    reason = tensorrt_unavailable()
    if reason is not None:
        raise ImportError(reason)
    from engines.tensorrt_backend import versions

    found = versions()
    return (f"TensorRT {found['tensorrt']}, cuda-python {found['cuda_python']}, driver CUDA "
            f"{found['driver_cuda']}")


def _portaudio() -> str:
    import sounddevice

    return str(sounddevice.get_portaudio_version()[1])


def _torch() -> str:
    import torch

    return f"torch {torch.__version__}"


# part -> (loader returning a version line, what to do when it fails)
PARTS: dict[str, tuple[Callable[[], str], str]] = {
    "face landmarker": (_face_landmarker, ("needed for mouth_roi = 'landmarks'; the models "
                                           "are engines/models/face/*.onnx on ONNX Runtime")),
    "rerun": (_rerun, "needed for `fusion-node view`: pip install 'fusion-node[view]'"),
    "tensorrt": (_tensorrt, ("needed for backend 'tensorrt' (auto falls back to ONNX "
                             "Runtime): TensorRT from NVIDIA and the `tensorrt` extra")),
    "portaudio": (_portaudio, "needed for the microphone driver: apt-get install libportaudio2"),
    "torch": (_torch, "needed for backend 'torch', training and export: the `torch` extra"),
}


def parts_used_by(config: Any) -> list[str]:
    """The optional parts a launch file needs."""
    used = []
    speech_params = [e.params for e in config.engines]
    if any(p.get("mouth_roi") == "landmarks" for p in speech_params):
        used.append("face landmarker")
    if any(e.backend == "tensorrt" for e in config.engines):
        used.append("tensorrt")
    if any(e.backend == "torch" for e in config.engines):
        used.append("torch")
    if any(d.kind == "microphone" for d in config.drivers):
        used.append("portaudio")
    return used


def check_parts(names: list[str]) -> dict[str, dict[str, Any]]:
    """{part: {"ok": bool, "detail": version or why not, "remedy": ...}}."""
    report: dict[str, dict[str, Any]] = {}
    for name in names:
        loader, remedy = PARTS[name]
        try:
            report[name] = {"ok": True, "detail": loader()}
        except (*LOAD_FAILURES, FusionError) as exc:
            report[name] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}",
                            "remedy": remedy}
    return report


def add_check_parser(commands: Any) -> None:
    check = commands.add_parser("check", help="say which optional parts (face landmarker, "
                                "rerun, TensorRT, PortAudio, torch) load here")
    check.add_argument("--config", help="check only what this launch file uses, and fail "
                       "if any of it cannot load")
    check.add_argument("--launch-schema", action="store_true", help="print the JSON Schema "
                       "of launch files instead, generated from their parser (launch/"
                       "launch.schema.json is its output)")
    check.add_argument("--out", metavar="FILE", help="with --launch-schema: write the schema "
                       "to FILE instead of printing it")
    add_force(check)


def run_check_command(args: argparse.Namespace) -> dict[str, Any]:
    if args.launch_schema:
        return _launch_schema(args)
    if args.out is not None:
        raise ConfigError("check --out: only --launch-schema writes a file")
    names = list(PARTS)
    if args.config is not None:
        from fusion_node.config import load_config

        names = parts_used_by(load_config(args.config))
    report = check_parts(names)
    if args.config is not None:
        failed = [name for name, result in report.items() if not result["ok"]]
        if failed:
            lines = "; ".join(f"{name}: {report[name]['detail']} ({report[name]['remedy']})"
                              for name in failed)
            raise ConfigError(f"{args.config}: cannot load {lines}")
    return report


def _launch_schema(args: argparse.Namespace) -> dict[str, Any]:
    from fusion_node.launch_schema import launch_schema, launch_schema_text

    if args.config is not None:
        raise ConfigError("check --launch-schema: the schema is of every launch file; "
                          "leave out --config")
    if args.out is None:
        return launch_schema()  # printed as JSON, the same text --out writes
    check_output(args.out, args.force, "check --launch-schema --out")
    Path(args.out).write_text(launch_schema_text())
    return {"written": args.out}
