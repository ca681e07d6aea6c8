"""The paper's benchmark data sets as manifests, with the splits every published number is measured on.

Retrieval (MSR-VTT, DiDeMo, MSVD, LSMDC) and zero-shot action recognition (UCF101, HMDB51) numbers are
only comparable on the standard splits, so each adapter here reads the data set's own annotation and
split files, in the layout its release unpacks to, and writes ``video,caption,label`` CSV manifests
(``data_dali.manifest.read_manifest`` reads them; ``label`` is empty for the retrieval sets) plus
``classes.txt`` for the action sets. Nothing is downloaded: a missing annotation file is refused with
the file's name and what to download, and rows whose video file is not on disk are left out of the
manifests but counted, named in the returned report and listed in ``OUT_DIR/missing_videos.txt``.

``BENCHMARKS`` describes each data set (what to download, the layout, the splits, protocol notes);
``write_benchmark_manifests`` writes the manifests (``miles data NAME ROOT OUT_DIR [--split S]``).
"""

from __future__ import annotations

import csv
import importlib
import io
import itertools
import json
import logging
import os
import pickle
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BENCHMARKS",
    "MSVD_SPLIT_SIZES",
    "VIDEO_EXTENSIONS",
    "Benchmark",
    "BenchmarkError",
    "BenchmarkReport",
    "get_benchmark",
    "hmdb_class_name",
    "load_numpy_pickle",
    "lsmdc_movie",
    "ucf_class_name",
    "write_benchmark_manifests",
]

log = logging.getLogger(__name__)

# Extensions looked for, in this order, when an annotation names a video by its id (or by a file that
# was re-encoded since, e.g. DiDeMo's .mov originals shipped as .mp4).
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".webm", ".mkv", ".mov")
# Suffixes that mark a name in an annotation as a video file name; only these are swapped for the
# extensions above (an LSMDC clip id such as "..._00.00.51.926-00.00.54.129" ends in ".129").
_VIDEO_SUFFIXES = frozenset(VIDEO_EXTENSIONS) | {".m4v", ".3gp", ".mpg", ".mpeg", ".wmv", ".flv"}

MISSING_LIST_NAME = "missing_videos.txt"
CLASSES_NAME = "classes.txt"
MSVD_SPLIT_SIZES: tuple[int, int, int] = (1200, 100, 670)


class BenchmarkError(ValueError):
    """A benchmark cannot be converted; the message names the file, the data set and what to download."""


# --------------------------------------------------------------------------------------------------
# Reading the release's files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise BenchmarkError(
            f"{path} is not valid UTF-8 (byte {e.start}); re-save it as UTF-8, e.g. with iconv"
        ) from e


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, stripped line) for each non-blank line; handles the \\r\\n endings of some lists."""
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        line = line.strip()
        if line:
            yield lineno, line


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path} is not valid JSON ({e}); the download may be truncated") from e


def _clean(text: object) -> str:
    """Whitespace runs (line breaks included) become one space, so a caption is one line of words."""
    return " ".join(str(text).split())


def _strip_video_suffix(name: str) -> str:
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix.lower() in _VIDEO_SUFFIXES else name


def _read_ids(path: Path) -> list[str]:
    """Video ids, one per line (a trailing video extension is dropped), in file order, without repeats."""
    ids = list(dict.fromkeys(_strip_video_suffix(line.split()[0]) for _, line in _lines(path)))
    if not ids:
        raise BenchmarkError(f"split list {path} is empty; the download may be truncated")
    return ids


# --------------------------------------------------------------------------------------------------
# A pickle that cannot run code


def _numpy_attr(submodule: str, name: str) -> Callable[[], Any]:
    """Resolve numpy's private module under either of its names (numpy 2: numpy._core, 1.x: numpy.core)."""

    def get() -> Any:
        for module in (f"numpy._core.{submodule}", f"numpy.core.{submodule}"):
            try:
                return getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"this numpy has no {submodule}.{name}")

    return get


def _codecs_encode() -> Any:
    import _codecs

    return _codecs.encode


# What a pickle of NumPy arrays and numbers (any protocol, numpy 1.x or 2.x) refers to, and nothing else.
_PICKLE_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    **{
        (f"{pkg}.multiarray", "_reconstruct"): _numpy_attr("multiarray", "_reconstruct")
        for pkg in ("numpy.core", "numpy._core")
    },
    **{
        (f"{pkg}.multiarray", "scalar"): _numpy_attr("multiarray", "scalar")
        for pkg in ("numpy.core", "numpy._core")
    },
    **{
        (f"{pkg}.numeric", "_frombuffer"): _numpy_attr("numeric", "_frombuffer")
        for pkg in ("numpy.core", "numpy._core")
    },
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    # Protocol-2 pickles (and Python 2 ones) store an array's bytes as _codecs.encode(text, "latin1").
    ("_codecs", "encode"): _codecs_encode,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, strings, numbers and NumPy arrays/scalars; refuses every other global.

    A pickle is a program: any callable it names is called while loading. Only the names NumPy's own
    pickles use are resolved, so a tampered file fails here instead of running its payload.
    """

    def find_class(self, module: str, name: str) -> Any:
        get = _PICKLE_ALLOWED.get((module, name))
        if get is None:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only NumPy arrays and numbers are allowed in this file"
            )
        return get()

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id: only NumPy arrays and numbers are allowed")


def load_numpy_pickle(path: Path) -> Any:
    """Load a pickle of plain containers and NumPy arrays without executing code (see the unpickler).

    Releases ship such files (MSR-VTT's ``jsfusion_val_caption_idx.pkl``); ``np.load(allow_pickle=True)``
    or ``pickle.load`` would run whatever a tampered copy asks for. Raises BenchmarkError otherwise.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        RuntimeError,
        OverflowError,
    ) as e:
        raise BenchmarkError(
            f"{path} cannot be read as a pickle of NumPy arrays ({e}); it is not the file the release "
            "ships (re-download it), and it was not executed"
        ) from e


