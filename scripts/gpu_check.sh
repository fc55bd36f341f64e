#!/usr/bin/env bash
# GPU readiness check of napari-ctp2mri, in at most 8 minutes (docs/gpu.md).
#
#   bash scripts/gpu_check.sh                 # writes ${OUT:-gpu_check_out}/summary.md and a log per step
#   BUDGET_S=300 bash scripts/gpu_check.sh    # a shorter total budget (default 470 s)
#
# On a machine with a CUDA GPU: `ctp2mri doctor`; the tests that need a real GPU; `ctp2mri bench
# train | post-train | synthesize` on the paper profile in bf16 (synthesis of the paper-size
# phantom volume with DDIM-200 and DPM-Solver++(2M)-20, with the fraction of the GPU's datasheet
# bf16 peak where doctor knows it); a 2-GPU DDP training under torchrun when two GPUs are present.
# Without CUDA it runs the CPU-safe parts (doctor, a tiny benchmark), says the GPU parts were
# skipped, and exits 0. Every step runs under `timeout` within the total budget; the exit status
# is 1 when a step that ran failed or ran out of time, else 0.
set -u
cd "$(dirname "$0")/.."

OUT="${OUT:-gpu_check_out}"
BUDGET_S="${BUDGET_S:-470}"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
CTP2MRI=("$PY" -m ctp2mri.cli)

mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
ROWS="$OUT/.rows"
SECTIONS="$OUT/.sections"
: >"$ROWS"
: >"$SECTIONS"
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
FAILED=0

# step NAME LIMIT_S COMMAND...: run under timeout (never past the deadline), log, record time and status
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - $(date +%s) - 5))
  if [ "$left" -lt 15 ]; then
    echo "| $name | skipped: the ${BUDGET_S} s budget is spent | | |" >>"$ROWS"
    echo "== $name: skipped (budget spent)"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s): $*"
  local t0 t1 rc status
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  local secs
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  case $rc in
    0) status=ok ;;
    124 | 137) status="timed out after ${limit} s"; FAILED=1 ;;
    *) status="failed (exit $rc)"; FAILED=1 ;;
  esac
  echo "   $status in ${secs} s (log: $OUT/$name.log)"
  echo "| $name | $status | $secs | $name.log |" >>"$ROWS"
  {
    echo
    echo "## $name — $status, ${secs} s"
    echo
    echo '```'
    echo "\$ $*"
    # progress bars rewrite one line with \r: keep only the last state of each line
    tr '\r' '\n' <"$OUT/$name.log" | grep -v '^\s*$' | grep -v 'it/s\]$\|s/it\]$' | tail -n 30
    echo '```'
  } >>"$SECTIONS"
}

note() {
  echo "== $1"
  echo "| $1 | skipped | | |" >>"$ROWS"
}

export PYTHONUNBUFFERED=1
step doctor 60 "${CTP2MRI[@]}" doctor

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [ "$GPUS" -gt 0 ]; then
  PEAK=$("$PY" -c "import torch; from ctp2mri.doctor import bf16_peak_tflops as p; print(p(torch.cuda.get_device_name(0)) or '')" 2>/dev/null)
  PEAK_ARG=()
  [ -n "$PEAK" ] && PEAK_ARG=(--peak-tflops "$PEAK")
  # The project marks no test "cuda"; these files hold the tests that take another path on a real GPU.
  if grep -q '"cuda:' pyproject.toml; then TESTS=(-m cuda); else TESTS=(tests/test_devices.py tests/test_doctor.py); fi
  step cuda-tests 90 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
  step bench-train-ldm 60 "${CTP2MRI[@]}" bench train --profile paper --kind ldm --batch-size 16 --steps 10 \
    --device cuda --precision bf16
  step bench-post-train 75 "${CTP2MRI[@]}" bench post-train --profile paper --batch-size 16 --steps 10 \
    --device cuda --precision bf16
  step bench-synthesize 120 "${CTP2MRI[@]}" bench synthesize --profile paper --samplers ddim dpm++2m \
    --steps 200 20 --no-naive --device cuda --precision bf16 ${PEAK_ARG[@]+"${PEAK_ARG[@]}"}
  if [ "$GPUS" -ge 2 ]; then
    step ddp-data 45 "${CTP2MRI[@]}" phantom --out "$OUT/ddp_data" --cases 4 --profile demo --no-figure --overwrite
    step ddp-2gpu-train 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m ctp2mri.cli \
      train-autoencoder --data "$OUT/ddp_data" --out "$OUT/ddp_autoencoder" --profile demo --steps 20 \
      --batch-size 8 --device cuda --precision bf16 --num-workers 0 --checkpoint-every 20
  else
    note "ddp-2gpu-train: skipped, $GPUS GPU here (needs 2)"
  fi
  step bench-train-autoencoder 45 "${CTP2MRI[@]}" bench train --profile paper --kind autoencoder --batch-size 8 \
    --steps 5 --device cuda --precision bf16
  GPU_NOTE="GPU parts ran on $GPUS CUDA GPU(s)."
else
  step bench-train-tiny 90 "${CTP2MRI[@]}" bench train --profile demo --kind ldm --batch-size 2 --steps 2 \
    --device cpu --precision fp32
  step bench-synthesize-tiny 120 "${CTP2MRI[@]}" bench synthesize --profile demo --samplers dpm++2m --steps 2 \
    --no-naive --device cpu --threads 1
  GPU_NOTE="GPU parts skipped: no CUDA GPU is usable here (see doctor above); ran the CPU-safe parts only."
  note "cuda-tests, bench train/post-train/synthesize (paper, bf16), ddp-2gpu-train: no CUDA GPU"
fi

TOTAL=$(($(date +%s) - START))
{
  echo "# gpu_check — $(date '+%Y-%m-%d %H:%M'), $(hostname)"
  echo
  echo "$GPU_NOTE Total ${TOTAL} s of a ${BUDGET_S} s budget."
  echo
  echo "| step | status | seconds | log |"
  echo "|---|---|---|---|"
  cat "$ROWS"
  cat "$SECTIONS"
} >"$SUMMARY"
rm -f "$ROWS" "$SECTIONS"
echo "$GPU_NOTE"
echo "summary: $SUMMARY (${TOTAL} s)"
exit $FAILED
