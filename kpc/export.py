"""Export a model or artifact to ONNX (and a TensorRT engine), then prove the export computes the same thing.

Export and validation are separate steps on purpose: the exporter may succeed and still
produce a graph that disagrees with PyTorch (an unsupported op lowered wrongly, fp16
overflow, a pruned layer exported with stale shapes). So every export is followed by a
parity check on a few image-like inputs, PyTorch eager (CPU, fp32) against the runtime
that will serve the file, with every output reported and every failure collected.

The output directory is written atomically: if the export or the parity check fails,
nothing is left behind, so a directory with `export.json` is always a verified export.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kpc import __version__
from kpc.artifact import LoadedModel, sha256_file
from kpc.atomic import atomic_dir
from kpc.errors import KpcError
from kpc.plan import MAX_INPUT_ELEMENTS

EXPORT_SCHEMA = "kpc-export/1"
EXPORT_FILE = "export.json"
ONNX_FILE = "model.onnx"
INPUT_NAME = "input"
# The TorchScript exporter (exporters.onnx_export.EXPORTER) implements opsets up to 20;
# below 11 the CNN ops kpc produces (e.g. Resize, adaptive pooling) are not expressible.
MIN_OPSET, MAX_OPSET = 11, 20
# Without --opset kpc exports at DEFAULT_OPSET, or at the lowest later opset that an operator of the model
# needs (volo's col2im exists from opset 18); an opset the user names is kept or refused, never changed.
DEFAULT_OPSET = 17
MAX_SAMPLES = 100  # parity inputs: a few already catch a mismatch; each is held in memory
MAX_PARITY_VALUES = 4 * MAX_INPUT_ELEMENTS  # all parity inputs together: 800 MB in fp32
_NEEDS_OPSET = re.compile(r"added in (?:opset )?version (\d+)", re.IGNORECASE)

# (atol, rtol) for the parity check. fp32 graphs differ from eager only by summation
# order; fp16 graphs lose ~3 decimal digits per layer, so their outputs drift by 1e-2.
FP32_TOLERANCES = (1e-4, 1e-3)
FP16_TOLERANCES = (5e-2, 5e-2)

log = logging.getLogger(__name__)


def default_tolerances(fp16: bool) -> tuple[float, float]:
    """The (atol, rtol) a parity check uses when the user gives none."""
    return FP16_TOLERANCES if fp16 else FP32_TOLERANCES


@dataclass(frozen=True)
class ExportSettings:
    """What to export and how strictly to check it; `None` tolerances mean the precision's default."""

    onnx: bool = True
    trt: bool = False
    fp16: bool = False
    int8: bool = False
    dynamic_batch: bool = False
    opset: int | None = None  # None: DEFAULT_OPSET, or a later one the model's operators need
    batch: int = 1
    atol: float | None = None
    rtol: float | None = None
    samples: int = 3
    seed: int = 0
    min_batch: int = 1
    max_batch: int | None = None
    workspace_mb: int = 4096
    timing_cache: Path | None = None

    @property
    def trt_precision(self) -> str:
        return "int8" if self.int8 else "fp16" if self.fp16 else "fp32"

    def tolerances(self, precision: str) -> tuple[float, float]:
        """The user's tolerances, else the default of the precision the checked file runs at.

        With --trt --fp16 the ONNX file stays fp32 and keeps fp32 tolerances; only the
        engine gets fp16's. int8 engines are built with fp16 enabled too
        (exporters.build_engine), so fp16's tolerance is the floor; real int8 needs Q/DQ
        nodes and the user's own tolerance.
        """
        atol, rtol = default_tolerances(precision != "fp32")
        return (atol if self.atol is None else self.atol, rtol if self.rtol is None else self.rtol)

    def check(self) -> None:
        """Reject contradictory settings before loading or exporting anything."""
        if not (self.onnx or self.trt):
            raise KpcError("nothing to export: pass --onnx, --trt or both")
        if self.int8 and not self.trt:
            raise KpcError("--int8 applies to TensorRT engines only: add --trt (the ONNX file stays fp32)")
        if self.int8 and self.fp16:
            raise KpcError("--int8 and --fp16 are exclusive: int8 engines already allow fp16 layers")
        if self.batch < 1 or self.samples < 1:
            raise KpcError(f"--batch and --samples must be at least 1, got {self.batch} and {self.samples}")
        if self.opset is not None and not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise KpcError(f"--opset {self.opset} is out of range: use {MIN_OPSET}..{MAX_OPSET} "
                           f"({DEFAULT_OPSET} is the default)")
        if self.samples > MAX_SAMPLES:
            raise KpcError(f"--samples {self.samples} is above kpc's limit of {MAX_SAMPLES}: every sample is held in "
                           "memory and a few already catch a mismatch; give fewer")
        for name, value in (("--atol", self.atol), ("--rtol", self.rtol)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise KpcError(f"{name} must be a finite number >= 0, got {value}")
        for name, value in (("--min-batch", self.min_batch), ("--max-batch", self.max_batch),
                            ("--workspace-mb", self.workspace_mb)):
            if value is not None and value < 1:
                raise KpcError(f"{name} must be at least 1, got {value}")
        if not self.min_batch <= self.batch <= (self.batch if self.max_batch is None else self.max_batch):
            raise KpcError(f"the TensorRT batch profile needs --min-batch <= --batch <= --max-batch, got "
                           f"{self.min_batch} <= {self.batch} <= {self.max_batch}")
        if self.timing_cache is not None and Path(self.timing_cache).is_dir():
            raise KpcError(f"--timing-cache {self.timing_cache} is a directory: give a file path")

    def check_size(self, input_size: Sequence[int]) -> None:
        """Refuse parity inputs that alone would not fit in memory (all are held at once), before exporting."""
        values = self.samples * self.batch * math.prod(int(d) for d in input_size)
        if values > MAX_PARITY_VALUES:
            raise KpcError(f"--samples {self.samples} x --batch {self.batch} images of "
                           f"{'x'.join(str(int(d)) for d in input_size)} are {values:,} values, above kpc's limit of "
                           f"{MAX_PARITY_VALUES:,}: give a smaller --batch or fewer --samples")


IMAGE_LIKE = "image-like (smooth random images)"


def parity_inputs(loaded: LoadedModel, batch: int, count: int, seed: int = 0
                  ) -> tuple[list[dict[str, np.ndarray]], str]:
    """`count` inputs of `batch` images for the parity check, and what they are.

    The images the model was trained or calibrated on, where its artifact names them and
    they can be read here: a check must run the model where it is served. BatchNorm
    statistics re-estimated on grayscale images replicated to three channels leave
    near-zero variances on colour features, and colour inputs then drive the logits to
    1e6, where summation order alone moves them by hundreds (a pruned efficientnet_v2_s
    failed its export check that way, and matched to 2e-4 on its own images). Elsewhere,
    image-like inputs (`image_like_inputs`).
    """
    data = _recorded_data(loaded)
    if data is not None:
        images = _data_inputs(data, loaded.input_size, batch, count, seed)
        if images is not None:
            return images, data
    return image_like_inputs(loaded, batch, count, seed), IMAGE_LIKE


def _recorded_data(loaded: LoadedModel) -> str | None:
    """The data spec the artifact records: what it was trained on, else what its latest prune calibrated on."""
    if loaded.plan.data:
        return loaded.plan.data
    for prune_round in reversed(loaded.plan.rounds):
        label = (prune_round.importance or {}).get("data")
        if label:
            return str(label)
    return None


def _data_inputs(label: str, input_size: tuple[int, int, int], batch: int, count: int, seed: int
                 ) -> list[dict[str, np.ndarray]] | None:
    """`count` full batches of the recorded data (None: not a real dataset, not readable here, or too small)."""
    from kpc.data import calibration_batches, parse_data_spec

    try:
        spec = parse_data_spec(label)
        if spec.kind == "synthetic":
            return None
        batches = [images for images, _ in calibration_batches(spec, input_size, batches=count, batch_size=batch,
                                                               seed=seed)]
    except (KpcError, OSError, ValueError) as exc:  # "user data", a dataset on another machine, a moved folder
        log.info("parity check on image-like inputs: the model's data %s cannot be read here (%s)", label,
                 str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    if len(batches) < count or any(images.shape[0] != batch for images in batches):
        log.info("parity check on image-like inputs: %s holds fewer than %d images", label, batch * count)
        return None
    return [{INPUT_NAME: images.float().numpy()} for images in batches]


def image_like_inputs(loaded: LoadedModel, batch: int, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` image-like inputs: smooth random images in [0, 1], normalised like the model's data.

    Pure Gaussian noise keeps activations in a narrow regime that hides range problems
    (fp16 overflow, saturated activations); smooth images with edges, normalised the way
    the model was trained, push the network through the ranges it sees in service.
    """
    channels, height, width = loaded.input_size
    mean, std = _normalization(loaded, channels)
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        coarse = torch.rand((batch, channels, max(1, height // 8), max(1, width // 8)), generator=generator)
        image = nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        image = (image + 0.05 * torch.randn(image.shape, generator=generator)).clamp(0.0, 1.0)
        image = (image - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        samples.append({INPUT_NAME: image.numpy().astype(np.float32)})
    return samples


def _normalization(loaded: LoadedModel, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    from kpc.data import IMAGENET_MEAN, IMAGENET_STD

    recorded = loaded.plan.normalization or {}
    mean = list(recorded.get("mean") or (IMAGENET_MEAN if channels == 3 else (0.5,)))
    std = list(recorded.get("std") or (IMAGENET_STD if channels == 3 else (0.5,)))
    if len(mean) != channels:
        mean, std = mean[:1] * channels, std[:1] * channels
    return torch.tensor(mean[:channels]), torch.tensor(std[:channels])


def check_parity(
    reference: nn.Module,
    exported: str | Path,
    samples: Sequence[Mapping[str, np.ndarray]],
    *,
    atol: float,
    rtol: float,
    runtime: str = "ort-cpu",
    precision: str = "fp32",
) -> list[Any]:
    """Compare `reference` (eager CPU fp32) with the exported file on every sample; one check per output.

    The runners are prepared once and fed every sample; per output the worst check over
    the samples is kept, so the result reads like a single comparison but no sample can
    hide a failure. Returns the checks (exporters.OutputCheck) without raising; pass them
    to `exporters.raise_on_failures` to make a mismatch fatal.
    """
    from exporters import compare_outputs, get_runner

    if not samples:
        raise KpcError("parity check needs at least one input sample")
    worst: dict[str, Any] = {}
    with get_runner("torch-cpu") as ref_runner, get_runner(runtime, precision=precision) as got_runner:
        ref_runner.prepare(reference, samples[0])
        got_runner.prepare(exported, samples[0])
        for sample in samples:
            for check in compare_outputs(ref_runner.infer(sample), got_runner.infer(sample), atol=atol, rtol=rtol):
                if check.name not in worst or check.severity > worst[check.name].severity:
                    worst[check.name] = check
    return list(worst.values())


def check_to_json(check: Any) -> dict[str, Any]:
    return {"name": check.name, "ok": bool(check.ok),
            "shape": list(check.shape_got) if check.shape_got is not None else None,
            "max_abs": _finite(check.max_abs), "max_rel": _finite(check.max_rel), "severity": _finite(check.severity)}


def _finite(value: float) -> float | None:
    """JSON has no inf/NaN; null marks a comparison that had no number (shape mismatch)."""
    return float(value) if np.isfinite(value) else None


def _verify(reference: nn.Module, exported: Path, samples: list[dict[str, np.ndarray]], settings: ExportSettings,
            runtime: str, precision: str) -> dict[str, Any]:
    from exporters import raise_on_failures

    atol, rtol = settings.tolerances(precision)
    checks = check_parity(reference, exported, samples, atol=atol, rtol=rtol, runtime=runtime, precision=precision)
    for check in checks:
        log.info(f"  {check.line()}")
    raise_on_failures(checks)  # ParityError, exit 1: the worst output first, all failures counted
    return {"runtime": runtime, "precision": precision, "reference": "torch-cpu fp32", "samples": len(samples),
            "batch": settings.batch, "atol": atol, "rtol": rtol, "ok": True,
            "outputs": [check_to_json(c) for c in checks]}


def export_model(loaded: LoadedModel, out: Path, settings: ExportSettings, *,
                 overwrite: bool = False) -> dict[str, Any]:
    """Export `loaded` into `out` (ONNX, optionally a TensorRT engine), verify it, write `export.json`.

    Returns the record written to `export.json`. Raises ParityError (exit 1) when the
    export disagrees with PyTorch and the exporters' typed errors (exit 2) when a runtime
    is missing; in both cases `out` is left untouched.
    """
    import exporters

    settings.check()
    settings.check_size(loaded.input_size)
    if settings.trt:
        # Fail in a second (no GPU, no tensorrt) before minutes of export and build.
        exporters.get_runner("trt", precision=settings.trt_precision).close()
    model = loaded.model.eval()
    samples, inputs = parity_inputs(loaded, settings.batch, settings.samples, settings.seed)
    example = {INPUT_NAME: torch.from_numpy(samples[0][INPUT_NAME])}
    # A TensorRT batch profile needs a dynamic batch dimension in the graph.
    dynamic = settings.dynamic_batch or (settings.trt and (settings.max_batch or settings.batch) != settings.min_batch)
    record: dict[str, Any] = {
        "schema": EXPORT_SCHEMA,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "kpc_version": __version__,
        "versions": _versions(),
        "model": {"source": loaded.source, "label": loaded.label, "input_size": list(loaded.input_size),
                  "artifact": str(loaded.path) if loaded.path is not None else None,
                  "weights_sha256": loaded.plan.weights.get("sha256")},
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        onnx_fp16 = settings.fp16 and not settings.trt  # TensorRT lowers precision itself from an fp32 graph
        log.info(f"exporting {loaded.label} to ONNX (opset {settings.opset or DEFAULT_OPSET}, batch "
                 f"{settings.batch}, {'dynamic' if dynamic else 'static'} batch, {'fp16' if onnx_fp16 else 'fp32'})")
        onnx_path, opset = _export_onnx(model, example, tmp / ONNX_FILE, settings.opset, dynamic, onnx_fp16)
        checked = exporters.check_onnx(onnx_path)
        record["onnx"] = {"file": ONNX_FILE, "sha256": sha256_file(onnx_path), "opset": opset,
                          "batch": settings.batch, "dynamic_batch": dynamic, "fp16": onnx_fp16,
                          "inputs": [i.name for i in checked.graph.input],
                          "outputs": [o.name for o in checked.graph.output]}
        log.info(f"checking ONNX Runtime against PyTorch on {len(samples)} inputs of shape "
            f"{tuple(samples[0][INPUT_NAME].shape)}: {inputs}")
        record["parity"] = {**_verify(model, onnx_path, samples, settings, "ort-cpu", "fp16" if onnx_fp16 else "fp32"),
                            "inputs": inputs}
        if dynamic:  # a free batch dimension is a promise: check it at another batch than the one exported
            other = settings.batch + 2
            log.info(f"checking the dynamic batch: ONNX Runtime against PyTorch at batch {other}")
            others, _ = parity_inputs(loaded, other, 1, settings.seed + 1)
            record["parity_second_batch"] = _verify(model, onnx_path, others, replace(settings, batch=other),
                                                    "ort-cpu", "fp16" if onnx_fp16 else "fp32")
        if settings.int8 and not exporters.tensorrt_engine.has_quantization_nodes(onnx_path):
            raise KpcError("--int8 needs a graph with QuantizeLinear/DequantizeLinear nodes and this export has none "
                           "(an int8 engine built from it would run in fp16): quantize the model first (e.g. with "
                           "NVIDIA ModelOpt), or build fp16 with --fp16")
        if settings.trt:
            record["trt"] = _build_trt(model, onnx_path, tmp, samples, settings)
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record


def _export_onnx(model: nn.Module, example: dict[str, torch.Tensor], path: Path, opset: int | None, dynamic: bool,
                 fp16: bool) -> tuple[Path, int]:
    """exporters.export_onnx, with the exporter's own failures (an op it cannot lower) as one user-facing line.

    Returns the file and the opset it holds. With no opset asked for, an operator that the
    exporter says exists only from a later opset (up to MAX_OPSET) moves the export there
    instead of failing it.
    """
    import exporters
    from exporters.errors import ExporterError

    chosen = DEFAULT_OPSET if opset is None else opset
    while True:
        try:
            return exporters.export_onnx(model, example, path, opset=chosen, dynamic_batch=dynamic, fp16=fp16), chosen
        except (ExporterError, KpcError):
            raise
        except Exception as exc:  # torch.onnx and the onnx checker raise many unrelated types
            needed = _NEEDS_OPSET.search(str(exc))
            later = int(needed.group(1)) if needed else 0
            if opset is None and chosen < later <= MAX_OPSET:
                log.warning(f"an operator of this model exists in ONNX from opset {later} on: exporting at opset "
                            f"{later} instead of {chosen} (pass --opset to choose)")
                chosen = later
                continue
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise KpcError(f"ONNX export failed at opset {chosen} ({type(exc).__name__}: {first}); "
                           "try another --opset, or KPC_DEBUG=1 for the traceback") from exc


def _build_trt(model: nn.Module, onnx_path: Path, tmp: Path, samples: list[dict[str, np.ndarray]],
               settings: ExportSettings) -> dict[str, Any]:
    """Build an engine for the batch profile and check it against PyTorch within fp16 tolerances."""
    import tensorrt

    import exporters
    from exporters.device import gpu_name

    max_batch = settings.max_batch or settings.batch
    name = exporters.engine_filename(onnx_path, precision=settings.trt_precision, min_batch=settings.min_batch,
                                     max_batch=max_batch, device_name=gpu_name(0),
                                     trt_version=tensorrt.__version__)
    log.info(f"building TensorRT engine {name} (batch {settings.min_batch}..{max_batch}, opt {settings.batch}, "
        f"workspace {settings.workspace_mb} MiB)")
    engine = exporters.build_engine(onnx_path, tmp / name,
                                    input_shapes={k: v.shape for k, v in samples[0].items()},
                                    precision=settings.trt_precision, min_batch=settings.min_batch,
                                    opt_batch=settings.batch, max_batch=max_batch,
                                    workspace_mb=settings.workspace_mb, timing_cache=settings.timing_cache)
    log.info("checking TensorRT against PyTorch")
    parity = _verify(model, engine, samples, settings, "trt", settings.trt_precision)
    return {"file": name, "sha256": sha256_file(engine), "precision": settings.trt_precision,
            "min_batch": settings.min_batch, "opt_batch": settings.batch, "max_batch": max_batch,
            "workspace_mb": settings.workspace_mb, "device": gpu_name(0), "tensorrt": tensorrt.__version__,
            "timing_cache": str(settings.timing_cache) if settings.timing_cache else None, "parity": parity}


def _versions() -> dict[str, str]:
    import onnx

    versions = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # pragma: no cover - a kpc dependency
        pass
    return versions
