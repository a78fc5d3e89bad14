#!/usr/bin/env bash
# Set-up for a fresh machine: Debian's Fashion-MNIST package (the embedded real data)
# and a virtual environment with kpc and its test tools. Safe to run again: the install
# is skipped while the venv is up to date with pyproject.toml (a stamp in .venv records it).
# PyPI's torch is the CUDA build; it runs on the CPU too (the CPU-only wheel does not
# work with torchvision).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.kpc-installed
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && [ -x .venv/bin/kpc ] \
    && .venv/bin/python -c "import kpc, torch, onnxruntime" 2> /dev/null; then
  echo "set-up: .venv is up to date with pyproject.toml (delete $stamp to reinstall)"
else
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$wanted" > "$stamp"
fi
.venv/bin/kpc --version
