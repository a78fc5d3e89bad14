#!/usr/bin/env bash
# The GPU path in one call of a few minutes on an H100/H200 (issue 15): measure which conv widths the GPU
# likes, profile ResNet-50 on torch-cuda (fp16, batch 64) and on ort-cuda where onnxruntime-gpu is installed,
# prune it with --budget-ms at 30/50/70% of the measured latency, check the landing and the speedup with
# kpc bench, and write everything under $OUT as summary.md plus results.tgz (tables, plans, bench reports,
# logs; the weights stay behind). Where a GPU is lent it runs through the `device` tool:
#
#     run: bash benchmarks/gpu.sh          (OUT is set by the tool; carry: wheels/ when kpc's deps are missing)
#
# Without a GPU it stops at the boundary, in one line, exit 2, before any work. Every step runs under a
# deadline (KPC_GPU_DEADLINE seconds for the whole script, default 420) so that a slow or hung step still
# leaves the results of the others. KPC_GPU_RUNTIMES, KPC_GPU_MODEL, KPC_GPU_BATCH, KPC_GPU_PRECISION,
# KPC_GPU_INPUT_SIZE and KPC_GPU_FRACTIONS change what is run (a CPU runtime rehearses the script here);
# KPC_GPU_TABLE reuses a table this GPU measured before instead of profiling; KPC_GPU_BENCH_REPEATS (2) benches;
# KPC_GPU_ROUND_TO prunes with another width step; KPC_GPU_WIDTH_PROBE=0 skips the conv width probe.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d /tmp/kpc-gpu.XXXXXX)}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-$(command -v python3)}"
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
MODEL="${KPC_GPU_MODEL:-torchvision:resnet50}"
BATCH="${KPC_GPU_BATCH:-64}"
PRECISION="${KPC_GPU_PRECISION:-fp16}"
FRACTIONS="${KPC_GPU_FRACTIONS:-0.3 0.5 0.7}"
DEADLINE="${KPC_GPU_DEADLINE:-420}"
SIZE_ARGS=()
if [ -n "${KPC_GPU_INPUT_SIZE:-}" ]; then SIZE_ARGS=(--input-size "$KPC_GPU_INPUT_SIZE"); fi
STEP_ARGS=()
if [ -n "${KPC_GPU_ROUND_TO:-}" ]; then STEP_ARGS=(--round-to "$KPC_GPU_ROUND_TO"); fi

# kpc's pure-Python dependencies from a carried wheel directory when the machine lacks them (it reaches no registry)
if ! "$PYTHON" -c "import torch_pruning, typer, rich, safetensors, timm, yaml" 2>/dev/null; then
  if compgen -G "wheels/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/kpc-site wheels/*.whl
    export PYTHONPATH="/tmp/kpc-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "kpc: error: kpc's dependencies are missing and no wheels/ directory was carried: pip download them into wheels/" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

RUNTIMES="${KPC_GPU_RUNTIMES:-}"
if [ -z "$RUNTIMES" ] || [[ "$RUNTIMES" == *cuda* ]]; then
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "kpc: error: no CUDA GPU is visible here (torch.cuda.is_available() is False): run this script where a GPU is lent" >&2
    exit 2
  fi
fi
if [ -z "$RUNTIMES" ]; then
  RUNTIMES="torch-cuda"
  if "$PYTHON" -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)"; then
    RUNTIMES="torch-cuda ort-cuda"
  fi
fi

# Bundle what came out into one archive (the device tool returns at most 8 files), weights left behind.
bundle() {
  (cd "$OUT" && find . -type f ! -name results.tgz ! -name summary.md ! -name '*.safetensors' ! -name '*.onnx' \
     ! -name '*.pt' -print0 | tar czf results.tgz --null -T - && find . -mindepth 1 ! -name results.tgz \
     ! -name summary.md -delete) || true
}
trap bundle EXIT

# Run "$@" under what is left of the deadline; 124 when it ran out.
step() {
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -le 5 ]; then return 124; fi
  timeout --kill-after=5 "$left" "$@"
}

summary="$OUT/summary.md"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"; } > "$OUT/gpu.txt"
step_label="${KPC_GPU_ROUND_TO:-from the table}"
echo "# kpc on $(head -1 "$OUT/gpu.txt"): $MODEL, batch $BATCH, $PRECISION, width step $step_label, $(date -u +%F)" > "$summary"
"$PYTHON" -c "import torch, onnxruntime as o; print(f'torch {torch.__version__}, cuda {torch.version.cuda}, ort {o.__version__} {o.get_available_providers()}')" >> "$summary" || true

