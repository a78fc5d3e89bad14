#!/usr/bin/env bash
# kpc's main job on the embedded default (`kpc demo`): on Fashion-MNIST from Debian's package,
# train a small ResNet-18 teacher, profile it on ONNX Runtime (CPU, batch 1, 2 threads), prune it
# to half its measured latency, distill the child under its parent, export ONNX, and verify the
# speedup and the accuracy. Writes ./kpc-demo/ (report.md inside).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/kpc demo --out "${1:-kpc-demo}"
