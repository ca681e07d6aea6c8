"""Checkpoints: written atomically (temporary file, fsync, rename), read without running code from the file.

A kill never leaves a torn file, a full disk never leaves a partial one, and loading uses
`torch.load(weights_only=True)`: tensors, plain containers and numbers only, so a crafted file cannot
execute anything. The released MILES / Frozen-in-Time / MCQ files also pickle their trainer's run config
(`parse_config.ConfigParser`, with `pathlib.PosixPath` fields and, for the distributed trainer, an
`argparse.Namespace`): exactly those names are allowed, each mapped onto an inert stand-in that keeps the
pickled attributes as data. Anything else is refused, naming what the file asked for.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import shutil
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from miles.stop import RunFailed

log = logging.getLogger("miles")

PATTERN = re.compile(r"step_(\d+)\.pt$")

# Checkpoints written before 2026-12 hold numpy's RNG state as an array: allow exactly those types.
_NUMPY_RNG_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class PickledRecord:
    """An object that a released trainer pickled, kept as its attributes (`fields`) and nothing more.

    The weights-only unpickler builds it with `__new__` and `__setstate__` (a plain attribute dict, as
    pickle stores an instance without a `__reduce__` of its own). Nothing of the original class runs:
    a file that tries to call it with arguments, or to give it a state that is not a dict, is refused.
    """

    pickled_as = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args or kwargs:
            raise pickle.UnpicklingError(f"{self.pickled_as} is only accepted as plain data, not called")
        self.fields: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise pickle.UnpicklingError(f"{self.pickled_as}: its pickled state is not an attribute dict")
        self.fields = dict(state)

    def __repr__(self) -> str:
        return f"<{self.pickled_as} as data: {', '.join(self.fields)}>"


class ReleasedRunConfig(PickledRecord):
    """The run config the official trainer saves in every checkpoint (`_config`, `_save_dir`, ...)."""

    pickled_as = "parse_config.ConfigParser"


class ReleasedRunArgs(PickledRecord):
    """The command-line arguments the distributed trainer's config object carries (`args`)."""

    pickled_as = "argparse.Namespace"


# Pickled name -> inert stand-in, for exactly what the released trainers put in their files.
RELEASED_TRAINER_GLOBALS = [
    (ReleasedRunConfig, "parse_config.ConfigParser"),
    (ReleasedRunConfig, "parse_config_dist_multi.ConfigParser"),
    (ReleasedRunArgs, "argparse.Namespace"),
    (PurePosixPath, "pathlib.PosixPath"),  # a path as a value: nothing on disk is touched
]
_SAFE_GLOBALS = [*_NUMPY_RNG_GLOBALS, *RELEASED_TRAINER_GLOBALS]


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be used (damaged, unsafe, or for another model)."""


class CheckpointWriteError(RunFailed):
    """A checkpoint could not be written (disk full, quota, permissions); earlier ones are intact."""


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step_{step:08d}.pt"


def _write_failure(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno is not None:
        return f"{errno.errorcode.get(err.errno, err.errno)}: {err.strerror}"
    text = str(err)
    return "file write failed (disk full or a file-size limit)" if "write" in text.lower() else text[:200]


def save_atomic(state: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free / 2**20
        raise CheckpointWriteError(
            f"cannot write checkpoint {path} ({_write_failure(err)}); {free:.0f} MiB free there. "
            "The partial file was removed and earlier checkpoints are intact: free some space (or lower "
            "train.keep_checkpoints, or use another --out) and rerun with --resume"
        ) from err
    directory = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.search(p.name))]
    return sorted(found)


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def load_latest(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that reads; unreadable newer ones are named in a warning and passed over.

    None when the folder holds no checkpoint; CheckpointError when it holds some and none reads.
    """
    found = list_checkpoints(folder)
    failures = []
    for _, path in reversed(found):
        try:
            state = load(path)
        except CheckpointError as err:
            log.warning("passing over unreadable checkpoint: %s", err)
            failures.append(str(err))
            continue
        if failures:
            log.warning("resuming from %s, the newest checkpoint that reads", path)
        return path, state
    if failures:
        raise CheckpointError(
            f"none of the {len(found)} checkpoints in {folder} can be read (newest: {failures[0]}); "
            "move the folder aside to start afresh"
        )
    return None


def prune(folder: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; remove temporaries left by killed writes."""
    for _, path in list_checkpoints(folder)[:-keep]:
        path.unlink(missing_ok=True)
    for stale in folder.glob(".step_*.pt.tmp*"):
        if not stale.name.endswith(f".tmp{os.getpid()}"):
            stale.unlink(missing_ok=True)


def _unsafe_globals(path: Path) -> str:
    """The names a refused file asked for, beyond what `load` allows."""
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)) or "unknown"
    except Exception:  # not a zip checkpoint: the names cannot be listed without unpickling
        return "objects of the legacy pickle format"


def load(path: Path, what: str = "checkpoint") -> dict[str, Any]:
    """A checkpoint or weights file as plain data; never runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} {'is a folder' if path.is_dir() else 'does not exist'}")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise CheckpointError(f"cannot read {what} {path}: {str(err)[:300]}") from err
        found = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", str(err), re.S)
        reason = " ".join(found.group(1).split()) if found else ""
        if reason.startswith("Unsupported global"):  # the names are listed: not torch's advice to allow them
            reason = ""
        names = _unsafe_globals(path)
        raise CheckpointError(
            f"refusing {what} {path}: it holds Python objects beyond tensors, plain containers and the "
            f"released trainers' run configs ({'; '.join(filter(None, [names, reason[:200]]))}), and "
            "unpickling them would run code from the file. Save its tensors with the code that wrote it "
            "(torch.save of the state dict, or safetensors) and load that file instead"
        ) from err
    except Exception as err:  # truncated, not a torch file, wrong format: say which file and why
        raise CheckpointError(f"cannot read {what} {path}: {str(err)[:300]}") from err
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{what} {path} holds a {type(state).__name__}, not a mapping of entries")
    return dict(state)


def load_module_state(
    module: torch.nn.Module, state: Any, path: Path, entry: str, config_diff: list[str] | None = None
) -> None:
    """`module.load_state_dict(state)`, with an error naming what does not fit instead of torch's list."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"checkpoint {path}: entry '{entry}' is a {type(state).__name__}, not a state dict of tensors"
        )
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if config_diff:
            parts.append("the checkpoint's config differs: " + "; ".join(config_diff[:6]))
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: " + "; ".join(shapes[:4]))
        if missing:
            parts.append(f"{len(missing)} tensors missing from the file: " + ", ".join(missing[:4]))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors: " + ", ".join(unexpected[:4]))
        raise CheckpointError(
            f"checkpoint {path}: '{entry}' does not fit this model ({' | '.join(parts)}); use the "
            "checkpoint's own model settings or start a new --out"
        )
    module.load_state_dict(state)
