"""Validate an export as its own step: same inputs to reference and export, compare outputs.

Following optimum's validation: check names and shapes first, then values, produce one
line per output, and collect every failure before raising once, so a user sees all broken
outputs at the same time. A value passes when ``|got - ref| <= atol * scale + rtol * |ref|``
elementwise (numpy's ``allclose`` rule, with ``atol`` in units of the output's scale: its
largest magnitude where that is above 1); ``max_rel`` is reported for reading only, since it
explodes where the reference is near zero.

Why the scale: a float32 graph differs from eager by rounding in sums whose terms are as
large as the output's largest values, so an element near zero in an output that reaches
1e13 (a randomly initialised MobileOne) carries an error near 1e13 * 2**-24 however small
it is itself; a fixed atol failed such exports that were right to 6 digits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exporters.errors import ParityError


@dataclass(frozen=True)
class OutputCheck:
    """Result of comparing one output of an exported model against the reference."""

    ok: bool
    name: str
    shape_ref: tuple[int, ...] | None  # None: the reference has no such output
    shape_got: tuple[int, ...] | None  # None: the export has no such output
    max_abs: float  # largest |got - ref|; inf when shapes differ
    max_rel: float  # largest |got - ref| / |ref|; inf when shapes differ
    atol: float
    rtol: float
    severity: float = 0.0  # max of |got - ref| / (atol scale + rtol |ref|); > 1 fails, inf for shape errors
    scale: float = 1.0  # the output's largest finite |ref| where above 1: atol is in units of it

    def problem(self) -> str:
        """What is wrong, in a phrase; empty when the check passed."""
        if self.shape_got is None:
            return "missing from the export"
        if self.shape_ref is None:
            return "not produced by the reference"
        if self.shape_ref != self.shape_got:
            return f"shape {self.shape_got} != reference {self.shape_ref}"
        if math.isinf(self.severity) and not math.isinf(self.max_abs):
            return "NaN/inf where the reference is finite"
        if self.ok:
            return ""
        return f"max abs diff {self.max_abs:.3g} exceeds atol {self._atol()} + rtol {self.rtol:g} * |ref|"

    def _atol(self) -> str:
        return f"{self.atol:g}" if self.scale == 1.0 else f"{self.atol:g} x scale {self.scale:.3g}"

    def line(self) -> str:
        status = "ok  " if self.ok else "FAIL"
        if self.shape_ref is not None and self.shape_ref == self.shape_got:
            # The bound is atol x scale + rtol x |ref| per element, so max_rel alone can exceed
            # rtol near zeros and still pass: say how much of the bound the worst element used.
            detail = (
                f"shape {self.shape_ref}  max_abs {self.max_abs:.3g}  max_rel {self.max_rel:.3g}  "
                f"worst element at {self.severity:.0%} of atol {self._atol()} + rtol {self.rtol:g} x |ref|"
            )
            if not self.ok:
                detail += f"  -- {self.problem()}"
        else:
            detail = self.problem()
        return f"{status} {self.name}: {detail}"


def compare_output(
    name: str, ref: np.ndarray | None, got: np.ndarray | None, *, atol: float, rtol: float
) -> OutputCheck:
    """Shape first (a shape error makes value diffs meaningless), then values."""
    shape_ref = None if ref is None else tuple(ref.shape)
    shape_got = None if got is None else tuple(got.shape)
    if ref is None or got is None or shape_ref != shape_got:
        return OutputCheck(False, name, shape_ref, shape_got, math.inf, math.inf, atol, rtol, math.inf)
    r = ref.astype(np.float64, copy=False)
    g = got.astype(np.float64, copy=False)
    if r.size == 0:
        return OutputCheck(True, name, shape_ref, shape_got, 0.0, 0.0, atol, rtol, 0.0)
    ref_nonfinite, got_nonfinite = ~np.isfinite(r), ~np.isfinite(g)
    finite = ~(ref_nonfinite | got_nonfinite)
    diff = np.abs(g[finite] - r[finite])
    max_abs = float(diff.max(initial=0.0))
    max_rel = float((diff / np.maximum(np.abs(r[finite]), np.finfo(np.float64).tiny)).max(initial=0.0))
    scale = max(1.0, float(np.abs(r[finite]).max(initial=0.0)))
    severity = float((diff / (atol * scale + rtol * np.abs(r[finite]))).max(initial=0.0))
    # Non-finite values must agree exactly (same positions, same values).
    if not np.array_equal(ref_nonfinite, got_nonfinite) or not np.array_equal(
        r[ref_nonfinite], g[got_nonfinite], equal_nan=True
    ):
        severity = math.inf
    return OutputCheck(severity <= 1.0, name, shape_ref, shape_got, max_abs, max_rel, atol, rtol, severity, scale)


def compare_outputs(
    reference: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], *, atol: float, rtol: float
) -> list[OutputCheck]:
    """Match outputs by name; if no names agree but counts do, match by position.

    Positional matching covers a reference named ``output`` against an export named
    ``logits``; checks then carry the export's names, which the user will look up.
    """
    ref_names, got_names = list(reference), list(got)
    if not set(ref_names) & set(got_names) and len(ref_names) == len(got_names):
        pairs = [(g, reference[r], got[g]) for r, g in zip(ref_names, got_names, strict=True)]
    else:
        names = ref_names + [n for n in got_names if n not in reference]
        pairs = [(n, reference.get(n), got.get(n)) for n in names]
    return [compare_output(n, r, g, atol=atol, rtol=rtol) for n, r, g in pairs]


def raise_on_failures(checks: Sequence[OutputCheck]) -> None:
    """Raise one ParityError with every failed check (worst first); return if all passed."""
    failures = [c for c in checks if not c.ok]
    if failures:
        raise ParityError(failures)


def validate_onnx(
    reference: torch.nn.Module,
    onnx_path: str | Path,
    inputs: Mapping[str, np.ndarray],
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    runtime: str = "ort-cpu",
    threads: int | None = None,
) -> list[OutputCheck]:
    """Run ``reference`` (eager, CPU, fp32) and ``onnx_path`` on ``runtime``; one check per output.

    Returns the checks without raising so the caller decides what is fatal; pass them to
    :func:`raise_on_failures` for the strict behaviour. An fp16 export is read through a
    runner in fp16 and compared against the fp32 reference, so loosen the tolerances.
    """
    import onnx

    from exporters.runners import get_runner

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    is_fp16 = bool(graph.input) and graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    ref_runner = get_runner("torch-cpu", threads=threads)
    got_runner = get_runner(runtime, threads=threads, precision="fp16" if is_fp16 else "fp32")
    with ref_runner, got_runner:
        ref_runner.prepare(reference, inputs)
        got_runner.prepare(onnx_path, inputs)
        return compare_outputs(ref_runner.infer(inputs), got_runner.infer(inputs), atol=atol, rtol=rtol)
