#!/usr/bin/env bash
# On a CUDA machine: the CUDA tests, then every benchmark suite, into one JSON report per run.
# Usage: benchmarks/gpu_check.sh [OUT_DIR]   (default benchmarks/results/gpu); needs `make install` first.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
"$PY" - <<'PY' > "$OUT/device.json"
import json, torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device"
p = torch.cuda.get_device_properties(0)
print(json.dumps({"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1), "torch": torch.__version__}))
PY
cat "$OUT/device.json"
# Tests: everything, so the CUDA-only cases that skip on a CPU run here (compiled Triton kernels included).
"$PY" -m pytest -q tests -x --junitxml="$OUT/tests.xml" 2>&1 | tail -n 5
# Benchmarks: kernels against references and the copy bandwidth, then the whole train step.
"$PY" -m pytest -q benchmarks --benchmark-json="$OUT/benchmarks.json" 2>&1 | tail -n 30
"$PY" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
data = json.load(open(f"{out}/benchmarks.json"))
rows = {b["name"]: b for b in data["benchmarks"]}
report = {"device": json.load(open(f"{out}/device.json")), "cases": {}}
for name, b in rows.items():
    report["cases"][name] = {"mean_s": b["stats"]["mean"], **b.get("extra_info", {})}
json.dump(report, open(f"{out}/report.json", "w"), indent=2)
print(json.dumps(report, indent=2)[:4000])
PY
