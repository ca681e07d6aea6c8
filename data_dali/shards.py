"""Frame shards as a loader reads them: the folder layout, its index, and random access to any frame.

``miles prepare`` (:mod:`data_dali.shard_writer`) decodes every video once and writes:

```
OUT_DIR/
  shards/shard-000000.tar   members "<key>.<frame:04d>.jpg" and "<key>.json" (WebDataset layout)
  index.jsonl               one line per clip, manifest order, with the byte range of every JPEG
  skipped.jsonl             {"source", "error", "position"} per clip that could not be decoded
  prepare.json              the parameters; a rerun with the same ones resumes, other ones are refused
```

The index lets a loader read any frame with one ``pread``-like slice instead of scanning a tar, so
random access (shuffled training, sparse frame sampling) costs no more than sequential reading.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT_VERSION",
    "INDEX_NAME",
    "PARAMS_NAME",
    "SHARD_DIR",
    "SKIPPED_NAME",
    "ShardClip",
    "ShardError",
    "ShardIndex",
    "file_sha256",
    "is_shard_dir",
]

FORMAT_VERSION = 1
INDEX_NAME = "index.jsonl"
SKIPPED_NAME = "skipped.jsonl"
PARAMS_NAME = "prepare.json"
SHARD_DIR = "shards"
# Open shard files kept per process by ShardIndex.read_frames.
_MAX_OPEN_SHARDS = 16


class ShardError(ValueError):
    """A shard folder cannot be used or written; the message names the path and the fix."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_jsonl_prefix(path: Path) -> list[dict]:
    """Complete JSON lines of a file appended to by a process that may have died mid-write."""
    if not path.exists():
        return []
    out = []
    with path.open("r", encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn last line
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


@dataclass(frozen=True)
class ShardClip:
    """One clip of a prepared folder: where its JPEG frames lie and what describes it."""

    key: str
    shard: Path
    source: str
    captions: tuple[str, ...]
    label: str | None
    frames: tuple[tuple[int, int], ...]
    height: int
    width: int
    fps: float


def _index_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.name == INDEX_NAME or path.suffix == ".jsonl" else path / INDEX_NAME


def is_shard_dir(path: str | Path) -> bool:
    """True when ``path`` is a prepared folder (or its index.jsonl), so loaders can pick the shard path."""
    path = Path(path)
    if path.is_file():
        return path.name == INDEX_NAME and (path.parent / PARAMS_NAME).is_file()
    return path.is_dir() and (path / INDEX_NAME).is_file() and (path / PARAMS_NAME).is_file()


class ShardIndex:
    """The clips of a prepared folder, and cheap random access to their JPEG frames.

    Shard files are memory-mapped on first use and kept in a small per-process cache; a forked data
    loader worker notices the new process id and maps its own, so no handle is shared across processes.
    """

    def __init__(self, root: Path, clips: list[ShardClip], params: dict[str, Any]) -> None:
        self.root = root
        self.clips = clips
        self.params = params
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._maps: OrderedDict[Path, tuple[Any, mmap.mmap]] = OrderedDict()

    @classmethod
    def open(cls, path: str | Path) -> ShardIndex:
        """Read ``OUT_DIR/index.jsonl``; a missing or corrupt index says how to (re)create it."""
        index_path = _index_path(path)
        root = index_path.parent
        fix = f"run `miles prepare MANIFEST {root}` to create it"
        if not index_path.is_file():
            raise ShardError(f"frame shard index {index_path} does not exist; {fix}")
        params_path = root / PARAMS_NAME
        try:
            params = json.loads(params_path.read_text(encoding="utf-8")) if params_path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ShardError(f"{params_path} is corrupt ({e}); {fix}") from e
        clips = []
        with index_path.open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    clips.append(
                        ShardClip(
                            key=str(r["key"]),
                            shard=root / r["shard"],
                            source=str(r["source"]),
                            captions=tuple(str(c) for c in r["captions"]),
                            label=None if r.get("label") is None else str(r["label"]),
                            frames=tuple((int(o), int(s)) for o, s in r["frames"]),
                            height=int(r["height"]),
                            width=int(r["width"]),
                            fps=float(r["fps"]),
                        )
                    )
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise ShardError(
                        f"frame shard index {index_path} line {lineno} is corrupt ({type(e).__name__}: {e}); "
                        f"an interrupted `miles prepare` resumes when rerun with the same arguments, or {fix}"
                    ) from e
        if not clips:
            raise ShardError(f"frame shard index {index_path} lists no clips; {fix}")
        return cls(root, clips, params)

    def __len__(self) -> int:
        return len(self.clips)

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into spawned loader workers: open maps and locks stay behind.
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_maps"] = OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _map_locked(self, shard: Path) -> mmap.mmap:
        """The cached map of ``shard`` (held lock: an evicted map is closed only while nobody slices it)."""
        hit = self._maps.get(shard)
        if hit is not None:
            self._maps.move_to_end(shard)
            return hit[1]
        fix = f"rerun `miles prepare` for {self.root}"
        try:
            f = shard.open("rb")
        except OSError as e:
            raise ShardError(f"frame shard {shard} cannot be opened ({e}); {fix}") from e
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file
            f.close()
            raise ShardError(f"frame shard {shard} cannot be mapped ({e}); {fix}") from e
        self._maps[shard] = (f, mm)
        while len(self._maps) > _MAX_OPEN_SHARDS:
            _, (old_f, old_mm) = self._maps.popitem(last=False)
            old_mm.close()
            old_f.close()
        return mm

    def read_frames(self, i: int, frame_ids: Sequence[int]) -> list[bytes]:
        """JPEG bytes of clip ``i``'s stored frames ``frame_ids`` (indices into ``clips[i].frames``).

        Thread-safe: the slices are copied under the cache lock, so another thread's eviction never
        closes a map in use.
        """
        clip = self.clips[i]
        for j in frame_ids:
            if not 0 <= j < len(clip.frames):
                raise IndexError(
                    f"clip {clip.key} ({clip.source}) has {len(clip.frames)} frames, asked for {j}"
                )
        if self._pid != os.getpid():
            # Forked: the parent's maps belong to it; start an empty cache of our own.
            self._maps = OrderedDict()
            self._lock = threading.Lock()
            self._pid = os.getpid()
        with self._lock:
            mm = self._map_locked(clip.shard)
            out = [mm[offset : offset + size] for offset, size in (clip.frames[j] for j in frame_ids)]
        for j, data in zip(frame_ids, out, strict=True):
            if len(data) != clip.frames[j][1]:
                raise ShardError(
                    f"frame shard {clip.shard} is shorter than its index says (clip {clip.key}); "
                    f"rerun `miles prepare` for {self.root}"
                )
        return out

    def close(self) -> None:
        """Unmap every cached shard (also happens when the index is garbage collected)."""
        with self._lock:
            for f, mm in self._maps.values():
                mm.close()
                f.close()
            self._maps.clear()
