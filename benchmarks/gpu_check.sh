#!/usr/bin/env bash
# On a CUDA machine: device facts, the CUDA tests, every benchmark suite, then one report
# (REPORT.md + ratios.png + the pytest-benchmark JSON + tests.xml) in OUT_DIR, its table printed.
#
# Usage: benchmarks/gpu_check.sh [OUT_DIR]      (default benchmarks/results/gpu)
# Needs `make install` (.venv), or, on an offline machine whose python3 has PyTorch, the folder
# .devbundle made by benchmarks/device_bundle.sh and carried along.
# Env:   PY (python, default .venv/bin/python), KERNEL_TESTS_TIMEOUT (s, compiled-kernel tests, default
#        90), TESTS_TIMEOUT (s, the other CUDA tests, default 90), CUDA_TESTS (their files, default
#        tests/test_attention.py tests/test_dali_pipeline.py), BENCH_TIMEOUT (s, all benchmarks, default
#        300), SUITE_TIMEOUT (s per suite, default 150), SUITES (default train_step,kernels,attention,data;
#        `miles bench` runs the peak suite, test_machine_peak.py, before them), QUICK=1 (smoke rounds).
# Every stage has a timeout and a failing stage does not stop the next: the report names what failed.
# Worst case (every stage cut at its timeout) about 8 minutes, inside one 10-minute device command.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
PY=${PY:-.venv/bin/python}
if [ ! -x "$PY" ]; then
    PY=python3
    # Without an install, `miles_kernels` (the folder kernels/, see pyproject.toml) needs its name: a link.
    mkdir -p /tmp/miles-import && ln -sfn "$PWD/kernels" /tmp/miles-import/miles_kernels
    export PYTHONPATH="/tmp/miles-import${PYTHONPATH:+:$PYTHONPATH}"
    # An offline machine without this project's venv: the wheels and stand-ins of benchmarks/device_bundle.sh.
    if [ -d .devbundle ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/miles-site \
            .devbundle/wheels/*.whl || { echo "gpu_check.sh: installing .devbundle wheels failed" >&2; exit 1; }
        export PYTHONPATH="/tmp/miles-site:$PWD/.devbundle/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
        echo "using python3 with .devbundle (no DALI; text tower randomly initialised)"
    else
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
KERNEL_TESTS_TIMEOUT=${KERNEL_TESTS_TIMEOUT:-90}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-90}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
SUITE_TIMEOUT=${SUITE_TIMEOUT:-150}
# The headline first: if the stage is cut, the train step has been measured.
SUITES=${SUITES:-train_step,kernels,attention,data}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
rm -f "$OUT"/peak.json "$OUT"/kernels.json "$OUT"/attention.json "$OUT"/data.json "$OUT"/train_step.json \
    "$OUT"/*-tests.*
NOTES=()

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
if ! timeout 60 "$PY" - "$OUT/device.json" <<'PY'
import json, sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh needs a CUDA device: torch.cuda.is_available() is False")
p = torch.cuda.get_device_properties(0)
facts = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}",
         "sms": p.multi_processor_count, "torch": torch.__version__, "cuda": torch.version.cuda}
json.dump(facts, open(sys.argv[1], "w"), indent=2)
print(json.dumps(facts))
PY
then
    echo "gpu_check.sh: no usable CUDA device, stopping" >&2
    exit 1
fi

# One pytest process per stage: tests/test_kernels_cuda.py must import the kernels compiled, before any
# interpreter test module of the same process could wrap them for the interpreter.
run_tests() {  # name, timeout, files...
    local name=$1 limit=$2
    shift 2
    echo "== $name (timeout ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$PY" -m pytest -q -p no:cacheprovider -o addopts=-rfEs "$@" \
        --junitxml="$OUT/$name.xml" > "$OUT/$name.log" 2>&1
    local code=$?
    tail -n 25 "$OUT/$name.log"
    JUNITS+=(--junit "$OUT/$name.xml")
    case $code in
        0) ;;
        124 | 137) NOTES+=("$name: cut at the ${limit} s timeout ($name.log)") ;;
        5) NOTES+=("$name: no test ran, all skipped ($name.log)") ;;
        *) NOTES+=("$name: pytest exit code $code ($name.log)") ;;
    esac
}
JUNITS=()
run_tests kernel-tests "$KERNEL_TESTS_TIMEOUT" tests/test_kernels_cuda.py
# shellcheck disable=SC2086  # CUDA_TESTS is a list of paths
run_tests cuda-tests "$TESTS_TIMEOUT" ${CUDA_TESTS:-tests/test_attention.py tests/test_dali_pipeline.py}

echo "== benchmarks (timeout ${BENCH_TIMEOUT}s, ${SUITE_TIMEOUT}s per suite)"
QUICK_FLAG=()
[ "${QUICK:-0}" = 1 ] && QUICK_FLAG=(--quick)
timeout --kill-after=10 "$BENCH_TIMEOUT" "$PY" -m miles bench --suite "$SUITES" --out "$OUT" "${QUICK_FLAG[@]}" \
    --suite-timeout "$SUITE_TIMEOUT" > "$OUT/bench.log" 2>&1
code=$?
grep -E "^(== suite|SKIPPED|FAILED|ERROR|[0-9]+ (passed|failed))" "$OUT/bench.log" | tail -n 40
if [ "$code" -ne 0 ]; then
    case $code in
        124 | 137) NOTES+=("benchmarks: cut at the ${BENCH_TIMEOUT} s timeout (bench.log)") ;;
        *) NOTES+=("benchmarks: a suite failed, exit code $code (bench.log)") ;;
    esac
fi

echo "== report"
NOTE_ARGS=()
for note in "${NOTES[@]}"; do NOTE_ARGS+=(--note "$note"); done
"$PY" -m miles bench --report-only --out "$OUT" "${JUNITS[@]}" "${NOTE_ARGS[@]}"
