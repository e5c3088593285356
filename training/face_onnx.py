"""Convert the two bundled MediaPipe face models from TFLite to ONNX, for ONNX Runtime.

The node runs the face detector and the landmark model on ONNX Runtime (which it already
carries, and which TensorRT can take over on a GPU) rather than through OpenCV's TFLite
importer, whose engine flags changed between OpenCV 5.0 and 5.1. This converter covers
exactly the operators those two models use (float16 weights behind DEQUANTIZE, CONV_2D,
DEPTHWISE_CONV_2D, ADD, RELU, PRELU, PAD, MAX_POOL_2D, RESHAPE, CONCATENATION) and refuses
any other with a clear error, so a new model cannot be converted wrongly in silence.

Layout: TFLite is NHWC, ONNX convolutions are NCHW. Every 4-D activation is kept NCHW inside
the graph; the input is taken NCHW (as `engines/face.py` feeds it), a RESHAPE of a 4-D tensor
first transposes back to NHWC so the flattening order matches TFLite's, and 4-D outputs are
transposed back to TFLite's NHWC shape.

Regenerate the shipped files (deterministic: the same bytes every time):

    python -m training.face_onnx --out engines/models/face --force
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import tflite
from onnx import TensorProto, helper, numpy_helper

from engines.face import DETECTOR_FILE, LANDMARK_FILE, default_model_dir, onnx_name

OPSET = 17
_NHWC_TO_NCHW = (0, 3, 1, 2)
_NCHW_TO_NHWC = (0, 2, 3, 1)
_NUMPY_TYPES = {tflite.TensorType.FLOAT32: np.float32, tflite.TensorType.FLOAT16: np.float16,
                tflite.TensorType.INT32: np.int32, tflite.TensorType.INT64: np.int64}
_OPERATOR_NAMES = {value: key for key, value in vars(tflite.BuiltinOperator).items()
                   if not key.startswith("_")}


class ConversionError(Exception):
    """The TFLite model uses something this converter does not translate."""


def _options(operator: tflite.Operator, kind: type):
    table = operator.BuiltinOptions()
    options = kind()
    options.Init(table.Bytes, table.Pos)
    return options


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TFLite's SAME padding: output ceil(size / stride), the odd pixel padded at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class _Converter:
    def __init__(self, data: bytes) -> None:
        if data[4:8] != b"TFL3":
            raise ConversionError("not a TFLite flatbuffer (no TFL3 identifier)")
        self.model = tflite.Model.GetRootAsModel(data, 0)
        if self.model.SubgraphsLength() != 1:
            raise ConversionError(f"expected one subgraph, found {self.model.SubgraphsLength()}")
        self.graph = self.model.Subgraphs(0)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.constants: dict[int, np.ndarray] = {}  # TFLite tensor index -> value
        self.layout: dict[int, str] = {}            # activation index -> "nchw" or "plain"

    # -- tensors -------------------------------------------------------------------------
    def _tensor(self, index: int) -> tflite.Tensor:
        return self.graph.Tensors(index)

    def _shape(self, index: int) -> list[int]:
        return [int(d) for d in self._tensor(index).ShapeAsNumpy()]

    def _name(self, index: int) -> str:
        return f"t{index}"

    def _buffer(self, index: int) -> np.ndarray | None:
        tensor = self._tensor(index)
        data = self.model.Buffers(tensor.Buffer()).DataAsNumpy()
        if isinstance(data, int) or data.size == 0:
            return None
        dtype = _NUMPY_TYPES.get(tensor.Type())
        if dtype is None:
            raise ConversionError(f"tensor {tensor.Name().decode()}: type {tensor.Type()} "
                                  "not supported")
        return np.frombuffer(data.tobytes(), dtype).reshape(self._shape(index))

    def _constant(self, index: int) -> np.ndarray:
        if index not in self.constants:
            value = self._buffer(index)
            if value is None:
                raise ConversionError(f"tensor {self._tensor(index).Name().decode()} was "
                                      "expected to be a constant")
            self.constants[index] = value
        return self.constants[index]

    def _initializer(self, name: str, value: np.ndarray) -> str:
        self.initializers[name] = numpy_helper.from_array(np.ascontiguousarray(value), name)
        return name

    def _node(self, op: str, inputs: list[str], outputs: list[str], **attributes) -> None:
        name = f"{op.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attributes))

    def _activation(self, code: int, value: str, output: str) -> None:
        if code == tflite.ActivationFunctionType.NONE:
            self._node("Identity", [value], [output])
        elif code == tflite.ActivationFunctionType.RELU:
            self._node("Relu", [value], [output])
        elif code == tflite.ActivationFunctionType.RELU6:
            self._node("Clip", [value, self._initializer(f"{output}_lo", np.float32(0)),
                                self._initializer(f"{output}_hi", np.float32(6))], [output])
        else:
            raise ConversionError(f"fused activation {code} not supported")

    # -- operators -----------------------------------------------------------------------
    def convert(self) -> onnx.ModelProto:
        graph = self.graph
        inputs, outputs = [], []
        for i in range(graph.InputsLength()):
            index = graph.Inputs(i)
            n, h, w, c = self._shape(index)
            self.layout[index] = "nchw"
            inputs.append(helper.make_tensor_value_info(self._name(index), TensorProto.FLOAT,
                                                        [n, c, h, w]))
        for i in range(graph.OperatorsLength()):
            self._operator(graph.Operators(i))
        for i in range(graph.OutputsLength()):
            index = graph.Outputs(i)
            name = self._tensor(index).Name().decode()
            if self.layout[index] == "nchw":
                self._node("Transpose", [self._name(index)], [name], perm=_NCHW_TO_NHWC)
            else:
                self._node("Identity", [self._name(index)], [name])
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                         self._shape(index)))
        # The graph input keeps its TFLite name.
        first_input = self._tensor(graph.Inputs(0)).Name().decode()
        inputs[0].name = first_input
        self.nodes.insert(0, helper.make_node("Identity", [first_input],
                                              [self._name(graph.Inputs(0))], name="input"))
        onnx_graph = helper.make_graph(self.nodes, "face", inputs, outputs,
                                       list(self.initializers.values()))
        model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="fusion-node training.face_onnx")
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model

    def _operator(self, operator: tflite.Operator) -> None:
        codes = self.model.OperatorCodes(operator.OpcodeIndex())
        code = max(codes.BuiltinCode(), codes.DeprecatedBuiltinCode())
        kind = _OPERATOR_NAMES.get(code, str(code))
        ins = [int(i) for i in operator.InputsAsNumpy()]
        out = int(operator.OutputsAsNumpy()[0])
        handler = getattr(self, f"_op_{kind.lower()}", None)
        if handler is None:
            raise ConversionError(f"TFLite operator {kind} not supported")
        handler(operator, ins, out)

    def _op_dequantize(self, operator, ins, out) -> None:
        self.constants[out] = self._constant(ins[0]).astype(np.float32)

    def _spatial(self, index: int) -> tuple[int, int]:
        _, h, w, _ = self._shape(index)
        return h, w

    def _pads(self, padding: int, source: int, kernel: tuple[int, int],
              stride: tuple[int, int], dilation: tuple[int, int]) -> list[int]:
        if padding == tflite.Padding.VALID:
            return [0, 0, 0, 0]
        h, w = self._spatial(source)
        top, bottom = _same_padding(h, kernel[0], stride[0], dilation[0])
        left, right = _same_padding(w, kernel[1], stride[1], dilation[1])
        return [top, left, bottom, right]

    def _convolution(self, ins, out, weights: np.ndarray, group: int, options) -> None:
        kernel = weights.shape[2:]
        stride = (options.StrideH(), options.StrideW())
        dilation = (options.DilationHFactor(), options.DilationWFactor())
        inputs = [self._name(ins[0]), self._initializer(f"{self._name(out)}_w", weights)]
        if len(ins) > 2 and ins[2] >= 0:
            inputs.append(self._initializer(f"{self._name(out)}_b",
                                            self._constant(ins[2]).astype(np.float32)))
        raw = f"{self._name(out)}_raw"
        self._node("Conv", inputs, [raw], kernel_shape=list(kernel), strides=list(stride),
                   dilations=list(dilation), group=group,
                   pads=self._pads(options.Padding(), ins[0], kernel, stride, dilation))
        self._activation(options.FusedActivationFunction(), raw, self._name(out))
        self.layout[out] = "nchw"

    def _op_conv_2d(self, operator, ins, out) -> None:
        weights = self._constant(ins[1]).astype(np.float32).transpose(0, 3, 1, 2)  # OHWI->OIHW
        self._convolution(ins, out, weights, 1, _options(operator, tflite.Conv2DOptions))

    def _op_depthwise_conv_2d(self, operator, ins, out) -> None:
        options = _options(operator, tflite.DepthwiseConv2DOptions)
        channels = self._shape(ins[0])[3]
        # [1, H, W, C * M] -> [C * M, 1, H, W], one group per input channel.
        weights = self._constant(ins[1]).astype(np.float32).transpose(3, 0, 1, 2)
        self._convolution(ins, out, weights, channels, options)

    def _op_add(self, operator, ins, out) -> None:
        options = _options(operator, tflite.AddOptions)
        raw = f"{self._name(out)}_raw"
        self._node("Add", [self._activation_input(i) for i in ins], [raw])
        self._activation(options.FusedActivationFunction(), raw, self._name(out))
        self.layout[out] = self.layout[ins[0]]

    def _activation_input(self, index: int) -> str:
        if index in self.layout:
            return self._name(index)
        raise ConversionError(f"tensor {self._tensor(index).Name().decode()}: constant "
                              "operand not supported here")

    def _op_relu(self, operator, ins, out) -> None:
        self._node("Relu", [self._name(ins[0])], [self._name(out)])
        self.layout[out] = self.layout[ins[0]]

    def _op_prelu(self, operator, ins, out) -> None:
        alpha = self._constant(ins[1]).astype(np.float32).reshape(-1)
        # Per-channel slope, broadcast over H and W in NCHW.
        slope = self._initializer(f"{self._name(out)}_slope", alpha.reshape(-1, 1, 1))
        self._node("PRelu", [self._name(ins[0]), slope], [self._name(out)])
        self.layout[out] = "nchw"

    def _op_pad(self, operator, ins, out) -> None:
        paddings = self._constant(ins[1]).astype(np.int64)  # NHWC rows of (before, after)
        order = _NHWC_TO_NCHW
        pads = [int(paddings[a, 0]) for a in order] + [int(paddings[a, 1]) for a in order]
        self._node("Pad", [self._name(ins[0]),
                           self._initializer(f"{self._name(out)}_pads", np.array(pads))],
                   [self._name(out)], mode="constant")
        self.layout[out] = "nchw"

    def _op_max_pool_2d(self, operator, ins, out) -> None:
        options = _options(operator, tflite.Pool2DOptions)
        kernel = (options.FilterHeight(), options.FilterWidth())
        stride = (options.StrideH(), options.StrideW())
        raw = f"{self._name(out)}_raw"
        self._node("MaxPool", [self._name(ins[0])], [raw], kernel_shape=list(kernel),
                   strides=list(stride),
                   pads=self._pads(options.Padding(), ins[0], kernel, stride, (1, 1)))
        self._activation(options.FusedActivationFunction(), raw, self._name(out))
        self.layout[out] = "nchw"

    def _op_reshape(self, operator, ins, out) -> None:
        source = self._name(ins[0])
        if self.layout[ins[0]] == "nchw":
            source = f"{self._name(out)}_nhwc"
            self._node("Transpose", [self._name(ins[0])], [source], perm=_NCHW_TO_NHWC)
        shape = np.array(self._shape(out), np.int64)
        self._node("Reshape", [source, self._initializer(f"{self._name(out)}_shape", shape)],
                   [self._name(out)])
        self.layout[out] = "plain"

    def _op_concatenation(self, operator, ins, out) -> None:
        options = _options(operator, tflite.ConcatenationOptions)
        layouts = {self.layout[i] for i in ins}
        if layouts != {"plain"}:
            raise ConversionError("CONCATENATION of 4-D activations not supported")
        axis = options.Axis()
        raw = f"{self._name(out)}_raw"
        self._node("Concat", [self._name(i) for i in ins], [raw], axis=axis)
        self._activation(options.FusedActivationFunction(), raw, self._name(out))
        self.layout[out] = "plain"


def convert(tflite_path: Path) -> onnx.ModelProto:
    """The ONNX model equivalent to one TFLite file (ConversionError names what is not
    supported)."""
    return _Converter(Path(tflite_path).read_bytes()).convert()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.face_onnx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=default_model_dir(),
                        help="folder holding the two .tflite files")
    parser.add_argument("--out", type=Path, required=True, help="folder for the .onnx files")
    parser.add_argument("--force", action="store_true", help="overwrite existing .onnx files")
    args = parser.parse_args(argv)
    targets = [(args.source / name, args.out / onnx_name(name))
               for name in (DETECTOR_FILE, LANDMARK_FILE)]
    for _, target in targets:
        if target.exists() and not args.force:
            print(f"error: {target} exists; pass --force to overwrite it", file=sys.stderr)
            return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for source, target in targets:
        try:
            model = convert(source)
        except (ConversionError, OSError) as error:
            print(f"error: {source}: {error}", file=sys.stderr)
            return 1
        target.write_bytes(model.SerializeToString())
        print(f"{source} -> {target} ({target.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
