"""benchmarks/gpu.sh, the GPU path's one-call script, up to the device boundary."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here: the script would run for real")
def test_gpu_script_stops_at_the_boundary_in_one_line(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path)}, timeout=300, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [lines[0]] and "no CUDA GPU is visible" in lines[0], done.stderr
    assert list(tmp_path.iterdir()) == []