# --------------------------------------------------------------------------------------------------
# Class names


_CAMEL_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")


def ucf_class_name(name: str) -> str:
    """UCF101's CamelCase folder name as words for a text prompt: "ApplyEyeMakeup" -> "apply eye makeup".

    Every capital starts a word ("YoYo" -> "yo yo"), except inside a run of capitals, which stays one
    word ("PlayingTVGames" -> "playing tv games"); digits are a word; everything is lower-cased.
    """
    words = _CAMEL_WORD.findall(name)
    return " ".join(w.lower() for w in words) if words else name.lower()


def hmdb_class_name(name: str) -> str:
    """HMDB51's folder name as words: "brush_hair" -> "brush hair"."""
    return " ".join(name.replace("_", " ").split()).lower()


# --------------------------------------------------------------------------------------------------
# What an adapter hands to the writer


@dataclass(frozen=True)
class _Row:
    video: tuple[str, ...]  # the video's path under the video folder, then fallbacks; extension optional
    caption: str
    label: str = ""


@dataclass
class _Built:
    parts: dict[str, list[_Row]]  # split name -> rows, in writing order
    files: dict[str, str]  # split name -> manifest file name
    video_dirs: tuple[Path, ...]  # the video folder: the first of these that exists
    classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    empty_captions: int = 0


class _VideoFinder:
    """Finds ``<folder>/<name>`` under any of VIDEO_EXTENSIONS, once per distinct video."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._cache: dict[tuple[str, ...], Path | None] = {}

    def _candidates(self, name: str) -> list[Path]:
        name = name.replace("\\", "/")
        stem = _strip_video_suffix(name)
        names = [name] if stem != name else []
        names += [stem + ext for ext in VIDEO_EXTENSIONS]
        if stem != name:
            names += [name + ext for ext in VIDEO_EXTENSIONS]  # e.g. "x.mov.mp4"
        return [self.folder / n for n in dict.fromkeys(names)]

    def expected(self, video: tuple[str, ...]) -> Path:
        return self._candidates(video[0])[0]

    def find(self, video: tuple[str, ...]) -> Path | None:
        if video not in self._cache:
            found = None
            for name in video:
                found = next((p for p in self._candidates(name) if p.is_file()), None)
                if found is not None:
                    break
            self._cache[video] = found
        return self._cache[video]


# --------------------------------------------------------------------------------------------------
# Data set descriptions


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: where its files come from, where they must lie, its splits and protocol."""

    name: str
    title: str
    task: str
    download: str  # what to download, by name
    layout: str  # the files this adapter reads, relative to ROOT
    splits: tuple[str, ...]  # the values ``split`` accepts
    default_split: str | None  # None: every split is written
    protocol: str
    build: Callable[[Benchmark, Path, str | None, tuple[int, ...] | None], _Built] = field(repr=False)
    sized: bool = False  # whether ``split_sizes`` applies (splits taken by order)

    def missing(self, paths: Sequence[Path], what: str = "") -> BenchmarkError:
        """The refusal for absent files: names each file, the data set and what to download."""
        listed = ", ".join(str(p) for p in paths[:5])
        if len(paths) > 5:
            listed += f" and {len(paths) - 5} more"
        detail = f" ({what})" if what else ""
        return BenchmarkError(
            f"{self.title}: {listed} not found{detail}; download {self.download}, and unpack it so that "
            f"ROOT holds: {self.layout}"
        )

    def require(self, root: Path, *candidates: str, what: str = "") -> Path:
        """The first of ``candidates`` (under root) that is a file, else the refusal naming the first."""
        for rel in candidates:
            if (root / rel).is_file():
                return root / rel
        raise self.missing([root / candidates[0]], what)

    def require_all(self, root: Path, rels: Sequence[str], what: str = "") -> list[Path]:
        absent = [root / r for r in rels if not (root / r).is_file()]
        if absent:
            raise self.missing(absent, what)
        return [root / r for r in rels]

    def canonical_split(self, split: str | None) -> str | None:
        if split is None:
            return self.default_split
        for s in self.splits:
            if s.lower() == split.strip().lower():
                return s
        raise BenchmarkError(
            f"{self.title} has no split {split!r}; choose one of {', '.join(self.splits)}"
            + ("" if self.default_split else " (or none for all of them)")
        )


