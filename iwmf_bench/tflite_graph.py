"""A TFLite flatbuffer read into PyTorch: the graph's operators run as torch ops.

Read with the ``tflite`` package (the flatbuffer schema's generated Python accessors;
nothing of TensorFlow), then executed op for op by :class:`TFLiteGraph`, an
``nn.Module`` whose constant tensors are buffers, so gradients flow to the input exactly
(the attacks need them). Only what float32 face-embedding graphs use is supported, and
anything else is refused by name: ``CONV_2D``, ``DEPTHWISE_CONV_2D`` (with their fused
activations), ``ADD``, ``SUB``, ``MUL``, ``RELU``, ``RELU6``, ``ABS``, ``RESHAPE``.

Layout: TFLite is NHWC; the module runs NCHW (PyTorch's convolution layout). Per-channel
constants (shape ``[C]``, broadcast along TFLite's last axis) become ``[C, 1, 1]``; a
``RESHAPE`` goes back to NHWC first so it means what it meant in the graph.

Padding: TFLite's ``SAME`` pads ``max((ceil(n / s) - 1) * s + k - n, 0)`` in total, the
extra row or column (when odd) at the bottom/right: at stride 2 on an even side that is
all of it, which PyTorch's symmetric ``padding`` would put on the wrong side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MissingExtraError, WeightsError

SUPPORTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "SUB", "MUL", "RELU", "RELU6", "ABS", "RESHAPE")
_ACTIVATIONS = {0: None, 1: "RELU", 3: "RELU6"}  # tflite.ActivationFunctionType: NONE, RELU, RELU6


@dataclass(frozen=True)
class Op:
    kind: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    same: bool = False  # padding SAME (else VALID)
    activation: str | None = None


@dataclass
class Graph:
    ops: list[Op]
    names: dict[int, str]  # tensor index -> name
    shapes: dict[int, tuple[int, ...]]
    constants: dict[int, np.ndarray]  # tensors with data in the file (weights, biases, shapes)
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


def _module():
    try:
        import tflite  # deferred: only models read from a .tflite file need it
    except ImportError:
        raise MissingExtraError("reading a .tflite model needs the `tflite` package (the flatbuffer schema): "
                                "pip install tflite") from None
    return tflite


def read_graph(path: str | Path) -> Graph:
    """The single subgraph of a float32 TFLite model; WeightsError naming the problem
    (unreadable file, quantized tensors, an unsupported operator)."""
    tfl = _module()
    path = Path(path)
    try:
        buf = path.read_bytes()
        if buf[4:8] != b"TFL3":  # the schema's file identifier
            raise WeightsError(f"{path}: not a readable TFLite model (no TFL3 file identifier; truncated or "
                               "another format)")
        model = tfl.Model.GetRootAsModel(buf, 0)
        if model.SubgraphsLength() != 1:
            raise WeightsError(f"{path}: {model.SubgraphsLength()} subgraphs; one expected")
        g = model.Subgraphs(0)
        builtin = {v: k for k, v in vars(tfl.BuiltinOperator).items() if not k.startswith("_")}
        codes = []
        for i in range(model.OperatorCodesLength()):
            c = model.OperatorCodes(i)
            codes.append(builtin.get(max(c.BuiltinCode(), c.DeprecatedBuiltinCode()), "CUSTOM"))
        names, shapes, constants = {}, {}, {}
        for i in range(g.TensorsLength()):
            t = g.Tensors(i)
            names[i] = t.Name().decode()
            shapes[i] = tuple(int(s) for s in t.ShapeAsNumpy()) if t.ShapeLength() else ()
            data = model.Buffers(t.Buffer()).DataAsNumpy() if t.Buffer() else 0
            if isinstance(data, np.ndarray) and data.size:
                if t.Type() == tfl.TensorType.FLOAT32:
                    constants[i] = data.view(np.float32).reshape(shapes[i]).copy()
                elif t.Type() == tfl.TensorType.INT32:
                    constants[i] = data.view(np.int32).reshape(shapes[i]).copy()
                else:
                    raise WeightsError(f"{path}: tensor {names[i]!r} has type {t.Type()} (quantized?); only float32 "
                                       "models are supported")
        ops = [_op(g.Operators(i), codes, tfl, path) for i in range(g.OperatorsLength())]
    except WeightsError:
        raise
    except Exception as exc:  # a truncated or foreign file fails deep inside the accessors
        raise WeightsError(f"{path}: not a readable TFLite model ({type(exc).__name__}: {exc})") from None
    return Graph(ops, names, shapes, constants, tuple(int(i) for i in g.InputsAsNumpy()),
                 tuple(int(i) for i in g.OutputsAsNumpy()))


def _op(op, codes: list[str], tfl, path: Path) -> Op:
    kind = codes[op.OpcodeIndex()]
    if kind not in SUPPORTED:
        raise WeightsError(f"{path}: operator {kind} is not supported (supported: {', '.join(SUPPORTED)})")
    ins, outs = tuple(int(i) for i in op.InputsAsNumpy()), tuple(int(i) for i in op.OutputsAsNumpy())
    if kind not in ("CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "SUB", "MUL"):
        return Op(kind, ins, outs)
    table = op.BuiltinOptions()
    cls = {"CONV_2D": tfl.Conv2DOptions, "DEPTHWISE_CONV_2D": tfl.DepthwiseConv2DOptions,
           "ADD": tfl.AddOptions, "SUB": tfl.SubOptions, "MUL": tfl.MulOptions}[kind]
    opts = cls()
    opts.Init(table.Bytes, table.Pos)
    act = opts.FusedActivationFunction()
    if act not in _ACTIVATIONS:
        raise WeightsError(f"{path}: fused activation {act} of a {kind} is not supported")
    if kind in ("ADD", "SUB", "MUL"):
        return Op(kind, ins, outs, activation=_ACTIVATIONS[act])
    if kind == "DEPTHWISE_CONV_2D" and opts.DepthMultiplier() not in (0, 1):
        raise WeightsError(f"{path}: depthwise convolution with depth multiplier {opts.DepthMultiplier()} "
                           "is not supported")
    return Op(kind, ins, outs, stride=(opts.StrideH(), opts.StrideW()),
              dilation=(opts.DilationHFactor(), opts.DilationWFactor()),
              same=opts.Padding() == tfl.Padding.SAME, activation=_ACTIVATIONS[act])


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) of TensorFlow's SAME padding along one axis."""
    effective = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _activate(x: torch.Tensor, kind: str | None) -> torch.Tensor:
    if kind == "RELU":
        return F.relu(x)
    if kind == "RELU6":
        return F.relu6(x)
    return x


