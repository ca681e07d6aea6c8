"""Manifest formats: the one place that turns a CSV/TSV/JSONL file into (video, caption, label) entries.

Every loader (DALI, frame shards, the PyAV reference) reads manifests through here, so column names,
relative-path rules and error messages are the same everywhere.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "ManifestEntry", "ManifestError", "is_image", "read_manifest"]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}

# Column names that other datasets use; only used to suggest a fix in error messages.
_ALIASES = {
    "video": (
        "video",
        "path",
        "video_path",
        "videopath",
        "file",
        "filename",
        "file_name",
        "videoid",
        "video_id",
        "image",
        "image_path",
        "clip",
    ),
    "caption": ("caption", "text", "sentence", "name", "title", "description", "txt", "label_text"),
}


class ManifestError(ValueError):
    """A manifest cannot be used; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class ManifestEntry:
    """One (video or image, caption) pair; label is the class name where the dataset has one."""

    video: Path
    caption: str
    label: str | None = None


def is_image(path: Path) -> bool:
    """Images (CC3M-style rows) are decoded as one-frame clips, so loaders must tell them apart."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _suggest(role: str, option: str, columns: list[str]) -> str:
    lowered = {c.lower(): c for c in columns}
    for alias in _ALIASES.get(role, ()):
        if alias in lowered:
            return f"set data.{option}={lowered[alias]}"
    return f"set data.{option} to one of the columns above"


def _read_rows(path: Path) -> tuple[list[str], list[dict]]:
    """Rows as dicts plus the column names seen, for any supported format."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            rows = list(reader)
            columns = list(reader.fieldnames or [])
        return columns, rows
    if suffix == ".jsonl":
        rows = []
        columns: list[str] = []
        with path.open(encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ManifestError(
                        f"manifest {path} line {lineno} is not valid JSON ({e.msg}); "
                        "write one JSON object per line"
                    ) from e
                if not isinstance(row, dict):
                    raise ManifestError(
                        f"manifest {path} line {lineno} is a JSON {type(row).__name__}, not an object; "
                        'write one object per line, e.g. {"video": "a.mp4", "caption": "..."}'
                    )
                columns.extend(k for k in row if k not in columns)
                rows.append(row)
        return columns, rows
    raise ManifestError(
        f"manifest {path} has unsupported extension {path.suffix!r}; use .csv, .tsv or .jsonl"
    )


DEFAULT_LABEL_COLUMN = "label"


def read_manifest(
    path: Path,
    *,
    video_column: str = "video",
    caption_column: str = "caption",
    label_column: str = DEFAULT_LABEL_COLUMN,
    root: Path | None = None,
    require_label_column: bool = False,
) -> list[ManifestEntry]:
    """Read a manifest into entries with resolved video paths.

    Relative video paths resolve against ``root`` when given, else against the manifest's folder, so a
    dataset folder can be moved as a whole. Labels are optional (None when the column is absent or empty)
    unless ``require_label_column``: callers set it when a label column was named on purpose, so that a
    typo is an error rather than a manifest without labels.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ManifestError(
            f"manifest {path} {what}; check the manifest path in the config "
            "(a ready-made one: data_dali.demo.write_demo_dataset)"
        )
    columns, rows = _read_rows(path)
    if not rows:
        raise ManifestError(
            f"manifest {path} has no rows; add at least one row with columns "
            f"{video_column!r} and {caption_column!r}"
        )
    for role, option, column in (
        ("video", "video_column", video_column),
        ("caption", "caption_column", caption_column),
    ):
        if column not in columns:
            raise ManifestError(
                f"manifest {path} has no column {column!r} (columns: {', '.join(map(str, columns))}); "
                f"{_suggest(role, option, columns)}"
            )
    if require_label_column and label_column not in columns:
        listed = ", ".join(map(str, columns))
        raise ManifestError(
            f"manifest {path} has no label column {label_column!r} (columns: {listed}); name one of them "
            "as the label column, or leave the default for a manifest without labels"
        )
    base = (Path(root) if root is not None else path.parent).absolute()
    line_offset = 2 if path.suffix.lower() in (".csv", ".tsv") else 1
    entries = []
    for n, row in enumerate(rows):
        video = row.get(video_column)
        caption = row.get(caption_column)
        if video is None or str(video).strip() == "" or caption is None:
            missing = video_column if video is None or str(video).strip() == "" else caption_column
            raise ManifestError(
                f"manifest {path} row {n + line_offset} has no value for {missing!r}; "
                "fill it in or remove the row"
            )
        label = row.get(label_column)
        video_path = Path(str(video).strip()).expanduser()
        if not video_path.is_absolute():
            video_path = base / video_path
        entries.append(
            ManifestEntry(
                video=video_path,
                caption=str(caption),
                label=None if label is None or str(label) == "" else str(label),
            )
        )
    return entries