def _wanted(bench: Benchmark, split: str | None) -> tuple[str, ...]:
    return bench.splits if split is None else (split,)


def _rows(video: str | tuple[str, ...], caption: object, label: str, built: _Built) -> list[_Row]:
    """One row, or none (counted) when the caption is empty."""
    text = _clean(caption)
    if not text:
        built.empty_captions += 1
        return []
    return [_Row(video if isinstance(video, tuple) else (video,), text, label)]


# --- MSR-VTT ----------------------------------------------------------------------------------------

_MSRVTT_LISTS = "high-quality/structured-symlinks"
_MSRVTT_PROTOCOLS: dict[str, dict[str, str]] = {
    "1k-A": {"train": "train_list_jsfusion.txt", "test": "val_list_jsfusion.txt"},
    "miech": {"train": "train_list_miech.txt", "test": "test_list_miech.txt"},
    "full": {"train": "train_list_full.txt", "val": "val_list_full.txt", "test": "test_list_full.txt"},
}
_MSRVTT_CAPTION_INDEX = "jsfusion_val_caption_idx.pkl"


def _msrvtt_captions(path: Path) -> dict[str, list[str]]:
    """Video id -> its captions in the file's order (the order the 1k-A caption index counts in)."""
    data = _read_json(path)
    records, id_key = None, "image_id"
    if isinstance(data, dict):
        if isinstance(data.get("annotations"), list):
            records = data["annotations"]
        elif isinstance(data.get("sentences"), list):  # the original train_val_videodatainfo.json
            records, id_key = data["sentences"], "video_id"
    if records is None:
        raise BenchmarkError(
            f"{path} has no 'annotations' list of {{'image_id', 'caption'}} records; it is not MSR_VTT.json"
        )
    captions: dict[str, list[str]] = {}
    for k, rec in enumerate(records):
        if not isinstance(rec, dict) or id_key not in rec or "caption" not in rec:
            raise BenchmarkError(
                f"{path}: annotation {k} is not an {{'{id_key}', 'caption'}} record: {rec!r}"
            )
        captions.setdefault(str(rec[id_key]), []).append(str(rec["caption"]))
    return captions


def _as_index(value: Any) -> int | None:
    arr = np.asarray(value)
    if arr.size != 1 or arr.dtype.kind not in "iu":
        return None
    return int(arr.reshape(-1)[0])


def _msrvtt_caption_choice(path: Path, test_ids: list[str]) -> dict[str, int]:
    """Test video -> index of its one query caption, from the release's pickle (a dict, or a sequence in
    the order of the test list)."""
    obj = load_numpy_pickle(path)
    pairs: list[tuple[Any, Any]]
    if isinstance(obj, dict):
        pairs = list(obj.items())
    elif isinstance(obj, (list, tuple, np.ndarray)) and np.ndim(obj) >= 1:
        if len(obj) != len(test_ids):
            raise BenchmarkError(
                f"{path} holds {len(obj)} caption indices but the 1k-A test list has {len(test_ids)} videos; "
                "the two files come from different releases"
            )
        pairs = list(zip(test_ids, obj, strict=True))
    else:
        raise BenchmarkError(f"{path} holds a {type(obj).__name__}, not a video -> caption index mapping")
    choice: dict[str, int] = {}
    for key, value in pairs:
        if isinstance(key, bytes):
            key = key.decode("latin1")
        vid = f"video{int(key)}" if isinstance(key, (int, np.integer)) else str(key)
        index = _as_index(value)
        if index is None:
            raise BenchmarkError(f"{path}: the caption index of {vid} is {value!r}, not an integer")
        choice[_strip_video_suffix(vid)] = index
    absent = [v for v in test_ids if v not in choice]
    if absent:
        raise BenchmarkError(
            f"{path} has no caption index for {len(absent)} of the {len(test_ids)} 1k-A test videos "
            f"(e.g. {', '.join(absent[:3])}); it does not match val_list_jsfusion.txt"
        )
    return choice


