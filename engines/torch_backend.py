"""PyTorch backend: the reference engine. Eager on the CPU; on a GPU, fp16 and a CUDA graph.

torch is imported here only. An ONNX file exported by `training.export` names the torch module
it came from (`torch_module`, `torch_init`) and the SHA-256 of its weights, so
`TorchEngine.from_onnx` rebuilds exactly the module the file was exported from, with trained
weights from `MODEL.pt` beside it when there is one, and refuses weights that differ.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engines import base
from engines.base import TensorSpec, check_feeds
from fusion_node.errors import ConfigError, EngineError

PRECISIONS = ("fp32", "fp16")
# Eager runs before capture, as the CUDA graphs documentation asks (lazy init, autotuning).
_CAPTURE_WARM_UP = 3


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes, values), in name order."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{key}:{array.dtype}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


# Files exported before model making moved from engines/ to training/ name the old module.
_MOVED_MODULES = {"engines.models": "training.models"}


class TorchEngine:
    """A keyword-in, dict-out torch module behind the `Engine` protocol.

    On the CPU (the default) it runs eager in fp32 under `inference_mode`; `threads` sets
    torch's intra-op threads, a process-wide setting, so None leaves it alone. With `device="cuda"` the module runs
    in `precision` ("fp16" halves float inputs and weights) and, with `cuda_graphs`, is
    captured once into a CUDA graph over static input tensors and replayed per call;
    `last_gpu_ms` is then the GPU time of the last inference, from CUDA events.
    """

    backend = "torch"

    def __init__(
        self,
        module: nn.Module,
        inputs: tuple[TensorSpec, ...],
        *,
        name: str,
        model_hash: str,
        device: str = "cpu",
        precision: str = "fp32",
        cuda_graphs: bool = True,
        threads: int | None = None,
        example_feeds: dict[str, np.ndarray] | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"engine {name!r}: torch precision {precision!r} is not one of "
                              f"{PRECISIONS}")
        if device == "cpu" and precision != "fp32":
            raise ConfigError(f"engine {name!r}: torch runs fp32 on the CPU, not {precision}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineError(f"engine {name!r}: device {device!r} asked for, but torch sees "
                              "no CUDA GPU")
        if threads is not None:
            torch.set_num_threads(threads)
        self.name = name
        self.model_hash = model_hash
        self.inputs = inputs
        self.device = torch.device(device)
        self._half = precision == "fp16"
        self.module = module.eval().to(self.device)
        if self._half:
            self.module = self.module.half()
        self._example = base.example_feeds(f"engine {name!r}", inputs, example_feeds)
        self._graph: Any = None
        self.last_gpu_ms = 0.0
        if self.device.type == "cuda":
            self._static = {s.name: self._to_device(self._example[s.name]) for s in inputs}
            self._events = (torch.cuda.Event(enable_timing=True),
                            torch.cuda.Event(enable_timing=True))
            if cuda_graphs:
                self._capture()
        outputs = self.infer(self._example)
        self.outputs = tuple(TensorSpec(k, v.shape, v.dtype.name) for k, v in outputs.items())

    @classmethod
    def from_onnx(cls, path: str | Path, name: str | None = None, **options: Any) -> TorchEngine:
        """The torch module `path` was exported from (see the module docstring)."""
        from engines.onnxruntime_backend import load_metadata

        path = Path(path)
        meta = load_metadata(path)
        target = meta.get("torch_module")
        if not target or ":" not in target:
            raise EngineError(f"engine model {path}: no torch_module in its metadata; only "
                              "files written by training.export can run on the torch backend")
        module_name, _, class_name = target.partition(":")
        module_name = _MOVED_MODULES.get(module_name, module_name)
        try:
            module_cls = getattr(importlib.import_module(module_name), class_name)
            # The name comes from the model file: only a torch module class may be built
            # from it, never an arbitrary callable such as os:system.
            if not (isinstance(module_cls, type) and issubclass(module_cls, torch.nn.Module)):
                raise TypeError(f"{target} is not a torch.nn.Module class")
            module = module_cls(**json.loads(meta.get("torch_init", "{}")))
        except (ImportError, AttributeError, TypeError, ValueError) as exc:
            raise EngineError(f"engine model {path}: cannot build {target}: {exc}") from exc
        weights = path.with_suffix(".pt")
        if weights.exists():
            module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        if weights_sha256(module) != meta.get("weights_sha256"):
            raise EngineError(f"engine model {path}: the torch weights of {target} "
                              f"({weights if weights.exists() else 'initial'}) are not the "
                              "ones this ONNX file was exported with")
        inputs = tuple(TensorSpec(s["name"], tuple(s["shape"]), s["dtype"])
                       for s in json.loads(meta["inputs"]))
        model_hash = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        return cls(module, inputs, name=name or path.stem, model_hash=model_hash, **options)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        return tensor.half() if self._half and tensor.is_floating_point() else tensor

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(_CAPTURE_WARM_UP):
                self.module(**self._static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            self._static_out = self.module(**self._static)
        self._graph = graph

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the module once on `feeds`; outputs as float32 (or their own dtype) arrays."""
        check_feeds(self.name, self.inputs, feeds)
        if self.device.type == "cpu":
            with torch.inference_mode():
                outputs = self.module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
            return {k: v.numpy() for k, v in outputs.items()}
        start, end = self._events
        for key, value in feeds.items():
            self._static[key].copy_(torch.from_numpy(value))
        start.record()
        if self._graph is not None:
            self._graph.replay()
            outputs = self._static_out
        else:
            with torch.no_grad():
                outputs = self.module(**self._static)
        end.record()
        result = {k: (v.float() if v.dtype == torch.half else v).cpu().numpy()
                  for k, v in outputs.items()}  # .cpu() waits for the stream
        end.synchronize()
        self.last_gpu_ms = start.elapsed_time(end)
        return result

    def warm_up(self, iterations: int = 3) -> None:
        """Run `iterations` inferences on the example feeds."""
        for _ in range(iterations):
            self.infer(self._example)

    def close(self) -> None:
        """Nothing to free by hand: torch frees tensors and CUDA graphs with the object."""
