#!/usr/bin/env bash
# kpc's main job on the embedded default: prune a ResNet-18 for 1x32x32 Fashion-MNIST
# images to half its FLOPs, calibrated on the real Fashion-MNIST training split from
# Debian's package, then show what was kept and reload the artifact.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out="${1:-kpc-demo}"
.venv/bin/kpc prune torchvision:resnet18 --num-classes 10 --input-size 1x32x32 \
  --data fashion-mnist --calib-batches 8 --budget-ratio 0.5 --out "$out" --overwrite
.venv/bin/kpc inspect "$out"
.venv/bin/python -c "import kpc, torch; m = kpc.load('$out'); print('reloaded:', tuple(m(torch.zeros(1, 1, 32, 32)).shape))"
