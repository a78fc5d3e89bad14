"""What a prune must fit: FLOPs, a fraction of the unpruned cost, or milliseconds on a measured target.

Checked where it is made: a budget that is NaN, infinite, zero, negative or (as a ratio)
above 1 is refused with one line, before any model is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kpc.errors import KpcError


def finite_positive(value: Any, name: str) -> float:
    """`value` as a float that is finite and > 0, else one line naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KpcError(f"{name} should be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise KpcError(f"{name} is {number}: give a finite positive number")
    if number <= 0:
        raise KpcError(f"{name} must be positive (got {number:g})")
    return number


@dataclass(frozen=True, eq=False)
class Budget:
    """Exactly one of `gflops`, `ratio` or `ms`.

    `ratio` is a fraction of the unpruned cost: of its FLOPs, or of its latency when a
    `table` (a `kpc.LatencyTable`) is given. `ms` needs a `table`: milliseconds mean
    something only on the target the table was measured on. `gflops` with a `table` stays
    a FLOPs budget; the table's runtime then picks, among the plans that keep nearly the
    most importance, the one it runs fastest (`kpc.planner.fastest_within`). `force_table` uses a table
    measured on another target anyway; `target` overrides the table's runtime, batch,
    threads or precision (a mismatch with the table is refused unless forced).
    """

    gflops: float | None = None
    ratio: float | None = None
    ms: float | None = None
    table: Any = None  # kpc.latency.table.LatencyTable
    force_table: bool = False
    target: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        given = [(name, getattr(self, name)) for name in ("gflops", "ratio", "ms") if getattr(self, name) is not None]
        if len(given) != 1:
            raise KpcError("give exactly one budget: --budget-gflops, --budget-ratio or --budget-ms")
        name, value = given[0]
        object.__setattr__(self, name, finite_positive(value, f"--budget-{name}"))
        if self.ratio is not None and self.ratio > 1:
            raise KpcError(f"--budget-ratio {self.ratio:g} is above 1: it is a fraction of the unpruned cost")
        if self.ms is not None and self.table is None:
            raise KpcError("--budget-ms needs a latency table: pass --lut FILE (measure one with kpc profile)")

    @property
    def latency(self) -> bool:
        """The budget is in milliseconds (or a fraction of them): the table is the cost."""
        return self.table is not None and self.gflops is None

    @property
    def speed_table(self) -> Any:
        """The table that breaks a FLOPs budget's near-ties toward speed, or None."""
        return self.table if self.gflops is not None else None

    def describe(self) -> str:
        if self.gflops is not None:
            return f"{self.gflops:g} GFLOPs" + (", fastest on the latency table" if self.table is not None else "")
        if self.ratio is not None:
            return f"{self.ratio:g} x unpruned {'latency' if self.latency else 'cost'}"
        return f"{self.ms:g} ms"

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"asked": self.describe()}
        for name in ("gflops", "ratio", "ms"):
            if getattr(self, name) is not None:
                record[name] = getattr(self, name)
        return record
