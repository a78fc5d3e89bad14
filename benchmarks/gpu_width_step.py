"""Which width step a GPU's convolutions like, measured rather than assumed (issue 15, item 1).

kpc's torch-cuda channel block is 8 for fp16/bf16, from NVIDIA's performance guide. This
times ResNet-50's three conv shapes (1x1 reduce, 3x3, 1x1 expand) at every width from
``--low`` to ``--high`` in steps of 1 (input and output width equal), fp16 channels_last at
batch 64, and reports, per step s in 8, 16, 32, 64, the time of widths on the step below
(any width for 8; multiples of 8 but not 16 for 16, ...) over the time of the multiple of s
above them: near 1, the coarser step buys nothing; well above 1, it is the runtime's block.
CUDA events, medians of ``--iters``.

    python benchmarks/gpu_width_step.py --out width-step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

SHAPES = {"1x1 at 28x28": (1, 28), "3x3 at 28x28": (3, 28), "3x3 at 14x14": (3, 14), "1x1 at 7x7": (1, 7)}


def time_conv(width: int, kernel: int, size: int, batch: int, dtype: torch.dtype, iters: int) -> float:
    """Median ms of one conv of ``width`` in and out channels, CUDA events around each run."""
    conv = nn.Conv2d(width, width, kernel, padding=kernel // 2, bias=False).cuda().to(dtype)
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(batch, width, size, size, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(5):
            conv(x)
        timings = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            conv(x)
            end.record()
            end.synchronize()
            timings.append(start.elapsed_time(end))
    return statistics.median(timings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--low", type=int, default=209)
    parser.add_argument("--high", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--precision", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_width_step: error: no CUDA GPU is visible here: run it where a GPU is lent", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    dtype = torch.float16 if args.precision == "fp16" else torch.bfloat16
    result: dict[str, object] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                 "cudnn": torch.backends.cudnn.version(), "batch": args.batch,
                                 "precision": args.precision, "shapes": {}}
    header = " ".join(f"{'/' + str(s):>7}" for s in (8, 16, 32, 64))
    print(f"{'shape':<14} {header}   (ms on the step below / ms at the multiple above)")
    for name, (kernel, size) in SHAPES.items():
        ms = {w: time_conv(w, kernel, size, args.batch, dtype, args.iters) for w in range(args.low, args.high + 1)}
        ratios = {}
        for step in (8, 16, 32, 64):
            # widths on the next smaller step but off this one (off 8: any), against the multiple above
            coarse = step // 2 if step > 8 else 1
            off = [ms[w] / ms[-(-w // step) * step] for w in ms
                   if w % coarse == 0 and w % step and -(-w // step) * step in ms]
            ratios[step] = statistics.mean(off) if off else float("nan")
        result["shapes"][name] = {"ms": ms, "off_multiple_over_multiple": ratios}  # type: ignore[index]
        print(f"{name:<14} " + " ".join(f"{ratios[s]:>7.3f}" for s in (8, 16, 32, 64)))
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
