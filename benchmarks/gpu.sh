#!/usr/bin/env bash
# The GPU path in one call of a few minutes on an H100/H200 (issue 15): profile ResNet-50 on torch-cuda
# (fp16, batch 64) and on ort-cuda where onnxruntime-gpu is installed, prune it with --budget-ms at 30/50/70%
# of the measured latency, check the landing and the speedup with kpc bench, and write everything under $OUT
# (tables, plans, bench reports, a summary.md). Where a GPU is lent it runs through the `device` tool:
#
#     run: bash benchmarks/gpu.sh          (OUT is set by the tool; carry: wheels/ when kpc's deps are missing)
#
# Without a GPU it stops at the boundary, in one line, exit 2, before any work.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d /tmp/kpc-gpu.XXXXXX)}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-$(command -v python3)}"
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
MODEL="${KPC_GPU_MODEL:-torchvision:resnet50}"
BATCH="${KPC_GPU_BATCH:-64}"
PRECISION="${KPC_GPU_PRECISION:-fp16}"

# kpc's pure-Python dependencies from a carried wheel directory when the machine lacks them (it reaches no registry)
if ! "$PYTHON" -c "import torch_pruning, typer, rich, safetensors, timm, yaml" 2>/dev/null; then
  if [ -d wheels ]; then
    "$PYTHON" -m pip install -q --no-index --find-links wheels torch-pruning typer rich safetensors timm pyyaml
  else
    echo "kpc: error: kpc's dependencies are missing and no wheels/ directory was carried: pip download them into wheels/" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "kpc: error: no CUDA GPU is visible here (torch.cuda.is_available() is False): run this script where a GPU is lent" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv" || true

RUNTIMES="torch-cuda"
if "$PYTHON" -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)"; then
  RUNTIMES="torch-cuda ort-cuda"
fi

summary="$OUT/summary.md"
echo "# kpc on $(head -2 "$OUT/gpu.csv" | tail -1): $MODEL, batch $BATCH, $PRECISION" > "$summary"
for runtime in $RUNTIMES; do
  table="$OUT/$runtime-$PRECISION-b$BATCH.json"
  "$PYTHON" -m kpc profile "$MODEL" --runtime "$runtime" --precision "$PRECISION" --batch "$BATCH" --threads 1 \
    --out "$table" 2> "$OUT/$runtime-profile.log"
  full=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['header']['full_model_ms'])" "$table")
  echo "" >> "$summary"
  echo "## $runtime: unpruned $full ms" >> "$summary"
  echo "| budget | budget ms | prune exit | at prune ms | bench speedup (95% CI) |" >> "$summary"
  echo "|---|---|---|---|---|" >> "$summary"
  for fraction in 0.3 0.5 0.7; do
    budget=$("$PYTHON" -c "print(round($fraction * $full, 4))")
    child="$OUT/$runtime-$fraction"
    set +e
    "$PYTHON" -m kpc prune "$MODEL" --budget-ms "$budget" --lut "$table" --calib-batches 2 --bn-recalibrate 0 \
      --out "$child" 2> "$OUT/$runtime-$fraction-prune.log"
    code=$?
    set -e
    measured="-"
    speedup="-"
    if [ -f "$child/plan.json" ]; then
      measured=$("$PYTHON" -c "import json,sys; r=json.load(open(sys.argv[1]))['rounds'][-1]; print(f\"{r['counted_cost']:.3f} ({r['counted_cost']/r['limit']-1:+.1%})\")" "$child/plan.json")
      "$PYTHON" -m kpc bench "$MODEL" "$child" --runtime "$runtime" --precision "$PRECISION" --batch "$BATCH" \
        --json "$child-bench.json" > /dev/null 2> "$OUT/$runtime-$fraction-bench.log" || true
      if [ -f "$child-bench.json" ]; then
        speedup=$("$PYTHON" -c "import json,sys; s=json.load(open(sys.argv[1]))['speedup']; print(f\"{s['ratio']:.2f}x ({s['ci_low']:.2f}-{s['ci_high']:.2f})\")" "$child-bench.json")
      fi
    fi
    echo "| $fraction | $budget | $code | $measured | $speedup |" >> "$summary"
  done
done
cat "$summary"
