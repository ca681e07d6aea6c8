#!/usr/bin/env bash
# On a CUDA machine: device facts, the CUDA tests, every benchmark suite, then one report
# (REPORT.md + ratios.png + the pytest-benchmark JSON + tests.xml) in OUT_DIR, its table printed.
#
# Usage: benchmarks/gpu_check.sh [OUT_DIR]      (default benchmarks/results/gpu)
# Needs `make install` (.venv), or, on an offline machine whose python3 has PyTorch, the folder
# .devbundle made by benchmarks/device_bundle.sh and carried along.
# Env:   PY (python, default .venv/bin/python), TESTS_TIMEOUT (s, default 180), BENCH_TIMEOUT (s, whole
#        benchmark stage, default 300), SUITE_TIMEOUT (s per suite, default 150), QUICK=1 (smoke rounds),
#        CUDA_TESTS (test files; default: every tests/test_*.py that mentions CUDA), SUITES (default all).
# Every stage has a timeout and a failing stage does not stop the next: the report names what failed.
# Sized for about 8 minutes on one H100 in the worst case (every stage cut at its timeout).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
PY=${PY:-.venv/bin/python}
if [ ! -x "$PY" ]; then
    PY=python3
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
TESTS_TIMEOUT=${TESTS_TIMEOUT:-180}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
SUITE_TIMEOUT=${SUITE_TIMEOUT:-150}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
rm -f "$OUT"/kernels.json "$OUT"/attention.json "$OUT"/data.json "$OUT"/train_step.json "$OUT"/tests.xml
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

echo "== CUDA tests (timeout ${TESTS_TIMEOUT}s)"
if [ -z "${CUDA_TESTS:-}" ]; then
    CUDA_TESTS=$(grep -l -i "cuda" tests/test_*.py | grep -v test_bench_report.py | tr '\n' ' ')
fi
echo "files: $CUDA_TESTS"
# shellcheck disable=SC2086  # CUDA_TESTS is a list of paths
timeout --kill-after=10 "$TESTS_TIMEOUT" "$PY" -m pytest -q -p no:cacheprovider -o addopts=-rfEs \
    $CUDA_TESTS --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
code=$?
tail -n 25 "$OUT/tests.log"
if [ "$code" -ne 0 ]; then
    [ "$code" -eq 124 ] && NOTES+=("CUDA tests: cut at the ${TESTS_TIMEOUT} s timeout (tests.log)") \
        || NOTES+=("CUDA tests: pytest exit code $code (tests.log)")
fi

echo "== benchmarks (timeout ${BENCH_TIMEOUT}s, ${SUITE_TIMEOUT}s per suite)"
QUICK_FLAG=()
[ "${QUICK:-0}" = 1 ] && QUICK_FLAG=(--quick)
timeout --kill-after=10 "$BENCH_TIMEOUT" "$PY" -m miles bench --suite "${SUITES:-all}" --out "$OUT" "${QUICK_FLAG[@]}" \
    --suite-timeout "$SUITE_TIMEOUT" > "$OUT/bench.log" 2>&1
code=$?
grep -E "^(== suite|SKIPPED|FAILED|ERROR|[0-9]+ (passed|failed))" "$OUT/bench.log" | tail -n 40
if [ "$code" -ne 0 ]; then
    [ "$code" -eq 124 ] && NOTES+=("benchmarks: cut at the ${BENCH_TIMEOUT} s timeout (bench.log)") \
        || NOTES+=("benchmarks: a suite failed, exit code $code (bench.log)")
fi

echo "== report"
NOTE_ARGS=()
for note in "${NOTES[@]}"; do NOTE_ARGS+=(--note "$note"); done
"$PY" -m miles bench --report-only --out "$OUT" --junit "$OUT/tests.xml" "${NOTE_ARGS[@]}"
