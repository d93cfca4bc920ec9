#!/usr/bin/env bash
# The GPU path, measured, in one run: bench/gpu_check.sh OUTDIR [--device cuda|cpu] [--budget S]
#
# Writes everything it measures under OUTDIR and exits non-zero when any part fails:
#   tests        the device-aware tests (model, training, TTT, distributed, sysmon, speed
#                switches) with --device (pytest -m device), junit XML in tests/
#   data         a synthetic corpus (8,000 images on cuda) prepared for configs/flickr8k.yaml,
#                and a 500-image one for tiny_cpu; built while the tests run
#   bench_*      bench/train_bench.py on that corpus with flickr8k: seconds per epoch,
#                triples/s, MFU, peak memory, the store's share of step time, host syncs per
#                step (torch.cuda.set_sync_debug_mode over 3 steps); as configured (batch 32),
#                with batch 64 and 128, --grad-checkpointing, and train.compile
#   cli_*        200 steps of flickr8k and of tiny_cpu (bf16) through `nlmm train`: finished,
#                every logged loss finite, dev and test Recall@K in the store and the table
#                printed
#   search       bench/search_bench.py: `nlmm search` latency over a 40,000-item gallery
#   sysmon       nvidia-smi samples (sysmon/nvidia-smi.csv, one a second) and nlmm.train.sysmon's NVML
#                rows (sysmon/nvml.jsonl, what the dash's GPU panel shows) over the whole check,
#                and each CLI run's samples from the store
# status.tsv lists each part's outcome and seconds, logs/ their output, summary.md the figures.
# On one H100/H200 it is meant to take at most 8 minutes: --budget (default 480 s) caps it, and
# a part the budget does not reach fails. `--device cpu` runs every part at toy sizes (64 images,
# a few steps, inductor replaced by aot_eager) so that a test keeps the script working.
set -uo pipefail

usage() {
  echo "usage: bench/gpu_check.sh OUTDIR [--device cuda|cpu] [--budget SECONDS]" >&2
  exit 2
}
[ $# -ge 1 ] || usage
case $1 in -h|--help) usage ;; esac
OUT=$1
shift
DEVICE=cuda
BUDGET=
while [ $# -gt 0 ]; do
  case $1 in
    --device) [ $# -ge 2 ] || usage; DEVICE=$2; shift 2 ;;
    --budget) [ $# -ge 2 ] || usage; BUDGET=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "gpu_check: unknown option $1" >&2; usage ;;
  esac
done
case $DEVICE in cuda|cpu) ;; *) echo "gpu_check: --device must be cuda or cpu, got $DEVICE" >&2; exit 2 ;; esac
case ${BUDGET:-0} in *[!0-9]*) echo "gpu_check: --budget must be whole seconds, got $BUDGET" >&2; exit 2 ;; esac

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
NLMM=$(dirname "$PY")/nlmm
cd "$REPO" || exit 2
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
# a rerun into the same folder starts clean (these are the only names the check writes)
rm -rf "$OUT"/{logs,tests,train_bench,cli,search,sysmon} \
  "$OUT"/{status.tsv,summary.md,summary.json,device.json,env.txt}
mkdir -p "$OUT"/{logs,tests,train_bench,cli,search,sysmon} || exit 2
# corpora, caches and runs (a flickr8k last.pt holds ~10 GB of optimizer state) stay out of OUT
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nlmm-gpu-check.XXXXXX") || exit 2
export NLMM_RUNS_DIR=$WORK/runs PYTHONUNBUFFERED=1 COLUMNS=160
unset NLMM_DB_URL

CORPUS=$WORK/corpus
if [ "$DEVICE" = cuda ]; then
  IMAGES=8000 TINY_IMAGES=500 TINY_CORPUS=$WORK/tiny_corpus STEPS=200
  BENCH_STEPS=20 WARMUP=3 COMPILE_WARMUP=8 SYNC_STEPS=3 COMPILE_BACKEND=inductor
  GALLERY=40000 QUERIES=100 SEARCH_CONFIG=flickr8k
  BUDGET=${BUDGET:-480}
  FLICKR_SET=()
  PYTEST_SELECT=()
else
  # toy sizes: the same parts, in minutes on two CPU cores
  IMAGES=64 TINY_IMAGES=64 TINY_CORPUS=$CORPUS STEPS=4
  BENCH_STEPS=2 WARMUP=1 COMPILE_WARMUP=2 SYNC_STEPS=1 COMPILE_BACKEND=aot_eager
  GALLERY=2000 QUERIES=20 SEARCH_CONFIG=tiny_cpu
  BUDGET=${BUDGET:-1800}
  FLICKR_SET=(d_model=64 n_heads=4 embed_dim=64 L_mem=4 "depth={text: 1, image: 1, audio: 1}"
              data.image_size=32 data.max_audio_seconds=2.0 data.text_max_len=16
              train.batch_size=8 train.warmup_steps=2)
  # the learning test trains for minutes on a CPU; the default suite runs it there
  PYTEST_SELECT=(-k "not learns_retrieval_well_above_chance")
  # toy tensors on a shared CPU: a second OpenMP thread only spin-waits (measured 30x slower)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
