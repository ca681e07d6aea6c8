"""`miles prepare`: videos decoded once, resampled to a fixed rate, stored as JPEG frames in tar files.

Decoding H.264 on the CPU is what starves a GPU trainer; JPEG frames decode on the GPU (nvJPEG through
DALI) or quickly on the CPU. The folder this writes is described, and read, by :mod:`data_dali.shards`.
Output bytes depend only on the inputs and parameters, never on the worker count or on a resume.
SIGTERM, SIGUSR1 or SIGINT stop a run after the clip at hand: committed shards stay, the partial one is
dropped, the workers are killed and ``StopRequested`` says how far it got (a rerun resumes). Workers
ignore Ctrl-C and SIGUSR1 (the parent decides) and die with the parent however it ends, SIGKILL included.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import signal
import tarfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
from PIL import Image
from tqdm import tqdm

from data_dali.lifetime import STOP_SIGNALS, GracefulStop, StopRequested, die_with_parent
from data_dali.manifest import DEFAULT_LABEL_COLUMN, ManifestEntry, is_image, read_manifest
from data_dali.shards import (
    FORMAT_VERSION,
    INDEX_NAME,
    PARAMS_NAME,
    SHARD_DIR,
    SKIPPED_NAME,
    ShardError,
    _read_jsonl_prefix,
    file_sha256,
)
from data_dali.video_decode import (
    _COUNT_TOLERANCE,
    VideoDecodeError,
    _check_file,
    _frame_count,
    decode_threads,
    frame_to_rgb,
)

__all__ = [
    "PrepareReport",
    "SourceClip",
    "group_entries",
    "prepare_shards",
    "resize_short_side",
]

# Keys are the clip's manifest position: dot-free (WebDataset splits key and extension at the first
# dot), sortable, and stable across resumes because the manifest's hash is pinned in prepare.json.
_KEY_DIGITS = 9


@dataclass(frozen=True)
class SourceClip:
    """One distinct video (or image) of the manifest with all captions that rows give it."""

    position: int
    source: Path
    captions: tuple[str, ...]
    label: str | None


def group_entries(entries: Sequence[ManifestEntry]) -> list[SourceClip]:
    """Rows naming the same file become one clip with several captions, in first-appearance order.

    This is the grouping ``miles eval`` uses (one video, many captions), so a prepared shard folder and
    the manifest it came from describe the same clips. The label is the first row's.
    """
    order: dict[Path, int] = {}
    captions: list[list[str]] = []
    labels: list[str | None] = []
    sources: list[Path] = []
    for entry in entries:
        if entry.video not in order:
            order[entry.video] = len(sources)
            sources.append(entry.video)
            captions.append([])
            labels.append(entry.label)
        captions[order[entry.video]].append(entry.caption)
    return [
        SourceClip(position=i, source=s, captions=tuple(c), label=lab)
        for i, (s, c, lab) in enumerate(zip(sources, captions, labels, strict=True))
    ]


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Short side to ``size`` keeping aspect (long side floored, as torchvision's resize does).

    Never upscales: a frame whose short side is already <= ``size`` is stored as it is, because
    upscaling adds bytes but no information and the training crop resizes anyway. PIL's bilinear
    filter widens its support when shrinking, i.e. it antialiases like torchvision's ``antialias=True``.
    """
    new_w, new_h = _short_side_size(*image.size, size)
    if (new_w, new_h) == image.size:
        return image
    return image.resize((new_w, new_h), Image.Resampling.BILINEAR)


def _short_side_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) of :func:`resize_short_side`'s result."""
    short, long = min(w, h), max(w, h)
    if short <= size:
        return w, h
    new_long = max(1, int(size * long / short))
    return (size, new_long) if w <= h else (new_long, size)


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    # 4:2:0 chroma: the sources are yuv420p video, so full-resolution chroma would store nothing real.
    image.save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False)
    return buf.getvalue()


@dataclass
class _Decoded:
    """What a worker sends back: JPEG bytes per stored frame, or the reason the clip was skipped."""

    position: int
    jpegs: list[bytes] = field(default_factory=list)
    height: int = 0
    width: int = 0
    error: str | None = None


