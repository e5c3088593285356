"""Engine specs: parsing, checking against a model, and SpecBinding on real windows.

The models are tiny hand-built ONNX graphs, run by the real ONNX Runtime engine; the windows
come from a real AlignmentBuffer fed with protocol messages.
"""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from engines.backends import create_engine
from engines.preprocess import LogMel
from engines.spec import parse_spec
from fusion_node.alignment import AlignmentBuffer
from fusion_node.bindings import SpecBinding
from fusion_node.errors import ConfigError
from fusion_node.protocol import AudioChunk, Frame, JointState

SR = 16_000
PERIOD_NS = 32_000_000


def _save(path: Path, nodes, inputs, outputs) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)
    return path


def _accumulator(path: Path) -> Path:
    """y = x + state (x [1, 4]); stateN = y; `state` has a dynamic first dim, like Silero's."""
    return _save(path, [helper.make_node("Add", ["x", "state"], ["y"]),
                        helper.make_node("Identity", ["y"], ["stateN"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                  helper.make_tensor_value_info("state", TensorProto.FLOAT, ["batch", 4])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
                  helper.make_tensor_value_info("stateN", TensorProto.FLOAT, ["batch", 4])])


def _passthrough(path: Path, inputs: dict[str, tuple[list[int], int]]) -> Path:
    """Every input copied to an output named `<input>_out`, to see exactly what was fed."""
    return _save(path, [helper.make_node("Identity", [n], [f"{n}_out"]) for n in inputs],
                 [helper.make_tensor_value_info(n, t, s) for n, (s, t) in inputs.items()],
                 [helper.make_tensor_value_info(f"{n}_out", t, s)
                  for n, (s, t) in inputs.items()])


ACCUMULATOR_SPEC = {
    "inputs": {
        "x": {"kind": "constant", "value": [1.0, 2.0, 3.0, 4.0]},
        "state": {"kind": "state", "output": "stateN", "shape": [1, 4]},
    },
    "outputs": {"y": {"field": "total", "threshold": 5.0, "flag": "big"},
                "stateN": {"field": "state", "publish": "array"}},
}


def _binding(spec, engine, streams=None) -> SpecBinding:
    spec.check("test", engine.inputs, engine.outputs)
    return SpecBinding(spec, streams or {}, engine.inputs, PERIOD_NS, "test")


def _tick(binding: SpecBinding, engine, buffer: AlignmentBuffer, t_ref_ns: int):
    window = buffer.window(t_ref_ns, binding.spec)
    assert not window.missing_required, window.missing
    feeds = binding.feeds(window)
    return feeds, binding.decode(engine.infer(feeds), window)


def test_state_carries_between_consecutive_ticks_and_resets_after_a_gap(tmp_path):
    spec = parse_spec(ACCUMULATOR_SPEC, "spec")
    engine = create_engine(_accumulator(tmp_path / "acc.onnx"), backend="onnxruntime",
                           input_shapes=spec.input_shapes(), example_feeds=spec.example_feeds())
    assert {s.name: s.shape for s in engine.outputs} == {"y": (1, 4), "stateN": (1, 4)}
    binding = _binding(spec, engine)
    buffer = AlignmentBuffer({})
    totals = [_tick(binding, engine, buffer, k * PERIOD_NS)[1][0]["total"] for k in range(3)]
    assert totals == [4.0, 8.0, 12.0]  # the last element accumulates: state was fed back
    fields, arrays = _tick(binding, engine, buffer, 3 * PERIOD_NS)[1]
    assert fields == {"total": 16.0, "big": True}
    np.testing.assert_array_equal(arrays["state"], [4, 8, 12, 16])
    # Two periods later (a tick produced nothing): the state starts again from `initial`.
    assert _tick(binding, engine, buffer, 5 * PERIOD_NS)[1][0]["total"] == 4.0


def _buffer_with_sensors(t_end_ns: int) -> AlignmentBuffer:
    buffer = AlignmentBuffer({"audio.mic0": 256, "camera.front": 8, "joints.arm": 64})
    rng = np.random.default_rng(5)
    chunk = 160  # 10 ms
    for k in range(t_end_ns // 10_000_000 + 1):
        samples = (rng.standard_normal((chunk, 2)) * 3000).astype(np.int16)
        buffer.push(AudioChunk("audio.mic0", k, k * 10_000_000, SR, k * chunk, samples))
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    buffer.push(Frame("camera.front", 0, t_end_ns - 5_000_000, image))
    for k in range(3):
        t = t_end_ns - 10_000_000 + k * 10_000_000
        buffer.push(JointState("joints.arm", k, t, ("a", "b"), np.array([k, 2.0 * k]),
                               np.array([0.5, -0.5]), np.zeros(2)))
    return buffer


def test_every_source_kind_feeds_what_the_spec_says(tmp_path):
    n_mels, frames = 8, 5
    mel = LogMel(SR, n_mels=n_mels)
    samples = mel.samples_for(frames)
    spec = parse_spec({"inputs": {
        "wave": {"kind": "audio", "stream": "mic", "samples": samples, "sample_rate": SR},
        "mel": {"kind": "audio", "stream": "mic", "samples": samples, "sample_rate": SR,
                "transform": "log_mel", "n_mels": n_mels},
        "mel_valid": {"kind": "valid", "of": "mel"},
        "image": {"kind": "image", "stream": "cam", "size": 8},
        "image_valid": {"kind": "valid", "of": "image"},
        "joints": {"kind": "joints", "stream": "arm", "fields": ["position", "velocity"]},
        "rate": {"kind": "constant", "value": SR},
    }}, "spec")
    float_ = TensorProto.FLOAT
    model = _passthrough(tmp_path / "all.onnx", {
        "wave": ([1, samples], float_), "mel": ([1, frames, n_mels], float_),
        "mel_valid": ([1, frames], float_), "image": ([1, 3, 8, 8], float_),
        "image_valid": ([1, 1], float_), "joints": ([1, 4], float_),
        "rate": ([], TensorProto.INT64)})
    engine = create_engine(model, backend="onnxruntime", example_feeds=spec.example_feeds())
    binding = _binding(spec, engine, {"mic": "audio.mic0", "cam": "camera.front",
                                      "arm": "joints.arm"})
    t_ref = 500_000_000
    buffer = _buffer_with_sensors(t_ref)
    feeds, _ = _tick(binding, engine, buffer, t_ref)
    span = buffer.window(t_ref, binding.spec).data["audio.mic0"]
    mono = span.samples.mean(axis=1)
    np.testing.assert_array_equal(feeds["wave"][0], mono)
    np.testing.assert_allclose(feeds["mel"][0], mel(mono), rtol=1e-6)
    np.testing.assert_array_equal(feeds["mel_valid"][0], np.ones(frames))
    assert feeds["image"].shape == (1, 3, 8, 8) and 0 < feeds["image"].mean() < 1
    assert feeds["image_valid"].item() == 1.0
    # Joints at t_ref (which falls exactly on the second sample): positions, then velocities.
    np.testing.assert_allclose(feeds["joints"][0], [1.0, 2.0, 0.5, -0.5])
    assert feeds["rate"].dtype == np.int64 and feeds["rate"] == SR


def test_missing_optional_inputs_are_zeros_and_masked(tmp_path):
    spec = parse_spec({"inputs": {
        "wave": {"kind": "audio", "stream": "mic", "samples": 160, "sample_rate": SR,
                 "required": False},
        "wave_valid": {"kind": "valid", "of": "wave"},
        "image": {"kind": "image", "stream": "cam", "size": 4},
        "image_valid": {"kind": "valid", "of": "image"},
    }}, "spec")
    float_ = TensorProto.FLOAT
    engine = create_engine(_passthrough(tmp_path / "opt.onnx", {
        "wave": ([1, 160], float_), "wave_valid": ([1, 160], float_),
        "image": ([1, 3, 4, 4], float_), "image_valid": ([1], float_)}), backend="onnxruntime")
    binding = _binding(spec, engine, {"mic": "audio.mic0", "cam": "camera.front"})
    feeds, _ = _tick(binding, engine, AlignmentBuffer({"audio.mic0": 8, "camera.front": 8}),
                     10**9)
    assert all(not value.any() for value in feeds.values())


@pytest.mark.parametrize(("spec", "message"), [
    ({"inputs": {"x": {"kind": "video"}}}, "kind = 'video' is not one of"),
    ({"inputs": {"x": {"kind": "audio", "stream": "a", "samples": 10}}},
     "missing required key 'sample_rate'"),
    ({"inputs": {"x": {"kind": "constant", "value": 1, "colour": "red"}}},
     r"unknown key\(s\) \['colour'\]"),
    ({"inputs": {"x": {"kind": "constant", "value": "fast"}}}, "value = 'fast'"),
    ({"inputs": {"x": {"kind": "constant", "value": 1, "shape": [0]}}}, "positive ints"),
    ({"inputs": {"x": {"kind": "valid", "of": "y"}}}, "`of` = 'y' is not an audio"),
    ({"inputs": {"x": {"kind": "audio", "stream": "a", "samples": 100, "sample_rate": SR,
                       "transform": "log_mel"}}}, "make no log-mel frame"),
    ({"inputs": {}, "outputs": {"y": {"field": "p", "flag": "on"}}}, "go together"),
    ({"inputs": {}, "outputs": {"y": {"field": "p"}, "z": {"field": "p"}}},
     r"fields \['p'\] are published more than once"),
    ({"inputs": {}, "outputs": {"y": {"field": "p", "publish": "mean"}}}, "publish = 'mean'"),
])
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(spec, "engine 'vad' spec")


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s["inputs"].pop("x"), r"model inputs \['x'\] have no binding"),
    (lambda s: s["inputs"].update(z={"kind": "constant", "value": 0}), r"binds \['z'\]"),
    (lambda s: s["inputs"]["state"].update(output="nope"), "comes from 'nope'"),
    (lambda s: s["inputs"].update(x={"kind": "audio", "stream": "mic", "samples": 5,
                                     "sample_rate": SR}), r"is \(1, 4\) \(4 values\)"),
    (lambda s: s["outputs"].update(y={"field": "c", "publish": "argmax", "labels": ["a"]}),
     "has 4 values but 1 labels"),
    (lambda s: s["outputs"].update(q={"field": "q"}), "publishes 'q'"),
])
def test_spec_is_checked_against_the_model(tmp_path, change, message):
    good = parse_spec(ACCUMULATOR_SPEC, "spec")
    engine = create_engine(_accumulator(tmp_path / "acc.onnx"), backend="onnxruntime",
                           input_shapes=good.input_shapes())
    data = {"inputs": {k: dict(v) for k, v in ACCUMULATOR_SPEC["inputs"].items()},
            "outputs": dict(ACCUMULATOR_SPEC["outputs"])}
    change(data)
    with pytest.raises(ConfigError, match=message):
        parse_spec(data, "spec").check("engine 'acc'", engine.inputs, engine.outputs)


