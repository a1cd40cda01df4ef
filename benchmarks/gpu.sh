#!/usr/bin/env bash
# GPU readiness benchmark (issues 14, 21): on a machine with CUDA, the training throughput of the MOSI-shaped
# model (mosi-synth at the paper's batch 64 x sequence 50) for each method in bf16 and fp32 (steps/s and
# the bf16/fp32 ratio); the GPU settings of docs/performance.md, each on vs off (TF32 + cudnn.benchmark,
# channels_last on a conv model, torch.compile, fp16 with fused Adam vs bf16); the per-run anatomy
# (benchmarks/run_anatomy.py) on the GPU; and, with >= 2 GPUs, 2-process DDP scaling (accelerate launch --num_processes 2
# vs 1: samples/s ratio, per-process batch = the paper batch, ideal 2.0). Each measurement is
# benchmarks/gpu_throughput.py in a fresh process; see its docstring for what is timed.
#
#   benchmarks/gpu.sh [--methods "baseline cggm"] [--steps 30] [--epochs 3] [--out FILE] [--help]
#
# Exit codes: 0 measured; 2 bad arguments; 3 no CUDA device here (nothing is measured or written).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

METHODS="baseline cggm"
STEPS=30
EPOCHS=3
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --methods) [ $# -ge 2 ] || { echo "gpu.sh: --methods needs a value (e.g. \"baseline cggm\")" >&2; exit 2; }; METHODS="$2"; shift 2 ;;
    --steps) [ $# -ge 2 ] || { echo "gpu.sh: --steps needs a value" >&2; exit 2; }; STEPS="$2"; shift 2 ;;
    --epochs) [ $# -ge 2 ] || { echo "gpu.sh: --epochs needs a value" >&2; exit 2; }; EPOCHS="$2"; shift 2 ;;
    --out) [ $# -ge 2 ] || { echo "gpu.sh: --out needs a file name" >&2; exit 2; }; OUT="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$1'; expected --methods, --steps, --epochs, --out or --help" >&2; exit 2 ;;
  esac
done
for v in "$STEPS" "$EPOCHS"; do
  case "$v" in ''|*[!0-9]*|0) echo "gpu.sh: --steps/--epochs must be positive integers, got '$v'" >&2; exit 2 ;; esac
done
[ -n "$METHODS" ] || { echo "gpu.sh: --methods is empty" >&2; exit 2; }

PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MMBALANCE_NO_PROGRESS=1
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
if [ "$NGPU" -lt 1 ]; then
  echo "gpu.sh: no CUDA device is visible here (torch.cuda.is_available() is False); this benchmark needs a GPU." >&2
  echo "gpu.sh: nothing was measured. On CPU, 'python benchmarks/gpu_throughput.py --cpu-smoke' checks the code path." >&2
  exit 3
fi
# every method name must be registered (a clear error before minutes of GPU time)
"$PY" - "$METHODS" <<'EOF' || exit 2
import sys
from mmbalance.registry import list_methods
known = list_methods()
bad = [m for m in sys.argv[1].split() if m not in known]
if bad:
    sys.exit(f"gpu.sh: unknown method(s) {', '.join(bad)}; registered: {', '.join(known)}")