def _tick_frames(path: Path, fps: float, max_frames: int, threads: int = 0) -> Iterator[av.VideoFrame]:
    """Decode the stream once and yield, per 1/fps tick, the frame nearest it (streaming, so a long
    clip never holds more than two decoded frames).

    Frames are compared by presentation time; streams without timestamps fall back to frame count /
    frame rate. A frame nearest to several ticks (source rate below ``fps``) is yielded once per tick.
    Stops as soon as ``max_frames`` ticks are filled. ``threads`` are the codec's threads (0: FFmpeg
    picks); the decoded pixels are the same for any count.
    """
    with av.open(str(path), mode="r") as container:
        if not container.streams.video:
            raise VideoDecodeError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.thread_count = threads
        header_count = _frame_count(container, stream)
        rate = stream.average_rate or stream.guessed_rate
        step = float(1 / rate) if rate else 1.0 / fps
        prev: av.VideoFrame | None = None
        prev_t = t0 = 0.0
        decoded = 0
        k = 0  # next tick to fill
        for frame in container.decode(stream):
            t = frame.time if frame.time is not None else decoded * step
            if prev is None:
                t0 = t
            else:
                t = max(t, prev_t)  # a backwards timestamp must not reorder ticks
                # Every tick up to the midpoint is nearer the previous frame (ties: the earlier one).
                mid = (prev_t + t) / 2
                while k < max_frames and t0 + k / fps <= mid + 1e-9:
                    yield prev
                    k += 1
            decoded += 1
            prev, prev_t = frame, t
            if k >= max_frames:
                return
        if prev is None:
            raise VideoDecodeError(f"{path} has no decodable video frames")
        if header_count and decoded < header_count - _COUNT_TOLERANCE:
            raise VideoDecodeError(
                f"{path} has fewer decodable frames than its header says: {decoded} of {header_count} "
                "(truncated or corrupt file)"
            )
        last_duration = getattr(prev, "duration", None)
        duration = float(last_duration * prev.time_base) if last_duration and prev.time_base else step
        end = prev_t + duration
        while k < max_frames and (k == 0 or t0 + k / fps < end - 1e-6):
            yield prev
            k += 1


def _decode_clip(job: tuple[int, str, float, int, int, int, int]) -> _Decoded:
    """Worker entry point: one clip -> resized JPEG frames, or an error message (never raises)."""
    position, source, fps, size, quality, max_frames, threads = job
    path = Path(source)
    result = _Decoded(position=position)
    sizes: set[tuple[int, int]] = set()

    def add(image: Image.Image) -> bytes:
        sizes.add(image.size)
        small = resize_short_side(image, size)
        result.width, result.height = small.size
        return _encode_jpeg(small, quality)

    def add_frame(frame: av.VideoFrame) -> bytes:
        # One swscale call converts and shrinks, as the reference loader converts (frame_to_rgb): a
        # full-size RGB image resized by PIL took half of the time of a 720p clip.
        sizes.add((frame.width, frame.height))
        small = Image.fromarray(frame_to_rgb(frame, *_short_side_size(frame.width, frame.height, size)))
        result.width, result.height = small.size
        return _encode_jpeg(small, quality)

    try:
        _check_file(path)
        if is_image(path):
            try:
                with Image.open(path) as im:
                    rgb = im.convert("RGB")
            except Exception as e:  # PIL raises many unrelated types for a bad file
                raise VideoDecodeError(f"cannot decode image {path}: {e}") from e
            result.jpegs.append(add(rgb))
        else:
            last, last_jpeg = None, b""
            try:
                for frame in _tick_frames(path, fps, max_frames, threads):
                    if frame is not last:  # a repeated frame is encoded once
                        last, last_jpeg = frame, add_frame(frame)
                    result.jpegs.append(last_jpeg)
            except VideoDecodeError:
                raise
            except (av.error.FFmpegError, OSError, ValueError, IndexError, KeyError) as e:
                raise VideoDecodeError(f"cannot decode {path}: {e}") from e
        if len(sizes) != 1:
            raise VideoDecodeError(f"{path} changes frame size mid-stream ({sorted(sizes)})")
        return result
    except VideoDecodeError as e:
        return _Decoded(position=position, error=str(e))
    except Exception as e:  # a worker must never take the whole run down for one file
        return _Decoded(position=position, error=f"cannot decode {path}: {type(e).__name__}: {e}")


