"""Export a torch model to a verified, self-describing, fixed-shape ONNX file.

    python -m training.export --out engines/models [--seed 0]

writes the reference models `speech.onnx` and `action.onnx` from `training.models`;

    python -m training.export --module pkg.mod:Class [--init '{"seed": 0}']
        --input audio=1x64x40 --input valid=1x64 --name NAME --version V
        [--preprocessing '{...}'] --out FILE.onnx

exports any keyword-in, dict-out torch module at those fixed input shapes (float32).
"""

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from engines.preprocess import LogMel
from engines.torch_backend import weights_sha256
from engines.vocabulary import COMMANDS
from fusion_node.errors import ConfigError, EngineError
from training import models

__all__ = ["export_onnx", "main", "verify_onnx", "weights_sha256"]

OPSET = 17
TOLERANCE = 1e-4
# Keys export_onnx writes itself; caller metadata may not override them.
_RESERVED = ("name", "version", "inputs", "outputs", "weights_sha256", "torch_module",
             "torch_init")


def refuse_to_overwrite(parser: argparse.ArgumentParser, out: Path, force: bool) -> None:
    """Before any training: an existing model file is replaced only with --force."""
    if out.exists() and not force:
        parser.error(f"{out} exists; pass --force to replace it")


@contextlib.contextmanager
def stop_on_interrupt(prog: str, out: Path) -> Iterator[None]:
    """Ctrl-C during training: one line saying nothing was written, exit status 130."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {out} not written", file=sys.stderr)
        raise SystemExit(130) from None

def export_onnx(
    model: nn.Module,
    example_feeds: dict[str, np.ndarray],
    path: str | Path,
    *,
    name: str,
    version: str,
    metadata: dict[str, str],
    init_kwargs: dict[str, object] | None = None,
) -> str:
    """Export `model` to `path` as ONNX and return the file's hash (16 hex digits of SHA-256).

    `model(**feeds)` must return a dict of output name -> tensor; inputs and outputs keep the
    order of `example_feeds` and of that dict, with the example's fixed shapes. The file
    carries `metadata_props`: `name`, `version`, `inputs` and `outputs` (JSON lists of
    {name, shape, dtype}), `weights_sha256`, plus `metadata` (e.g. "preprocessing" as JSON).
    With `init_kwargs` (the JSON-able arguments that rebuild the module), it also names the
    module class (`torch_module`, `torch_init`) so the torch backend can run the same model.
    It is written only after ONNX Runtime reproduced torch on the example and random feeds
    (see `verify_onnx`), through a temporary file renamed into place, so `path` never holds an
    unverified model. Raises EngineError if export, checking or verification fails.
    """
    path = Path(path)
    clashes = sorted(set(metadata) & set(_RESERVED))
    if clashes:
        raise ConfigError(f"export of {name!r}: metadata keys {clashes} are reserved")
    model = model.eval()
    input_names = list(example_feeds)
    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in example_feeds.values())
    with torch.no_grad():
        reference = model(**dict(zip(input_names, args, strict=True)))
    if not isinstance(reference, dict):
        raise EngineError(
            f"export of {name!r}: model must return a dict of outputs, got {type(reference)}"
        )
    output_names = list(reference)

    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "raw.onnx"
        try:
            with warnings.catch_warnings():
                # The TorchScript exporter is chosen on purpose (compact graph, fixed shapes,
                # byte-deterministic output); its deprecation notices are not news here.
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(
                    _Positional(model, input_names),
                    args,
                    raw_path,
                    input_names=input_names,
                    output_names=output_names,
                    opset_version=OPSET,
                    dynamo=False,
                    do_constant_folding=True,
                )
        except Exception as exc:  # the exporter raises many unrelated types
            raise EngineError(
                f"export of {name!r} to {path}: torch.onnx.export failed: {exc}"
            ) from exc
        proto = onnx.load(raw_path)

    props = {
        "name": name,
        "version": version,
        "inputs": _specs_json(example_feeds),
        "outputs": _specs_json({k: v.numpy() for k, v in reference.items()}),
        "weights_sha256": weights_sha256(model),
        **metadata,
    }
    if init_kwargs is not None:
        props["torch_module"] = f"{type(model).__module__}:{type(model).__qualname__}"
        props["torch_init"] = json.dumps(init_kwargs, sort_keys=True)
    # Sorted, so the serialised bytes do not depend on dict order.
    onnx.helper.set_model_props(proto, dict(sorted(props.items())))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        raise EngineError(f"export of {name!r} to {path}: invalid ONNX graph: {exc}") from exc
    data = proto.SerializeToString()
    verify_onnx(data, model, example_feeds)
    _write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()[:16]


def verify_onnx(
    onnx_model: bytes | str | Path,
    model: nn.Module,
    example_feeds: dict[str, np.ndarray],
    *,
    trials: int = 3,
    seed: int = 0,
    tolerance: float = TOLERANCE,
) -> float:
    """Check that ONNX Runtime reproduces `model` on the example and `trials` random feeds.

    Random feeds keep each example's shape and dtype: 0/1 masks get random 0/1 values (mostly
    1), other float inputs N(0, 1), other inputs the example's values. The error of an output
    is max |ort - torch| / max |torch|; returns the largest, or raises EngineError naming the
    output when it exceeds `tolerance` (or is NaN).
    """
    source = onnx_model if isinstance(onnx_model, bytes) else Path(onnx_model).read_bytes()
    options = ort.SessionOptions()
    # Verify what the engine will run: the same graph optimisations as OnnxRuntimeEngine.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's exception types share no base but Exception
        raise EngineError(f"verification: ONNX Runtime cannot load the model: {exc}") from exc
    rng = np.random.default_rng(seed)
    worst = 0.0
    for feeds in [example_feeds, *(_random_like(example_feeds, rng) for _ in range(trials))]:
        with torch.no_grad():
            expected = model.eval()(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        actual = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        for out_name, tensor in expected.items():
            ref = tensor.numpy()
            got = actual.get(out_name)
            if got is None or got.shape != ref.shape:
                shape = None if got is None else got.shape
                raise EngineError(
                    f"verification: output {out_name!r} is {shape} in ONNX Runtime, "
                    f"{ref.shape} in torch"
                )
            error = float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-12))
            if not error <= tolerance:
                raise EngineError(
                    f"verification: output {out_name!r} differs from torch by relative error "
                    f"{error:.3g} > {tolerance:g}"
                )
            worst = max(worst, error)
    return worst


class _Positional(nn.Module):
    """Adapts a keyword-in, dict-out model to the exporter's positional tuple convention."""

    def __init__(self, model: nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(**dict(zip(self.input_names, args, strict=True)))
        return tuple(outputs.values())


def _specs_json(arrays: dict[str, np.ndarray]) -> str:
    specs = [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()]
    return json.dumps(specs)


def _random_like(
    example_feeds: dict[str, np.ndarray], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    feeds = {}
    for key, example in example_feeds.items():
        if not np.issubdtype(example.dtype, np.floating):
            feeds[key] = example
        elif np.isin(example, (0, 1)).all():
            feeds[key] = (rng.random(example.shape) < 0.75).astype(example.dtype)
        else:
            feeds[key] = rng.standard_normal(example.shape).astype(example.dtype)
    return feeds


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; a model file is meant to be shared
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _speech_preprocessing() -> dict[str, object]:
    mel = LogMel()
    return {
        "audio_mel": {
            "op": "log_mel",
            "sample_rate": mel.sample_rate,
            "n_fft": mel.n_fft,
            "win_length": mel.win_length,
            "hop_length": mel.hop_length,
            "n_mels": mel.n_mels,
            "window": "hann (periodic)",
            "center": False,
            "mel_scale": "htk",
            "log_offset": mel.log_offset,
            "frames": models.AUDIO_FRAMES,
            "samples": mel.samples_for(models.AUDIO_FRAMES),
        },
        "audio_valid": {"op": "frame_valid", "rule": "a frame is valid if all its samples are"},
        "video": {
            "op": "mouth_crop",
            "size": models.MOUTH_SIZE,
            "color": "gray",
            "range": [0, 1],
            "fps": 25,
            "frames": models.VIDEO_FRAMES,
        },
        "video_valid": {"rule": "1 per real frame, 0 per missing frame"},
    }


def _action_preprocessing() -> dict[str, object]:
    return {
        "image": {
            "op": "image_tensor",
            "size": models.IMAGE_SIZE,
            "color": "rgb",
            "layout": "chw",
            "range": [0, 1],
        },
        "joints": {"layout": "positions (rad) then velocities (rad/s)", "dof": models.N_JOINTS},
        "command": {"source": "softmax of the speech model's command_logits"},
        "actions": {
            "horizon": models.ACTION_HORIZON,
            "step_ms": models.ACTION_STEP_MS,
            "units": "rad",
        },
    }


def main(argv: list[str] | None = None) -> None:
    """Export the reference models (untrained, seeded) to --out, or any torch module with
    --module."""
    parser = argparse.ArgumentParser(prog="python -m training.export", description=main.__doc__)
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory (reference models) or .onnx file (--module)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    parser.add_argument("--module", help="pkg.mod:Class of a keyword-in, dict-out module")
    parser.add_argument("--init", default="{}", help="JSON keyword arguments for the class")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=D1xD2...",
                        help="a float32 input and its fixed shape, in forward() order")
    parser.add_argument("--name", help="model name (--module)")
    parser.add_argument("--version", default="0", help="model version (--module)")
    parser.add_argument("--preprocessing", default="{}",
                        help="JSON: the preprocessing each input expects (--module)")
    args = parser.parse_args(argv)
    if args.module:
        model_hash = _export_module(args)
        print(f"{args.out}: hash {model_hash}")
        return

    version = f"0+untrained.seed{args.seed}"
    training = f"untrained: deterministic random initialisation, seed {args.seed}"
    rng = np.random.default_rng(args.seed)
    jobs = [
        ("speech", models.SpeechModel(args.seed), models.SPEECH_INPUTS, _speech_preprocessing()),
        ("action", models.ActionModel(args.seed), models.ACTION_INPUTS, _action_preprocessing()),
    ]
    for name, model, inputs, preprocessing in jobs:
        path = args.out / f"{name}.onnx"
        model_hash = export_onnx(
            model,
            models.random_feeds(inputs, rng),
            path,
            name=name,
            version=version,
            metadata={
                "commands": json.dumps(COMMANDS),
                "preprocessing": json.dumps(preprocessing),
                "training": training,
            },
            init_kwargs={"seed": args.seed},
        )
        print(f"{path}: hash {model_hash}, {sum(p.numel() for p in model.parameters())} params")


def _export_module(args: argparse.Namespace) -> str:
    import importlib

    module_name, _, class_name = args.module.partition(":")
    try:
        init = json.loads(args.init)
        model = getattr(importlib.import_module(module_name), class_name)(**init)
        json.loads(args.preprocessing)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(f"export of {args.module!r}: {exc}") from exc
    rng = np.random.default_rng(args.seed)
    feeds = {}
    for item in args.input:
        input_name, _, dims = item.partition("=")
        try:
            shape = tuple(int(d) for d in dims.split("x"))
        except ValueError:
            raise ConfigError(f"export: --input {item!r} is not NAME=D1xD2...") from None
        feeds[input_name] = rng.standard_normal(shape).astype(np.float32)
    if not feeds:
        raise ConfigError("export: give every input with --input NAME=D1xD2...")
    return export_onnx(model, feeds, args.out, name=args.name or class_name,
                       version=args.version, metadata={"preprocessing": args.preprocessing},
                       init_kwargs=init)


if __name__ == "__main__":
    main()