EOF

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
REPORT="$WORK/report.md"
GPU_NAME=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
TORCH=$("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')
{
  echo "## GPU throughput, $(date -u +%F), $NGPU x $GPU_NAME, torch $TORCH"
  echo
  echo "mosi-synth (MulT-shaped), batch 64 x seq 50 per process, $STEPS steps x $((EPOCHS - 1)) timed epochs."
  echo
  echo "| method | fp32 steps/s | bf16 steps/s | bf16/fp32 |"
  echo "|---|---|---|---|"
} > "$REPORT"

steps_of() { "$PY" -c 'import json,sys; print(f"{json.load(open(sys.argv[1]))["steps_per_s"]:.2f}")' "$1"; }

for m in $METHODS; do
  for p in no bf16; do
    CUDA_VISIBLE_DEVICES=0 "$PY" benchmarks/gpu_throughput.py --method "$m" --precision "$p" --steps "$STEPS" \
      --epochs "$EPOCHS" --json "$WORK/$m-$p.json"
  done
  echo "| $m | $(steps_of "$WORK/$m-no.json") | $(steps_of "$WORK/$m-bf16.json") | $("$PY" benchmarks/gpu_throughput.py --ratio "$WORK/$m-bf16.json" "$WORK/$m-no.json") |" >> "$REPORT"
done

# The GPU settings (docs/performance.md), baseline, one GPU: each setting on (its default) vs off, steps/s.
{
  echo
  echo "GPU settings, baseline, one GPU (steps/s; on = the default unless noted)"
  echo
  echo "| setting | model | on steps/s | off steps/s | on/off |"
  echo "|---|---|---|---|---|"
} >> "$REPORT"
setting_row() {  # label dataset precision-on precision-off "on sets" "off sets"
  local label=$1 ds=$2 args side prec sets
  for side in on off; do
    if [ "$side" = on ]; then prec=$3; sets=$5; else prec=$4; sets=$6; fi
    args=()
    for kv in $sets; do args+=(--set "$kv"); done
    CUDA_VISIBLE_DEVICES=0 "$PY" benchmarks/gpu_throughput.py --method baseline --dataset "$ds" --precision "$prec" \
      --steps "$STEPS" --epochs "$EPOCHS" --json "$WORK/set-$side.json" "${args[@]}"
  done
  echo "| $label | $ds | $(steps_of "$WORK/set-on.json") | $(steps_of "$WORK/set-off.json") | $("$PY" benchmarks/gpu_throughput.py --ratio "$WORK/set-on.json" "$WORK/set-off.json") |" >> "$REPORT"
}
setting_row "TF32 + cudnn.benchmark (fp32)" mosi-synth no no "" "train.tf32=false train.cudnn_benchmark=false"
setting_row "channels_last (fp32)" synthetic-seg no no "" "train.channels_last=false"
setting_row "channels_last (bf16)" synthetic-seg bf16 bf16 "" "train.channels_last=false"
setting_row "torch.compile (bf16; on = train.compile=true)" mosi-synth bf16 bf16 "train.compile=true" ""
setting_row "fp16 (fused Adam: overflow skip on the device) vs bf16" mosi-synth fp16 bf16 "" ""
{
  echo
  echo "Anatomy of one warm leaderboard run on this machine (benchmarks/run_anatomy.py, 1 repeat):"
  echo
  CUDA_VISIBLE_DEVICES=0 "$PY" benchmarks/run_anatomy.py --repeats 1 --markdown | sed -n '1,20p'
} >> "$REPORT"

if [ "$NGPU" -ge 2 ]; then
  {
    echo
    echo "2-process DDP (accelerate launch, one GPU per process, per-process batch 64): samples/s of 2 over 1 process (ideal 2.0)"
    echo
    echo "| method | precision | 1 process samples/s | 2 processes samples/s | scaling |"
    echo "|---|---|---|---|---|"
  } >> "$REPORT"
  for m in $METHODS; do
    for p in no bf16; do
      for n in 1 2; do
        multi=""; [ "$n" -gt 1 ] && multi="--multi_gpu"
        CUDA_VISIBLE_DEVICES=0,1 "$PY" -m accelerate.commands.launch $multi --num_processes "$n" --num_machines 1 \
          --mixed_precision "$p" --dynamo_backend no benchmarks/gpu_throughput.py --method "$m" --precision "$p" \
          --steps "$STEPS" --epochs "$EPOCHS" --json "$WORK/ddp-$m-$p-$n.json"
      done
      s1=$("$PY" -c 'import json,sys; print(f"{json.load(open(sys.argv[1]))["samples_per_s"]:.1f}")' "$WORK/ddp-$m-$p-1.json")
      s2=$("$PY" -c 'import json,sys; print(f"{json.load(open(sys.argv[1]))["samples_per_s"]:.1f}")' "$WORK/ddp-$m-$p-2.json")
      echo "| $m | $p | $s1 | $s2 | $("$PY" benchmarks/gpu_throughput.py --ratio "$WORK/ddp-$m-$p-2.json" "$WORK/ddp-$m-$p-1.json") |" >> "$REPORT"
    done
  done
else
  printf '\nDDP scaling: skipped (%s GPU here; it needs at least 2).\n' "$NGPU" >> "$REPORT"
fi

cat "$REPORT"
if [ -n "$OUT" ]; then
  cp "$REPORT" "$OUT.tmp.$$" && mv "$OUT.tmp.$$" "$OUT"
  echo "written: $OUT"
fi