SETS=()
for item in ${FLICKR_SET[@]+"${FLICKR_SET[@]}"}; do SETS+=(--set "$item"); done

START_MS=$(date +%s%3N)
printf 'part\tstatus\tseconds\tlog\n' > "$OUT/status.tsv"

now_ms() { date +%s%3N; }

record() {  # NAME STATUS MILLISECONDS
  printf '%s\t%s\t%d.%03d\tlogs/%s.log\n' "$1" "$2" $(($3 / 1000)) $(($3 % 1000)) "$1" \
    >> "$OUT/status.tsv"
}

# run_part NAME LIMIT_S COMMAND...: the command's output in logs/NAME.log, its outcome in
# status.tsv; the limit is cut to what is left of the budget. Returns the command's status.
run_part() {
  local name=$1 limit=$2 left began rc status
  shift 2
  left=$(( BUDGET - ($(now_ms) - START_MS) / 1000 ))
  if [ "$left" -lt 15 ]; then
    record "$name" "not run: the ${BUDGET} s budget was spent" 0
    echo "== $name: not run, the ${BUDGET} s budget was spent"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit} s)"
  began=$(now_ms)
  timeout --kill-after=15 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${limit} s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  record "$name" "$status" $(( $(now_ms) - began ))
  if [ $rc -ne 0 ]; then
    echo "   $name: $status; the end of logs/$name.log:"
    tail -n 15 "$OUT/logs/$name.log" | sed 's/^/   | /'
  fi
  return $rc
}

skip_part() {  # NAME REASON
  record "$1" "not run: $2" 0
  echo "== $1: not run, $2"
}

