"""Spec-level workflows, wired once: what `kpc prune`/`export`/`bench` and `kpc run` all do.

The CLI commands and the recipe pipeline are thin views over these functions, which are
thin views over the model-first library (`kpc.prune`, `kpc.save`, `kpc.export`,
`kpc.bench`): open the model a spec or artifact names, read calibration data from a data
spec, check the output can be written before the long work starts, and write it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from kpc.artifact import LoadedModel, save_artifact
from kpc.atomic import check_dir_target, check_writable, output_lock
from kpc.batchnorm import DEFAULT_BATCHES as DEFAULT_BN_BATCHES
from kpc.budget import Budget
from kpc.data import DataSpec, calibration_batches
from kpc.errors import KpcError, VerificationFailed
from kpc.importance import needs_data
from kpc.pruning import PruneResult, PruneSettings, prune

log = logging.getLogger(__name__)


def make_budget(*, gflops: float | None = None, ratio: float | None = None, ms: float | None = None,
                lut: str | Path | None = None, force_lut: bool = False,
                target: dict[str, Any] | None = None) -> Budget:
    """A Budget from command-line values: the table is read (and schema-checked) here."""
    table = None
    if lut is not None:
        from kpc.latency.table import load_table

        table = load_table(lut)
    return Budget(gflops=gflops, ratio=ratio, ms=ms, table=table, force_table=force_lut,
                  target={k: v for k, v in (target or {}).items() if v is not None})


def weights_bytes_estimate(loaded: LoadedModel) -> int:
    return sum(p.numel() * p.element_size() for p in loaded.model.parameters())


def prune_to_artifact(loaded: LoadedModel, budget: Budget, settings: PruneSettings, data: DataSpec, out: Path, *,
                      overwrite: bool = False, progress: Callable[[], None] | None = None) -> PruneResult:
    """Prune `loaded` with calibration from `data`, and write the verified artifact to `out`.

    Returns the result whether or not the budget landed: callers decide (the CLI exits 1
    after writing, `kpc run` records it in the report's gate).
    """
    check_writable(out, need_bytes=weights_bytes_estimate(loaded))
    synthetic = data.kind == "synthetic"
    if settings.bn_recalibrate and synthetic:
        raise KpcError("--bn-recalibrate needs real data (--data): random images would corrupt the BatchNorm "
                       "statistics; drop it or give --data")
    if settings.sensitivity == "auto" and synthetic:
        settings = replace(settings, sensitivity=0)  # random images say nothing of a cut's effect: sum importance
    if settings.sensitivity and synthetic:
        raise KpcError("--sensitivity needs real data (--data): the effect of a cut on random images says little "
                       "about the images the model serves; drop it or give --data")
    bn_batches = settings.bn_recalibrate if settings.bn_recalibrate is not None else \
        (0 if synthetic else DEFAULT_BN_BATCHES)
    with output_lock(out):
        check_dir_target(out, overwrite=overwrite)
        calibration = None
        if needs_data(settings.resolved().importance, settings.sensitivity):
            calibration = calibration_batches(data, loaded.input_size, batches=settings.calib_batches,
                                              batch_size=settings.calib_batch_size, seed=settings.seed)
        recalibration = calibration_batches(data, loaded.input_size, batches=bn_batches,
                                            batch_size=settings.calib_batch_size, seed=settings.seed + 1) \
            if bn_batches else None
        result = prune(loaded.model, loaded.example_input(), budget, calibration, settings=replace(
            settings, bn_recalibrate=bn_batches), recalibration=recalibration, data_label=data.label(),
            progress=progress)
        save_artifact(out, result.model, result.plan, overwrite=overwrite, factory=loaded.factory)
    return result


def landing_failure(result: PruneResult, out: Path) -> VerificationFailed | None:
    """The verification failure of a prune whose measured cost missed its window (None when it landed)."""
    r = result.round
    if r.landed is not False:
        return None
    return VerificationFailed(f"the pruned model measures {r.counted_cost:.4g} {r.cost_unit} against a budget of "
                              f"{r.limit:.4g} {r.cost_unit} ({100 * r.miss:+.1f}%, outside the landing window); the "
                              f"artifact was written to {out} with the miss recorded in its plan")
