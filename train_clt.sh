#!/usr/bin/env bash
# Train transcoders over layer pairs x a hyper-parameter grid, then print a summary table.
#
#   ./train_clt.sh                      the demo: collect runs/tsp20_demo's pairs (clt/configs/tsp20_demo.json),
#                                       train one top-k transcoder per pair and the multi-layer CLT, evaluate and
#                                       splice each, print FVU / L0 / dead vs ridge
#   ./train_clt.sh --run_dir kool_tsp50 the same for any run (an imported RL4CO or Kool model too), no config needed
#   ./train_clt.sh --run_dir R --pairs "clt_L0_to_L1 clt_L1_to_L2" --expansion "4 8" --k "8 16" \
#                  --activation "topk batchtopk" --lr "16e-3 32e-3" --epochs 20 -- --wandb_project my-clt
#
# Options (each grid option takes a space-separated list):
#   --run_dir R        run folder or name                     [tsp20_demo]
#   --config FILE      pair config for collection             [clt/configs/<run>.json, if it exists]
#   --pairs "P ..."    pair names to train                    [every pair the config lists; without a config, the
#                      run's default pairs: each layer's mlp_in -> mlp_out, each layer's output -> the next's]
#   --expansion "E ..."  expansion factors                    [the config's sparsity.expansion_factors, else 8]
#   --k "K ..."        active features per row                [the config's sparsity.k, else 16]
#   --k_ratio "R ..."  fractions of features active, instead of --k  [the config's sparsity.k_ratio]
#   --activation "A ..." topk | batchtopk | jumprelu | relu   [topk]
#   --lr "LR ..."      learning rates                         [the trainer's default, 32e-3]
#   --epochs N         epochs per run                         [10]
#   --eval N           splice each transcoder into the policy on N instances (python -m clt.eval) [1000; 0: skip]
#   --no_labels        do not label the features (clt.eval labels each transcoder's features by default)
#   --no_multilayer    do not train the multi-layer CLT (trained by default unless --pairs is given or the config
#                      leaves out a layer's mlp_in -> mlp_out pair, which it reads; the default pairs hold them all)
#   --jobs N           processes that train the runs (then evaluate them) side by side, each on cores/N threads,
#                      each one's output in a log file; 1: one process, output on the terminal
#                      [the cores, at most the runs]
#   --instances N      instances collected per pair [the config's, else 200000 rows' worth: 10000 of TSP20, 4000
#                      of TSP50]
#   --no_collect       skip pair collection (reuse the dumps)
#   --overwrite        collect again over dumps made with other settings (python -m clt.collect_pairs --overwrite)
#   --sweep NAME       record the runs as <run>/clt/sweeps/NAME.json   [sweep_<date>-<time>]
#                      (then: python -m clt.summarize --run_dir R --sweep NAME, python -m clt.site.export ... --sweep NAME)
#   -- ARGS            passed to every python -m clt.train_transcoder (e.g. --wandb_project, --wandb_mode, --device)
# PYTHON selects the interpreter [python].
set -euo pipefail

PYTHON=${PYTHON:-python}
RUN_DIR=tsp20_demo
CONFIG=""
PAIRS=""
EXPANSION=""
K=""
K_RATIO=""
ACTIVATION="topk"
LR="default"
EPOCHS=10
EVAL=1000
LABELS=()
MULTILAYER=1
JOBS=""
COLLECT=1
OVERWRITE=()
INSTANCES=""
SWEEP="sweep_$(date +%Y%m%d-%H%M%S)"
EXTRA=()

usage() { sed -n '2,/^set -euo/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --run_dir) RUN_DIR=$2; shift 2 ;;
    --no_labels) LABELS=(--no_labels); shift ;;
    --no_multilayer) MULTILAYER=0; shift ;;
    --config) CONFIG=$2; shift 2 ;;
    --pairs) PAIRS=$2; shift 2 ;;
    --expansion) EXPANSION=$2; shift 2 ;;
    --k) K=$2; shift 2 ;;
    --k_ratio) K_RATIO=$2; shift 2 ;;
    --activation) ACTIVATION=$2; shift 2 ;;
    --lr) LR=$2; shift 2 ;;
    --epochs) EPOCHS=$2; shift 2 ;;
    --eval) EVAL=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --no_collect) COLLECT=0; shift ;;
    --instances) INSTANCES=$2; shift 2 ;;
    --overwrite) OVERWRITE=(--overwrite); shift ;;
    --sweep) SWEEP=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "train_clt.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

