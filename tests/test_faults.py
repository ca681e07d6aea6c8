"""Faults a cluster and a careless day bring, on the smoke run: each must fail loudly or lose nothing.

Preemption signals save and resume exactly; a diverging run stops naming the step; a changed manifest,
an unreadable checkpoint, a different architecture and an unreadable validation set are each caught
before they can produce a wrong result.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import data_overrides, logged_losses, run_miles

from miles import checkpoint as ckpt

pytestmark = pytest.mark.slow

RUN = [
    "--preset",
    "smoke",
    "train.max_steps=8",
    "train.checkpoint_every=2",
    "eval.before_training=false",
    "data.num_workers=1",
]


@pytest.fixture(scope="module")
def uninterrupted(smoke_data: Path, tmp_path_factory, tiny_text_args: list[str]) -> Path:
    run = tmp_path_factory.mktemp("faults") / "uninterrupted"
    run_miles("pretrain", "--out", str(run), *RUN, *tiny_text_args, *data_overrides(smoke_data))
    return run


def _same_final_weights(a: Path, b: Path) -> None:
    final = ckpt.checkpoint_path(Path("checkpoints"), 8)
    wa, wb = ckpt.load(a / final)["model"], ckpt.load(b / final)["model"]
    assert all(torch.equal(v, wb[k]) for k, v in wa.items())


@pytest.mark.parametrize("sig,code", [("TERM", 75), ("INT", 130)])
def test_a_signal_saves_after_the_step_and_resume_is_exact(
    sig: str, code: int, smoke_data: Path, uninterrupted: Path, tmp_path: Path, tiny_text_args: list[str]
) -> None:
    run = tmp_path / "run"
    args = ["pretrain", "--out", str(run), *RUN, *tiny_text_args, *data_overrides(smoke_data)]
    proc = run_miles(*args, "train.crash_at_step=5", f"train.crash_signal={sig}", check=False)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    saved = run / ckpt.checkpoint_path(Path("checkpoints"), 5)
    assert f"stopped by SIG{sig} after step 5 of 8; checkpoint {saved} written" in proc.stderr
    assert [s for s, _, _ in logged_losses(run)] == [1, 2, 3, 4, 5]  # step 5 finished, 6 never began
    assert not (run / "metrics.json").exists()  # no result from a stopped run
    if sig == "INT":
        return  # what follows the stop is the same code for every signal: resumed once, for SIGTERM
    run_miles(*args, "--resume")
    assert logged_losses(run) == logged_losses(uninterrupted)  # bit-identical on the CPU
    _same_final_weights(run, uninterrupted)


def test_preemption_under_torchrun_stops_every_rank_at_one_step(
    smoke_data: Path, tmp_path: Path, tiny_text_args: list[str]
) -> None:
    """Only rank 1 gets SIGTERM (after step 3); both ranks learn of it in step 4's collective, rank 0
    saves step 4, both exit 75; the resumed run's losses equal an uninterrupted two-rank run's."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        cmd += [
            "-m",
            "miles",
            "pretrain",
            "--out",
            str(out),
            *RUN,
            *tiny_text_args,
            *data_overrides(smoke_data),
        ]
        cmd += ["train.batch_size=4", "train.max_steps=6", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)

    full = torchrun(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["data_backend"] == "reference"
    assert all(mvm > 0 for _, _, mvm in logged_losses(tmp_path / "full"))
    stopped = torchrun(
        tmp_path / "run", "train.crash_at_step=3", "train.crash_signal=TERM", "train.crash_rank=1"
    )
    assert stopped.returncode != 0  # torchrun reports its workers' non-zero exit
    assert stopped.stderr.count("stopped by SIGTERM after step 4 of 6") == 2  # both ranks, same step
    assert "exitcode  : 75" in stopped.stderr or "exit code 75" in stopped.stderr.lower()
    assert [s for s, _, _ in logged_losses(tmp_path / "run")] == [1, 2, 3, 4]
    assert (tmp_path / "run" / ckpt.checkpoint_path(Path("checkpoints"), 4)).is_file()
    resumed = torchrun(tmp_path / "run", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_losses(tmp_path / "run") == logged_losses(tmp_path / "full")


def test_resume_passes_over_an_unreadable_newest_checkpoint(
    smoke_data: Path, uninterrupted: Path, tmp_path: Path, tiny_text_args: list[str]
) -> None:
    run = tmp_path / "run"
    args = ["pretrain", "--out", str(run), *RUN, *tiny_text_args, *data_overrides(smoke_data)]
    # --resume on a fresh folder starts the run: one command line for the first start and every requeue
    assert run_miles(*args, "--resume", "auto", "train.crash_at_step=5", check=False).returncode == -9
    newest = run / ckpt.checkpoint_path(Path("checkpoints"), 4)
    newest.write_bytes(newest.read_bytes()[:1000])  # torn by a failing disk
    proc = run_miles(*args, "--resume")
    assert f"passing over unreadable checkpoint: cannot read checkpoint {newest}" in proc.stderr
    assert f"resuming from {run / ckpt.checkpoint_path(Path('checkpoints'), 2)}" in proc.stderr
    assert logged_losses(run) == logged_losses(uninterrupted)


def test_diverging_training_stops_naming_the_step_and_the_last_good_checkpoint(
    smoke_data: Path, tmp_path: Path, tiny_text_args: list[str]
) -> None:
    run = tmp_path / "run"
    args = [
        "pretrain",
        "--out",
        str(run),
        *RUN,
        *tiny_text_args,
        *data_overrides(smoke_data),
        "train.checkpoint_every=1",
    ]
    proc = run_miles(*args, "train.lr=1e6", check=False)
    assert proc.returncode == 3
    good = run / ckpt.checkpoint_path(Path("checkpoints"), 1)
    assert "step 2: non-finite training (loss " in proc.stderr and "mvm " in proc.stderr
    assert f"last good checkpoint: {good}" in proc.stderr and "train.nonfinite=skip" in proc.stderr
    assert not (run / "metrics.json").exists()  # no R@1 = 100 from NaN scores
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [good.name]
    # skip mode drops such updates, but a run that never recovers still stops, after the limit
    proc = run_miles(
        *args, "train.lr=1e6", "train.nonfinite=skip", "train.max_nonfinite_skips=2", check=False
    )
    assert proc.returncode == 3 and "3 in a row (limit train.max_nonfinite_skips)" in proc.stderr
    assert proc.stderr.count("update skipped") == 2


def test_resume_refuses_a_changed_manifest_unless_allowed(
    smoke_data: Path, tmp_path: Path, tiny_text_args: list[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.csv", "val.csv", "classes.txt"):
        (data / name).write_text((smoke_data / name).read_text().replace("videos/", f"{smoke_data}/videos/"))
    run = tmp_path / "run"
    args = ["pretrain", "--out", str(run), *RUN, *tiny_text_args, *data_overrides(data)]
    run_miles(*args, "train.max_steps=4")
    rows = list(csv.reader((data / "train.csv").open()))
    with (data / "train.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([rows[0], *reversed(rows[1:])])  # same rows, other order
    proc = run_miles(*args, "--resume", check=False)
    assert proc.returncode == 2
    assert f"the training data changed since checkpoint {run / 'checkpoints'}" in proc.stderr
    assert str(data / "train.csv") in proc.stderr and "--allow-data-change" in proc.stderr
    assert [s for s, _, _ in logged_losses(run)] == [1, 2, 3, 4]  # the run is left as it was
    proc = run_miles(*args, "--resume", "--allow-data-change")
    assert "--allow-data-change, so epoch" in proc.stderr and "restarts from its first batch" in proc.stderr
    assert [s for s, _, _ in logged_losses(run)] == list(range(1, 9))


def test_resume_with_another_architecture_names_the_keys(
    uninterrupted: Path, smoke_data: Path, tiny_text_args: list[str]
) -> None:
    before = (uninterrupted / "config.yaml").read_text()
    args = [
        "pretrain",
        "--out",
        str(uninterrupted),
        *RUN,
        *tiny_text_args,
        *data_overrides(smoke_data),
        "--resume",
    ]
    proc = run_miles(*args, "model.embed_dim=32", check=False)
    assert proc.returncode == 2
    assert "model.embed_dim was 64 in the checkpoint, is 32 now" in proc.stderr
    assert "shape mismatches: " in proc.stderr and "in the file" in proc.stderr
    assert "Error(s) in loading state_dict" not in proc.stderr
    assert (uninterrupted / "config.yaml").read_text() == before


def test_eval_names_checkpoint_entries_of_the_wrong_type(
    uninterrupted: Path, smoke_data: Path, tmp_path: Path, capsys
) -> None:
    from miles.cli import main

    state = ckpt.load(uninterrupted / ckpt.checkpoint_path(Path("checkpoints"), 8))
    cases = {
        "config": ({**state, "config": "smoke"}, "entry 'config' is a str, not a mapping"),
        "model": ({**state, "model": [1, 2]}, "entry 'model' is a list, not a state dict of tensors"),
        "missing": (
            {"step": 1},
            "is neither a MILES checkpoint ('config' and 'model' entries) nor a released",
        ),
    }
    for name, (bad, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(bad, path)
        code = main(["eval", "--checkpoint", str(path), "--data", str(smoke_data / "val.csv")])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (name, err[-2000:])
        assert "Traceback" not in err


def test_a_validation_set_with_no_readable_video_is_refused_before_training(
    smoke_data: Path, tmp_path: Path, tiny_text_args: list[str]
) -> None:
    bad = tmp_path / "val.csv"
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(3000))
    bad.write_text(f"video,caption,label\n{garbage},a clip,growing\n{tmp_path / 'gone.mp4'},a clip,growing\n")
    run = tmp_path / "run"
    args = ["pretrain", "--out", str(run), *RUN, *tiny_text_args, *data_overrides(smoke_data)]
    proc = run_miles(*args, f"data.val_manifest={bad}", check=False)
    assert proc.returncode == 2
    assert f"config key 'data.val_manifest': none of the 2 videos of {bad} can be read" in proc.stderr
    assert str(garbage) in proc.stderr
    assert not run.exists()  # refused before any training or any file
