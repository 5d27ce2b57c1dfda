#!/usr/bin/env bash
# Reproduce the README's tiny results on a CPU (about 19 minutes on 2 otherwise idle cores, the
# warm start included): one cached warm start, RL-tuned four ways, then one evaluation table with
# the paper's baselines.
#   gapg            GAPG (SPEC 5-6), the default config
#   gapg-seed1      the same with another RL seed (same warm start)
#   task-only       task-tuning only: RL with help disabled (the H decision is never sampled)
#   collab          collaboration-aware baseline (SPEC 8.5): same rewards, no filtering, Dr. GRPO
#                   advantages (the v3 reward's; SPEC 8.5 pairs GRPO with the v1 reward)
# Extra arguments are passed to every new train.py run, before its own settings (e.g.
# rl.steps=100 for a quick look); the keys the four runs differ by, and where they go, are not
# allowed there. A finished run is kept, an interrupted one (Ctrl-C) resumed. OUT (default: the
# project's runs/) is relative to the directory this is called from.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/runs}
case $OUT in /*) ;; *) OUT="$PWD/$OUT" ;; esac
cd "$ROOT"
EXTRA=("$@")
for arg in ${EXTRA[@]+"${EXTRA[@]}"}; do
  case $arg in
    *=*) ;;
    *) echo "reproduce_tiny.sh: $arg is not allowed: give key=value settings, not a config file" >&2
       exit 2 ;;
  esac
  case $arg in
    name=*|out_dir=*|seed=*|warm_start.seed=*|task.allow_help=*|task=*allow_help*|rl.algo=*|\
    rl.filter=*|resume=*)
      echo "reproduce_tiny.sh: $arg is not allowed: the four runs are set apart by their name," \
           "seed, task.allow_help, rl.algo and rl.filter (OUT=dir sets where they go)" >&2
      exit 2 ;;
  esac
done
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
    python train.py ${EXTRA[@]+"${EXTRA[@]}"} name="tiny-$name" out_dir="$OUT" "$@"
  fi
done
python eval.py "$OUT/tiny-gapg" "$OUT/tiny-gapg-seed1" "$OUT/tiny-collab" \
  --task-tuned "$OUT/tiny-task-only" --out "$OUT/tiny-report"
echo "report: $OUT/tiny-report/report.md"