# ----------------------------------------------------------------------------------------------------
# The decoding pool: workers that die with the parent, and a shutdown that does not wait for them
# ----------------------------------------------------------------------------------------------------

# How often the parent, waiting for a clip, looks whether a stop was asked for; and how often a worker
# without prctl looks whether its parent is still there.
_STOP_POLL_S = 0.2
_PARENT_POLL_S = 1.0
# A worker killed by the same signal as the parent (SIGTERM to the process group) can break the pool an
# instant before the parent's handler has run; this long the parent waits to tell the two apart.
_BROKEN_GRACE_S = 0.5
# How long a stop waits for the killed workers to be reaped, then for the pool's manager thread to end.
_REAP_S = 10.0
_MANAGER_S = 2.0


def _parent_gone(parent_pid: int, direct: bool) -> bool:
    if direct:  # an orphan is re-parented (to init or a subreaper) at once
        return os.getppid() != parent_pid
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _watch_parent(parent_pid: int, direct: bool) -> None:
    while not _parent_gone(parent_pid, direct):
        time.sleep(_PARENT_POLL_S)
    os._exit(1)


def _worker_init(parent_pid: int, start_method: str) -> None:
    """Pool initializer: the worker leaves stopping to the parent, and never outlives it.

    Ctrl-C reaches the whole process group and SLURM's SIGUSR1 every process of the step; the parent
    decides what they mean, so workers ignore both (no KeyboardInterrupt tracebacks from them). SIGTERM
    keeps its default action: the pool itself terminates broken workers with it. With the fork start
    method the parent's Python handlers were inherited, hence the explicit SIG_DFL; the parent blocked
    these signals around the fork, so none is lost or handled by the wrong handler in between.

    Whatever ends the parent (SIGKILL and the OOM killer included), the kernel then SIGKILLs the worker
    (PR_SET_PDEATHSIG); without it, a worker would sit forever on the inherited queue pipes.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    # fork and spawn make the worker a child of the parent; forkserver a child of the server (which exits
    # with the parent, so its death signal still reaches the worker, but getppid() is no test there).
    direct = start_method in ("fork", "spawn")
    if die_with_parent() and direct:
        if _parent_gone(parent_pid, direct):  # died before prctl: no signal will come
            os._exit(1)
        return
    if _parent_gone(parent_pid, direct):
        os._exit(1)
    watcher = threading.Thread(target=_watch_parent, args=(parent_pid, direct), daemon=True)
    watcher.start()


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Block the stop signals in this thread while it forks workers (they unblock in _worker_init).

    Signals that arrive meanwhile stay pending and reach the parent's handler when the block ends.
    Threads started inside (the pool's manager) keep them blocked, so they go to the main thread.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _kill_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel the clips not started and SIGKILL the workers, without waiting for in-flight decodes.

    ``shutdown(cancel_futures=True)`` alone would still wait for every clip a worker has taken (a long
    video can take minutes). Python 3.11 has no public way to end workers (3.14 adds ``kill_workers``),
    hence the executor's private ``_processes``, read defensively. Only the pool's manager thread
    cancels futures: one cancelled from here while it marks them broken would raise InvalidStateError
    in that thread (CPython 3.11).
    """
    procs = list((getattr(pool, "_processes", None) or {}).values())
    manager = getattr(pool, "_executor_manager_thread", None)
    result_queue = getattr(pool, "_result_queue", None)
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.kill()
    for p in procs:
        p.join(timeout=_REAP_S)
    if manager is not None:
        manager.join(timeout=_MANAGER_S)
        writer = getattr(result_queue, "_writer", None)
        if manager.is_alive() and writer is not None:
            # A worker killed while sending a result leaves half a message, and the parent's own copy of
            # the pipe's write end keeps the pool's reader waiting for the rest: close it, so the reader
            # sees end of file, marks the pool broken and ends (the interpreter joins it at exit).
            with contextlib.suppress(OSError):
                writer.close()
            manager.join(timeout=_MANAGER_S)