def _build_msrvtt(bench: Benchmark, root: Path, split: str | None, sizes: tuple[int, ...] | None) -> _Built:
    protocol = split or "1k-A"
    lists = _MSRVTT_PROTOCOLS[protocol]
    needed = ["annotation/MSR_VTT.json"] + [f"{_MSRVTT_LISTS}/{f}" for f in lists.values()]
    if protocol == "1k-A":
        needed.append(f"{_MSRVTT_LISTS}/{_MSRVTT_CAPTION_INDEX}")
    paths = bench.require_all(root, needed)
    captions = _msrvtt_captions(paths[0])
    suffix = "" if protocol == "1k-A" else f"_{protocol}"
    built = _Built(
        parts={},
        files={part: f"{part}{suffix}.csv" for part in lists},
        video_dirs=(root / "videos" / "all", root / "videos"),
    )
    for part, list_name in lists.items():
        list_path = root / _MSRVTT_LISTS / list_name
        ids = _read_ids(list_path)
        absent = [v for v in ids if v not in captions]
        if absent:
            raise BenchmarkError(
                f"{bench.title}: {len(absent)} videos of {list_path} (e.g. {', '.join(absent[:3])}) have no "
                f"caption in {paths[0]}; the split lists and MSR_VTT.json come from different releases"
            )
        rows: list[_Row] = []
        if protocol == "1k-A" and part == "test":
            choice = _msrvtt_caption_choice(root / _MSRVTT_LISTS / _MSRVTT_CAPTION_INDEX, ids)
            for vid in ids:
                index = choice[vid]
                if not 0 <= index < len(captions[vid]):
                    raise BenchmarkError(
                        f"{bench.title}: {_MSRVTT_CAPTION_INDEX} picks caption {index} of {vid}, which has "
                        f"{len(captions[vid])} captions in MSR_VTT.json; the files come from different "
                        "releases"
                    )
                rows += _rows(vid, captions[vid][index], "", built)
        else:
            for vid in ids:
                for caption in captions[vid]:
                    rows += _rows(vid, caption, "", built)
        built.parts[part] = rows
    if protocol == "1k-A":
        built.notes.append("test: one caption per video, chosen by jsfusion_val_caption_idx.pkl")
    else:
        built.notes.append("test: all captions of each video")
    return built


# --- DiDeMo -----------------------------------------------------------------------------------------

_DIDEMO_FILES = {"train": "train_data.json", "val": "val_data.json", "test": "test_data.json"}


def _build_didemo(bench: Benchmark, root: Path, split: str | None, sizes: tuple[int, ...] | None) -> _Built:
    wanted = _wanted(bench, split)
    paths = {}
    for part in wanted:
        name = _DIDEMO_FILES[part]
        paths[part] = bench.require(root, name, f"data/{name}", f"annotations/{name}")
    built = _Built(parts={}, files={p: f"{p}.csv" for p in wanted}, video_dirs=(root / "videos",))
    for part, path in paths.items():
        data = _read_json(path)
        if not isinstance(data, list):
            raise BenchmarkError(f"{path} is a JSON {type(data).__name__}, not a list of moment annotations")
        paragraphs: dict[str, list[str]] = {}
        for k, rec in enumerate(data):
            if not isinstance(rec, dict) or "video" not in rec or "description" not in rec:
                raise BenchmarkError(f"{path}: annotation {k} has no 'video' and 'description': {rec!r}")
            text = _clean(rec["description"])
            paragraphs.setdefault(str(rec["video"]), [])
            if text:
                paragraphs[str(rec["video"])].append(text)
        if not paragraphs:
            raise BenchmarkError(f"{path} holds no annotations; the download may be truncated")
        built.parts[part] = [
            r for vid, texts in paragraphs.items() for r in _rows(vid, " ".join(texts), "", built)
        ]
    built.notes.append(
        "one paragraph per video: its moment descriptions in annotation order, joined by spaces"
    )
    return built


# --- MSVD -------------------------------------------------------------------------------------------

_MSVD_CAPTIONS = "AllVideoDescriptions.txt"
_MSVD_LISTS = {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}
_MSVD_MAPPING = "youtube_mapping.txt"


def _first_file(root: Path, name: str) -> Path | None:
    return next((p for p in (root / name, root / "annotations" / name) if p.is_file()), None)


def _msvd_order(path: Path) -> list[str]:
    """Video ids in the vid1..vidN order of youtube_mapping.txt (lines "<video id> vid<N>")."""
    numbered = []
    for lineno, line in _lines(path):
        fields = line.split()
        match = re.fullmatch(r"vid(\d+)", fields[-1]) if len(fields) == 2 else None
        if match is None:
            raise BenchmarkError(f"{path} line {lineno} is not '<video id> vid<N>': {line!r}")
        numbered.append((int(match.group(1)), fields[0]))
    return [vid for _, vid in sorted(numbered)]


