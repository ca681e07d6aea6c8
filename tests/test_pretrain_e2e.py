"""The `smoke` pre-training run end to end: metrics, checkpoints, eval, resume after a kill, bad videos."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import data_overrides, logged_losses, run_miles, shard_overrides

from data_dali.demo import write_demo_dataset

pytestmark = pytest.mark.slow


def test_smoke_run_end_to_end(smoke_data: Path, tmp_path: Path) -> None:
    """Run as a user runs it: the installed `miles` command, from a folder outside the checkout (where
    Hugging Face's `kernels`, which transformers imports, must not be confused with ours)."""
    run = tmp_path / "run"
    proc = run_miles(
        "pretrain",
        "--preset",
        "smoke",
        "--out",
        "run",
        *data_overrides(smoke_data),
        cwd=tmp_path,
        installed=True,
    )
    assert "t2v R1" in proc.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    for side in ("t2v", "v2t"):
        assert set(metrics[side]) == {"R1", "R5", "R10", "MedR", "MeanR"}
        assert 0 <= metrics[side]["R1"] <= metrics[side]["R5"] <= metrics[side]["R10"] <= 100
        assert 1 <= metrics[side]["MedR"] <= 12
    assert set(metrics["zeroshot"]) == {"top1", "top5"}
    assert metrics["chance"]["R1"] == pytest.approx(100 / 12)
    assert metrics["chance"]["top1"] == pytest.approx(100 / 7)
    assert metrics["untrained"]["t2v"]["R1"] >= 0
    assert metrics["skipped_videos"] == 0
    assert metrics["attention"] == "auto" and metrics["attention_backend"] == "sdpa"  # auto on a CPU
    assert (proc.stdout + proc.stderr).count("attention sdpa (auto: xformers has no CPU kernels") == 1
    log = logged_losses(run)
    assert [s for s, _, _ in log] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor([loss, mvm])).all() and mvm > 0 for _, loss, mvm in log)
    ckpts = sorted((run / "checkpoints").glob("step_*.pt"))
    assert [p.name for p in ckpts] == ["step_00000003.pt", "step_00000006.pt"]
    assert not list((run / "checkpoints").glob(".*tmp*"))  # atomic writes leave no temporaries
    assert (run / "config.yaml").is_file()
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(r["data_wait_s"] >= 0 and r["peak_memory_mb"] > 0 for r in records)

    # TensorBoard holds every scalar of log.jsonl and the evaluation metrics, at their steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for key in ("loss", "mvm", "lr", "clips_per_s", "data_wait_s", "peak_memory_mb", "grad_norm"):
        assert [e.step for e in events.Scalars(f"train/{key}")] == list(range(1, 7)), key
    logged = [e.value for e in events.Scalars("train/loss")]
    assert logged == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert events.Scalars("eval/t2v_R1")[0].value == pytest.approx(metrics["t2v"]["R1"])
    assert events.Scalars("eval/t2v_R1")[0].step == 6 and "eval_untrained/t2v_R1" in scalars

    # `miles eval` on the final checkpoint reproduces the run's own final numbers.
    out = tmp_path / "eval.json"
    run_miles(
        "eval",
        "--checkpoint",
        str(ckpts[-1]),
        "--data",
        str(smoke_data / "val.csv"),
        "--classes",
        str(smoke_data / "classes.txt"),
        "--out",
        str(out),
        cwd=tmp_path,
        installed=True,
    )
    again = json.loads(out.read_text())
    assert again["t2v"] == metrics["t2v"] and again["v2t"] == metrics["v2t"]
    assert again["zeroshot"] == metrics["zeroshot"]


