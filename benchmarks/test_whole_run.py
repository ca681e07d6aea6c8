"""A whole short pre-training run, loader included: what `train.precision` buys end to end.

The train-step benchmark times the step alone, on synthetic clips, in `drop` mode. A run also decodes,
augments and collates its data (in threads or workers that share the cores with the step), runs the
text tower and, in the demo, `bert` mode's full grid. So the step's precision speed-up does not carry
over to a run, and `train.precision=auto` is decided from this case instead.

Case `whole run demo: precision`: the demo preset as `make demo` runs it (frame shards, DALI, `bert`
mode, MiniLM) for `STEPS` steps, fp32 (the reference side) against bf16 autocast, each a fresh
`miles pretrain` process, one round each (a round is half a minute here). Recorded: the run's own
`train_clips_per_s` (steps alone, data waits included) beside the wall time of the whole process.
On a CPU without BF16 instructions the bf16 side is skipped (bf16 is emulated there, several times slower).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.conftest import QUICK, pair
from data_dali.demo import write_demo_dataset
from data_dali.shard_writer import prepare_shards
from miles.precision import cpu_bf16_flags

STEPS = 10 if QUICK else 60
BATCH = 32  # the demo preset's
CASE = f"whole run demo: precision ({STEPS} steps, loader included)"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("whole_run") / "demo"
    write_demo_dataset(root, n_train=600, n_val=100, seed=0)
    for split in ("train", "val"):  # what the demo preset prepares on first use, outside the timing
        prepare_shards(root / f"{split}.csv", root / "shards" / split, workers=2, progress=False)
    return root


def _run(root: Path, out: Path, precision: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "miles",
        "pretrain",
        "--preset",
        "demo",
        "--out",
        str(out),
        f"data.root={root}",
        f"data.train_manifest={root / 'train.csv'}",
        f"data.val_manifest={root / 'val.csv'}",
        f"data.classes={root / 'classes.txt'}",
        f"train.max_steps={STEPS}",
        f"train.warmup_steps={max(1, STEPS // 10)}",
        f"train.checkpoint_every={STEPS}",
        "eval.before_training=false",
        f"train.precision={precision}",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"miles pretrain failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_whole_run_precision(
    benchmark, precision: str, demo_root: Path, device: torch.device, tmp_path: Path
) -> None:
    if precision == "bf16" and device.type == "cpu" and not cpu_bf16_flags():
        pytest.skip("this CPU has no BF16 instructions: bf16 is emulated, several times slower")
    pair(benchmark, CASE, "reference" if precision == "fp32" else "fast", f"{precision}, DALI frame shards")
    results: list[dict] = []

    def whole_run() -> None:
        start = time.perf_counter()
        metrics = _run(demo_root, tmp_path / f"run{len(results)}", precision)
        metrics["process_s"] = time.perf_counter() - start
        results.append(metrics)

    benchmark.pedantic(whole_run, rounds=1, iterations=1)
    metrics = results[-1]
    benchmark.extra_info.update(
        clips_per_s=metrics["train_clips_per_s"],
        train_seconds=metrics["train_seconds"],
        process_s=metrics["process_s"],
        t2v_r1=metrics["t2v"]["R1"],
        data_backend=metrics["data_backend"],
    )
