"""Latency lookup tables: measured data with provenance, checked on load.

A table belongs to one target (device, runtime and version, precision, batch, threads)
and one model; its entries are keyed by layer signature, not by module name, so
identical layers share one entry and a table can be checked against any model that
needs it. Interpolation runs over the monotone envelope of the measurements
(latency never falls when a width grows), which makes it exact at every measured
point that is already monotone and monotone between points.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kpc.atomic import write_text_atomic
from kpc.errors import KpcError

SCHEMA = "kpc-latency-table/1"
HEADER_FIELDS = {
    "device": str, "runtime": str, "runtime_version": str, "precision": str, "batch": int, "threads": int,
    "date": str, "kpc_version": str, "model": str, "input_size": list, "full_model_ms": float,
}
TARGET_FIELDS = ("device", "runtime", "precision", "batch", "threads")
ONE_WIDTH_KINDS = ("dwconv", "gconv")  # layers whose input width moves with their output width


@dataclass
class Entry:
    """Latency of one layer signature over a grid of (input, output) widths, in ms."""

    kind: str  # "conv", "linear", or one-width kinds: "dwconv", "gconv" (grouped, whole conv groups)
    c_in: np.ndarray  # ascending; for one-width kinds the input width at each output width
    c_out: np.ndarray  # ascending
    ms: np.ndarray  # (len(c_in), len(c_out)); for one-width kinds shape (len(c_out),)
    _envelope: np.ndarray | None = field(default=None, repr=False)

    @property
    def envelope(self) -> np.ndarray:
        if self._envelope is None:
            env = np.maximum.accumulate(self.ms, axis=0)
            if env.ndim == 2:
                env = np.maximum.accumulate(env, axis=1)
            self._envelope = env
        return self._envelope

    def __call__(self, c_in: np.ndarray | float, c_out: np.ndarray | float) -> np.ndarray:
        """Latency at arbitrary widths (vectorised); widths outside the grid are clamped to it."""
        if self.kind in ONE_WIDTH_KINDS:  # input width follows the output width
            return np.interp(np.asarray(c_out, dtype=np.float64), self.c_out, self.envelope)
        x = np.clip(np.asarray(c_in, dtype=np.float64), self.c_in[0], self.c_in[-1])
        y = np.clip(np.asarray(c_out, dtype=np.float64), self.c_out[0], self.c_out[-1])
        x, y = np.broadcast_arrays(x, y)
        i, tx = _cell(self.c_in, x)
        j, ty = _cell(self.c_out, y)
        env = self.envelope
        if env.shape[0] == 1:
            return np.interp(y, self.c_out, env[0])
        if env.shape[1] == 1:
            return np.interp(x, self.c_in, env[:, 0])
        top = env[i, j] * (1 - ty) + env[i, j + 1] * ty
        bottom = env[i + 1, j] * (1 - ty) + env[i + 1, j + 1] * ty
        return top * (1 - tx) + bottom * tx

    def covers(self, c_in: float, c_out: float) -> bool:
        slack = 1e-6
        return (self.c_in[0] - slack <= c_in <= self.c_in[-1] + slack
                and self.c_out[0] - slack <= c_out <= self.c_out[-1] + slack)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "c_in": self.c_in.tolist(), "c_out": self.c_out.tolist(), "ms": self.ms.tolist()}


def _cell(grid: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the grid cell holding each value, and the position inside it (0..1)."""
    if len(grid) == 1:
        return np.zeros(values.shape, dtype=np.int64), np.zeros(values.shape)
    index = np.clip(np.searchsorted(grid, values, side="right") - 1, 0, len(grid) - 2)
    width = grid[index + 1] - grid[index]
    return index, (values - grid[index]) / width


@dataclass
class Remainder:
    """Everything the layer entries miss, fitted on whole-model measurements.

    total(w) = entry_scale * sum(entries(w)) + fixed_ms + activation_ms * output_fraction(w)
    `fixed_ms` covers per-run overhead and unpruned work; the volume term (signed) what
    scales with the tensors the layers write: adds, pools and activations in the graph
    (positive), and the layout reorders an isolated layer pays but a layer inside the
    graph does not (negative); `entry_scale` how much cheaper a layer is inside the graph
    than alone (fusions).
    """

    entry_scale: float = 1.0
    fixed_ms: float = 0.0
    activation_ms: float = 0.0
    calibration: list[dict[str, Any]] = field(default_factory=list)  # measured vs predicted per variant

    def to_json(self) -> dict[str, Any]:
        return {"entry_scale": self.entry_scale, "fixed_ms": self.fixed_ms, "activation_ms": self.activation_ms,
                "calibration": self.calibration}