def test_argmax_publishes_the_label(tmp_path):
    spec = parse_spec({"inputs": {"x": {"kind": "constant", "value": [0.1, 3.0, 0.2, 0.0]},
                                  "state": {"kind": "constant", "value": 0, "shape": [1, 4]}},
                       "outputs": {"y": {"field": "word", "publish": "argmax",
                                         "activation": "softmax",
                                         "labels": ["no", "yes", "stop", "go"]}}}, "spec")
    engine = create_engine(_accumulator(tmp_path / "acc.onnx"), backend="onnxruntime",
                           input_shapes=spec.input_shapes(), example_feeds=spec.example_feeds())
    fields, _ = _tick(_binding(spec, engine), engine, AlignmentBuffer({}), 0)[1]
    assert fields["word"] == "yes" and fields["word_index"] == 1
    assert 0.8 < fields["word_confidence"] < 1.0


def test_shapes_fix_only_dynamic_dims(tmp_path):
    from fusion_node.errors import EngineError

    model = _accumulator(tmp_path / "acc.onnx")
    with pytest.raises(EngineError, match="'state' has dynamic shape"):
        create_engine(model, backend="onnxruntime")
    with pytest.raises(EngineError, match=r"'state' is \['batch', 4\], cannot fix it to \(1, 5\)"):
        create_engine(model, backend="onnxruntime", input_shapes={"state": (1, 5)})
    with pytest.raises(EngineError, match=r"input_shapes name unknown inputs \['z'\]"):
        create_engine(model, backend="onnxruntime", input_shapes={"z": (1,)})