def _decoded_in_order(
    jobs: list[tuple[int, str, float, int, int, int, int]],
    workers: int,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[_Decoded]:
    """Results in job order, with a bounded window of work in flight so memory stays flat.

    With a pool, the wait for the next clip ends as soon as ``should_stop()`` is true: the generator
    then returns early (fewer results than jobs). Leaving early in any way (a stop, an error, ``close``)
    cancels the rest and kills the workers instead of waiting for the clips they are decoding.
    """
    stop_asked = should_stop or (lambda: False)
    if workers <= 1:
        for job in jobs:
            yield _decode_clip(job)
        return
    window = workers * 4
    ctx = multiprocessing.get_context()
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=ctx,
        initializer=_worker_init,
        initargs=(os.getpid(), ctx.get_start_method()),
    )
    finished = False
    pending: deque[Future] = deque()
    try:
        it = iter(jobs)
        with _signals_blocked():  # the workers are forked (or spawned) by these first submits
            for job in it:
                pending.append(pool.submit(_decode_clip, job))
                if len(pending) >= window:
                    break
        while pending:
            head = pending[0]
            while not wait([head], timeout=_STOP_POLL_S).done:
                if stop_asked():
                    return
            try:
                result = head.result()
            except BrokenProcessPool:
                if should_stop is None:
                    raise
                deadline = time.monotonic() + _BROKEN_GRACE_S
                while time.monotonic() < deadline and not stop_asked():
                    time.sleep(0.05)
                if stop_asked():
                    return
                raise
            pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(_decode_clip, nxt))
            # After the last result the workers are idle: a consumer that closes us there (it need not
            # ask for the end) gets the orderly shutdown.
            finished = not pending
            yield result
    finally:
        if finished:
            pool.shutdown(wait=True)
        else:  # the consumer stopped early: do not decode what nobody will write
            _kill_pool(pool)


# ----------------------------------------------------------------------------------------------------
# Writing shards (main process)
# ----------------------------------------------------------------------------------------------------


@dataclass
class PrepareReport:
    """What ``prepare_shards`` left in the folder (totals include clips written by earlier runs)."""

    clips: int
    frames: int
    bytes: int
    skipped: list[tuple[str, str]]
    shards: list[Path]
    seconds: float
    out_dir: Path | None = None
    resumed_clips: int = 0

    def summary(self, show: int = 5) -> str:
        """Human-readable report for the end of ``miles prepare``."""
        rate = (self.clips - self.resumed_clips) / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"wrote {self.clips} clips, {self.frames} frames, {self.bytes / 2**20:.1f} MiB "
            f"in {len(self.shards)} shards ({self.seconds:.1f} s, {rate:.1f} clips/s)"
        ]
        if self.resumed_clips:
            lines.append(f"resumed: {self.resumed_clips} clips were already in complete shards")
        if self.out_dir is not None:
            lines.append(f"index: {self.out_dir / INDEX_NAME}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} clips that could not be decoded:")
            lines.extend(f"  {src}: {err}" for src, err in self.skipped[:show])
            if len(self.skipped) > show:
                lines.append(f"  ... and {len(self.skipped) - show} more")
            if self.out_dir is not None:
                lines.append(f"all skipped clips are listed in {self.out_dir / SKIPPED_NAME}")
        else:
            lines.append("skipped 0 clips")
        return "\n".join(lines)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _append_lines(path: Path, lines: list[str]) -> None:
    if not lines:
        return
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


# Parameters added after format 1 was released, with the value that folders prepared before had.
_PARAM_DEFAULTS = {"label_column": DEFAULT_LABEL_COLUMN}