class TFLiteGraph(torch.nn.Module):
    """Runs a :class:`Graph` on NCHW input; ``forward(x)`` returns the graph's single output."""

    def __init__(self, graph: Graph):
        super().__init__()
        if len(graph.inputs) != 1 or len(graph.outputs) != 1:
            raise WeightsError(f"graph with {len(graph.inputs)} inputs and {len(graph.outputs)} outputs; one each "
                               "expected")
        self.graph = graph
        self._slot: dict[int, str] = {}
        uses = {i: op.kind for op in graph.ops for i in op.inputs}
        for index, array in graph.constants.items():
            if uses.get(index) == "RESHAPE" and array.dtype == np.int32:
                continue  # a target shape, read from the graph when the op runs
            t = torch.from_numpy(array.astype(np.float32))
            if uses.get(index) == "CONV_2D" and t.dim() == 4:
                t = t.permute(0, 3, 1, 2)  # OHWI -> OIHW
            elif uses.get(index) == "DEPTHWISE_CONV_2D" and t.dim() == 4:
                t = t.permute(3, 0, 1, 2)  # 1HWC -> C1HW
            elif t.dim() == 1:
                t = t.view(-1, 1, 1)  # a per-channel constant (bias: flattened where used)
            name = f"t{index}"
            self.register_buffer(name, t.contiguous())
            self._slot[index] = name

    def _value(self, values: dict[int, torch.Tensor], index: int) -> torch.Tensor:
        return values[index] if index in values else getattr(self, self._slot[index])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.graph
        values: dict[int, torch.Tensor] = {g.inputs[0]: x}
        for op in g.ops:
            a = self._value(values, op.inputs[0])
            if op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
                w = self._value(values, op.inputs[1])
                bias = self._value(values, op.inputs[2]).flatten() if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
                if op.same:
                    (t, b), (left, right) = (same_padding(a.shape[2 + d], w.shape[2 + d], op.stride[d], op.dilation[d])
                                             for d in (0, 1))
                    a = F.pad(a, (left, right, t, b))
                groups = a.shape[1] if op.kind == "DEPTHWISE_CONV_2D" else 1
                out = F.conv2d(a, w, bias, stride=op.stride, dilation=op.dilation, groups=groups)
            elif op.kind in ("ADD", "SUB", "MUL"):
                b = self._value(values, op.inputs[1])
                out = a + b if op.kind == "ADD" else a - b if op.kind == "SUB" else a * b
            elif op.kind == "RELU":
                out = F.relu(a)
            elif op.kind == "RELU6":
                out = F.relu6(a)
            elif op.kind == "ABS":
                out = a.abs()
            else:  # RESHAPE, in the graph's NHWC layout
                shape = [int(s) for s in g.constants.get(op.inputs[1], np.array(g.shapes[op.outputs[0]]))] \
                    if len(op.inputs) > 1 else list(g.shapes[op.outputs[0]])
                shape[0] = -1 if shape[0] in (-1, g.shapes[g.inputs[0]][0]) else shape[0]
                out = (a.permute(0, 2, 3, 1) if a.dim() == 4 else a).reshape(shape)
            values[op.outputs[0]] = _activate(out, op.activation)
        return values[g.outputs[0]]
