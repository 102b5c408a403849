#!/usr/bin/env bash
# One command for a bare GPU node: facts, an environment from the wheelhouse, tests/gpu, the GPU
# benchmark, then one summary, all written into one folder in under 8 minutes.
#
#   scripts/gpu_check.sh [--dry-run] [--wheelhouse DIR] [--out DIR] [--no-install]
#
#   --dry-run          everything on CPU with small sizes (MINIGPT_GPU_DRY_RUN=1 for the tests,
#                      the benchmark's CPU mode); installs only when --wheelhouse is given
#   --wheelhouse DIR   wheels + requirements.txt + hf_hub/ (scripts/wheelhouse.py); default
#                      wheelhouse/ beside the code
#   --out DIR          default outputs/gpu_check/<UTC time>/; gets summary.md, summary.json,
#                      tests.xml, benchmark.json, log.txt (five files)
#   --no-install       use $PYTHON as it is (it already has minigpt's requirements)
#
# Environment: PYTHON (python3), the interpreter the venv is layered on (its packages, torch
# among them, stay visible); GPU_CHECK_WORK (/tmp/minigpt-gpu-check), the scratch folder: the
# venv (reused while requirements.txt is unchanged), the token cache, per-part logs;
# BUDGET_FACTS/ENV/TESTS/BENCH/SUMMARY, each part's wall-clock limit in seconds.
# Each part runs under `timeout`; one that fails or times out does not stop the later ones.
# Exit status 0 when every part passed and every test passed.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2

DRY_RUN=0
INSTALL=1
WHEELHOUSE=""
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --no-install) INSTALL=0 ;;
        --wheelhouse) WHEELHOUSE="${2:?--wheelhouse needs a folder}"; shift ;;
        --out) OUT="${2:?--out needs a folder}"; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# Budgets: 15 + 75 + 170 + 165 + 15 = 440 s; after its limit a part gets 5 s to stop (the tests
# 10 s: pytest writes its report, the suite stops its runs) before it is killed: at most 470 s.
# A dry run's tests run on CPU, several train.py runs side by side: they get 420 s.
BUDGET_FACTS="${BUDGET_FACTS:-15}"
BUDGET_ENV="${BUDGET_ENV:-75}"
if [ "$DRY_RUN" = 1 ]; then BUDGET_TESTS="${BUDGET_TESTS:-420}"; fi
BUDGET_TESTS="${BUDGET_TESTS:-170}"
BUDGET_BENCH="${BUDGET_BENCH:-165}"
BUDGET_SUMMARY="${BUDGET_SUMMARY:-15}"
GRACE=5

