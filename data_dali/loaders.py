"""Which loader reads the data (`data.backend`), and one place that builds it for training and evaluation.

`reference` is the PyAV loader; `dali` the DALI graphs (raw video, frame shards); `auto` takes DALI where it
can decode the given data on the given device and the reference loader otherwise, and says which in one
line. A data path is either a manifest (CSV/TSV/JSONL of videos and captions) or a folder of frame shards
written by `miles prepare`, which only DALI reads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from data_dali.manifest import DEFAULT_LABEL_COLUMN, ManifestEntry, read_manifest
from data_dali.shards import INDEX_NAME, ShardIndex, file_sha256, is_shard_dir

__all__ = [
    "DATA_BACKENDS",
    "DataSource",
    "build_loader",
    "data_fingerprint",
    "decode_counts",
    "sum_counts",
    "first_readable",
    "open_source",
    "resolve_data_backend",
]

DATA_BACKENDS = ("auto", "dali", "reference")

DataSource = Sequence[ManifestEntry] | ShardIndex


def open_source(
    path: str | Path,
    *,
    video_column: str = "video",
    caption_column: str = "caption",
    label_column: str = DEFAULT_LABEL_COLUMN,
    require_label_column: bool = False,
) -> DataSource:
    """A manifest's entries, or the index of a frame-shard folder (or its index.jsonl)."""
    if is_shard_dir(path):
        return ShardIndex.open(path)
    return read_manifest(
        Path(path),
        video_column=video_column,
        caption_column=caption_column,
        label_column=label_column,
        require_label_column=require_label_column,
    )


def resolve_data_backend(name: str, source: DataSource, device: torch.device) -> tuple[str, str]:
    """(`dali` or `reference`, one line saying why), refusing a combination that cannot work."""
    if name not in DATA_BACKENDS:
        raise ValueError(f"data.backend must be one of {DATA_BACKENDS}, got {name!r}")
    shards = isinstance(source, ShardIndex)
    if name == "reference":
        if shards:
            raise ValueError(
                f"{source.root} holds frame shards, which only the DALI loader reads: set data.backend=dali "
                "or auto, or point the manifest key at the original CSV/JSONL manifest"
            )
        return "reference", "PyAV reference loader (data.backend=reference)"
    from data_dali.dali_loader import dali_support  # importing DALI costs a second: only when asked

    ok, why = dali_support(source, device)
    if name == "dali":
        if not ok:
            raise ValueError(f"data.backend=dali cannot run here: {why}")
        return "dali", why
    if ok:
        return "dali", f"{why} (data.backend=auto)"
    if shards:
        raise ValueError(f"frame shards at {source.root} need DALI, which cannot run here: {why}")
    return "reference", f"PyAV reference loader; {why} (data.backend=auto)"


def build_loader(
    backend: str, source: DataSource, tokenizer: Any, *, device: torch.device, **kwargs: Any
) -> Any:
    """The loader of `backend` over `source`; the keyword arguments are `build_reference_loader`'s."""
    if backend == "dali":
        from data_dali.dali_loader import build_dali_loader

        return build_dali_loader(source, tokenizer, device=device, **kwargs)
    if backend == "reference":
        from data_dali.reference_loader import build_reference_loader

        return build_reference_loader(source, tokenizer, **kwargs)
    raise ValueError(f"unknown data backend {backend!r}; expected 'dali' or 'reference'")


def decode_counts(loader: Any) -> dict[str, int]:
    """Clips a loader decoded with PyAV instead of DALI (``dali_screened``, ``dali_fallbacks``); empty for
    the reference loader, which decodes everything with PyAV by design."""
    counts = getattr(loader, "decode_counts", None)
    return dict(counts()) if callable(counts) else {}


def sum_counts(per_rank: list[dict[str, int]]) -> dict[str, int]:
    """Every rank's decode counts, added up key by key (zeros kept: they say DALI decoded everything)."""
    total: Counter[str] = Counter()
    for counts in per_rank:
        total.update(counts)
    return dict(total)


def data_fingerprint(path: str | Path) -> dict[str, str]:
    """What a checkpoint records of the data it was reading: the manifest's (or shard index's) sha256.

    Rows reordered, added or removed change it, so a resume can tell that the batches would differ.
    """
    path = Path(path)
    if is_shard_dir(path):
        path = path if path.is_file() else path / INDEX_NAME
    return {"path": str(path.absolute()), "sha256": file_sha256(path)}


def first_readable(source: DataSource, num_frames: int) -> tuple[int | None, list[str]]:
    """Index of the first clip that decodes, and the errors of those before it; (None, all) if none does.

    Stops at the first success, so on healthy data it costs one clip.
    """
    from data_dali.video_decode import VideoDecodeError, decode_frames

    errors: list[str] = []
    if isinstance(source, ShardIndex):
        from io import BytesIO

        from PIL import Image

        for i, clip in enumerate(source.clips):
            try:
                with Image.open(BytesIO(source.read_frames(i, [0])[0])) as im:
                    im.convert("RGB")
                return i, errors
            except Exception as e:  # a damaged shard or JPEG: any PIL / OS error
                errors.append(f"{clip.source}: {e}")
        return None, errors
    seen: set[Path] = set()
    for i, entry in enumerate(source):
        if entry.video in seen:
            continue
        seen.add(entry.video)
        try:
            decode_frames(entry.video, num_frames, train=False)
            return i, errors
        except VideoDecodeError as e:
            errors.append(str(e))
    return None, errors
