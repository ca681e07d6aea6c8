"""The PyAV + torch DataLoader reference loader.

This is the plain CPU path that every fast loader (DALI on GPU/CPU, frame shards) is tested and
benchmarked against, and the loader that runs wherever DALI cannot. It follows Frozen-in-Time's frame
sampling rule so that checkpoints trained here evaluate like the released models, decodes with seeking
so long clips cost only the GOPs that hold the sampled frames, and takes all randomness from
(seed, epoch, index) so a sample is the same whatever the worker count and after a resume.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import av
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from data_dali.lifetime import die_with_parent, ignore_stop_signals
from data_dali.manifest import ManifestEntry, is_image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ReferenceDataLoader",
    "ShardedEpochSampler",
    "UnreadableDataError",
    "VideoDecodeError",
    "VideoTextCollator",
    "VideoTextDataset",
    "augment_clip",
    "build_reference_loader",
    "decode_frames",
    "decode_image",
    "decode_threads",
    "frame_to_rgb",
    "load_clip",
    "sample_frame_indices",
    "sample_rng",
    "set_loader_epoch",
    "unreadable_data_message",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN_255 = [255.0 * m for m in IMAGENET_MEAN]
_STD_255 = [255.0 * s for s in IMAGENET_STD]

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
MAX_SUBSTITUTIONS = 20


class VideoDecodeError(RuntimeError):
    """A clip cannot give the frames asked for; the message names the file so it can be fixed or dropped."""


class UnreadableDataError(RuntimeError):
    """So many clips in a row failed that the data, not a clip, is broken (wrong folder or paths).

    Every loader raises it in the caller's thread and process with the same message, whatever its worker
    count: a data loader worker returns it as a flagged batch (see :class:`ReferenceDataLoader`) instead
    of raising, which torch would re-raise wrapped in the worker's traceback.
    """


def unreadable_data_message(tries: int, index: int, first: str, reason: str) -> str:
    """The one wording of :class:`UnreadableDataError`: ``first`` is the first bad clip, ``reason`` why."""
    detail = reason if first in reason else f"{first}: {reason}"
    return (
        f"{tries} consecutive clips from index {index} failed to decode (first: {detail}); "
        "the data folder or the manifest's video paths are probably wrong"
    )


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


def _random_resized_crop_params(
    height: int, width: int, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """Inception-style crop box (top, left, h, w) drawn from ``rng`` rather than torch's global RNG."""
    area = height * width
    log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = float(np.exp(rng.uniform(log_ratio[0], log_ratio[1])))
        w = int(round(np.sqrt(target_area * aspect)))
        h = int(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the largest centred box within the ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_clip(
    frames: torch.Tensor,
    *,
    size: int,
    train: bool,
    rng: np.random.Generator | None = None,
    hflip: float = 0.5,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> normalized float32 [F, 3, size, size], one crop/flip for the whole clip.

    Training: random resized crop + horizontal flip with probability ``hflip`` (0 when captions say
    left/right). Evaluation: short side to ``size`` and a centre crop, deterministic.
    """
    x = frames.permute(0, 3, 1, 2).contiguous().to(torch.float32)
    if train:
        if rng is None:
            rng = np.random.default_rng()
        top, left, h, w = _random_resized_crop_params(x.shape[-2], x.shape[-1], rng, scale, ratio)
        x = TF.resized_crop(x, top, left, h, w, [size, size], antialias=True)
        if rng.random() < hflip:  # always drawn, so hflip does not shift later draws
            x = TF.horizontal_flip(x)
    else:
        x = TF.resize(x, [size], antialias=True)
        x = TF.center_crop(x, [size, size])
    # Pixels stay in [0, 255] until here: the 1/255 scale is folded into mean and std (one pass fewer).
    x = TF.normalize(x, _MEAN_255, _STD_255, inplace=True)
    return x.contiguous()


def _augment_rgb(
    frames: list[np.ndarray],
    *,
    size: int,
    train: bool,
    rng: np.random.Generator | None,
    hflip: float,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> torch.Tensor:
    """:func:`augment_clip` on uint8 [H, W, 3] frames (repeats may share one array), with the same draws.

    Training copies only the crop box out of each distinct frame and resizes it on uint8 (torch's
    antialiased bilinear, which rounds to whole grey levels); only the [F, 3, size, size] result becomes
    float. Evaluation resizes the short side on uint8 and centre-crops, as augment_clip does in float.
    """
    slots: dict[int, int] = {}
    order = [slots.setdefault(id(f), len(slots)) for f in frames]
    distinct = list({id(f): f for f in frames}.values())
    height, width = distinct[0].shape[:2]
    if train:
        top, left, h, w = _random_resized_crop_params(height, width, rng, scale, ratio)
        box = np.empty((len(distinct), h, w, 3), dtype=np.uint8)
        for k, f in enumerate(distinct):
            box[k] = f[top : top + h, left : left + w]
        x = TF.resize(torch.from_numpy(box).permute(0, 3, 1, 2), [size, size], antialias=True)
        if rng.random() < hflip:  # always drawn, as in augment_clip
            x = TF.horizontal_flip(x)
    else:
        x = torch.from_numpy(np.stack(distinct)).permute(0, 3, 1, 2)
        x = TF.center_crop(TF.resize(x, [size], antialias=True), [size, size])
    if len(distinct) < len(frames):
        x = x[torch.tensor(order)]
    x = x.to(torch.float32, memory_format=torch.contiguous_format)
    return TF.normalize(x, _MEAN_255, _STD_255, inplace=True)


def load_clip(
    path: Path,
    *,
    num_frames: int,
    size: int,
    train: bool,
    rng: np.random.Generator | None = None,
    hflip: float = 0.5,
    test_clip: tuple[int, int] = (0, 1),
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """What the loader gives the model: ``augment_clip(decode_frames(...))`` with the same frames, crop
    box and flip for the same ``rng``, within one grey level per pixel (see :func:`_augment_rgb`), at a
    fraction of the cost: no full-resolution float frames, no per-frame tensor copies.
    """
    path = Path(path)
    if train and rng is None:
        rng = np.random.default_rng()
    kwargs = {"size": size, "train": train, "rng": rng, "hflip": hflip, "scale": scale, "ratio": ratio}
    if is_image(path):
        return _augment_rgb([decode_image(path)[0].numpy()], **kwargs)
    return _decode_video(
        path, num_frames, train, rng, test_clip, lambda frames: _augment_rgb(frames, **kwargs)
    )


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The one source of randomness for a sample, so it does not depend on worker count or resume."""
    return np.random.default_rng([seed, epoch, index])


class VideoTextDataset(Dataset):
    """Manifest entries -> augmented clips + captions, skipping (train) or flagging (eval) bad files."""

    def __init__(
        self,
        entries: Sequence[ManifestEntry],
        *,
        num_frames: int,
        size: int,
        train: bool,
        seed: int = 0,
        hflip: float = 0.5,
        substitute_bad: bool = True,
        test_clip: tuple[int, int] = (0, 1),
    ) -> None:
        if not entries:
            raise ValueError("VideoTextDataset needs at least one manifest entry")
        self.entries = list(entries)
        self.num_frames = num_frames
        self.size = size
        self.train = train
        self.seed = seed
        self.hflip = hflip
        self.substitute_bad = substitute_bad
        self.test_clip = test_clip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Training crops and frames change per epoch; must be set before workers start."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int) -> torch.Tensor:
        """Decoded and augmented clip of one entry; raises VideoDecodeError for a bad file."""
        rng = sample_rng(self.seed, self.epoch, index)
        return load_clip(
            self.entries[index].video,
            num_frames=self.num_frames,
            size=self.size,
            train=self.train,
            rng=rng,
            hflip=self.hflip,
            test_clip=self.test_clip,
        )

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Item ``i`` or, in training, the next entry that decodes.

        When ``MAX_SUBSTITUTIONS`` entries in a row fail, :class:`UnreadableDataError` is raised here in
        the main process; in a data loader worker the item comes back with the message under ``fatal``,
        for :class:`ReferenceDataLoader` to raise in the main process.
        """
        skipped: list[str] = []
        first_error = ""
        tries = min(MAX_SUBSTITUTIONS, len(self.entries)) if self.substitute_bad else 1
        for k in range(tries):
            j = (i + k) % len(self.entries)
            entry = self.entries[j]
            try:
                video = self.load(j)
            except VideoDecodeError as e:
                # Reported once per file by the consumer (trainer / evaluation), which sees `skipped`.
                log.debug("skipping bad video: %s", e)
                skipped.append(str(entry.video))
                first_error = first_error or str(e)
                continue
            return {"video": video, "caption": entry.caption, "index": j, "skipped": skipped}
        item = {"video": None, "caption": self.entries[i].caption, "index": i, "skipped": skipped}
        if not self.substitute_bad:
            return item
        message = unreadable_data_message(tries, i, skipped[0], first_error)
        if get_worker_info() is None:
            raise UnreadableDataError(message)
        return {**item, "fatal": message}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The items of one batch (torch's fetcher calls this); stops at the first fatal item, since the
        batch will be refused anyway and each further item would try ``MAX_SUBSTITUTIONS`` files."""
        items = []
        for i in indices:
            items.append(self[i])
            if items[-1].get("fatal"):
                break
        return items


class VideoTextCollator:
    """Stacks clips and tokenizes captions in the worker, dropping items that failed in evaluation."""

    def __init__(self, tokenizer: Any, max_length: int = 32) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        skipped = [p for item in items for p in item.get("skipped", [])]
        fatal = next((item["fatal"] for item in items if item.get("fatal")), None)
        good = [item for item in items if item["video"] is not None]
        if not good or fatal is not None:
            # Every clip in the batch failed: the caller skips a batch whose video is None. A fatal one
            # (the data is unreadable) is raised by ReferenceDataLoader in the main process.
            return {
                "video": None,
                "input_ids": None,
                "attention_mask": None,
                "index": torch.empty(0, dtype=torch.int64),
                "captions": [],
                "skipped": skipped,
                "fatal": fatal,
            }
        videos = [item["video"] for item in good]
        num_frames = max(v.shape[0] for v in videos)
        if any(v.shape[0] not in (1, num_frames) for v in videos):
            raise ValueError(f"cannot batch clips with {sorted({v.shape[0] for v in videos})} frames")
        # Images (one frame) are tiled to the clip length so a batch can mix images and videos.
        videos = [v.expand(num_frames, *v.shape[1:]) if v.shape[0] == 1 else v for v in videos]
        return self.batch(
            torch.stack(videos), [item["caption"] for item in good], [item["index"] for item in good], skipped
        )

    def batch(
        self,
        video: torch.Tensor,
        captions: list[str],
        indices: list[int],
        skipped: list[str],
        fatal: str | None = None,
    ) -> dict[str, Any]:
        """The batch dict every loader yields: clips, tokenized captions, dataset indices, skipped files,
        and ``fatal``: None, or the message of an :class:`UnreadableDataError` the loader raises."""
        tokens = self.tokenizer(
            captions, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {
            "video": video,
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "index": torch.tensor(indices, dtype=torch.int64),
            "captions": captions,
            "skipped": skipped,
            "fatal": fatal,
        }


class ShardedEpochSampler(Sampler[int]):
    """Per-epoch permutation split across ranks, with an exact mid-epoch resume point.

    Every rank gets the same number of indices (padded by repeating the start of the permutation, or
    truncated with ``drop_last``), so collective ops stay in step.
    """

    def __init__(
        self,
        n: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        batch_size: int = 1,
    ) -> None:
        if n <= 0:
            raise ValueError(f"sampler needs a positive dataset size, got {n}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if drop_last and n < world_size:
            raise ValueError(f"{n} samples cannot give every one of {world_size} ranks one with drop_last")
        self.n = n
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.batch_size = batch_size
        self.epoch = 0
        self.start_batch = 0

    @property
    def per_rank(self) -> int:
        """Indices each rank sees in a full epoch."""
        if self.drop_last:
            return self.n // self.world_size
        return -(-self.n // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """A new permutation per epoch, the same on every rank."""
        self.epoch = epoch

    def set_start_batch(self, k: int) -> None:
        """Resume mid-epoch: the next iteration skips the first ``k`` batches of this rank."""
        if k < 0:
            raise ValueError(f"start batch must be >= 0, got {k}")
        self.start_batch = k

    def indices(self) -> list[int]:
        """This rank's full list for the current epoch (before any resume skip)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        total = self.per_rank * self.world_size
        if total <= self.n:
            perm = perm[:total]
        else:
            reps = -(-total // self.n)
            perm = (perm * reps)[:total]
        return perm[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        skip = self.start_batch * self.batch_size
        yield from self.indices()[skip:]
        self.start_batch = 0  # the resume point applies to one epoch only

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start_batch * self.batch_size)


class _FatalCheckingIterator:
    """A DataLoader iterator that raises a batch's ``fatal`` message as :class:`UnreadableDataError`."""

    def __init__(self, it: Iterator[dict[str, Any]]) -> None:
        self._it = it
        self._len = len(it)  # type: ignore[arg-type]

    def __iter__(self) -> _FatalCheckingIterator:
        return self

    def __len__(self) -> int:
        return self._len

    def __next__(self) -> dict[str, Any]:
        try:
            batch = next(self._it)
        except UnreadableDataError:  # no workers: the dataset raised it here already
            self._finish()
            raise
        fatal = batch.get("fatal") if isinstance(batch, dict) else None
        if fatal:
            self._finish()
            raise UnreadableDataError(fatal)
        return batch

    def _finish(self) -> None:
        """End the epoch; workers stop now rather than when the exception (holding this frame) is freed."""
        it, self._it = self._it, iter(())
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class ReferenceDataLoader(DataLoader):
    """The reference loader's DataLoader: a batch flagged ``fatal`` by a worker is raised as
    :class:`UnreadableDataError` in the main process, with the message a run without workers gives,
    instead of torch's "Caught RuntimeError in DataLoader worker process" and the worker's traceback."""

    def __iter__(self) -> _FatalCheckingIterator:
        return _FatalCheckingIterator(super().__iter__())


def _worker_init(_: int) -> None:
    # Each worker decodes one clip at a time; torch's intra-op threads would only oversubscribe the CPU.
    torch.set_num_threads(1)
    # A stop signal is the trainer's to handle after its step; the worker ends with the trainer (torch's
    # own watchdog covers a clean exit, the death signal a SIGKILL).
    ignore_stop_signals()
    die_with_parent()


def build_reference_loader(
    entries: Sequence[ManifestEntry],
    tokenizer: Any,
    *,
    batch_size: int,
    num_frames: int,
    size: int,
    train: bool,
    seed: int = 0,
    hflip: float = 0.5,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    max_length: int = 32,
    test_clip: tuple[int, int] = (0, 1),
) -> ReferenceDataLoader:
    """The reference loader: train shuffles, drops the last partial batch and substitutes bad clips;
    eval keeps order and every sample, and reports bad clips instead of replacing them. Training data
    with ``MAX_SUBSTITUTIONS`` bad clips in a row raises :class:`UnreadableDataError`.

    Call :func:`set_loader_epoch` before iterating each epoch.
    """
    dataset = VideoTextDataset(
        entries,
        num_frames=num_frames,
        size=size,
        train=train,
        seed=seed,
        hflip=hflip,
        substitute_bad=train,
        test_clip=test_clip,
    )
    sampler = ShardedEpochSampler(
        len(dataset),
        rank=rank,
        world_size=world_size,
        shuffle=train,
        seed=seed,
        drop_last=train,
        batch_size=batch_size,
    )
    return ReferenceDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=VideoTextCollator(tokenizer, max_length=max_length),
        drop_last=train,
        persistent_workers=False,  # workers are re-created per epoch, so they see the dataset's epoch
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )


def set_loader_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Set the epoch on sampler and dataset (and the resume batch) before creating the iterator."""
    sampler = loader.sampler
    if isinstance(sampler, ShardedEpochSampler):
        sampler.set_epoch(epoch)
        sampler.set_start_batch(start_batch)
    elif start_batch:
        raise ValueError("mid-epoch resume needs the loader from build_reference_loader")
    dataset = loader.dataset
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