def _check_params(out_dir: Path, params: dict[str, Any]) -> None:
    """Pin the parameters on the first run; refuse a rerun that would mix two kinds of shards."""
    path = out_dir / PARAMS_NAME
    if not path.exists():
        _write_atomic(path, json.dumps(params, indent=2, sort_keys=True) + "\n")
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path} is corrupt ({e}); delete {out_dir} and run `miles prepare` again") from e
    old = {**_PARAM_DEFAULTS, **old}
    for key in sorted(set(old) | set(params)):
        if old.get(key) != params.get(key):
            raise ShardError(
                f"{out_dir} was prepared with {key}={old.get(key)!r}, this run asks for "
                f"{key}={params.get(key)!r}; rerun with the same parameters to resume, or choose a new "
                f"output folder (or delete {out_dir})"
            )


def _key(position: int) -> str:
    return f"{position:0{_KEY_DIGITS}d}"


def _shard_name(n: int) -> str:
    return f"{SHARD_DIR}/shard-{n:06d}.tar"


def _json_members(path: Path) -> int:
    with tarfile.open(path, "r") as tar:
        return sum(1 for m in tar if m.name.endswith(".json"))


def _recover(out_dir: Path) -> tuple[list[dict], list[dict]]:
    """Committed index and skipped records of an earlier run; everything after them is removed.

    A shard counts only when its tar exists and every one of its clips is in the index (the index lines
    of a shard are appended after its rename, so a crash between the two leaves a tar to redo).
    """
    index = _read_jsonl_prefix(out_dir / INDEX_NAME)
    by_shard: dict[str, int] = {}
    for rec in index:
        by_shard[rec["shard"]] = by_shard.get(rec["shard"], 0) + 1
    good: set[str] = set()
    for n in range(len(by_shard)):
        name = _shard_name(n)
        tar_path = out_dir / name
        if name not in by_shard or not tar_path.is_file():
            break
        if n == len(by_shard) - 1 and _json_members(tar_path) != by_shard[name]:
            break  # only the last shard can have been cut short
        good.add(name)
    index = [rec for rec in index if rec["shard"] in good]
    done_until = int(index[-1]["key"]) + 1 if index else 0
    skipped = [rec for rec in _read_jsonl_prefix(out_dir / SKIPPED_NAME) if rec["position"] < done_until]
    # Rewrite both files to exactly the committed records, and drop shards that were not committed.
    _write_atomic(out_dir / INDEX_NAME, "".join(json.dumps(r) + "\n" for r in index))
    _write_atomic(out_dir / SKIPPED_NAME, "".join(json.dumps(r) + "\n" for r in skipped))
    for path in sorted((out_dir / SHARD_DIR).glob("shard-*")):
        if f"{SHARD_DIR}/{path.name}" not in good:
            path.unlink()
    return index, skipped