def _build_msvd(bench: Benchmark, root: Path, split: str | None, sizes: tuple[int, ...] | None) -> _Built:
    wanted = _wanted(bench, split)
    path = bench.require(root, _MSVD_CAPTIONS, f"annotations/{_MSVD_CAPTIONS}", what="the captions")
    captions: dict[str, list[str]] = {}
    for _, line in _lines(path):
        if line.startswith("#"):
            continue
        fields = line.split(None, 1)
        captions.setdefault(fields[0], [])
        if len(fields) == 2:
            captions[fields[0]].append(fields[1])
    if not captions:
        raise BenchmarkError(f"{path} holds no captions; the download may be truncated")
    built = _Built(parts={}, files={p: f"{p}.csv" for p in wanted}, video_dirs=(root / "YouTubeClips",))

    lists = {p: f for p, f in ((p, _first_file(root, n)) for p, n in _MSVD_LISTS.items()) if f is not None}
    ids: dict[str, list[str]] = {}
    if lists:
        if sizes is not None:
            raise BenchmarkError(
                f"{bench.title}: split_sizes applies only without split lists ({_MSVD_LISTS})"
            )
        absent = [p for p in wanted if p not in lists]
        if absent:
            found = ", ".join(f.name for f in lists.values())
            raise bench.missing(
                [root / _MSVD_LISTS[p] for p in absent], f"{found} found: every split needs its list"
            )
        ids = {p: _read_ids(lists[p]) for p in wanted}
        built.notes.append("splits from the split lists")
    else:
        mapping = _first_file(root, _MSVD_MAPPING)
        order = _msvd_order(mapping) if mapping is not None else list(captions)
        sizes = tuple(sizes) if sizes is not None else MSVD_SPLIT_SIZES
        if len(sizes) != 3 or any(n < 0 for n in sizes):
            raise BenchmarkError(f"split_sizes must be three counts (train, val, test), got {sizes}")
        if len(order) != sum(sizes):
            source = mapping if mapping is not None else path
            raise BenchmarkError(
                f"{bench.title}: {source} lists {len(order)} videos, but the split by order takes "
                f"{sizes[0]}/{sizes[1]}/{sizes[2]} = {sum(sizes)}; give train_list.txt, val_list.txt and "
                "test_list.txt, or the standard release's files"
            )
        ends = list(itertools.accumulate(sizes))
        by_order = {"train": order[: ends[0]], "val": order[ends[0] : ends[1]], "test": order[ends[1] :]}
        ids = {p: by_order[p] for p in wanted}
        source = (
            f"the vid<N> order of {_MSVD_MAPPING}"
            if mapping is not None
            else f"their order in {_MSVD_CAPTIONS}"
        )
        built.notes.append(f"split by order ({'/'.join(map(str, sizes))} videos, {source})")
    for part in wanted:
        absent = [v for v in ids[part] if v not in captions]
        if absent:
            raise BenchmarkError(
                f"{bench.title}: {len(absent)} {part} videos (e.g. {', '.join(absent[:3])}) have no caption "
                f"in {path}; the split files and the captions come from different releases"
            )
        built.parts[part] = [r for vid in ids[part] for c in captions[vid] for r in _rows(vid, c, "", built)]
    return built


# --- LSMDC ------------------------------------------------------------------------------------------

_LSMDC_FILES = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",  # sic: the official file name
}
_LSMDC_TIMES = re.compile(r"_\d+\.\d+\.\d+\.\d+-\d+\.\d+\.\d+\.\d+$")


def lsmdc_movie(clip_id: str) -> str:
    """The movie folder of a clip: its id without the trailing "_<start>-<end>" time stamps
    ("0001_American_Beauty_00.00.51.926-00.00.54.129" -> "0001_American_Beauty"); without such a
    stamp, the id without its last "_" part."""
    stripped = _LSMDC_TIMES.sub("", clip_id)
    return stripped if stripped != clip_id else clip_id.rsplit("_", 1)[0]


def _build_lsmdc(bench: Benchmark, root: Path, split: str | None, sizes: tuple[int, ...] | None) -> _Built:
    wanted = _wanted(bench, split)
    paths = {p: bench.require(root, _LSMDC_FILES[p], f"annotations/{_LSMDC_FILES[p]}") for p in wanted}
    video_dirs = (root / "avi", root / "videos", root)
    built = _Built(parts={}, files={p: f"{p}.csv" for p in wanted}, video_dirs=video_dirs)
    for part, path in paths.items():
        rows: list[_Row] = []
        for lineno, line in _lines(path):
            fields = line.split("\t")
            if len(fields) < 2:
                raise BenchmarkError(
                    f"{path} line {lineno} is not tab-separated 'clip id, times..., sentence': {line[:80]!r}"
                )
            clip = fields[0].strip()
            sentence = fields[5] if len(fields) >= 6 else fields[-1]
            rows += _rows((f"{lsmdc_movie(clip)}/{clip}", clip), sentence, "", built)
        if not rows:
            raise BenchmarkError(f"{path} holds no clips; the download may be truncated")
        built.parts[part] = rows
    return built


# --- UCF101 -----------------------------------------------------------------------------------------

_FOLDS = ("1", "2", "3")
_ACTION_SPLITS = tuple(f"test{n}" for n in _FOLDS) + tuple(f"train{n}" for n in _FOLDS)


def _check_unique(bench: Benchmark, names: list[str], raw: list[str]) -> None:
    seen: dict[str, str] = {}
    for name, original in zip(names, raw, strict=True):
        if name in seen:
            raise BenchmarkError(f"{bench.title}: classes {seen[name]!r} and {original!r} both read {name!r}")
        seen[name] = original


