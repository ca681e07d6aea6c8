"""Decoding the frames a clip needs with PyAV: Frozen-in-Time's frame sampling rule, seeking so a long clip
costs only the GOPs that hold the sampled frames, and a clear error naming the file for anything broken.

Every loader path that reads raw video ends here when DALI cannot decode a clip, so it never pads a short
clip with black frames and never hides a truncated file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

import av
import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from data_dali.manifest import is_image

__all__ = [
    "DECODE_MAX_THREADS",
    "SEEK_GAP_FRAMES",
    "SEEK_MIN_SKIP",
    "VideoDecodeError",
    "decode_frames",
    "decode_image",
    "decode_threads",
    "frame_to_rgb",
    "sample_frame_indices",
]

_T = TypeVar("_T")

# Seek only when that skips decoding more than this many frames: the container index dates keyframes by
# decode time, which runs a few frames ahead of display time in streams with B-frames.
SEEK_MIN_SKIP = 8
# Containers without an index (keyframes unknown): seek when the next wanted frame is further ahead than
# this; closer frames are cheaper to reach by decoding forward (about 2 GOPs of a typical encode).
SEEK_GAP_FRAMES = 32
# Frame threads of one decoder: at most this many, since each adds a frame in flight that is decoded in
# vain after the last wanted frame and at every seek (see decode_threads).
DECODE_MAX_THREADS = 4
# Containers sometimes announce a frame or two more than they hold (duration-based counts, edit lists).
# Wanted frames past the last real one, within this tolerance, take the last frame; beyond it the file
# is treated as truncated.
_COUNT_TOLERANCE = 2


class VideoDecodeError(RuntimeError):
    """A clip cannot give the frames asked for; the message names the file so it can be fixed or dropped."""


def sample_frame_indices(
    total: int,
    num: int,
    train: bool,
    rng: np.random.Generator | None = None,
    test_clip: tuple[int, int] = (0, 1),
) -> list[int]:
    """Frozen-in-Time's rule: ``num`` equal segments; random frame in each (train), middle (eval).

    With fewer frames than segments the indices repeat, still sorted, so short clips are usable.
    ``test_clip=(k, K)``: at evaluation, the k-th of K clips, at the middle of the k-th of K equal parts
    of every segment (K = 1: the middle frame), for averaging several test clips per video.
    """
    k, clips = test_clip
    if not 0 <= k < clips:
        raise ValueError(f"test clip {k} of {clips} does not exist")
    if total <= 0:
        raise ValueError(f"cannot sample frames from a clip with {total} frames")
    if num <= 0:
        raise ValueError(f"number of frames to sample must be positive, got {num}")
    bounds = np.linspace(0, total, num + 1).astype(np.int64)
    if train and rng is None:
        rng = np.random.default_rng()
    out = []
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        if hi <= lo:
            idx = lo
        elif train:
            idx = int(rng.integers(lo, hi))
        else:
            idx = lo + ((2 * k + 1) * (hi - lo) - 1) // (2 * clips)
        out.append(min(idx, total - 1))
    return out


class _SeekMissed(Exception):
    """Seeking landed after the wanted frame (bad index); decode from the start instead."""


class _NoTimestamps(Exception):
    """Frames without pts cannot be placed after a seek; count them from the start instead."""


def _frame_count(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    """Frames in the stream from metadata: the exact count if stored, else duration x frame rate."""
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        return 0
    if stream.duration and stream.time_base:
        return int(round(stream.duration * stream.time_base * rate))
    if container.duration:
        return int(round(Fraction(container.duration, av.time_base) * rate))
    return 0


def decode_threads(cores: int | None = None, workers: int | None = None, minimum: int = 2) -> int:
    """Codec threads for one decoder: the cores per decoding process (loader workers times local ranks),
    but at least ``minimum`` and at most ``DECODE_MAX_THREADS``.

    At least 2: frame threads cost some CPU (7 % more per epoch of the data-loading benchmark, measured
    on 2 cores), but they let a worker whose batch holds the long clips use a core that another worker
    has finished with. Without loader workers (``workers`` 1) the decoder has the machine to itself.
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers is None:
        info = get_worker_info()
        ranks = os.environ.get("LOCAL_WORLD_SIZE", "1")  # set by torchrun
        workers = (info.num_workers if info is not None else 1) * (int(ranks) if ranks.isdigit() else 1)
    return max(minimum, min(DECODE_MAX_THREADS, cores // max(1, workers)))


def frame_to_rgb(frame: av.VideoFrame, width: int | None = None, height: int | None = None) -> np.ndarray:
    """uint8 [H, W, 3] in one swscale call: colour conversion and, given a size, a bilinear resize
    (antialiased: swscale widens the filter when shrinking). A view of the converted frame, not a copy.

    One thread, because every caller already runs one decoder per core (loader workers, prepare's pool).
    The reference loader and ``miles prepare`` both convert here, so their colours agree.
    """
    rgb = frame.reformat(width=width, height=height, format="rgb24", interpolation="BILINEAR", threads=1)
    return rgb.to_ndarray()


def _decode_seeking(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    wanted: list[int],
    total: int,
) -> tuple[dict[int, av.VideoFrame], int, av.VideoFrame | None]:
    """Decode the sorted, distinct ``wanted`` indices of a ``total``-frame stream.

    Two savings, neither of which changes a decoded pixel: a seek when the container index has a
    keyframe between the frames already decoded and the next wanted one (never otherwise: a stream with
    few keyframes is decoded forward once, not again from its keyframe for every wanted frame), and the
    decoder drops the non-reference frames (most B-frames) that no wanted index needs. Returns the
    frames found, the index of the last decoded frame and that frame (for the header tolerance at the
    end of the file).
    """
    rate = stream.average_rate or stream.guessed_rate
    time_base = stream.time_base
    if not rate or not time_base:
        raise _NoTimestamps
    start = stream.start_time or 0
    frames_per_tick = Fraction(time_base * rate)
    num, den = frames_per_tick.numerator, frames_per_tick.denominator
    entries = stream.index_entries
    n_entries = len(entries)

    def index_at(pts: int) -> int:
        """round((pts - start) * frames_per_tick), half to even as round() does, in integers (per packet)."""
        q, r = divmod((pts - start) * num, den)
        return q + (2 * r > den or (2 * r == den and q % 2 == 1))

    def pts_of(index: int) -> int:
        return start + int(Fraction(index) / frames_per_tick)

    def worth_seeking(target: int, decoded: int) -> bool:
        """Whether a keyframe lies in (decoded + SEEK_MIN_SKIP, target], by bisecting the index."""
        if not n_entries:
            return target - decoded > SEEK_GAP_FRAMES
        floor = decoded + SEEK_MIN_SKIP
        if target <= floor:
            return False
        lo, hi = 0, n_entries
        while lo < hi:
            mid = (lo + hi) // 2
            if index_at(entries[mid].timestamp) <= target:
                lo = mid + 1
            else:
                hi = mid
        for i in range(lo - 1, -1, -1):  # back to the keyframe, or to the frames already decoded
            entry = entries[i]
            if index_at(entry.timestamp) <= floor:
                return False
            if entry.is_keyframe:
                return True
        return False

    codec = stream.codec_context
    # From here on frames may have to stand in for ones the header overcounts: never dropped.
    tail = total - 1 - _COUNT_TOLERANCE
    pos = 0
    dropping = False

    def decoded_frames(packets: Iterator[av.Packet]) -> Iterator[av.VideoFrame]:
        nonlocal dropping
        for packet in packets:
            # Packets without pts (the final flush) are always decoded. A packet at or after the next
            # wanted index may be the frame that fills it (a timestamp gap gives the next frame).
            drop = packet.pts is not None and index_at(packet.pts) < min(wanted[pos], tail)
            if drop != dropping:
                codec.skip_frame = "NONREF" if drop else "DEFAULT"
                dropping = drop
            yield from packet.decode()

    got: dict[int, av.VideoFrame] = {}
    frames: Iterator[av.VideoFrame] | None = None
    last_idx, last_frame = -1, None
    new_target, just_seeked = True, False
    try:
        while pos < len(wanted):
            target = wanted[pos]
            if new_target and worth_seeking(target, last_idx):
                container.seek(pts_of(target), backward=True, any_frame=False, stream=stream)
                frames, just_seeked = decoded_frames(container.demux(stream)), True
            elif frames is None:
                frames = decoded_frames(container.demux(stream))
            new_target = False
            frame = next(frames, None)
            if frame is None:
                break
            if frame.pts is None:
                raise _NoTimestamps
            idx = index_at(frame.pts)
            if just_seeked and idx > target:
                raise _SeekMissed
            just_seeked = False
            last_idx, last_frame = idx, frame
            if idx < target:
                continue
            # A gap in timestamps (variable frame rate) gives the next frame that exists.
            while pos < len(wanted) and wanted[pos] <= idx:
                got[wanted[pos]] = frame
                pos += 1
            new_target = True
    finally:
        codec.skip_frame = "DEFAULT"
    return got, last_idx, last_frame


def _decode_sequential(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    wanted: list[int] | None,
) -> tuple[dict[int, av.VideoFrame], int, av.VideoFrame | None]:
    """Decode from the start counting frames: for streams without usable timestamps or index.

    With ``wanted=None`` every frame is kept (the frame count is unknown until the end).
    """
    container.seek(0)
    wanted_set = None if wanted is None else set(wanted)
    last_wanted = None if wanted is None else max(wanted)
    got: dict[int, av.VideoFrame] = {}
    idx, last_frame = -1, None
    for idx, frame in enumerate(container.decode(stream)):
        last_frame = frame
        if wanted_set is None or idx in wanted_set:
            got[idx] = frame
        if last_wanted is not None and idx >= last_wanted:
            break
    return got, idx, last_frame


def decode_image(path: Path) -> torch.Tensor:
    """Images enter the video pipeline as one-frame clips, uint8 [1, H, W, 3].

    PIL rather than torchvision.io: the latter's image codecs are deprecated since torchvision 0.29,
    and PIL covers every format in IMAGE_EXTENSIONS.
    """
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises many unrelated types for a bad file
        raise VideoDecodeError(f"cannot decode image {path}: {e}") from e
    return torch.from_numpy(rgb.copy()).unsqueeze(0)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoDecodeError(f"{path} does not exist")
    if not path.is_file():
        raise VideoDecodeError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"{path} is empty (0 bytes)")


def _ffmpeg_logging_off_the_gil() -> None:
    """FFmpeg's own log callback, not PyAV's Python one, while we decode with frame threads.

    PyAV's callback (installed by any ``av.logging.set_level(level)``, as ``import torchvision.io`` does
    in torchvision 0.25) takes the GIL in FFmpeg's decoding threads. Closing a decoder joins those threads
    while holding the GIL, so a frame thread that logs at that moment (H.264 does when a clip is left
    mid-stream) waits forever: measured, the first of 400 demo clips hung with torch 2.10 +
    torchvision 0.25. FFmpeg's callback writes to stderr without Python, as PyAV does by default.
    """
    if av.logging.get_level() is not None:
        av.logging.set_level(None)


def _decode_video(
    path: Path,
    num: int,
    train: bool,
    rng: np.random.Generator | None,
    test_clip: tuple[int, int],
    convert: Callable[[list[np.ndarray]], _T],
) -> _T:
    """The ``num`` frames of :func:`sample_frame_indices` as RGB arrays (one per distinct frame, repeats
    share it), handed to ``convert`` while the file is open, so any failure names the file."""
    _check_file(path)
    _ffmpeg_logging_off_the_gil()
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            stream.thread_count = decode_threads()
            total = _frame_count(container, stream)
            if total <= 0:
                # No usable count: decode everything once and sample from what is there.
                got, last_idx, _ = _decode_sequential(container, stream, None)
                total = last_idx + 1
                if total <= 0:
                    raise VideoDecodeError(f"{path} has no decodable video frames")
                targets = sample_frame_indices(total, num, train, rng, test_clip)
            else:
                targets = sample_frame_indices(total, num, train, rng, test_clip)
                wanted = sorted(set(targets))
                try:
                    got, last_idx, last_frame = _decode_seeking(container, stream, wanted, total)
                except (_SeekMissed, _NoTimestamps):
                    got, last_idx, last_frame = _decode_sequential(container, stream, wanted)
                missing = [t for t in wanted if t not in got]
                if missing:
                    if last_frame is None or last_idx < total - 1 - _COUNT_TOLERANCE:
                        raise VideoDecodeError(
                            f"{path} has fewer decodable frames than its header says: frame {missing[0]} "
                            f"of {total} needed, decoding stopped after frame {max(last_idx, 0)} "
                            "(truncated or corrupt file)"
                        )
                    # The header overcounted by a frame or two; the last real frame stands in.
                    for t in missing:
                        got[t] = last_frame
            sizes = sorted({(got[t].height, got[t].width) for t in targets})
            if len(sizes) != 1:
                raise VideoDecodeError(f"{path} changes frame size mid-stream ({sizes})")
            rgb: dict[int, np.ndarray] = {}
            for t in targets:
                if id(got[t]) not in rgb:
                    rgb[id(got[t])] = frame_to_rgb(got[t])
            return convert([rgb[id(got[t])] for t in targets])
    except VideoDecodeError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, StopIteration, IndexError, KeyError) as e:
        raise VideoDecodeError(f"cannot decode {path}: {e}") from e


def _stack(frames: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(frames))


def decode_frames(
    path: Path,
    num: int,
    train: bool,
    rng: np.random.Generator | None = None,
    test_clip: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """Decode ``num`` frames chosen by :func:`sample_frame_indices` as uint8 [F, H, W, 3].

    Images give one frame [1, H, W, 3]. Any failure raises :class:`VideoDecodeError` naming the file;
    this never pads with black or repeated frames to hide a broken clip.
    """
    path = Path(path)
    if is_image(path):
        return decode_image(path)
    return _decode_video(path, num, train, rng, test_clip, _stack)
