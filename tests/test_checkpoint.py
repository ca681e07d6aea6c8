"""Checkpoint files: never run code from a file, never leave a partial file, say what does not fit."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from miles import checkpoint as ckpt
from miles.checkpoint import CheckpointError


class _Payload:
    """Unpickling this object would create `marker`: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _hostile(path: Path, marker: Path) -> Path:
    torch.save({"config": {}, "model": {"w": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    return path


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_none(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _hostile(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError) as err:
        ckpt.load(path)
    assert not marker.exists()
    message = str(err.value)
    assert f"refusing checkpoint {path}" in message and "pathlib" in message  # names the global it wanted
    assert "weights_only=False" not in message  # no advice to unpickle it anyway
    assert "Save its tensors with the code that wrote it" in message


def test_eval_and_video_weights_refuse_a_hostile_file(tmp_path: Path, capsys) -> None:
    from miles.cli import main
    from miles.config import build_config
    from miles.model import MilesModel

    marker = tmp_path / "pwned"
    path = _hostile(tmp_path / "evil.pt", marker)
    code = main(["eval", "--checkpoint", str(path), "--data", str(tmp_path / "val.csv")])
    assert code == 2 and "refusing checkpoint" in capsys.readouterr().err
    cfg = build_config("smoke", overrides=[f"model.video_weights={path}"])
    with pytest.raises(CheckpointError, match="refusing video weights"):
        MilesModel(cfg)
    assert not marker.exists()


def test_numpy_rng_state_of_older_checkpoints_still_loads(tmp_path: Path) -> None:
    """Checkpoints written before 2026-12 hold numpy's RNG state as an array: allowed, nothing more."""
    state = {"rng": [{"numpy": np.random.get_state()}], "step": 3}
    torch.save(state, tmp_path / "old.pt")
    back = ckpt.load(tmp_path / "old.pt")
    assert back["step"] == 3 and np.array_equal(back["rng"][0]["numpy"][1], state["rng"][0]["numpy"][1])


def test_damaged_and_foreign_files_name_the_file(tmp_path: Path) -> None:
    torch.save({"step": 1, "model": {"w": torch.ones(100)}}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "torn.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "list.pt").write_bytes(b"")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {tmp_path / 'torn.pt'}"):
        ckpt.load(tmp_path / "torn.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a mapping"):
        ckpt.load(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load(tmp_path / "nope.pt")


def test_load_latest_passes_over_unreadable_newer_checkpoints(tmp_path: Path, caplog) -> None:
    for step in (2, 4, 6):
        ckpt.save_atomic({"step": step}, ckpt.checkpoint_path(tmp_path, step))
    ckpt.checkpoint_path(tmp_path, 6).write_bytes(b"not a checkpoint")
    ckpt.checkpoint_path(tmp_path, 4).write_bytes(ckpt.checkpoint_path(tmp_path, 2).read_bytes()[:40])
    path, state = ckpt.load_latest(tmp_path)
    assert path == ckpt.checkpoint_path(tmp_path, 2) and state["step"] == 2
    warned = caplog.text
    assert (
        str(ckpt.checkpoint_path(tmp_path, 6)) in warned and str(ckpt.checkpoint_path(tmp_path, 4)) in warned
    )
    ckpt.checkpoint_path(tmp_path, 2).write_bytes(b"")
    with pytest.raises(CheckpointError, match="none of the 3 checkpoints"):
        ckpt.load_latest(tmp_path)
    assert ckpt.load_latest(tmp_path / "empty") is None


def test_a_write_that_runs_out_of_space_removes_its_partial_file(tmp_path: Path) -> None:
    """A real write failure: the file-size limit makes the kernel refuse the write (EFBIG) mid-save."""
    script = textwrap.dedent(
        f"""
        import resource, signal, torch
        from pathlib import Path
        from miles import checkpoint as ckpt
        folder = Path({str(tmp_path)!r})
        ckpt.save_atomic({{"w": torch.ones(1000)}}, ckpt.checkpoint_path(folder, 1))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            ckpt.save_atomic({{"w": torch.ones(4 << 20)}}, ckpt.checkpoint_path(folder, 2))
        except ckpt.CheckpointWriteError as err:
            print(err)
            raise SystemExit(err.exit_code)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    message = proc.stdout
    assert f"cannot write checkpoint {ckpt.checkpoint_path(tmp_path, 2)}" in message
    assert "MiB free there" in message and "earlier checkpoints are intact" in message
    assert sorted(os.listdir(tmp_path)) == ["step_00000001.pt"]  # no partial file, no temporary
    assert torch.equal(ckpt.load(ckpt.checkpoint_path(tmp_path, 1))["w"], torch.ones(1000))


def test_a_state_that_does_not_fit_names_keys_shapes_and_config(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["0.weight"] = torch.zeros(5, 4)
    state["extra.bias"] = torch.zeros(1)
    del state["1.bias"]
    with pytest.raises(CheckpointError) as err:
        ckpt.load_module_state(model, state, tmp_path / "c.pt", "model", ["model.embed_dim was 5, is 3"])
    message = str(err.value)
    assert "model.embed_dim was 5, is 3" in message
    assert "0.weight (5, 4) in the file, (3, 4) in the model" in message
    assert (
        "1 tensors missing from the file: 1.bias" in message and "unexpected tensors: extra.bias" in message
    )
    with pytest.raises(CheckpointError, match="entry 'model' is a list"):
        ckpt.load_module_state(model, [1, 2], tmp_path / "c.pt", "model")
