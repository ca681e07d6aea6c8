"""Running `miles` as a user does, on the smoke preset: shared by the end-to-end and fault tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def data_overrides(root: Path, train: str = "train.csv", val: str = "val.csv") -> list[str]:
    return [
        f"data.root={root}",
        f"data.train_manifest={root / train}",
        f"data.val_manifest={root / val}",
        f"data.classes={root / 'classes.txt'}",
        "data.generate_demo=false",
    ]


def shard_overrides(root: Path) -> list[str]:
    return [*data_overrides(root, train="train", val="val"), "data.backend=auto"]


def console_script() -> str:
    """The installed `miles` command beside this interpreter (what a user types)."""
    found = shutil.which("miles", path=str(Path(sys.executable).parent))
    if found is None:
        raise AssertionError(
            f"no `miles` command beside {sys.executable}: install the project (make install)"
        )
    return found


def run_miles(
    *args: str,
    check: bool = True,
    env: dict | None = None,
    timeout: float = 300,
    cwd: Path | None = None,
    installed: bool = False,
) -> subprocess.CompletedProcess:
    """`python -m miles ARGS` from `cwd` (default: this process's folder), or with `installed` the console
    script, whose sys.path starts at the venv's bin/ rather than at a checkout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **(env or {}))
    command = [console_script()] if installed else [sys.executable, "-m", "miles"]
    proc = subprocess.run(
        [*command, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"miles {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def logged_losses(run: Path) -> list[tuple[int, float, float]]:
    lines = (run / "log.jsonl").read_text().splitlines()
    records = map(json.loads, lines)  # training lines; periodic evaluations log metrics, not losses
    return [(r["step"], r["loss"], r["mvm"]) for r in records if "loss" in r]


def as_killed_after(finished: Path, out: Path, step: int) -> None:
    """`out`: a copy of the finished run `finished` as a kill right after `step` would leave it (no later
    checkpoint, log line or metrics.json), for resume tests that need not pay for the killed launch."""
    shutil.copytree(finished, out)
    for path in (out / "checkpoints").glob("step_*.pt"):
        if int(path.stem.split("_")[1]) > step:
            path.unlink()
    (out / "metrics.json").unlink()
    lines = (out / "log.jsonl").read_text().splitlines()
    (out / "log.jsonl").write_text("".join(f"{line}\n" for line in lines if json.loads(line)["step"] <= step))
