"""`kpc profile --show`: latency against width for every entry of a table, as one PNG."""

from __future__ import annotations

import math
from pathlib import Path

from kpc.atomic import atomic_file
from kpc.latency.table import ONE_WIDTH_KINDS, load_table


def plot_table(path: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = load_table(path)
    entries = sorted(table.entries.items())
    columns = min(4, len(entries)) or 1
    rows = math.ceil(len(entries) / columns) or 1
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for axis, (signature, entry) in zip(axes.flat, entries, strict=False):
        if entry.kind in ONE_WIDTH_KINDS:
            axis.plot(entry.c_out, entry.ms, "o-", label="measured")
        else:
            for i, c_in in enumerate(entry.c_in):
                axis.plot(entry.c_out, entry.ms[i], "o-", ms=3, label=f"in {int(c_in)}")
        axis.set_title(signature, fontsize=7)
        axis.set_xlabel("output channels", fontsize=7)
        axis.set_ylabel("ms", fontsize=7)
        axis.tick_params(labelsize=6)
        if entry.kind not in ONE_WIDTH_KINDS and len(entry.c_in) <= 8:
            axis.legend(fontsize=5)
    for axis in list(axes.flat)[len(entries):]:
        axis.axis("off")
    h = table.header
    figure.suptitle(f"{h['model']} on {h['device']} ({h['runtime']}, {h['precision']}, b{h['batch']}, "
                    f"t{h['threads']}): full model {h['full_model_ms']:.3f} ms", fontsize=9)
    figure.tight_layout()
    target = out if out is not None else Path(path).with_suffix(".png")
    try:
        with atomic_file(target, "wb") as handle:
            figure.savefig(handle, format="png", dpi=90)
    finally:
        plt.close(figure)
    return target
