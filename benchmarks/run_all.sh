#!/usr/bin/env bash
# Every CPU benchmark once, their tables into one markdown file (for benchmarks/README.md): the engine
# vs a plain loop, every method vs the baseline per epoch (mfeat, mosi-synth), host syncs per step per
# method, the diagnostics overhead, the leaderboard's throughput, the methods' passes vs the rest per step and
# the probe solver against converged fits. Run it on an otherwise idle machine:
# the numbers are timing ratios of paired, interleaved runs, and other jobs widen their min-max ranges.
#
#   benchmarks/run_all.sh [--out FILE] [--dry-run] [--help]
#
# --out FILE: the markdown file (default benchmarks/results-<UTC date-time>.md; written when all are done,
# atomically: a failed benchmark leaves no partial file). --dry-run: print the estimate and the commands.
# Environment: PYTHON (default python). Budget: about 20.5 minutes on an idle 2-core CPU (measured: 7.5 min + 4 min for the throughput step, 2026-12-01; the last two steps added 2026-12-07, ≈ 2.5 min) (estimate below;
# the first four steps took 18 minutes on a shared machine at load average 6).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

OUT="benchmarks/results-$(date -u +%Y%m%d-%H%M).md"
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "run_all.sh: --out needs a file name" >&2; exit 2; }; OUT="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_all.sh: unknown argument '$1'; expected --out FILE, --dry-run or --help" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MMBALANCE_NO_PROGRESS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# name | estimated minutes on an idle 2-core CPU | command
STEPS=(
  "Engine vs a plain PyTorch loop|1.5|$PY benchmarks/loop_overhead.py --epochs 20 --repeats 10 --markdown"
  "Time per epoch, every method vs the baseline|9|$PY benchmarks/method_overhead.py --repeats 3"
  "Host syncs per training step|1.5|$PY benchmarks/host_syncs.py"
  "Diagnostics overhead (train.diagnostics=default vs none)|2|$PY benchmarks/diagnostics_overhead.py --repeats 3 --markdown"
  "Leaderboard throughput (warm workers vs one process per run)|4|$PY benchmarks/leaderboard_throughput.py --repeats 2"
  "Method passes vs the rest per step (mfeat)|1|$PY benchmarks/method_passes.py --epochs 10 --repeats 3"
  "Probe solver: shipped vs converged fits|1.5|$PY benchmarks/probe_solver.py"
)
total=0
echo "run_all.sh: estimate on an idle 2-core CPU (a loaded machine takes longer):"
for s in "${STEPS[@]}"; do
  IFS='|' read -r name minutes cmd <<< "$s"
  echo "  ~${minutes} min  $name: $cmd"
  total=$(awk -v a="$total" -v b="$minutes" 'BEGIN { print a + b }')
done
echo "  total ~${total} min; output: $OUT"
[ "$DRY" = 1 ] && exit 0

TMP=$(mktemp "${OUT}.tmp.XXXXXX")
trap 'rm -f "$TMP"' EXIT
{
  echo "# Benchmark results, $(date -u '+%F %H:%M') UTC"
  echo
  "$PY" -c 'from mmbalance import runfiles; import json; print("Machine: " + json.dumps(runfiles.hardware_summary()))'
  echo
  "$PY" -c 'import torch, accelerate, platform; print(f"python {platform.python_version()}, torch {torch.__version__}, accelerate {accelerate.__version__}")'
  echo
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //' || echo unknown)"
  echo
  echo "Commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo
  echo "Load average at the start (1/5/15 min): $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)"
} > "$TMP"
t0=$(date +%s)
for s in "${STEPS[@]}"; do
  IFS='|' read -r name minutes cmd <<< "$s"
  echo "run_all.sh: $name ..." >&2
  t=$(date +%s)
  { echo; echo "## $name"; echo; echo "\`$cmd\`"; echo; } >> "$TMP"
  $cmd >> "$TMP"
  echo "run_all.sh:   done in $(( $(date +%s) - t )) s" >&2
done
echo >> "$TMP"
echo "Total wall time: $(( $(date +%s) - t0 )) s; load average at the end: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)" >> "$TMP"
mv "$TMP" "$OUT"
trap - EXIT
echo "written: $OUT"