BACKGROUND=()
cleanup() {
  local pid
  for pid in ${BACKGROUND[@]+"${BACKGROUND[@]}"}; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------- samples, device
{
  uname -a; echo "cpus: $(nproc)"; free -g 2>/dev/null | head -2
  echo "git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null) $(git -C "$REPO" status --short 2>/dev/null | wc -l) changed file(s)"
  "$PY" -c 'import torch; print(torch.__config__.show())'
} > "$OUT/env.txt" 2>&1
if command -v nvidia-smi > /dev/null; then
  nvidia-smi > "$OUT/sysmon/nvidia-smi.txt" 2>&1
  nvidia-smi -q > "$OUT/sysmon/nvidia-smi-q.txt" 2>&1
  nvidia-smi --query-gpu=timestamp,index,name,utilization.gpu,utilization.memory,memory.used,memory.total,power.draw,temperature.gpu,clocks.sm \
    --format=csv -lms 1000 > "$OUT/sysmon/nvidia-smi.csv" 2> "$OUT/logs/nvidia-smi.log" &
  BACKGROUND+=($!)
else
  echo "nvidia-smi: not installed" > "$OUT/sysmon/nvidia-smi.txt"
fi
"$PY" bench/gpu_check_parts.py sample --out "$OUT/sysmon/nvml.jsonl" --interval 1 \
  2> "$OUT/logs/nvml_sampler.log" &
SAMPLER=$!
BACKGROUND+=($SAMPLER)

if ! run_part device 60 "$PY" bench/gpu_check_parts.py device --device "$DEVICE" --out "$OUT/device.json"; then
  echo "gpu_check: the device is not usable; nothing else can run" >&2
  "$PY" bench/gpu_check_parts.py summarize "$OUT" > /dev/null
  exit 1
fi
cat "$OUT/logs/device.log"

# ---------------------------------------------------------------------------- data (background)
# shellcheck disable=SC2016  # expanded by the inner bash
DATA_SCRIPT='nlmm=$1 images=$2 corpus=$3 tiny_images=$4 tiny=$5; shift 5
"$nlmm" data synth --images "$images" --out "$corpus" &&
"$nlmm" data prepare "$corpus" --config flickr8k "$@" &&
{ [ "$tiny" = "$corpus" ] || "$nlmm" data synth --images "$tiny_images" --out "$tiny"; } &&
"$nlmm" data prepare "$tiny" --config tiny_cpu'
run_part data 240 bash -c "$DATA_SCRIPT" data "$NLMM" "$IMAGES" "$CORPUS" "$TINY_IMAGES" \
  "$TINY_CORPUS" ${SETS[@]+"${SETS[@]}"} &
DATA=$!
BACKGROUND+=($DATA)

# ---------------------------------------------------------------------------- tests
run_part tests 200 "$PY" -m pytest tests/test_model.py tests/test_train.py \
  tests/test_model_ttt.py tests/test_distributed.py tests/test_sysmon.py tests/test_speed.py \
  --device "$DEVICE" -m device -q -ra -p no:cacheprovider --junitxml "$OUT/tests/junit.xml" \
  ${PYTEST_SELECT[@]+"${PYTEST_SELECT[@]}"}

wait "$DATA"
DATA_OK=$?

# ---------------------------------------------------------------------------- measurements
bench() {  # LABEL LIMIT_S [train_bench options]
  local label=$1 limit=$2
  shift 2
  if [ $DATA_OK -ne 0 ]; then skip_part "bench_$label" "the data part failed"; return; fi
  rm -f "$OUT/train_bench/$label.json"
  run_part "bench_$label" "$limit" "$PY" bench/train_bench.py --corpus "$CORPUS" \
    --config flickr8k --device "$DEVICE" --modes baseline --steps "$BENCH_STEPS" \
    --warmup "$WARMUP" --sync-steps "$SYNC_STEPS" --compile-backend "$COMPILE_BACKEND" \
    --label "$label" --json "$OUT/train_bench/$label.json" ${SETS[@]+"${SETS[@]}"} "$@" &&
  "$PY" bench/gpu_check_parts.py check-bench "$OUT/train_bench/$label.json" \
    >> "$OUT/logs/bench_$label.log" 2>&1 ||
  { [ -f "$OUT/train_bench/$label.json" ] && mark_failed "bench_$label" "its figures fail the check"; }
}

mark_failed() {  # NAME WHY: turn a part's ok into a failure found afterwards
  "$PY" - "$OUT/status.tsv" "$1" "$2" <<'EOF'
import sys
path, name, why = sys.argv[1:]
lines = open(path).read().splitlines()
for i, line in enumerate(lines):
    cols = line.split("\t")
    if cols[0] == name and cols[1] == "ok":
        cols[1] = f"failed: {why}"
        lines[i] = "\t".join(cols)
open(path, "w").write("\n".join(lines) + "\n")
EOF
  echo "   $1: $2 (logs/$1.log)"
}

cli_run() {  # NAME CORPUS LIMIT_S [nlmm train options]
  local name=$1 corpus=$2 limit=$3
  shift 3
  if [ $DATA_OK -ne 0 ]; then skip_part "cli_$name" "the data part failed"; return; fi
  run_part "cli_$name" "$limit" "$NLMM" train flickr8k --synthetic --data "$corpus" \
    --steps "$STEPS" --device "$DEVICE" --name "gc_$name" "$@"
  "$PY" bench/gpu_check_parts.py check-run "gc_$name" --log "$OUT/logs/cli_$name.log" \
    --out "$OUT/cli/$name.json" >> "$OUT/logs/cli_$name.log" 2>&1 ||
    mark_failed "cli_$name" "the run fails the check"
}

# the most uncertain duration, compilation, comes last so that it cannot starve the others
bench baseline 120
cli_run flickr8k "$CORPUS" 200 --config flickr8k ${SETS[@]+"${SETS[@]}"}
bench batch64 120 --set train.batch_size=64
bench batch128 150 --set train.batch_size=128
bench grad_ckpt 120 --grad-checkpointing
cli_run tiny_cpu "$TINY_CORPUS" 150 --config tiny_cpu --amp
run_part search 150 "$PY" bench/search_bench.py --items "$GALLERY" --queries "$QUERIES" \
  --config "$SEARCH_CONFIG" --device "$DEVICE" --json "$OUT/search/search.json"
bench compile 240 --set train.compile=true --warmup "$COMPILE_WARMUP"

# ---------------------------------------------------------------------------- samples, summary
kill "$SAMPLER" 2>/dev/null && wait "$SAMPLER" 2>/dev/null
run_part sysmon 30 "$PY" bench/gpu_check_parts.py check-sysmon "$OUT" --device "$DEVICE"
"$PY" bench/gpu_check_parts.py summarize "$OUT" > "$OUT/logs/summary.log" 2>&1
cat "$OUT/summary.md" 2>/dev/null || cat "$OUT/logs/summary.log"
echo "gpu_check: $(( ($(now_ms) - START_MS) / 1000 )) s; figures in $OUT"
if awk -F'\t' 'NR > 1 && $2 != "ok" { bad = 1 } END { exit !bad }' "$OUT/status.tsv"; then
  echo "gpu_check: FAILED parts: $(awk -F'\t' 'NR > 1 && $2 != "ok" { printf "%s ", $1 }' "$OUT/status.tsv")"
  exit 1
fi