# --epochs, --eval and --jobs reach bash arithmetic ([[ -gt ]] evaluates expressions, $(...) included): digits only.
for name in EPOCHS EVAL JOBS INSTANCES; do
  [[ -z ${!name} || ${!name} =~ ^[0-9]+$ ]] \
    || { echo "train_clt.sh: --${name,,} must be a whole number, got '${!name}'" >&2; exit 2; }
  [[ -z ${!name} ]] || printf -v "$name" '%d' "$((10#${!name}))"  # 08 is eight, not a bad octal number
done
[[ $JOBS != 0 ]] || { echo "train_clt.sh: --jobs must be at least 1" >&2; exit 2; }
set -o noglob  # the grid lists are split on spaces, never expanded as file patterns

DEFAULT_CONFIG="$(dirname "$0")/clt/configs/$(basename "$RUN_DIR").json"
if [[ -z "$CONFIG" && -f "$DEFAULT_CONFIG" ]]; then
  CONFIG=$DEFAULT_CONFIG
fi
if [[ $COLLECT -eq 1 ]]; then
  collect=("$PYTHON" -m clt.collect_pairs --run_dir "$RUN_DIR" ${OVERWRITE[@]+"${OVERWRITE[@]}"})
  [[ -n "$CONFIG" ]] && collect+=(--config "$CONFIG")
  [[ -n "$INSTANCES" ]] && collect+=(--num_instances_per_pair "$INSTANCES")
  "${collect[@]}"
fi
# The grid: the flags, else the config's pairs and sparsity block (one line each), else 8x with k 16.
if [[ -n "$CONFIG" ]]; then
  GRIDS=$("$PYTHON" -m clt.list_pairs "$CONFIG" --grids)
else  # the run's default pairs, as clt.collect_pairs collects them without a config
  GRIDS=$("$PYTHON" -m clt.list_pairs --run_dir "$RUN_DIR" --grids)
fi
mapfile -t LISTS <<<"$GRIDS"
[[ -z "$PAIRS" ]] || MULTILAYER=0  # pairs chosen by hand: only those
[[ -n "$PAIRS" ]] || PAIRS=${LISTS[0]:-}
if [[ $MULTILAYER -eq 1 && -n "$CONFIG" ]]; then  # a config may leave out a layer's mlp pair (the defaults hold all)
  for pair in $("$PYTHON" -m clt.list_pairs --run_dir "$RUN_DIR" --grids | head -n 1); do
    [[ $pair != *.mlp_in_to_* || " $PAIRS " == *" $pair "* ]] || MULTILAYER=0
  done
fi
[[ -n "$EXPANSION" ]] || EXPANSION=${LISTS[1]:-}
if [[ -z "$K" && -z "$K_RATIO" ]]; then
  K=${LISTS[2]:-}
  [[ -n "$K" ]] || K_RATIO=${LISTS[3]:-}
fi
[[ -n "$EXPANSION" ]] || EXPANSION="8"
[[ -n "$K" || -n "$K_RATIO" ]] || K="16"
[[ -z "$K" || -z "$K_RATIO" ]] || { echo "train_clt.sh: give --k or --k_ratio, not both" >&2; exit 2; }
SIZES=()
for k in $K; do SIZES+=("--k=$k"); done
for r in $K_RATIO; do SIZES+=("--k_ratio=$r"); done

