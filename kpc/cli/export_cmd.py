"""`kpc export`: ONNX (and TensorRT) export of a model or artifact, verified against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kpc.cli._common import (
    InputSizeOpt,
    ModelFileOpt,
    NumClassesOpt,
    WeightsOpt,
    flag,
    handle_errors,
    log,
    output_path,
)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)


@handle_errors
def export_command(
    model: Annotated[str, typer.Argument(help="torchvision:NAME, timm:NAME, path/file.py:factory or an artifact dir.")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=output_path,
                                      help="Directory to write (model.onnx, export.json, engine).")],
    onnx: Annotated[bool, flag("--onnx", help="Export ONNX and check it with ONNX Runtime.")] = False,
    trt: Annotated[bool, flag("--trt", help="Also build a TensorRT engine and check it (needs a GPU and "
                                      "the kpc\\[trt] extra).")] = False,
    fp16: Annotated[bool, flag("--fp16", help="fp16 ONNX graph (with --onnx alone) or fp16 engine (--trt); "
                                       "loosens the default tolerances.")] = False,
    int8: Annotated[bool, flag("--int8", help="int8 TensorRT engine (the graph needs Q/DQ nodes).")] = False,
    dynamic_batch: Annotated[bool, flag("--dynamic-batch", help="Leave the batch dimension free in the "
                                                "graph.")] = False,
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (default: 17, or the first later one "
                                                                "that an operator of the model exists in)")] = None,
    batch: Annotated[int, typer.Option("--batch", help="Batch of the example (static graph) and of the parity "
                                       "inputs; the TensorRT profile's opt batch.")] = 1,
    atol: Annotated[float | None, typer.Option("--atol", help="Absolute tolerance (default 1e-4; 5e-2 for fp16).")]
    = None,
    rtol: Annotated[float | None, typer.Option("--rtol", help="Relative tolerance (default 1e-3; 5e-2 for fp16).")]
    = None,
    samples: Annotated[int, typer.Option("--samples", help="Image-like inputs the parity check runs.")] = 3,
    min_batch: Annotated[int, typer.Option("--min-batch", help="TensorRT profile: smallest batch.")] = 1,
    max_batch: Annotated[int | None, typer.Option("--max-batch", help="TensorRT profile: largest batch (default "
                                                  "--batch).")] = None,
    workspace_mb: Annotated[int, typer.Option("--workspace-mb", help="TensorRT builder workspace.")] = 4096,
    timing_cache: Annotated[Path | None, typer.Option("--timing-cache", help="TensorRT timing cache file, read and "
                                                      "updated (speeds up rebuilding pruned variants).")] = None,
    weights: WeightsOpt = None,
    num_classes: NumClassesOpt = None,
    input_size: InputSizeOpt = None,
    model_file: ModelFileOpt = None,
    overwrite: Annotated[bool, flag("--overwrite", help="Replace an existing --out directory.")] = False,
) -> None:
    """Export to ONNX (and TensorRT), check it against PyTorch output by output, write export.json.

    Exit 1 when the export disagrees with PyTorch beyond the tolerances; nothing is written then.
    """
    from kpc.artifact import open_model
    from kpc.export import ExportSettings, export_model
    from kpc.specs import parse_input_size

    settings = ExportSettings(onnx=onnx, trt=trt, fp16=fp16, int8=int8, dynamic_batch=dynamic_batch, opset=opset,
                              batch=batch, atol=atol, rtol=rtol, samples=samples, min_batch=min_batch,
                              max_batch=max_batch, workspace_mb=workspace_mb, timing_cache=timing_cache)
    settings.check()
    from kpc.atomic import check_dir_target
    from kpc.specs import check_num_classes

    check_dir_target(out, overwrite=overwrite)
    check_num_classes(num_classes)
    loaded = open_model(model, weights=weights, num_classes=num_classes, input_size=parse_input_size(input_size),
                        model_file=model_file)
    record = export_model(loaded, out, settings, overwrite=overwrite)
    made = [record["onnx"]["file"], *([record["trt"]["file"]] if "trt" in record else [])]
    log(f"exported {loaded.source} -> {out} ({', '.join(made)}); parity ok within atol "
        f"{record['parity']['atol']:g}, rtol {record['parity']['rtol']:g}")
