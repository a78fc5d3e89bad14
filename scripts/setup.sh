#!/usr/bin/env bash
# Set-up for a fresh machine: Debian's Fashion-MNIST package (the embedded real data)
# and a virtual environment with kpc and its test tools. Safe to run again.
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
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/kpc --version
