"""Manifest formats: the one place that turns a CSV/TSV/JSONL file into (video, caption, label) entries.

Every loader (DALI, frame shards, the PyAV reference) reads manifests through here, so column names,
relative-path rules and error messages are the same everywhere.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


_FORMATS = {".csv": "CSV", ".tsv": "TSV", ".jsonl": "JSONL"}
# A frame-shard folder written by `miles prepare` holds this file (data_dali.shards.INDEX_NAME; not
# imported, since shards imports this module).
_SHARD_INDEX = "index.jsonl"


# Bytes that are not UTF-8 decode, under the surrogateescape error handler, to these lone surrogates
# (U+DC80..U+DCFF, one per byte); valid UTF-8 never gives them.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def _not_utf8(path: Path, lineno: int, line: str, column: int) -> str:
    before = line[:column]
    shown = before.strip()[-30:]
    after = f", after {shown!r}" if shown else ""
    fixed = path.with_name(f"{path.stem}.utf8{path.suffix}")
    return (
        f"manifest {path} line {lineno} is not valid UTF-8 (byte 0x{ord(line[column]) - 0xDC00:02x} at "
        f"column {column + 1}{after}); re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 "
        f"{shlex.quote(str(path))} > {shlex.quote(str(fixed))}` (use the encoding it was written in if not "
        "latin1) and point the config at the new file"
    )


def _lines(path: Path) -> Iterator[str]:
    """The file's lines as text, each keeping its line break (\\n, \\r\\n or \\r), one at a time.

    The file is streamed, never held whole, so a multi-GB manifest costs a line of memory. A byte that
    is not UTF-8 is reported with its line and column: bad bytes are kept as surrogates while decoding
    (a strict decode would fail with a position inside an internal read chunk) and looked for per line.
    A UTF-8 byte order mark at the start is dropped. Line breaks are split as a text-mode read with
    ``newline=""`` splits them, which csv.reader expects (quoted values may hold line breaks).
    """
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        for lineno, line in enumerate(f, start=1):
            bad = _UNDECODABLE.search(line)
            if bad is not None:
                raise ManifestError(_not_utf8(path, lineno, line, bad.start()))
            yield line


def _shorten(value: str, limit: int = 60) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _csv_rows(path: Path, columns: list[str]) -> Iterator[tuple[int, dict[str, str | None], str]]:
    """(line where the row starts, row, note for a short row) per data row of a CSV/TSV manifest.

    ``columns`` is filled with the header's names before the first row. A row with more fields than the
    header (an unquoted delimiter inside a value) is an error, unless the extra fields are all empty (a
    trailing delimiter). A shorter row maps the missing columns to None, as csv.DictReader does.
    """
    tsv = path.suffix.lower() == ".tsv"
    kind = _FORMATS[path.suffix.lower()]
    reader = csv.reader(_lines(path), delimiter="\t" if tsv else ",")
    header_seen = False
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            where = f"line {start}" if reader.line_num <= start else f"lines {start}-{reader.line_num}"
            raise ManifestError(
                f"manifest {path} {where} cannot be read as {kind} ({e}); check the quotes on that row: a "
                'quote that opens a value must close it, and a quote inside a quoted value is written ""'
            ) from e
        if not fields:
            continue  # a blank line
        if not header_seen:
            header_seen = True
            columns.extend(fields)
            continue
        if len(fields) > len(columns) and any(f.strip() for f in fields[len(columns) :]):
            extra = ", ".join(repr(_shorten(f)) for f in fields[len(columns) :][:3])
            spans = f" (the row spans lines {start}-{reader.line_num})" if reader.line_num > start else ""
            if tsv:
                fix = "a value that holds a tab must be quoted, or the tab removed"
            else:
                fix = 'a value that holds a comma must be quoted, e.g. a.mp4,"a cat, sitting on a mat"'
            raise ManifestError(
                f"manifest {path} line {start} has {len(fields)} fields but the header has {len(columns)} "
                f"({', '.join(columns)}){spans}; the extra: {extra}; {fix}"
            )
        note = ""
        if len(fields) < len(columns):
            note = f" (the row has {len(fields)} of the header's {len(columns)} fields)"
        values = fields[: len(columns)] + [None] * (len(columns) - len(fields))
        yield start, dict(zip(columns, values, strict=True)), note


def _jsonl_rows(path: Path, columns: list[str]) -> Iterator[tuple[int, dict[str, Any], str]]:
    """(line, row, "") per non-blank line of a JSONL manifest; ``columns`` collects the keys seen so far."""
    for lineno, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(
                f"manifest {path} line {lineno} is not valid JSON ({e.msg}); write one JSON object per line"
            ) from e
        if not isinstance(row, dict):
            raise ManifestError(
                f"manifest {path} line {lineno} is a JSON {type(row).__name__}, not an object; "
                'write one object per line, e.g. {"video": "a.mp4", "caption": "..."}'
            )
        columns.extend(k for k in row if k not in columns)
        yield lineno, row, ""


def _folder_message(path: Path) -> str:
    if (path / _SHARD_INDEX).is_file():
        return (
            f"manifest {path} is a folder of frame shards written by `miles prepare`, not a manifest file; "
            "train or evaluate from it directly (the data path may name such a folder), or give the "
            "original CSV/TSV/JSONL manifest"
        )
    found: list[str] = []
    with os.scandir(path) as it:
        for k, item in enumerate(it):
            if k >= 10_000 or len(found) >= 3:
                break
            if Path(item.name).suffix.lower() in _FORMATS and item.is_file():
                found.append(item.name)
    hint = f" (this folder holds {', '.join(sorted(found))})" if found else ""
    return (
        f"manifest {path} is a folder, not a manifest file; give a CSV, TSV or JSONL file of video and "
        f"caption columns{hint}, or a folder written by `miles prepare` (a ready-made dataset: "
        "data_dali.demo.write_demo_dataset)"
    )


def _expand_home(path: Path, lineno: int, value: str) -> Path:
    try:
        return Path(value).expanduser()
    except RuntimeError as e:  # ~user with no such user, or ~ with no HOME
        user = value[1:].split("/", 1)[0].split("\\", 1)[0]
        if user:
            why = f"the home folder of user {user!r}, who does not exist on this machine"
            fix = "write the full path instead, or the right user name after '~'"
        else:
            why = "the home folder, which cannot be determined here (HOME is not set)"
            fix = "write the full path instead, or set HOME"
        raise ManifestError(
            f"manifest {path} line {lineno}: video path {value!r} starts with {why}; {fix}"
        ) from e


def _no_column(path: Path, role: str, option: str, column: str, columns: list[str]) -> ManifestError:
    return ManifestError(
        f"manifest {path} has no column {column!r} (columns: {', '.join(map(str, columns))}); "
        f"{_suggest(role, option, columns)}"
    )


def _no_label_column(path: Path, label_column: str, columns: list[str]) -> ManifestError:
    listed = ", ".join(map(str, columns))
    return ManifestError(
        f"manifest {path} has no label column {label_column!r} (columns: {listed}); name one of them "
        "as the label column, or leave the default for a manifest without labels"
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
        if path.is_dir():
            raise ManifestError(_folder_message(path))
        raise ManifestError(
            f"manifest {path} does not exist; check the manifest path in the config "
            "(a ready-made one: data_dali.demo.write_demo_dataset)"
        )
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise ManifestError(
            f"manifest {path} has unsupported extension {path.suffix!r}; use .csv, .tsv or .jsonl"
        )
    tabular = suffix != ".jsonl"
    columns: list[str] = []
    rows = _csv_rows(path, columns) if tabular else _jsonl_rows(path, columns)
    required = (("video", "video_column", video_column), ("caption", "caption_column", caption_column))
    base = (Path(root) if root is not None else path.parent).absolute()
    entries = []
    for lineno, row, note in rows:
        if tabular and not entries:  # the header is known: check its columns once
            for role, option, column in required:
                if column not in columns:
                    raise _no_column(path, role, option, column, columns)
            if require_label_column and label_column not in columns:
                raise _no_label_column(path, label_column, columns)
        video = row.get(video_column)
        caption = row.get(caption_column)
        for role, option, column in required:
            value = video if role == "video" else caption
            if value is None or (role == "video" and str(value).strip() == ""):
                if column not in columns:  # JSONL: no row so far had this key
                    raise _no_column(path, role, option, column, columns)
                raise ManifestError(
                    f"manifest {path} line {lineno} has no value for {column!r}{note}; "
                    "fill it in or remove the row"
                )
        label = row.get(label_column)
        video_path = _expand_home(path, lineno, str(video).strip())
        if not video_path.is_absolute():
            video_path = base / video_path
        entries.append(
            ManifestEntry(
                video=video_path,
                caption=str(caption),
                label=None if label is None or str(label) == "" else str(label),
            )
        )
    if not entries:
        raise ManifestError(
            f"manifest {path} has no rows; add at least one row with columns "
            f"{video_column!r} and {caption_column!r}"
        )
    if require_label_column and label_column not in columns:  # JSONL: the keys of every row are known
        raise _no_label_column(path, label_column, columns)
    return entries