@pytest.mark.parametrize("source", ["manifest", "shards"])
def test_resume_after_kill_reproduceslogged_losses(
    source: str, request, tmp_path: Path, tiny_text_args: list[str]
) -> None:
    """Reference loader on the H.264 manifest, and DALI on frame shards: the data position resumes."""
    data = data_overrides(request.getfixturevalue("smoke_data"))
    if source == "shards":
        data = shard_overrides(request.getfixturevalue("smoke_shards"))
    common = [
        "--preset",
        "smoke",
        *data,
        *tiny_text_args,
        "train.max_steps=8",
        "train.checkpoint_every=3",
        "eval.before_training=false",
        "data.num_workers=1",
    ]
    full = tmp_path / "full"
    run_miles("pretrain", "--out", str(full), *common)
    killed = tmp_path / "killed"
    proc = run_miles("pretrain", "--out", str(killed), *common, "train.crash_at_step=5", check=False)
    assert proc.returncode == -9  # SIGKILL, after step 5, with the last checkpoint at step 3
    assert not (killed / "metrics.json").exists()
    assert [s for s, _, _ in logged_losses(killed)] == [1, 2, 3, 4, 5]
    run_miles("pretrain", "--out", str(killed), "--resume", *common)
    assert logged_losses(killed) == logged_losses(full)  # bit-identical on the CPU
    a = torch.load(full / "checkpoints" / "step_00000008.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "step_00000008.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["snapshot"].items():
        assert torch.equal(value, b["snapshot"][key]), key
    metrics = json.loads((full / "metrics.json").read_text())
    # auto on a CPU: DALI cannot decode H.264 here; PyAV decodes everything, so nothing is counted
    assert metrics["data_backend"] == ("dali" if source == "shards" else "reference")
    if source != "shards":
        assert metrics["decode_counts"] == {"train": {}, "val": {}}


def test_frame_shards_train_and_evaluate_with_dali(
    smoke_shards: Path, tmp_path: Path, tiny_text_args: list[str]
) -> None:
    run = tmp_path / "run"
    shards = [*shard_overrides(smoke_shards), *tiny_text_args]
    proc = run_miles("pretrain", "--preset", "smoke", "--out", str(run), *shards)
    assert proc.stderr.count("training data: DALI on CPU: frame shards (32 clips)") == 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data_backend"] == metrics["eval_data_backend"] == "dali"
    assert metrics["skipped_videos"] == 0
    clean = {"dali_screened": 0, "dali_fallbacks": 0}  # every clip decoded by DALI, none by PyAV
    assert metrics["decode_counts"] == {"train": clean, "val": clean}
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps and all(r["dali_screened"] == r["dali_fallbacks"] == 0 for r in steps)
    assert metrics["chance"]["R1"] == pytest.approx(100 / 12)  # all 12 validation clips, from shards
    assert metrics["chance"]["top1"] == pytest.approx(100 / 7)  # labels travel through the shards
    ckpt = sorted((run / "checkpoints").glob("step_*.pt"))[-1]
    out = tmp_path / "eval.json"
    run_miles("eval", "--checkpoint", str(ckpt), "--data", str(smoke_shards / "val"), "--out", str(out))
    again = json.loads(out.read_text())
    assert again["t2v"] == metrics["t2v"] and again["zeroshot"] == metrics["zeroshot"]
    # The reference loader cannot read shards: refused before any work, naming the key.
    refused = run_miles(
        "pretrain",
        "--preset",
        "smoke",
        "--out",
        str(tmp_path / "refused"),
        *shards,
        "data.backend=reference",
        check=False,
    )
    assert refused.returncode == 2 and "data.backend" in refused.stderr and "frame shards" in refused.stderr
    assert not (tmp_path / "refused").exists()


def test_bad_videos_are_skipped_counted_and_named(
    smoke_data: Path, tmp_path: Path, tiny_text_args: list[str]
) -> None:
    data = tmp_path / "data"
    shutil.copytree(smoke_data, data)
    bad = data / "bad"
    bad.mkdir()
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "garbage.mp4").write_bytes(os.urandom(5000))
    good = (data / "videos" / "train" / "00000.mp4").read_bytes()
    (bad / "truncated.mp4").write_bytes(good[: len(good) // 3])
    names = ["bad/empty.mp4", "bad/garbage.mp4", "bad/truncated.mp4", "bad/missing.mp4"]
    for manifest in ("train.csv", "val.csv"):
        with open(data / manifest, "a", newline="") as fh:
            writer = csv.writer(fh)
            for name in names:
                writer.writerow([name, f"a broken clip {name}", "growing"])
    run = tmp_path / "run"
    run_miles(
        "pretrain",
        "--preset",
        "smoke",
        "--out",
        str(run),
        *data_overrides(data),
        *tiny_text_args,
        "train.max_steps=8",
        "train.grad_accum=2",  # also exercises accumulation
        "eval.before_training=false",
    )
    metrics = json.loads((run / "metrics.json").read_text())
    val_bad = {str(data / n) for n in names}
    # each bad file is in both splits: counted once, listed once, and listed per split
    assert metrics["skipped_paths"] == sorted(val_bad) and metrics["skipped_videos"] == 4
    assert metrics["skipped_by_split"]["val"] == sorted(val_bad)
    assert set(metrics["skipped_by_split"]["train"]) <= val_bad and metrics["skipped_by_split"]["train"]
    # evaluation left them out rather than scoring black clips
    assert json.loads((run / "metrics.json").read_text())["chance"]["R1"] == pytest.approx(100 / 12)


def test_two_process_torchrun_smoke_on_shards(
    smoke_shards: Path, tmp_path: Path, tiny_text_args: list[str]
) -> None:
    """DDP on gloo: both ranks train in step and rank 0 writes the metrics of the 2-process run; each
    rank runs its own DALI pipeline on its share of every epoch. (On a manifest: tests/test_faults.py.)"""
    data = shard_overrides(smoke_shards)
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "miles",
        "pretrain",
        "--preset",
        "smoke",
        "--out",
        str(run),
        *data,
        *tiny_text_args,
        "train.batch_size=4",
        "eval.before_training=false",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["data_backend"] == "dali"
    log = logged_losses(run)
    assert [s for s, _, _ in log] == list(range(1, 7))
    assert all(mvm > 0 for _, _, mvm in log)


def test_resume_guards_and_fresh_runs_move_old_ones_aside(
    smoke_data: Path, tmp_path: Path, tiny_text_args: list[str]
) -> None:
    common = [
        "--preset",
        "smoke",
        *data_overrides(smoke_data),
        *tiny_text_args,
        "train.max_steps=3",
        "eval.before_training=false",
    ]
    run = tmp_path / "run"
    run_miles("pretrain", "--out", str(run), *common)
    # a resume that would change the batches is refused, naming the key, and leaves the run intact
    proc = run_miles("pretrain", "--out", str(run), "--resume", *common, "train.batch_size=4", check=False)
    assert proc.returncode == 2 and "train.batch_size" in proc.stderr
    assert [s for s, _, _ in logged_losses(run)] == [1, 2, 3]
    # a torn last log line (a kill mid-write) does not stop a resume
    with open(run / "log.jsonl", "a") as fh:
        fh.write('{"step": 4, "loss": 1.')
    run_miles("pretrain", "--out", str(run), "--resume", *common, "train.max_steps=4")
    assert [s for s, _, _ in logged_losses(run)] == [1, 2, 3, 4]
    # a fresh run into the same folder moves the earlier one aside instead of mixing logs and checkpoints
    run_miles("pretrain", "--out", str(run), *common)
    assert [s for s, _, _ in logged_losses(run)] == [1, 2, 3]
    old = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(old) == 1 and [s for s, _, _ in logged_losses(old[0])] == [1, 2, 3, 4]
    # more clips per process than the manifest holds is refused before training
    proc = run_miles("pretrain", "--out", str(tmp_path / "big"), *common, "train.batch_size=64", check=False)
    assert proc.returncode == 2 and "train.batch_size" in proc.stderr


def test_drop_mode_training_learns_on_demo_data(tmp_path: Path) -> None:
    """The throughput mode still learns: 150 drop-mode steps on a 600-clip demo set, retrieval >> chance.

    Measured here: t2v R@1 11.5 % and R@10 85.5 % over 100 videos (chance 1 % and 10 %), in about 2.5 min.
    """
    data = tmp_path / "data"
    write_demo_dataset(data, n_train=600, n_val=100, seed=0)
    run = tmp_path / "run"
    run_miles(
        "pretrain",
        "--preset",
        "demo",
        "--out",
        str(run),
        *data_overrides(data),
        "mvm.mode=drop",
        "mvm.mask_ratio=0.75",
        "mvm.contrastive_input=masked",
        "train.max_steps=150",
        "eval.before_training=false",
        timeout=900,  # about 3 minutes alone on 2 cores; more when the machine is shared
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["mvm_mode"] == "drop" and metrics["chance"]["R1"] == pytest.approx(1.0)
    assert metrics["t2v"]["R1"] >= 5.0  # five times chance; measured 11.5
    assert metrics["t2v"]["R10"] >= 40.0  # four times chance; measured 85.5


def test_demo_trains_from_frame_shards_with_dali_and_reference_stays_one_key_away(
    tmp_path: Path, tiny_text_args: list[str]
) -> None:
    """The demo preset prepares frame shards of the generated demo once and trains and evaluates from them
    with DALI; data.backend=reference trains from the videos with PyAV; a second run prepares nothing."""
    data = tmp_path / "demo"
    common = [
        "--preset",
        "demo",
        f"data.root={data}",
        f"data.train_manifest={data / 'train.csv'}",
        f"data.val_manifest={data / 'val.csv'}",
        f"data.classes={data / 'classes.txt'}",
        "data.demo_train=40",
        "data.demo_val=12",
        "train.batch_size=8",
        "train.max_steps=2",
        "eval.before_training=false",
        *tiny_text_args,
    ]
    fast = run_miles("pretrain", "--out", str(tmp_path / "fast"), *common)
    assert "demo: 40 clips of" in fast.stderr and "demo: 12 clips of" in fast.stderr
    assert "training data: DALI on CPU: frame shards (40 clips)" in fast.stderr
    metrics = json.loads((tmp_path / "fast" / "metrics.json").read_text())
    assert metrics["data_backend"] == metrics["eval_data_backend"] == "dali"
    assert metrics["chance"]["R1"] == pytest.approx(100 / 12)
    saved = (tmp_path / "fast" / "config.yaml").read_text()
    assert f"train_manifest: {data / 'shards' / 'train'}" in saved
    again = run_miles("pretrain", "--out", str(tmp_path / "again"), *common)
    assert "prepared as frame shards" not in again.stderr and "from frame shards in" in again.stderr
    reference = run_miles("pretrain", "--out", str(tmp_path / "ref"), *common, "data.backend=reference")
    assert "frame shards" not in reference.stderr
    metrics = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert metrics["data_backend"] == metrics["eval_data_backend"] == "reference"