class _ShardWriter:
    """Fills one ``.tar.tmp`` at a time; a full shard is renamed, then its index lines are appended."""

    def __init__(self, out_dir: Path, clips_per_shard: int, first_shard: int, fps: float) -> None:
        self.out_dir = out_dir
        self.clips_per_shard = clips_per_shard
        self.fps = fps
        self.next_shard = first_shard
        self.tar: tarfile.TarFile | None = None
        self.tmp: Path | None = None
        self.name = ""
        self.index_lines: list[str] = []
        self.skipped_lines: list[str] = []
        self.written: list[Path] = []

    def _add(self, name: str, data: bytes) -> int:
        assert self.tar is not None
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0  # fixed metadata: same inputs give the same bytes
        self.tar.addfile(info, io.BytesIO(data))
        # After addfile the tar offset sits past the data's 512-byte padding.
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        return self.tar.offset - padded

    def add_clip(self, clip: SourceClip, decoded: _Decoded) -> None:
        if self.tar is None:
            self.name = _shard_name(self.next_shard)
            self.tmp = self.out_dir / (self.name + ".tmp")
            self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        key = _key(clip.position)
        frames = []
        for i, jpeg in enumerate(decoded.jpegs):
            frames.append([self._add(f"{key}.{i:04d}.jpg", jpeg), len(jpeg)])
        meta = {
            "captions": list(clip.captions),
            "source": str(clip.source),
            "label": clip.label,
            "fps": self.fps,
            "frames": len(frames),
            "height": decoded.height,
            "width": decoded.width,
        }
        self._add(f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
        record = {
            "key": key,
            "shard": self.name,
            "source": str(clip.source),
            "captions": list(clip.captions),
            "label": clip.label,
            "frames": frames,
            "height": decoded.height,
            "width": decoded.width,
            "fps": self.fps,
        }
        self.index_lines.append(json.dumps(record))
        if len(self.index_lines) >= self.clips_per_shard:
            self.commit()

    def add_skipped(self, clip: SourceClip, error: str) -> None:
        self.skipped_lines.append(
            json.dumps({"source": str(clip.source), "error": error, "position": clip.position})
        )

    def commit(self) -> None:
        """Close and rename the open shard, then record its clips (and the skips seen while filling it)."""
        if self.tar is not None:
            assert self.tmp is not None
            self.tar.close()
            with self.tmp.open("rb+") as f:
                os.fsync(f.fileno())
            final = self.out_dir / self.name
            os.replace(self.tmp, final)
            _fsync_dir(final.parent)
            self.written.append(final)
            self.tar, self.tmp = None, None
            self.next_shard += 1
        _append_lines(self.out_dir / SKIPPED_NAME, self.skipped_lines)
        _append_lines(self.out_dir / INDEX_NAME, self.index_lines)
        self.index_lines, self.skipped_lines = [], []

    def abort(self) -> int:
        """Discard the open shard (its clips were never indexed; a rerun decodes them again).

        Returns how many clips (written or skipped) it held.
        """
        dropped = len(self.index_lines) + len(self.skipped_lines)
        if self.tar is not None:
            with contextlib.suppress(OSError):  # it is thrown away; do not mask the error that got us here
                self.tar.close()
            self.tar = None
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                self.tmp.unlink(missing_ok=True)
            self.tmp = None
        self.index_lines, self.skipped_lines = [], []
        return dropped


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _stop_message(signum: int, out_dir: Path, total: int, dropped: int) -> str:
    """One line for the CLI: what a stopped ``miles prepare`` kept, and how to go on."""
    index = _read_jsonl_prefix(out_dir / INDEX_NAME)
    skipped = _read_jsonl_prefix(out_dir / SKIPPED_NAME)
    done = int(index[-1]["key"]) + 1 if index else 0
    kept = f"{_count(len(index), 'clip')} in {_count(len({r['shard'] for r in index}), 'complete shard')}"
    if skipped:
        kept += f", {len(skipped)} skipped"
    partial = f"; the unfinished shard ({_count(dropped, 'clip')}) was discarded" if dropped else ""
    return (
        f"prepare stopped by {signal.Signals(signum).name}: {done} of {total} clips done in {out_dir} "
        f"({kept}){partial}; run the same command again to resume from there"
    )


def prepare_shards(
    manifest: str | Path,
    out_dir: str | Path,
    *,
    fps: float = 4.0,
    size: int = 256,
    quality: int = 90,
    workers: int | None = None,
    clips_per_shard: int = 1000,
    max_frames: int = 512,
    video_column: str = "video",
    caption_column: str = "caption",
    label_column: str = DEFAULT_LABEL_COLUMN,
    progress: bool = True,
    stop_after_shards: int | None = None,
) -> PrepareReport:
    """Decode every manifest clip once into JPEG frame shards (resuming an interrupted run).

    Each video keeps the frame nearest every ``1/fps`` tick from its start, at most ``max_frames`` of
    them (longer videos keep their first ``max_frames / fps`` seconds); images become one-frame clips.
    Frames are shrunk so the short side is ``size`` (never enlarged) and stored as JPEG ``quality``.
    Files that cannot be decoded are listed in skipped.jsonl and the report, never written as frames.
    Labels (zero-shot classes) come from ``label_column`` and are stored per clip in the index.
    ``stop_after_shards`` ends the run after that many shards have been committed by this call, as an
    interruption would (for tests and for preparing a large manifest in several sittings).
    """
    start = time.perf_counter()
    manifest = Path(manifest)
    out_dir = Path(out_dir)
    if fps <= 0:
        raise ShardError(f"--fps must be positive, got {fps}")
    if size <= 0:
        raise ShardError(f"--size must be positive, got {size}")
    if not 1 <= quality <= 100:
        raise ShardError(f"--quality must be in 1..100, got {quality}")
    if clips_per_shard <= 0 or max_frames <= 0:
        raise ShardError(
            f"--clips-per-shard and --max-frames must be positive, got {clips_per_shard}, {max_frames}"
        )
    entries = read_manifest(
        manifest,
        video_column=video_column,
        caption_column=caption_column,
        label_column=label_column,
        require_label_column=label_column != DEFAULT_LABEL_COLUMN,  # named on purpose: a typo must not pass
    )
    clips = group_entries(entries)
    params = {
        "format_version": FORMAT_VERSION,
        "fps": float(fps),
        "size": int(size),
        "quality": int(quality),
        "max_frames": int(max_frames),
        "clips_per_shard": int(clips_per_shard),
        "manifest": str(manifest.absolute()),
        "manifest_sha256": file_sha256(manifest),
        "video_column": video_column,
        "caption_column": caption_column,
        "label_column": label_column,
    }
    if out_dir.exists() and not out_dir.is_dir():
        raise ShardError(f"output {out_dir} exists and is not a folder; choose another output folder")
    # SIGTERM / SIGUSR1 / SIGINT from here on: finish the clip at hand, keep the committed shards, drop
    # the partial one, end the workers and raise StopRequested (a rerun of the same command resumes).
    with GracefulStop() as stop:
        (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        _check_params(out_dir, params)
        index, skipped_recs = _recover(out_dir)
        done_until = int(index[-1]["key"]) + 1 if index else 0
        todo = clips[done_until:]
        writer = _ShardWriter(out_dir, clips_per_shard, len({r["shard"] for r in index}), float(fps))
        workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        # Cores are shared out between the worker processes. Unlike a loader's workers these decode
        # without pause, so there is no idle core to borrow: one thread each when they fill the cores.
        threads = decode_threads(os.cpu_count() or 1, workers, minimum=1)
        jobs = [
            (c.position, str(c.source), float(fps), int(size), int(quality), int(max_frames), threads)
            for c in todo
        ]
        desc = f"preparing {out_dir}"
        bar = tqdm(total=len(clips), initial=done_until, desc=desc, unit="clip", disable=not progress)
        resumed = len(index)
        results = _decoded_in_order(jobs, workers, lambda: stop.requested)
        stopped = interrupted = False
        dropped = 0
        try:
            for clip in todo:
                decoded = None if stop.requested else next(results, None)
                if decoded is None:
                    if not stop.requested:
                        raise RuntimeError(f"decoding {manifest} ended before clip {clip.position}")
                    interrupted = True
                    break
                if decoded.error is not None:
                    writer.add_skipped(clip, decoded.error)
                else:
                    writer.add_clip(clip, decoded)
                bar.update()
                if stop_after_shards is not None and len(writer.written) >= stop_after_shards:
                    stopped = True
                    break
            if not (stopped or interrupted):
                writer.commit()
        finally:
            results.close()
            dropped = writer.abort()
            bar.close()
        signum = stop.signum
    if interrupted:
        assert signum is not None
        raise StopRequested(signum, _stop_message(signum, out_dir, len(clips), dropped))
    index = _read_jsonl_prefix(out_dir / INDEX_NAME)
    skipped_recs = _read_jsonl_prefix(out_dir / SKIPPED_NAME)
    shards = sorted((out_dir / SHARD_DIR).glob("shard-*.tar"))
    return PrepareReport(
        clips=len(index),
        frames=sum(len(r["frames"]) for r in index),
        bytes=sum(p.stat().st_size for p in shards),
        skipped=[(r["source"], r["error"]) for r in skipped_recs],
        shards=shards,
        seconds=time.perf_counter() - start,
        out_dir=out_dir,
        resumed_clips=resumed,
    )


# ----------------------------------------------------------------------------------------------------
# Reading shards (data loaders)
# ----------------------------------------------------------------------------------------------------