if [[ "$RUNTIMES" == *cuda* ]] && [ "${KPC_GPU_WIDTH_PROBE:-1}" = 1 ]; then
  echo "" >> "$summary"
  echo "## conv width step ($PRECISION, batch $BATCH, channels_last; ms on the step below / ms at the multiple above)" >> "$summary"
  echo '```' >> "$summary"
  step "$PYTHON" benchmarks/gpu_width_step.py --batch "$BATCH" --precision "$PRECISION" --out "$OUT/width-step.json" \
    >> "$summary" 2> "$OUT/width-step.log" || echo "width step probe failed or ran out of time: $?" >> "$summary"
  echo '```' >> "$summary"
fi

for runtime in $RUNTIMES; do
  table="$OUT/$runtime-$PRECISION-b$BATCH.json"
  set +e
  if [ -n "${KPC_GPU_TABLE:-}" ]; then  # a table this GPU measured before: prune and bench only
    cp "$KPC_GPU_TABLE" "$table"
    code=0
  else
    step "$PYTHON" -m kpc profile "$MODEL" --runtime "$runtime" --precision "$PRECISION" --batch "$BATCH" \
      --threads 1 "${SIZE_ARGS[@]}" --out "$table" 2> "$OUT/$runtime-profile.log"
    code=$?
  fi
  set -e
  echo "" >> "$summary"
  if [ ! -f "$table" ]; then
    echo "## $runtime: profile failed (exit $code after ${SECONDS}s; see $runtime-profile.log)" >> "$summary"
    tail -3 "$OUT/$runtime-profile.log" | sed 's/^/    /' >> "$summary"
    continue
  fi
  full=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['header']['full_model_ms'])" "$table")
  echo "## $runtime: unpruned $full ms (profile exit $code at ${SECONDS}s)" >> "$summary"
  echo "| budget | budget ms | prune exit | plan's timed ms (vs budget) | bench candidate ms (vs budget) | bench speedup (95% CI) |" >> "$summary"
  echo "|---|---|---|---|---|---|" >> "$summary"
  for fraction in $FRACTIONS; do
    budget=$("$PYTHON" -c "print(round($fraction * $full, 4))")
    child="$OUT/$runtime-$fraction"
    set +e
    step "$PYTHON" -m kpc prune "$MODEL" --budget-ms "$budget" --lut "$table" --data synthetic --calib-batches 2 \
      --bn-recalibrate 0 "${SIZE_ARGS[@]}" "${STEP_ARGS[@]}" --out "$child" 2> "$OUT/$runtime-$fraction-prune.log"
    code=$?
    set -e
    measured="-"
    bench_ms="-"
    speedup="-"
    if [ -f "$child/plan.json" ]; then
      measured=$("$PYTHON" -c "import json,sys; r=json.load(open(sys.argv[1]))['rounds'][-1]; print(f\"{r['counted_cost']:.3f} ({r['counted_cost']/r['limit']-1:+.1%})\")" "$child/plan.json" || echo "?")
      bench_ms=""
      speedup=""
      for repeat in $(seq "${KPC_GPU_BENCH_REPEATS:-2}"); do  # a second, separate bench shows its own spread
        report="$child-bench-$repeat.json"
        step "$PYTHON" -m kpc bench "$MODEL" "$child" --runtime "$runtime" --precision "$PRECISION" --batch "$BATCH" \
          --threads 1 "${SIZE_ARGS[@]}" --json "$report" > /dev/null 2>> "$OUT/$runtime-$fraction-bench.log" || true
        if [ -f "$report" ]; then
          bench_ms+=$("$PYTHON" -c "import json,sys; m=json.load(open(sys.argv[1]))['candidate']['latency']; print(f\"{m['median_ms']:.3f} ({m['median_ms']/$budget-1:+.1%}, p90 {m['p90_ms']:.3f}); \", end='')" "$report")
          speedup+=$("$PYTHON" -c "import json,sys; s=json.load(open(sys.argv[1]))['speedup']; print(f\"{s['ratio']:.2f}x ({s['ci_low']:.2f}-{s['ci_high']:.2f}); \", end='')" "$report")
        fi
      done
    else
      tail -2 "$OUT/$runtime-$fraction-prune.log" | sed 's/^/    /' >> "$summary"
    fi
    echo "| $fraction | $budget | $code | $measured | $bench_ms | $speedup |" >> "$summary"
  done
done
echo "" >> "$summary"
echo "done in ${SECONDS}s" >> "$summary"
cat "$summary"