@dataclass
class LatencyTable:
    header: dict[str, Any]
    entries: dict[str, Entry]
    remainder: Remainder

    def target(self) -> dict[str, Any]:
        return {k: self.header[k] for k in TARGET_FIELDS}

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "header": self.header, "remainder": self.remainder.to_json(),
                "entries": {k: e.to_json() for k, e in sorted(self.entries.items())}}

    def save(self, path: Path) -> Path:
        write_text_atomic(Path(path), json.dumps(self.to_json(), indent=1) + "\n")
        return Path(path)

    def mismatches(self, wanted: dict[str, Any]) -> list[str]:
        """Target fields where this table differs from what a prune asks for."""
        return [f"{k}: table has {self.header[k]!r}, wanted {wanted[k]!r}"
                for k in TARGET_FIELDS if k in wanted and wanted[k] is not None and wanted[k] != self.header[k]]


def load_table(path: str | Path) -> LatencyTable:
    """Read and schema-check a table; any defect is a one-line KpcError naming the file."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise KpcError(f"latency table {path} {what} (measure one with kpc profile)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise KpcError(f"latency table {path} is not valid JSON ({exc}): it is corrupt or truncated") from exc
    try:
        return parse_table(data)
    except (KeyError, TypeError, ValueError) as exc:
        message = str(exc).strip("'\"")
        raise KpcError(f"latency table {path} does not follow {SCHEMA}: {message}") from exc


def _number(value: Any, where: str, *, positive: bool = False, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} should be a finite number, got {value!r}")
    if positive and (value < 0 or (value == 0 and not allow_zero)):
        raise ValueError(f"{where} should be {'positive' if not allow_zero else 'non-negative'}, got {value!r}")
    return float(value)


def parse_table(data: Any) -> LatencyTable:
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"schema is {data.get('schema') if isinstance(data, dict) else None!r}")
    header = data.get("header")
    if not isinstance(header, dict):
        raise TypeError("header should be an object")
    for key, kind in HEADER_FIELDS.items():
        if key not in header:
            raise KeyError(f"header.{key} is missing")
        if kind is float and isinstance(header[key], int) and not isinstance(header[key], bool):
            header[key] = float(header[key])
        if not isinstance(header[key], kind) or isinstance(header[key], bool):
            raise TypeError(f"header.{key} should be {kind.__name__}")
    _number(header["full_model_ms"], "header.full_model_ms", positive=True, allow_zero=False)
    for key in ("batch", "threads"):
        if header[key] < 1:
            raise ValueError(f"header.{key} should be at least 1, got {header[key]}")
    size = header["input_size"]
    if len(size) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise ValueError(f"header.input_size should be [C, H, W] with positive integers, got {size!r}")
    step = header.get("round_to", 1)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"header.round_to should be a positive integer, got {step!r}")
    raw_entries = data.get("entries")
    if not isinstance(raw_entries, dict):
        raise TypeError(f"entries should be an object keyed by layer signature, got {type(raw_entries).__name__}")
    entries: dict[str, Entry] = {}
    for key, raw in raw_entries.items():
        if not isinstance(raw, dict):
            raise TypeError(f"entry {key!r} should be an object")
        kind = raw.get("kind")
        if kind not in ("conv", "linear", *ONE_WIDTH_KINDS):
            raise ValueError(f"entry {key!r} has unknown kind {kind!r}")
        try:
            c_in = np.asarray(raw["c_in"], dtype=np.float64)
            c_out = np.asarray(raw["c_out"], dtype=np.float64)
            ms = np.asarray(raw["ms"], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"entry {key!r} has widths or latencies that are not numbers") from exc
        expected = (len(c_out),) if kind in ONE_WIDTH_KINDS else (len(c_in), len(c_out))
        if c_in.ndim != 1 or c_out.ndim != 1 or ms.shape != expected or len(c_in) == 0 or len(c_out) == 0 or \
                (kind in ONE_WIDTH_KINDS and len(c_in) != len(c_out)):
            raise ValueError(f"entry {key!r} has {ms.shape} latencies for a {expected} grid")
        if np.any(np.diff(c_in) <= 0) or np.any(np.diff(c_out) <= 0) or np.any(c_in <= 0) or np.any(c_out <= 0):
            raise ValueError(f"entry {key!r} has widths that are not positive and strictly ascending")
        if not np.all(np.isfinite(ms)) or np.any(ms < 0):
            raise ValueError(f"entry {key!r} has non-finite or negative latencies")
        entries[str(key)] = Entry(kind, c_in, c_out, ms)
    raw_rem = data.get("remainder")
    if not isinstance(raw_rem, dict):
        raise TypeError("remainder should be an object")
    calibration = raw_rem.get("calibration", [])
    if not isinstance(calibration, list):
        raise TypeError("remainder.calibration should be a list")
    remainder = Remainder(_number(raw_rem["entry_scale"], "remainder.entry_scale", positive=True, allow_zero=False),
                          _number(raw_rem["fixed_ms"], "remainder.fixed_ms"),
                          _number(raw_rem["activation_ms"], "remainder.activation_ms"), list(calibration))
    return LatencyTable(header, entries, remainder)
