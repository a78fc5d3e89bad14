#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: Debian's Fashion-MNIST (real data for
# the tests), a virtual environment with kpc, then pytest on two workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -n 2 -q "$@"
