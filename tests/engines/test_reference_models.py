"""The reference architectures in torch, and the ONNX files shipped in engines/models/."""

import hashlib
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.onnxruntime_backend import OnnxRuntimeEngine
from engines.vocabulary import COMMANDS
from training import models

SHIPPED = Path(str(resources.files("engines") / "models"))
ARCHITECTURES = [
    ("speech", models.SpeechModel, models.SPEECH_INPUTS, models.SPEECH_OUTPUTS),
    ("action", models.ActionModel, models.ACTION_INPUTS, models.ACTION_OUTPUTS),
]


def _run(model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outputs = model.eval()(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return {k: v.numpy() for k, v in outputs.items()}


def test_vocabulary() -> None:
    assert len(COMMANDS) == 17 and COMMANDS[0] == "none"
    assert len(set(COMMANDS)) == 17
    assert models.COMMANDS is COMMANDS


@pytest.mark.parametrize(("name", "cls", "inputs", "outputs"), ARCHITECTURES)
def test_size_shapes_and_seeded_init(name, cls, inputs, outputs) -> None:
    model = cls(seed=0)
    assert 400_000 <= sum(p.numel() for p in model.parameters()) <= 1_500_000
    result = _run(model, models.random_feeds(inputs, np.random.default_rng(0)))
    assert {k: v.shape for k, v in result.items()} == outputs
    assert list(result) == list(outputs)

    torch.manual_seed(123)  # the global RNG must not matter, nor be disturbed
    state = torch.random.get_rng_state()
    same, other = cls(seed=0), cls(seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    for key, value in model.state_dict().items():
        assert torch.equal(value, same.state_dict()[key]), key
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("cls", "inputs", "data", "valid"),
    [
        (models.SpeechModel, models.SPEECH_INPUTS, "audio_mel", "audio_valid"),
        (models.SpeechModel, models.SPEECH_INPUTS, "video", "video_valid"),
        (models.ActionModel, models.ACTION_INPUTS, "image", "image_valid"),
        (models.ActionModel, models.ACTION_INPUTS, "command", "command_valid"),
    ],
)
def test_masked_content_is_ignored(cls, inputs, data, valid) -> None:
    """What a valid mask marks as missing cannot change any output (modality dropout)."""
    rng = np.random.default_rng(3)
    model = cls(seed=0)
    feeds = models.random_feeds(inputs, rng)
    mask = np.zeros(inputs[valid], dtype=np.float32)
    if data == "audio_mel":
        mask[:, :40] = 1  # the last 24 frames (6 tokens) are a gap
    feeds[valid] = mask
    base = _run(model, feeds)

    gap = np.repeat(mask == 0, feeds[data].size // mask.size).reshape(feeds[data].shape)
    changed = dict(feeds)
    changed[data] = np.where(gap, rng.normal(size=gap.shape) * 5, feeds[data]).astype(np.float32)
    assert not np.array_equal(changed[data], feeds[data])
    for key, value in _run(model, changed).items():
        np.testing.assert_allclose(value, base[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_actions_are_offsets_from_current_positions() -> None:
    model = models.ActionModel(seed=0)
    torch.nn.init.zeros_(model.action_head.weight)
    torch.nn.init.zeros_(model.action_head.bias)
    feeds = models.random_feeds(models.ACTION_INPUTS, np.random.default_rng(4))
    actions = _run(model, feeds)["actions"]
    expected = np.broadcast_to(feeds["joints"][:, None, :3], (1, models.ACTION_HORIZON, 3))
    np.testing.assert_array_equal(actions, expected)


@pytest.mark.parametrize(("name", "cls", "inputs", "outputs"), ARCHITECTURES)
def test_shipped_model_declares_what_it_is(name, cls, inputs, outputs) -> None:
    path = SHIPPED / f"{name}.onnx"
    assert path.stat().st_size < 8 * 2**20
    engine = OnnxRuntimeEngine(path)
    assert engine.model_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert {s.name: s.shape for s in engine.inputs} == inputs
    assert {s.name: s.shape for s in engine.outputs} == outputs
    assert all(s.dtype == "float32" for s in engine.inputs + engine.outputs)
    meta = engine.metadata
    assert meta["name"] == name
    assert json.loads(meta["commands"]) == list(COMMANDS)
    assert {d["name"]: tuple(d["shape"]) for d in json.loads(meta["inputs"])} == inputs
    assert set(json.loads(meta["preprocessing"])) <= set(inputs) | set(outputs)
    assert len(meta["weights_sha256"]) == 64 and meta["version"] and meta["training"]
    engine.warm_up(iterations=1)