PYTHON="${PYTHON:-python3}"
STARTED="$(date +%s.%N)"
OUT="${OUT:-outputs/gpu_check/$(date -u +%Y%m%dT%H%M%SZ)}"
WORK="${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/minigpt-gpu-check}"
VENV="$WORK/venv"
mkdir -p "$OUT" "$WORK" || exit 2
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/log.txt"
: >"$LOG"
rm -f "$WORK/parts.tsv" "$WORK"/*.log "$WORK/facts.json" "$WORK/env.json" \
    "$OUT/tests.xml" "$OUT/benchmark.json" "$OUT/summary.md" "$OUT/summary.json"

if [ -z "$WHEELHOUSE" ]; then
    [ "$DRY_RUN" = 1 ] && INSTALL=0  # a dry run uses $PYTHON unless given a wheelhouse
    WHEELHOUSE="$ROOT/wheelhouse"
fi
WHEELHOUSE="$(cd "$WHEELHOUSE" 2>/dev/null && pwd || echo "$WHEELHOUSE")"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MINIGPT_CACHE_DIR="$WORK/cache" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline PIP_DISABLE_PIP_VERSION_CHECK=1
[ -d "$WHEELHOUSE/hf_hub" ] && export HF_HUB_CACHE="$WHEELHOUSE/hf_hub"
[ "$DRY_RUN" = 1 ] && export MINIGPT_GPU_DRY_RUN=1

elapsed() { awk -v s="$STARTED" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }'; }
say() { echo "[gpu-check +$(elapsed)s] $*" | tee -a "$LOG"; }

# part NAME BUDGET NOTE COMMAND...: run COMMAND under its budget, its output to the console, the
# log and $WORK/NAME.log; record name, budget, seconds, exit status and verdict in parts.tsv.
part() {
    local name="$1" budget="$2" note="$3" signal=TERM grace="$GRACE" start rc seconds status
    shift 3
    # pytest stops on SIGINT, reports what ran and writes its junit file
    [ "$name" = tests ] && signal=INT grace=$((2 * GRACE))
    say "$name: start (budget ${budget}s)"
    start="$(date +%s.%N)"
    timeout -s "$signal" -k "$grace" "$budget" "$@" 2>&1 | tee -a "$LOG" "$WORK/$name.log"
    rc="${PIPESTATUS[0]}"
    seconds="$(awk -v s="$start" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }')"
    case "$rc" in
        0) status=ok ;;
        124|137) status=timeout; note="${note:+$note; }stopped at its ${budget}s budget" ;;
        *) status=failed; note="${note:+$note; }exit status $rc" ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$budget" "$seconds" "$rc" "$status" "$note" \
        >>"$WORK/parts.tsv"
    say "$name: $status in ${seconds}s${note:+ ($note)}"
}

say "out: $OUT; work: $WORK; wheelhouse: $WHEELHOUSE; dry run: $DRY_RUN; PYTHON=$PYTHON"

# 1. facts: the GPU, driver, python, torch, CUDA (with $PYTHON: nothing installed yet)
part facts "$BUDGET_FACTS" "" "$PYTHON" scripts/gpu_check.py facts "$WORK/facts.json"

# 2. environment
PY="$PYTHON"
if [ "$INSTALL" = 1 ]; then
    rm -f "$WORK/python"  # make-env names the venv's interpreter there once it is installed
    part environment "$BUDGET_ENV" "venv from the wheelhouse" "$PYTHON" scripts/gpu_check.py \
        make-env "$WHEELHOUSE" "$VENV" "$WORK/env.json"
    [ -s "$WORK/python" ] && PY="$(cat "$WORK/python")"
else
    part environment "$BUDGET_ENV" "no install: $PYTHON as it is" \
        "$PYTHON" scripts/gpu_check.py verify-env "$WORK/env.json"
fi

# 3. the GPU tests, junit report into the out folder
if [ -d tests/gpu ]; then
    part tests "$BUDGET_TESTS" "" "$PY" scripts/gpu_check.py tests -- tests/gpu -m gpu -v \
        -p no:cacheprovider --junitxml="$OUT/tests.xml"
else
    printf 'tests\t%s\t0\t0\tmissing\tno tests/gpu folder in %s\n' "$BUDGET_TESTS" "$ROOT" \
        >>"$WORK/parts.tsv"
    say "tests: missing (no tests/gpu folder)"
fi

# 4. the benchmark: its own budget leaves 20 s for start-up and the last write
BENCH_BUDGET=$((BUDGET_BENCH - 20))
[ "$DRY_RUN" = 1 ] && [ "$BENCH_BUDGET" -gt 60 ] && BENCH_BUDGET=60  # CPU mode needs < 1 min
[ "$BENCH_BUDGET" -lt 10 ] && BENCH_BUDGET=10
BENCH_ARGS=(--json "$OUT/benchmark.json" --no-save --budget-s "$BENCH_BUDGET")
[ "$DRY_RUN" = 1 ] && BENCH_ARGS+=(--cpu)
part benchmark "$BUDGET_BENCH" "" "$PY" benchmarks/gpu_benchmark.py "${BENCH_ARGS[@]}"

# 5. the summary (standard library only, so it is written whatever failed)
say "summary: writing $OUT/summary.md and summary.json"
DRY_FLAG=()
[ "$DRY_RUN" = 1 ] && DRY_FLAG=(--dry-run)
timeout -k "$GRACE" "$BUDGET_SUMMARY" "$PYTHON" scripts/gpu_check.py summary --work "$WORK" \
    --out "$OUT" --started "$STARTED" "${DRY_FLAG[@]}" 2>&1 | tee -a "$LOG"
rc="${PIPESTATUS[0]}"
FILES="$(cd "$OUT" && printf '%s ' *)"
say "done in $(elapsed)s: $([ "$rc" = 0 ] && echo PASS || echo FAIL); in $OUT: $FILES"
exit "$rc"
