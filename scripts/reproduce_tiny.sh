#!/usr/bin/env bash
# Reproduce the README's tiny results on a CPU (about 19 minutes on 2 otherwise idle cores, the
# warm start included): one cached warm start, RL-tuned four ways, then one evaluation table with
# the paper's baselines.
#   gapg            GAPG (SPEC 5-6), the default config
#   gapg-seed1      the same with another RL seed (same warm start)
#   task-only       task-tuning only: RL with help disabled (the H decision is never sampled)
#   collab          collaboration-aware baseline (SPEC 8.5): same rewards, no filtering, Dr. GRPO
#                   advantages (the v3 reward's; SPEC 8.5 pairs GRPO with the v1 reward)
# Extra arguments are passed to every new train.py run (e.g. rl.steps=100 for a quick look); a
# finished run is kept, an interrupted one (Ctrl-C) resumed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}
EXTRA=("$@")
for run in "gapg" "gapg-seed1 seed=1 warm_start.seed=0" "task-only task.allow_help=false" \
           "collab rl.algo=dr_grpo rl.filter=none"; do
  set -- $run
  name=$1; shift
  if [ -f "$OUT/tiny-$name/final_eval.json" ]; then
    echo "== tiny-$name: already trained, skipping"
  elif [ -e "$OUT/tiny-$name/checkpoint" ] || [ -e "$OUT/tiny-$name/checkpoint.old" ]; then
    echo "== tiny-$name: interrupted earlier, resuming"
    python train.py resume="$OUT/tiny-$name"
  else
    echo "== tiny-$name"
    python train.py name="tiny-$name" out_dir="$OUT" "$@" ${EXTRA[@]+"${EXTRA[@]}"}
  fi
done
python eval.py "$OUT/tiny-gapg" "$OUT/tiny-gapg-seed1" "$OUT/tiny-collab" \
  --task-tuned "$OUT/tiny-task-only" --out "$OUT/tiny-report"
echo "report: $OUT/tiny-report/report.md"
