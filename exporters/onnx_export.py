"""Export a torch module to ONNX, and nothing else (validation is :mod:`exporters.parity`).

Exporter choice: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``).
Checked on torch 2.15 with torchvision resnet18 / mobilenet_v3_large / efficientnet_b0 and
timm efficientnet_b0 / convnext_atto on CPU: both exporters produce graphs that match
PyTorch, but the dynamo exporter

* has no opset 17 implementations: it exports opset 18 and tries to down-convert, which
  fails for these models and silently leaves opset 18, so the requested opset is not honoured
  (older TensorRT / ONNX Runtime builds are why a caller pins the opset);
* needs ``torch.export`` dynamic-shape specs instead of plain ``dynamic_axes``;
* is about 8x slower per export (3-4 s vs 0.3-0.6 s for these models), which matters when
  a pruning sweep exports many candidates.

The legacy exporter is deprecated upstream; :data:`EXPORTER` is the single switch to flip
once the dynamo path honours opsets below 18.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch

from exporters.errors import ExporterError
from exporters.modelcopy import copy_model
from exporters.onnx_rewrites import decomposed
from exporters.tensors import default_output_names, flatten_outputs

EXPORTER = "torchscript"


def export_onnx(
    module: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    opset: int = 17,
    dynamic_batch: bool = False,
    fp16: bool = False,
    output_names: list[str] | None = None,
) -> Path:
    """Export ``module`` to ``path`` and return the path.

    ``example_inputs`` are the forward's positional arguments in dict order; their names
    become the graph input names. Output names default to ``output`` / ``output_<i>`` (the
    same names the torch runners use), so outputs line up across runtimes by name.

    ``fp16`` halves a deep copy of the module and the floating inputs before export, so
    weights, activations and I/O are all float16 in the graph. Rewriting an fp32 graph
    instead needs Cast insertion around type-sensitive ops (onnxconverter-common does this;
    it is not a dependency), and halving in torch gives the graph the model would run as.

    Adaptive average pools the exporter cannot lower at this input size are exported as the
    equivalent matrix products (:mod:`exporters.onnx_rewrites`).

    The file is written under a temporary name and renamed when complete and checked, so a
    crash or a failed check never leaves a half-written ``.onnx`` at ``path``.
    """
    path = Path(path)
    if not example_inputs:
        raise ExporterError("export needs at least one example input; pass {'input': tensor}")
    if fp16:
        module = copy_model(module).half()
        example_inputs = {k: v.half() if v.is_floating_point() else v for k, v in example_inputs.items()}
    args = tuple(example_inputs.values())
    input_names = list(example_inputs)
    if output_names is None:
        output_names = default_output_names(_count_outputs(module, args))
    dynamic_axes = {name: {0: "batch"} for name in [*input_names, *output_names]} if dynamic_batch else None

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _run_exporter(module, args, tmp, input_names, output_names, opset, dynamic_axes)
        check_onnx(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_onnx(path: str | Path) -> onnx.ModelProto:
    """Shape inference then the ONNX checker; a graph that fails either is not worth timing."""
    model = onnx.load(str(path))
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(inferred, full_check=True)
    return inferred


def _run_exporter(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    opset: int,
    dynamic_axes: dict[str, dict[int, str]] | None,
) -> None:
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (module docstring); its deprecation
        # notices would otherwise be printed on every export of a sweep.
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        # the pool rewrite reads the spatial size as Python ints on purpose: H and W are fixed in every export
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"exporters\.onnx_rewrites")
        with decomposed():
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
                dynamo=False,
            )


def _count_outputs(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> int:
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            return len(flatten_outputs(module(*args)))
    finally:
        module.train(was_training)