def _build_ucf101(bench: Benchmark, root: Path, split: str | None, sizes: tuple[int, ...] | None) -> _Built:
    wanted = _wanted(bench, split)
    lists = "ucfTrainTestlist"
    files = {p: f"{lists}/{p[:-1]}list0{p[-1]}.txt" for p in wanted}
    class_ind, *list_paths = bench.require_all(root, [f"{lists}/classInd.txt", *files.values()])
    indexed: dict[int, str] = {}
    for lineno, line in _lines(class_ind):
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit() or int(fields[0]) in indexed:
            raise BenchmarkError(f"{class_ind} line {lineno} is not '<new index> <ClassName>': {line!r}")
        indexed[int(fields[0])] = fields[1]
    if not indexed:
        raise BenchmarkError(f"{class_ind} is empty; the download may be truncated")
    raw = [indexed[i] for i in sorted(indexed)]
    readable = {c: ucf_class_name(c) for c in raw}
    _check_unique(bench, list(readable.values()), raw)
    by_folder = {c.lower(): c for c in raw}
    built = _Built(
        parts={},
        files={p: f"{p}.csv" for p in wanted},
        video_dirs=(root / "UCF-101", root / "UCF101"),
        classes=[readable[c] for c in raw],
    )
    for part, path in zip(wanted, list_paths, strict=True):
        rows: list[_Row] = []
        for lineno, line in _lines(path):
            fields = line.split()
            video = fields[0].replace("\\", "/")
            if len(fields) >= 2 and fields[1].isdigit() and int(fields[1]) in indexed:
                cls = indexed[int(fields[1])]
            elif "/" in video and video.split("/")[0].lower() in by_folder:
                cls = by_folder[video.split("/")[0].lower()]
            else:
                raise BenchmarkError(f"{path} line {lineno}: no class of {class_ind} fits {line!r}")
            rows += _rows(video, readable[cls], readable[cls], built)
        if not rows:
            raise BenchmarkError(f"{path} is empty; the download may be truncated")
        built.parts[part] = rows
    return built


# --- HMDB51 -----------------------------------------------------------------------------------------

_HMDB_SPLITS_DIR = "testTrainMulti_7030_splits"
_HMDB_SPLIT_FILE = re.compile(r"(.+)_test_split([123])\.txt$")


def _build_hmdb51(bench: Benchmark, root: Path, split: str | None, sizes: tuple[int, ...] | None) -> _Built:
    wanted = _wanted(bench, split)
    folder = root / _HMDB_SPLITS_DIR
    found = [m for m in (_HMDB_SPLIT_FILE.match(p.name) for p in folder.glob("*_test_split*.txt")) if m]
    if not found:
        raise bench.missing([folder / "<class>_test_split<N>.txt"], "the split files")
    raw = sorted({m.group(1) for m in found})
    readable = {c: hmdb_class_name(c) for c in raw}
    _check_unique(bench, list(readable.values()), raw)
    folds = sorted({p[-1] for p in wanted})
    bench.require_all(root, [f"{_HMDB_SPLITS_DIR}/{c}_test_split{n}.txt" for n in folds for c in raw])
    built = _Built(
        parts={p: [] for p in wanted},
        files={p: f"{p}.csv" for p in wanted},
        video_dirs=(root / "hmdb51", root / "hmdb51_org", root / "videos"),
        classes=[readable[c] for c in raw],
    )
    for n in folds:
        for cls in raw:
            path = folder / f"{cls}_test_split{n}.txt"
            for lineno, line in _lines(path):
                fields = line.split()
                if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                    raise BenchmarkError(f"{path} line {lineno} is not '<video>.avi <0|1|2>': {line!r}")
                part = {"1": f"train{n}", "2": f"test{n}"}.get(fields[1])
                if part in built.parts:
                    built.parts[part] += _rows(f"{cls}/{fields[0]}", readable[cls], readable[cls], built)
    built.notes.append("split files: 1 = train, 2 = test, 0 = unused (left out)")
    return built


