"""The timed unit of a latency table: one conv or linear layer, identified by its signature.

A signature is everything that decides a layer's latency except its widths (op,
kernel, stride, padding, dilation, groups, input size, full widths); batch, precision
and threads belong to the table's header. Layers with the same signature (repeated
blocks) are measured once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from kpc.costs import Side, is_depthwise
from kpc.groups import is_grouped_conv
from kpc.tracing import forward_with_hooks

OPSET = 17
# The yardstick a lone layer is timed against on kernel-timed runtimes (see exporters.kernel_timing):
# a mid-sized 3x3 conv, about 0.1 ms here, in its own branch of the layer's graph.
REFERENCE_MARKER = "kpc_reference"
REFERENCE_CHANNELS = 48
REFERENCE_HW = (28, 28)
REFERENCE_SIGNATURE = f"conv k3x3 s1x1 p1x1 d1x1 in{REFERENCE_HW[0]}x{REFERENCE_HW[1]} g1 " \
                      f"c{REFERENCE_CHANNELS}->{REFERENCE_CHANNELS}"


@dataclass(frozen=True)
class Geometry:
    kind: str  # "conv", "dwconv", "gconv" (grouped, loses whole conv groups) or "linear"
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1  # conv groups at full width
    in_hw: tuple[int, int] = (1, 1)  # input spatial size; (tokens, 1) for linear layers
    out_hw: tuple[int, int] = (1, 1)
    group_widths: tuple[int, int] = (0, 0)  # grouped convs: (input, output) channels per conv group


@dataclass
class Layer:
    name: str
    geometry: Geometry
    out: Side  # output channels as a function of the group widths
    inp: Side  # input channels

    @property
    def signature(self) -> str:
        g = self.geometry
        c_in, c_out = int(self.inp.full), int(self.out.full)
        if g.kind == "linear":
            return f"linear t{g.in_hw[0]} c{c_in}->{c_out}"
        base = (f"k{g.kernel[0]}x{g.kernel[1]} s{g.stride[0]}x{g.stride[1]} p{g.padding[0]}x{g.padding[1]} "
                f"d{g.dilation[0]}x{g.dilation[1]} in{g.in_hw[0]}x{g.in_hw[1]}")
        if g.kind == "dwconv":
            return f"dwconv {base} c{c_out}"
        if g.kind == "gconv":
            return f"gconv {base} g{g.groups} c{c_in}->{c_out}"
        return f"conv {base} g{g.groups} c{c_in}->{c_out}"

    @property
    def out_elements(self) -> float:
        """Output elements per output channel (spatial positions or tokens)."""
        return float(self.geometry.out_hw[0] * self.geometry.out_hw[1])


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def collect_layers(model: nn.Module, example: torch.Tensor, sides: dict[nn.Module, tuple[Side, Side]]) -> list[Layer]:
    """Every conv and linear layer the forward pass runs, with its geometry and channel sides."""
    seen: dict[nn.Module, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def hook(module, inputs, output):
        if module not in seen and isinstance(output, torch.Tensor) and inputs and isinstance(inputs[0], torch.Tensor):
            seen[module] = (tuple(inputs[0].shape), tuple(output.shape))

    forward_with_hooks(model, example, [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))], hook)
    names = {m: n for n, m in model.named_modules()}
    layers = []
    for module, (in_shape, out_shape) in seen.items():
        if isinstance(module, nn.Conv2d):
            kind = "dwconv" if is_depthwise(module) else "gconv" if is_grouped_conv(module) else "conv"
            kernel = _pair(module.kernel_size)
            dilation = _pair(module.dilation)
            if isinstance(module.padding, str):  # "same"/"valid": spell it out as explicit pads
                padding = ((kernel[0] - 1) * dilation[0] // 2, (kernel[1] - 1) * dilation[1] // 2) \
                    if module.padding == "same" else (0, 0)
            else:
                padding = _pair(module.padding)
            geometry = Geometry(kind, kernel, _pair(module.stride), padding, dilation,
                                1 if kind == "dwconv" else module.groups, (in_shape[2], in_shape[3]),
                                (out_shape[2], out_shape[3]),
                                (module.in_channels // module.groups, module.out_channels // module.groups)
                                if kind == "gconv" else (0, 0))
            full_out, full_in = float(module.out_channels), float(module.in_channels)
        else:
            tokens = max(1, math.prod(out_shape[1:-1]))
            geometry = Geometry("linear", in_hw=(tokens, 1), out_hw=(tokens, 1))
            full_out, full_in = float(module.out_features), float(module.in_features)
        out, inp = sides.get(module, (Side(full_out, full_out), Side(full_in, full_in)))
        if geometry.kind == "dwconv":  # input and output channels are the same channels
            inp = out
        layers.append(Layer(names[module], geometry, out, inp))
    return layers


def grid_points(low: float, high: float, round_to: int) -> list[int]:
    """Widths to measure between `low` and `high`: dense near full width, coarser below.

    Latency moves in steps near the full width (tile boundaries) and the knapsack
    mostly chooses there, so the two steps below full are always measured; below
    that, points at 3/4, 1/2, 3/8 and 1/4 of full width and the minimum bound the curve.
    """
    high_i, low_i = round(high), max(1, math.floor(low))
    if high_i - low_i < 1:
        return [high_i]
    step = max(1, round_to)
    points = {high_i, high_i - step, high_i - 2 * step, low_i}
    for fraction in (0.75, 0.5, 0.375, 0.25):
        points.add(round(high_i * fraction / step) * step)
    return sorted(p for p in points if low_i <= p <= high_i)


# ---------------------------------------------------------------- single-layer models


def conv_groups(geometry: Geometry, c_out: int) -> int:
    """The conv's groups at these widths: depthwise keeps one per channel; a grouped conv keeps its
    per-group widths and loses whole groups, so its group count follows its width."""
    if geometry.kind == "dwconv":
        return c_out
    if geometry.kind == "gconv":
        return max(1, c_out // geometry.group_widths[1])
    return geometry.groups


def torch_layer(geometry: Geometry, c_in: int, c_out: int) -> nn.Module:
    if geometry.kind == "linear":
        return nn.Linear(c_in, c_out)
    groups = conv_groups(geometry, c_out)
    return nn.Conv2d(c_in, c_out, geometry.kernel, geometry.stride, geometry.padding, geometry.dilation, groups,
                     bias=True).eval()


def layer_input(geometry: Geometry, c_in: int, batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if geometry.kind == "linear":
        tokens = geometry.in_hw[0]
        shape = (batch, c_in) if tokens == 1 else (batch, tokens, c_in)
    else:
        shape = (batch, c_in, *geometry.in_hw)
    return rng.standard_normal(shape, dtype=np.float32)


def reference_input(fp16: bool = False) -> np.ndarray:
    sample = np.random.default_rng(1).standard_normal((1, REFERENCE_CHANNELS, *REFERENCE_HW), dtype=np.float32)
    return sample.astype(np.float16) if fp16 else sample


def onnx_layer(geometry: Geometry, c_in: int, c_out: int, batch: int, path: Path, *, fp16: bool = False,
               reference: bool = False) -> Path:
    """The layer as a one-node ONNX graph, built directly (milliseconds, no tracing).

    With `reference`, the graph also holds the reference conv on its own input
    (`REFERENCE_MARKER` in its node and tensor names), so the layer can be timed relative to it.
    """
    dtype = np.float16 if fp16 else np.float32
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    rng = np.random.default_rng(0)
    sample = layer_input(geometry, c_in, batch)
    x = helper.make_tensor_value_info("input", elem, list(sample.shape))
    if geometry.kind == "linear":
        weight = rng.standard_normal((c_out, c_in)).astype(dtype) * 0.05
        bias = np.zeros(c_out, dtype=dtype)
        if sample.ndim == 2:
            nodes = [helper.make_node("Gemm", ["input", "W", "B"], ["output"], transB=1)]
            inits = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")]
            out_shape = [batch, c_out]
        else:
            nodes = [helper.make_node("MatMul", ["input", "WT"], ["mm"]),
                     helper.make_node("Add", ["mm", "B"], ["output"])]
            inits = [numpy_helper.from_array(np.ascontiguousarray(weight.T), "WT"), numpy_helper.from_array(bias, "B")]
            out_shape = [batch, sample.shape[1], c_out]
    else:
        groups = conv_groups(geometry, c_out)
        weight = rng.standard_normal((c_out, c_in // groups, *geometry.kernel)).astype(dtype) * 0.05
        bias = np.zeros(c_out, dtype=dtype)
        nodes = [helper.make_node(
            "Conv", ["input", "W", "B"], ["output"], kernel_shape=list(geometry.kernel),
            strides=list(geometry.stride), pads=[geometry.padding[0], geometry.padding[1]] * 2,
            dilations=list(geometry.dilation), group=groups)]
        inits = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")]
        out_shape = [batch, c_out, *geometry.out_hw]
    inputs = [x]
    outputs = [helper.make_tensor_value_info("output", elem, out_shape)]
    if reference:
        ref_shape = [1, REFERENCE_CHANNELS, *REFERENCE_HW]
        inputs.append(helper.make_tensor_value_info(f"{REFERENCE_MARKER}_input", elem, ref_shape))
        outputs.append(helper.make_tensor_value_info(f"{REFERENCE_MARKER}_output", elem, ref_shape))
        ref_weight = rng.standard_normal((REFERENCE_CHANNELS, REFERENCE_CHANNELS, 3, 3)).astype(dtype) * 0.05
        inits += [numpy_helper.from_array(ref_weight, f"{REFERENCE_MARKER}_W"),
                  numpy_helper.from_array(np.zeros(REFERENCE_CHANNELS, dtype=dtype), f"{REFERENCE_MARKER}_B")]
        nodes.append(helper.make_node(
            "Conv", [f"{REFERENCE_MARKER}_input", f"{REFERENCE_MARKER}_W", f"{REFERENCE_MARKER}_B"],
            [f"{REFERENCE_MARKER}_output"], name=REFERENCE_MARKER, kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    graph = helper.make_graph(nodes, "layer", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = min(model.ir_version, 9)
    onnx.save(model, str(path))
    return path