CORES=$(nproc 2>/dev/null || echo 1)
words() { echo $#; }  # how many words a grid list holds (noglob is on)
RUNS=$(($(words $PAIRS) * $(words $EXPANSION) * ${#SIZES[@]} * $(words $ACTIVATION) * $(words $LR) + MULTILAYER))
JOBS=${JOBS:-$CORES}
JOBS=$((JOBS < RUNS ? JOBS : RUNS))
JOBS=$((JOBS > 0 ? JOBS : 1))
THREADS=$((CORES / JOBS > 0 ? CORES / JOBS : 1))
LOGS=""
if [[ $JOBS -gt 1 ]]; then
  LOGS=$(mktemp -d "${TMPDIR:-/tmp}/train_clt.XXXXXX")
  echo "train_clt.sh: $JOBS jobs at a time, $THREADS thread(s) each; their output in $LOGS" >&2
fi
QUEUE=$(mktemp -d "${TMPDIR:-/tmp}/train_clt_queue.XXXXXX")  # the trainings' command lines (clt.run_queue)
trap 'rm -rf "$QUEUE"' EXIT
LAUNCHED=0
# Background jobs of a script ignore SIGINT: Ctrl-C (or a TERM) hands them a TERM, which saves a trainer's state.
trap 'trap - INT TERM; [[ -z $(jobs -p) ]] || kill -TERM $(jobs -p) 2>/dev/null; wait; exit 130' INT TERM

# launch LABEL CMD...: run CMD, or with --jobs > 1 start it in the background once fewer than $JOBS run.
launch() {
  local label=$1
  shift
  echo "== $label" >&2
  if [[ $JOBS -eq 1 ]]; then
    "$@" >&2
    return
  fi
  while [[ $(jobs -rp | wc -l) -ge $JOBS ]]; do wait -n || true; done
  LAUNCHED=$((LAUNCHED + 1))
  local log="$LOGS/$LAUNCHED.log"
  echo "   (log: $log)" >&2
  (set +e; OMP_NUM_THREADS=$THREADS NUMBA_NUM_THREADS=$THREADS "$@" >"$log" 2>&1; echo $? >"$log.rc") &
}

# wait_all: wait for the background jobs; if any failed, show the end of its log and stop.
CHECKED=0
wait_all() {
  [[ $JOBS -gt 1 ]] || return 0
  wait
  local failed=0 log
  while [[ $CHECKED -lt $LAUNCHED ]]; do
    CHECKED=$((CHECKED + 1))
    log="$LOGS/$CHECKED.log"
    if [[ ! -f $log.rc || $(<"$log.rc") != 0 ]]; then
      failed=1
      echo "train_clt.sh: a job failed; the end of $log:" >&2
      tail -n 20 "$log" >&2
    fi
  done
  [[ $failed -eq 0 ]] || exit 1
}

# The trainings: one queued command line per run (NUL-separated words), run by $JOBS clt.run_queue workers that
# claim them in turn, each in one process (the start of a process, ~6 s, is paid once per worker, not per run).
QUEUED=0
if [[ $MULTILAYER -eq 1 ]]; then  # first: the longest training
  QUEUED=1
  echo "== run 1: the multi-layer CLT (its own defaults)" >&2
  printf '%s\0' clt.train_transcoder --run_dir "$RUN_DIR" --multilayer --num_epochs "$EPOCHS" --sweep "$SWEEP" \
    ${EXTRA[@]+"${EXTRA[@]}"} >"$QUEUE/000001.args"
fi
for pair in $PAIRS; do
  for e in $EXPANSION; do for size in "${SIZES[@]}"; do for act in $ACTIVATION; do for lr in $LR; do
    LR_ARG=()
    [[ $lr == default ]] || LR_ARG=(--lr "$lr")
    QUEUED=$((QUEUED + 1))
    echo "== run $QUEUED: $pair, expansion $e, ${size#--}, $act, lr $lr" >&2
    printf '%s\0' clt.train_transcoder --run_dir "$RUN_DIR" --pair "$pair" --expansion_factor "$e" "$size" \
      --activation "$act" ${LR_ARG[@]+"${LR_ARG[@]}"} --num_epochs "$EPOCHS" --sweep "$SWEEP" \
      ${EXTRA[@]+"${EXTRA[@]}"} >"$QUEUE/$(printf '%06d' "$QUEUED").args"
  done; done; done; done
done
for ((job = 1; job <= JOBS; job++)); do
  launch "training worker $job of $JOBS" "$PYTHON" -m clt.run_queue "$QUEUE"
done
wait_all

# The evaluations: the sweep's folders, sorted (a pair's together), in $JOBS consecutive shares, each evaluated
# by one process one after another: it loads the policy and splices the unmodified tours and each pair's
# ablations once for its share.
if [[ $EVAL -gt 0 ]]; then
  FOLDERS=$("$PYTHON" -m clt.summarize --run_dir "$RUN_DIR" --sweep "$SWEEP" --list | sort)
  mapfile -t FOLDERS <<<"$FOLDERS"
  COUNT=${#FOLDERS[@]}
  for ((job = 0; job < JOBS; job++)); do
    FROM=$((job * COUNT / JOBS))
    SHARE=("${FOLDERS[@]:FROM:(job + 1) * COUNT / JOBS - FROM}")
    [[ ${#SHARE[@]} -gt 0 ]] || continue
    launch "evaluating ${SHARE[*]}" "$PYTHON" -m clt.eval "${SHARE[@]}" --num_instances "$EVAL" "${LABELS[@]}" </dev/null
  done
  wait_all
fi

echo
"$PYTHON" -m clt.summarize --run_dir "$RUN_DIR" --sweep "$SWEEP"
echo "(this sweep's runs: python -m clt.summarize --run_dir $RUN_DIR --sweep $SWEEP --list)"