_ACTION_NOTE = (
    "zero-shot: caption and label are the readable class name; classes.txt lists them; the usual number "
    "is test1, or the mean over test1-test3"
)

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            name="msrvtt",
            title="MSR-VTT",
            task="text-video retrieval",
            download="MSRVTT.zip (the Frozen-in-Time / Collaborative Experts packaging of MSR-VTT)",
            layout=(
                "annotation/MSR_VTT.json, high-quality/structured-symlinks/*_list_*.txt and "
                "jsfusion_val_caption_idx.pkl, videos/all/video<N>.mp4"
            ),
            splits=tuple(_MSRVTT_PROTOCOLS),
            default_split="1k-A",
            protocol=(
                "1k-A: train = all captions of the 9k train_list_jsfusion videos, test = 1k videos with one "
                "caption each (jsfusion_val_caption_idx.pkl); miech: 7k/1k, all captions; full: "
                "6,513/497/2,990, all captions. Non-default splits are written as <part>_<split>.csv"
            ),
            build=_build_msrvtt,
        ),
        Benchmark(
            name="didemo",
            title="DiDeMo",
            task="paragraph-to-video retrieval",
            download=(
                "the DiDeMo annotations (train_data.json, val_data.json, test_data.json from the "
                "LocalizingMoments release) and the DiDeMo videos"
            ),
            layout="train_data.json, val_data.json, test_data.json (or under data/), videos/<video>",
            splits=("train", "val", "test"),
            default_split=None,
            protocol="a video's moment descriptions joined, in annotation order, into one paragraph caption",
            build=_build_didemo,
        ),
        Benchmark(
            name="msvd",
            title="MSVD",
            task="text-video retrieval",
            download=(
                "the Microsoft Research Video Description Corpus: YouTubeClips.tar (the clips) and "
                "AllVideoDescriptions.txt (the captions)"
            ),
            layout=(
                "AllVideoDescriptions.txt (or annotations/AllVideoDescriptions.txt), YouTubeClips/<id>.avi; "
                "optional train_list.txt/val_list.txt/test_list.txt or youtube_mapping.txt"
            ),
            splits=("train", "val", "test"),
            default_split=None,
            protocol=(
                "1,200/100/670 videos by order (youtube_mapping.txt's vid<N> order if present, else the "
                "order of first appearance in AllVideoDescriptions.txt) unless split lists are given; all "
                "~40 captions per video"
            ),
            build=_build_msvd,
            sized=True,
        ),
        Benchmark(
            name="lsmdc",
            title="LSMDC",
            task="text-video retrieval",
            download=(
                "LSMDC 2016 (registration): LSMDC16_annos_training.csv, LSMDC16_annos_val.csv, "
                "LSMDC16_challenge_1000_publictect.csv and the clips (avi/<movie>/<clip>.avi)"
            ),
            layout="the three LSMDC16_*.csv files (or under annotations/), avi/<movie>/<clip id>.avi",
            splits=("train", "val", "test"),
            default_split=None,
            protocol="test = the 1,000-clip public test, one sentence per clip",
            build=_build_lsmdc,
        ),
        Benchmark(
            name="ucf101",
            title="UCF101",
            task="zero-shot action recognition",
            download=(
                "UCF101.rar (the videos, unpacks to UCF-101/) and "
                "UCF101TrainTestSplits-RecognitionTask.zip (unpacks to ucfTrainTestlist/)"
            ),
            layout=(
                "UCF-101/<Class>/v_<Class>_gXX_cYY.avi, ucfTrainTestlist/classInd.txt, testlist0N.txt, "
                "trainlist0N.txt"
            ),
            splits=_ACTION_SPLITS,
            default_split=None,
            protocol=_ACTION_NOTE + '; names: CamelCase split into words ("YoYo" -> "yo yo")',
            build=_build_ucf101,
        ),
        Benchmark(
            name="hmdb51",
            title="HMDB51",
            task="zero-shot action recognition",
            download=(
                "hmdb51_org.rar (one .rar per class: unpack each to hmdb51/<class>/) and "
                "test_train_splits.rar (unpacks to testTrainMulti_7030_splits/)"
            ),
            layout="hmdb51/<class>/<video>.avi, testTrainMulti_7030_splits/<class>_test_split<N>.txt",
            splits=_ACTION_SPLITS,
            default_split=None,
            protocol=_ACTION_NOTE + '; names: underscores to spaces ("brush_hair" -> "brush hair")',
            build=_build_hmdb51,
        ),
    )
}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name`` (case, '-' and '_' ignored: "MSR-VTT" is msrvtt)."""
    key = re.sub(r"[-_\s]", "", name).lower()
    if key not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key]


# --------------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True, eq=False)
class BenchmarkReport(Mapping[str, Path]):
    """What ``write_benchmark_manifests`` wrote; as a mapping it is {split name: manifest path}.

    ``missing_videos`` names, per split, the expected path of each video that was not on disk: its rows
    are not in the manifest, so a partial download is visible rather than silently smaller.
    """

    name: str
    split: str | None  # the split asked for (MSR-VTT: the protocol); None: all of them
    out_dir: Path
    manifests: dict[str, Path]
    rows: dict[str, int]
    videos: dict[str, int]
    missing_videos: dict[str, list[Path]]
    classes: Path | None = None
    missing_list: Path | None = None
    empty_captions: int = 0
    notes: tuple[str, ...] = ()

    def __getitem__(self, key: str) -> Path:
        return self.manifests[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.manifests)

    def __len__(self) -> int:
        return len(self.manifests)

    @property
    def missing_count(self) -> int:
        """Distinct missing videos over all splits (a video may belong to several)."""
        return len({p for paths in self.missing_videos.values() for p in paths})

    def summary(self, show: int = 3) -> str:
        """Human-readable report for the end of ``miles data``."""
        title = BENCHMARKS[self.name].title
        lines = [f"{title}{f' ({self.split})' if self.split else ''} -> {self.out_dir}"]
        for part, path in self.manifests.items():
            gone = len(self.missing_videos.get(part, []))
            extra = f", {_count(gone, 'video')} not found (left out)" if gone else ""
            lines.append(
                f"  {part}: {_count(self.rows[part], 'row')}, {_count(self.videos[part], 'video')}{extra} "
                f"-> {path}"
            )
        if self.classes is not None:
            n = len(self.classes.read_text(encoding="utf-8").splitlines())
            lines.append(f"  classes: {n} names -> {self.classes}")
        lines.extend(f"  note: {note}" for note in self.notes)
        if self.empty_captions:
            lines.append(f"  left out {_count(self.empty_captions, 'annotation')} with an empty caption")
        if self.missing_count:
            lines.append(
                f"missing videos: {_count(self.missing_count, 'video')} not found (their rows are not in "
                "the manifests); "
                f"all listed in {self.missing_list}"
            )
            for part, paths in self.missing_videos.items():
                if paths:
                    shown = ", ".join(str(p) for p in paths[:show])
                    more = f" and {len(paths) - show} more" if len(paths) > show else ""
                    lines.append(f"  {part}: {shown}{more}")
        else:
            lines.append("missing videos: none")
        return "\n".join(lines)


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, path)


def _manifest_text(rows: list[tuple[str, str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("video", "caption", "label"))
    writer.writerows(rows)
    return buf.getvalue()


def write_benchmark_manifests(
    name: str,
    root: Path,
    out_dir: Path,
    *,
    split: str | None = None,
    relative: bool = False,
    split_sizes: Sequence[int] | None = None,
) -> BenchmarkReport:
    """Write the manifests of benchmark ``name`` from its release unpacked in ``root`` into ``out_dir``.

    ``split`` picks one split (MSR-VTT: the protocol, default 1k-A, whose parts are all written); None
    writes every split. Video paths are absolute, or relative to ``out_dir`` with ``relative`` (the
    folder can then move with the videos). ``split_sizes`` (MSVD only) replaces the standard
    1,200/100/670 counts of the split by order. Returns the report, a mapping {split: manifest path}.
    Raises BenchmarkError for a missing or malformed annotation file, or a split none of whose videos
    is on disk (a wrong ROOT); other missing videos are left out and reported.
    """
    bench = get_benchmark(name)
    root, out_dir = Path(root).expanduser(), Path(out_dir).expanduser()
    if not root.is_dir():
        raise BenchmarkError(
            f"{bench.title}: ROOT {root} is not a folder; download {bench.download}, and unpack it so "
            f"that ROOT holds: {bench.layout}"
        )
    chosen = bench.canonical_split(split)
    if split_sizes is not None and not bench.sized:
        sized = ", ".join(b.name for b in BENCHMARKS.values() if b.sized)
        raise BenchmarkError(
            f"split_sizes applies only to data sets split by order ({sized}), not {bench.name}"
        )
    built = bench.build(bench, root, chosen, tuple(split_sizes) if split_sizes is not None else None)

    video_dir = next((d for d in built.video_dirs if d.is_dir()), built.video_dirs[0])
    finder = _VideoFinder(video_dir)
    out_abs = out_dir.absolute()
    texts: dict[str, str] = {}
    rows_n: dict[str, int] = {}
    videos_n: dict[str, int] = {}
    missing: dict[str, list[Path]] = {}
    for part, rows in built.parts.items():
        written: list[tuple[str, str, str]] = []
        seen: dict[tuple[str, ...], bool] = {}
        gone: list[Path] = []
        for row in rows:
            path = finder.find(row.video)
            if row.video not in seen:
                seen[row.video] = path is not None
                if path is None:
                    gone.append(finder.expected(row.video))
            if path is None:
                continue
            path = path.absolute()
            shown = os.path.relpath(path, out_abs) if relative else str(path)
            written.append((shown, row.caption, row.label))
        if not rows:
            raise BenchmarkError(f"{bench.title}: the {part} split has no rows in its annotation files")
        if not written:
            raise BenchmarkError(
                f"{bench.title}: none of the {len(seen)} videos of the {part} split is on disk (looked for "
                f"e.g. {gone[0] if gone else video_dir} and the other extensions "
                f"{'/'.join(VIDEO_EXTENSIONS)}); download {bench.download}, and unpack it so that ROOT "
                f"holds: {bench.layout}"
            )
        texts[part] = _manifest_text(written)
        rows_n[part] = len(written)
        videos_n[part] = sum(seen.values())
        missing[part] = gone

    out_dir.mkdir(parents=True, exist_ok=True)
    manifests: dict[str, Path] = {}
    for part, text in texts.items():
        manifests[part] = out_dir / built.files[part]
        _write_atomic(manifests[part], text)
    classes = None
    if built.classes is not None:
        classes = out_dir / CLASSES_NAME
        _write_atomic(classes, "".join(f"{c}\n" for c in built.classes))
    missing_list = out_dir / MISSING_LIST_NAME
    if any(missing.values()):
        _write_atomic(missing_list, "".join(f"{part}\t{p}\n" for part, ps in missing.items() for p in ps))
    else:
        missing_list.unlink(missing_ok=True)  # a list from an earlier run would no longer be true

    report = BenchmarkReport(
        name=bench.name,
        split=chosen,
        out_dir=out_dir,
        manifests=manifests,
        rows=rows_n,
        videos=videos_n,
        missing_videos=missing,
        classes=classes,
        missing_list=missing_list if any(missing.values()) else None,
        empty_captions=built.empty_captions,
        notes=tuple(built.notes),
    )
    if report.missing_count:
        log.warning(
            "%s: %s not found under %s; their rows are left out of the manifests (listed in %s)",
            bench.title,
            _count(report.missing_count, "video"),
            video_dir,
            missing_list,
        )
    return report
