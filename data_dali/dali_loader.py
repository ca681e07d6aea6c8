"""The DALI loader: the reference loader's batches, decoded and augmented by DALI graphs.

It yields exactly the reference collator's batch dict (video [B, F, 3, H, W] float32, input_ids,
attention_mask, index, captions, skipped), walks the same :class:`ShardedEpochSampler` order and draws
every clip's frames, crop and flip from ``sample_rng(seed, epoch, index)`` like the reference, so
switching ``data.backend`` changes speed, not the experiment.

Bad clips. DALI's decoders do not skip a bad sample: a corrupt video or JPEG fails the whole batch with a
pipeline error (and leaves the pipeline unusable), and a video shorter than its header says would come
back padded with black frames under the default ``pad_mode``. So:

1. before feeding, each clip is checked cheaply and on its own (file exists and is not empty, PyAV opens
   the container and finds a video stream with a frame count, shard frames start with a JPEG marker);
   a clip that fails is replaced (training) or flagged (evaluation) exactly as in the reference;
2. the video decoder runs with ``pad_mode="none"``, so missing frames raise instead of turning black;
3. when a batch still fails inside DALI, the pipeline is rebuilt and each clip of the batch is run
   alone to find the one DALI rejects; that clip is decoded by the reference decoders (PyAV / PIL),
   which decide good or bad as the reference loader does, and still goes through the same DALI
   augmentation graph. Such fallbacks are counted and logged as warnings (they are slow); a CUDA
   out-of-memory error is never taken for one.
4. the loader remembers what it learnt, per clip: a clip that failed for a reason no epoch's draws can
   change (missing, empty, no video stream, unreadable container) is substituted up front in later
   batches, and a clip DALI rejected goes to the reference decoder directly from then on.

Clips DALI cannot read on this device are screened before they reach it, against the decoder's limits
(:mod:`data_dali.codecs`: the CPU decoder's codecs; NVDEC's codecs, profiles, pixel formats and sizes per
GPU generation), and decoded by the reference decoder, as are files above :data:`MAX_WHOLE_FILE_BYTES`;
DALI still augments them. ``decode_counts()`` gives both numbers (screened, fallbacks); the trainer writes
them to log.jsonl and metrics.json. ``skipped`` names every replaced or dropped clip, as in the reference.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from PIL import Image

from data_dali.codecs import CPU_VIDEO_CODECS, VideoInfo, decoder_rejects
from data_dali.dali_pipeline import (
    build_frames_pipeline,
    build_shard_pipeline,
    build_video_pipeline,
    draw_box,
    plan_clip,
)
from data_dali.manifest import ManifestEntry, is_image
from data_dali.reference_loader import (
    MAX_SUBSTITUTIONS,
    ShardedEpochSampler,
    UnreadableDataError,
    VideoTextCollator,
    sample_rng,
    unreadable_data_message,
)
from data_dali.shards import ShardError, ShardIndex
from data_dali.video_decode import VideoDecodeError, _check_file, _frame_count, decode_frames

__all__ = [
    "DaliLoader",
    "MAX_WHOLE_FILE_BYTES",
    "DaliUnsupportedError",
    "RawVideoClips",
    "ShardClips",
    "VideoInfo",
    "build_dali_loader",
    "dali_support",
    "probe_video",
    "resolve_device_id",
]

log = logging.getLogger(__name__)

_JPEG_SOI = b"\xff\xd8"
# dali_support probes this many manifest entries (spread over the manifest) for their codec.
_SUPPORT_PROBES = 64
# The DALI CPU loader checks the codec of this many leading entries when it is built.
_EARLY_PROBES = 8
# DALI's video decoder takes the whole file as one buffer. Above this size a clip is decoded by the
# reference decoder instead, which seeks to the F frames it needs rather than reading everything.
MAX_WHOLE_FILE_BYTES = 512 * 1024**2
# After the first, every this-many-th batch that DALI rejected is reported again with the running count.
_FALLBACK_WARN_EVERY = 100
# Messages of DALI errors that are a lack of device memory, not a bad clip: they must reach the trainer.
_OOM_MARKERS = ("out of memory", "bad_alloc", "allocation failed")


class DaliUnsupportedError(RuntimeError):
    """The data cannot be decoded by DALI on this device; the message names the file and the way out."""


class _BadClip(VideoDecodeError):
    """A clip failure that no epoch's draws can change (missing, empty, no video stream, unreadable
    container): the loader substitutes such a clip up front in later batches."""


class _TransientProbeError(VideoDecodeError):
    """The file could not be read this time (an I/O error); it is tried again when it next comes up."""


def _unsupported_message(path: Path | str, codec: str) -> str:
    return (
        f"{path} is {codec}, which DALI's CPU video decoder cannot decode (it handles "
        f"{', '.join(sorted(CPU_VIDEO_CODECS))} only); prepare frame shards with `miles prepare MANIFEST "
        "OUT_DIR` and train from OUT_DIR, run on a GPU, or set data.backend=reference (PyAV)"
    )


def probe_video(path: Path) -> VideoInfo:
    """Codec, frame count and size from the container header, without decoding a frame.

    Raises :class:`VideoDecodeError` naming the file for a missing, empty or unreadable file. An I/O
    error that may pass on a retry (anything but a missing path) is raised as a ``VideoDecodeError``
    subclass the loader does not cache.
    """
    path = Path(path)
    try:
        _check_file(path)
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise _BadClip(f"{path} has no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            return VideoInfo(
                ctx.codec.canonical_name,  # "av1", where the decoder's own name may be "libdav1d"
                _frame_count(container, stream),
                int(ctx.height),
                int(ctx.width),
                profile=ctx.profile or "",
                pix_fmt=ctx.pix_fmt or "",
            )
    except _BadClip:
        raise
    except VideoDecodeError as e:  # _check_file: missing, not a file, empty
        raise _BadClip(str(e)) from None
    except (av.error.FFmpegError, OSError, ValueError) as e:
        if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, IsADirectoryError)):
            raise _TransientProbeError(f"cannot read {path}: {e}") from e
        raise _BadClip(f"cannot open {path} as a video: {e}") from e


def _capability(device_id: int | None) -> tuple[int, int] | None:
    """The CUDA compute capability that picks NVDEC's limits; None (the CPU decoder) without a GPU."""
    return None if device_id is None else torch.cuda.get_device_capability(device_id)


def resolve_device_id(device: str | torch.device | None) -> int | None:
    """DALI's ``device_id``: the CUDA index for a CUDA device, None (CPU pipelines) otherwise.

    ``None`` or ``"auto"`` picks the current CUDA device when there is one.
    """
    if device is None or device == "auto":
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise ValueError(f"DALI runs on cpu or cuda devices, not {device}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available; use device=cpu")
    return device.index if device.index is not None else torch.cuda.current_device()


@dataclass
class _Prepared:
    """One clip ready for a batched DALI run: its plan and the per-sample pipeline inputs."""

    index: int
    name: str
    caption: str
    box: tuple[float, float, float, float]
    flip: bool
    inputs: dict[str, list[np.ndarray]] = field(default_factory=dict)  # samples_per_clip arrays per input


@dataclass
class _Decoded:
    """One clip decoded by the reference decoders, for the augmentation-only pipeline."""

    index: int
    name: str
    caption: str
    frames: np.ndarray
    box: tuple[float, float, float, float]
    flip: bool


class _Clips:
    """What the loader needs from a source: batched-pipeline inputs and a per-clip reference decode.

    ``epoch`` arguments default to the source's epoch; the loader passes the epoch it snapshotted when
    its iterator started, so a batch never mixes two epochs' draws. ``samples_per_clip`` is how many
    pipeline samples one clip is (1 for a video file; F for frame shards, one JPEG each).
    """

    samples_per_clip = 1

    def __init__(
        self,
        *,
        num_frames: int,
        size: int,
        train: bool,
        seed: int,
        hflip: float,
        device_id: int | None,
        test_clip: tuple[int, int] = (0, 1),
    ) -> None:
        self.test_clip = test_clip
        self.num_frames = num_frames
        self.size = size
        self.train = train
        self.seed = seed
        self.hflip = hflip
        self.device_id = device_id
        self.epoch = 0
        self.screened: dict[Path, str] = {}  # files the decoder's limits rule out, and why (raw videos)

    def set_epoch(self, epoch: int) -> None:
        """Frames, crops and flips change per epoch (the trainer calls this through set_loader_epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        raise NotImplementedError

    def name(self, j: int) -> str:
        """How ``skipped`` names clip ``j``."""
        raise NotImplementedError

    def prepare(self, j: int, epoch: int | None = None) -> _Prepared | None:
        """Inputs for the batched pipeline; None when only the reference decoder can read this clip.

        Raises VideoDecodeError for a clip that is bad.
        """
        raise NotImplementedError

    def decode_reference(self, j: int, epoch: int | None = None) -> _Decoded:
        """Clip ``j`` decoded by the reference decoders (raises VideoDecodeError for a bad clip)."""
        raise NotImplementedError

    def build_pipeline(self, batch_size: int, num_threads: int) -> Any:
        raise NotImplementedError

    def _rng(self, j: int, epoch: int | None) -> np.random.Generator:
        return sample_rng(self.seed, self.epoch if epoch is None else epoch, j)

    def _tile(self, frames: np.ndarray) -> np.ndarray:
        # One-frame clips (images) become F identical frames, as the reference collator tiles them.
        if frames.shape[0] == 1 and self.num_frames > 1:
            frames = np.repeat(frames, self.num_frames, axis=0)
        return np.ascontiguousarray(frames)


class RawVideoClips(_Clips):
    """Manifest entries decoded from the video files (``fn.decoders.video``)."""

    def __init__(self, entries: Sequence[ManifestEntry], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not entries:
            raise ValueError("the DALI loader needs at least one manifest entry")
        self.entries = list(entries)
        # Good probes keep their header; permanent failures keep only their message (no exception object
        # and traceback per bad file); transient I/O errors are not kept, so the file is tried again.
        self._probes: dict[Path, VideoInfo | str] = {}
        self.capability = _capability(self.device_id)
        if self.device_id is None:
            # Fail before training starts when the first files already show the CPU cannot decode them
            # (DALI was asked for on data it cannot decode); a later clip of such a codec is decoded by
            # the reference decoder instead, with one warning.
            for j in range(min(_EARLY_PROBES, len(self.entries))):
                if is_image(self.entries[j].video):
                    continue
                try:
                    info = self.probe(j)
                except VideoDecodeError:
                    continue
                if decoder_rejects(info, None):
                    raise DaliUnsupportedError(_unsupported_message(self.entries[j].video, info.codec))

    def __len__(self) -> int:
        return len(self.entries)

    def name(self, j: int) -> str:
        return str(self.entries[j].video)

    def probe(self, j: int) -> VideoInfo:
        """Cached :func:`probe_video` of entry ``j`` (a permanently bad file stays bad for the run)."""
        path = self.entries[j].video
        hit = self._probes.get(path)
        if hit is None:
            try:
                hit = probe_video(path)
            except _BadClip as e:
                self._probes[path] = str(e)
                raise
            self._probes[path] = hit
        if isinstance(hit, str):
            raise _BadClip(hit)
        return hit

    def prepare(self, j: int, epoch: int | None = None) -> _Prepared | None:
        entry = self.entries[j]
        if is_image(entry.video):
            return None
        info = self.probe(j)
        if entry.video in self.screened:
            return None
        reason = decoder_rejects(info, self.capability)
        if reason is not None:
            self.screened[entry.video] = reason
            if len(self.screened) == 1 or len(self.screened) % _FALLBACK_WARN_EVERY == 0:
                log.warning(
                    "%s is %s: %s. Clips DALI cannot decode here are decoded by PyAV from now on, each "
                    "found before it reaches DALI (%d so far, counted as `dali_screened` in log.jsonl "
                    "and metrics.json); `miles prepare` makes frame shards that DALI decodes on any device",
                    entry.video,
                    info.codec,
                    reason,
                    len(self.screened),
                )
            return None
        if info.frames <= 0 or info.height <= 0 or info.width <= 0:
            return None  # no count in the header: the reference decodes it all once and counts
        try:
            if entry.video.stat().st_size > MAX_WHOLE_FILE_BYTES:
                return None  # the reference decoder seeks instead of reading the whole file
            data = np.fromfile(entry.video, dtype=np.uint8)
        except OSError as e:
            raise VideoDecodeError(f"cannot read {entry.video}: {e}") from e
        plan = plan_clip(
            rng=self._rng(j, epoch),
            total_frames=info.frames,
            num_frames=self.num_frames,
            height=info.height,
            width=info.width,
            size=self.size,
            train=self.train,
            hflip=self.hflip,
            test_clip=self.test_clip,
        )
        inputs = {"encoded": [data], "frame_ids": [np.asarray(plan.frame_ids, dtype=np.int32)]}
        return _Prepared(j, self.name(j), entry.caption, plan.box, plan.flip, inputs)

    def decode_reference(self, j: int, epoch: int | None = None) -> _Decoded:
        entry = self.entries[j]
        rng = self._rng(j, epoch)
        try:
            frames = decode_frames(entry.video, self.num_frames, self.train, rng, self.test_clip).numpy()
        except VideoDecodeError as e:
            if is_image(entry.video):
                raise _BadClip(str(e)) from None  # an image has no draws: bad in every epoch
            raise
        box, flip = draw_box(
            rng,
            height=frames.shape[1],
            width=frames.shape[2],
            size=self.size,
            train=self.train,
            hflip=self.hflip,
        )
        return _Decoded(j, self.name(j), entry.caption, self._tile(frames), box, flip)

    def build_pipeline(self, batch_size: int, num_threads: int) -> Any:
        return build_video_pipeline(
            batch_size=batch_size, size=self.size, device_id=self.device_id, num_threads=num_threads
        )


class ShardClips(_Clips):
    """Clips of a prepared frame-shard folder, decoded from their JPEG frames (``fn.decoders.image``).

    Frame indices follow the reference rule over the stored frames; a clip made from an image (one
    stored frame) draws none, as the reference does for images. Of several captions, training picks one
    with the clip's generator (after the crop and flip draws); evaluation takes the first.
    """

    def __init__(self, index: ShardIndex, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.samples_per_clip = self.num_frames
        if len(index) == 0:
            raise ValueError("the DALI loader needs a frame shard index with at least one clip")
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def name(self, j: int) -> str:
        clip = self.index.clips[j]
        return f"{clip.source} (frame shard {clip.shard}, clip {clip.key})"

    def _draw(
        self, j: int, epoch: int | None
    ) -> tuple[list[int], tuple[float, float, float, float], bool, str]:
        """Every draw of clip ``j`` in the one order both decode paths share: frames, box + flip, caption."""
        clip = self.index.clips[j]
        rng = self._rng(j, epoch)
        stored = len(clip.frames)
        if stored == 0:
            raise _BadClip(f"{self.name(j)} has no stored frames; rerun `miles prepare`")
        if not clip.captions:
            raise _BadClip(f"{self.name(j)} has no caption in the shard index; rerun `miles prepare`")
        plan = plan_clip(
            rng=rng,
            total_frames=None if stored == 1 and is_image(Path(clip.source)) else stored,
            num_frames=self.num_frames,
            height=clip.height,
            width=clip.width,
            size=self.size,
            train=self.train,
            hflip=self.hflip,
            test_clip=self.test_clip,
        )
        caption = clip.captions[0]
        if self.train and len(clip.captions) > 1:
            caption = clip.captions[int(rng.integers(len(clip.captions)))]
        return list(plan.frame_ids), plan.box, plan.flip, caption

    def _read(self, j: int, frame_ids: list[int]) -> list[bytes]:
        try:
            return self.index.read_frames(j, frame_ids)
        except (ShardError, IndexError, OSError, ValueError) as e:
            raise VideoDecodeError(f"cannot read {self.name(j)}: {e}") from e

    def prepare(self, j: int, epoch: int | None = None) -> _Prepared | None:
        frame_ids, box, flip, caption = self._draw(j, epoch)
        data = self._read(j, frame_ids)
        for k, jpeg in zip(frame_ids, data, strict=True):
            if len(jpeg) < 4 or not jpeg.startswith(_JPEG_SOI):
                raise VideoDecodeError(
                    f"{self.name(j)}: stored frame {k} is not a JPEG; rerun `miles prepare`"
                )
        inputs = {"jpeg": [np.frombuffer(jpeg, dtype=np.uint8) for jpeg in data]}
        return _Prepared(j, self.name(j), caption, box, flip, inputs)

    def decode_reference(self, j: int, epoch: int | None = None) -> _Decoded:
        frame_ids, box, flip, caption = self._draw(j, epoch)
        frames = []
        for k, jpeg in zip(frame_ids, self._read(j, frame_ids), strict=True):
            try:
                with Image.open(io.BytesIO(jpeg)) as im:
                    frames.append(np.asarray(im.convert("RGB")))
            except Exception as e:  # PIL raises many unrelated types for a bad file
                raise VideoDecodeError(f"cannot decode stored frame {k} of {self.name(j)}: {e}") from e
        clip = self.index.clips[j]
        if {f.shape for f in frames} != {(clip.height, clip.width, 3)}:
            raise VideoDecodeError(
                f"{self.name(j)} has frames of another size than its index says "
                f"({clip.height}x{clip.width}); rerun `miles prepare`"
            )
        return _Decoded(j, self.name(j), caption, np.stack(frames), box, flip)

    def build_pipeline(self, batch_size: int, num_threads: int) -> Any:
        return build_shard_pipeline(
            batch_size=batch_size * self.samples_per_clip,
            size=self.size,
            device_id=self.device_id,
            num_threads=num_threads,
        )


def _dali_error_summary(error: BaseException) -> str:
    """The line of a DALI error that says what went wrong (the one after "encountered:"), not its
    "Critical error in pipeline:" heading."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for k, line in enumerate(lines[:-1]):
        if line == "encountered:":
            return lines[k + 1]
    return lines[0] if lines else type(error).__name__


def _feed_augment(pipe: Any, items: Sequence[_Prepared | _Decoded], samples_per_clip: int = 1) -> None:
    """Each clip's box and flip, once per pipeline sample of the clip."""
    r = range(samples_per_clip)
    pipe.feed_input("roi_start", [np.asarray(it.box[:2], dtype=np.float32) for it in items for _ in r])
    pipe.feed_input("roi_end", [np.asarray(it.box[2:], dtype=np.float32) for it in items for _ in r])
    pipe.feed_input("flip", [np.asarray(int(it.flip), dtype=np.int32) for it in items for _ in r])


def _outputs_to_torch(out: Any, device_id: int | None) -> torch.Tensor:
    """A DALI batch of equal-shape samples -> one torch tensor [B, ...] on the pipeline's device."""
    dense = out.as_tensor()
    if device_id is None:
        batch = torch.from_numpy(np.array(dense))
    else:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        batch = torch.empty(dense.shape(), dtype=torch.float32, device=torch.device("cuda", device_id))
        feed_ndarray(dense, batch, cuda_stream=torch.cuda.current_stream(device_id))
    return batch


class DaliLoader:
    """Iterable of batch dicts over one rank's share of an epoch, decoded and augmented by DALI.

    Works with the trainer's ``set_loader_epoch(loader, epoch, start_batch)`` unchanged: ``sampler`` is
    the reference :class:`ShardedEpochSampler` (epoch order, rank split, resume point) and ``dataset``
    is the clip source, whose ``set_epoch`` changes the per-clip draws. An iterator keeps the epoch and
    order it started with; several iterators alive at once share the pipelines under a lock.
    """

    def __init__(
        self,
        clips: _Clips,
        tokenizer: Any,
        *,
        batch_size: int,
        num_threads: int,
        rank: int,
        world_size: int,
        max_length: int,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset = clips
        self.batch_size = batch_size
        self.num_threads = max(1, num_threads)
        self.collate = VideoTextCollator(tokenizer, max_length=max_length)
        self.sampler = ShardedEpochSampler(
            len(clips),
            rank=rank,
            world_size=world_size,
            shuffle=clips.train,
            seed=clips.seed,
            drop_last=clips.train,
            batch_size=batch_size,
        )
        self._pipe: Any = None
        self._frames_pipe: Any = None
        self._lock = threading.Lock()
        # What this loader learnt about clips: bad whatever the draws (substituted up front), and
        # rejected by DALI (decoded by the reference decoder directly from then on).
        self._known_bad: set[int] = set()
        self._bad_reason: dict[int, str] = {}  # why each known-bad clip failed, for UnreadableDataError
        self._reference_only: set[int] = set()
        self.fallbacks = 0  # clips DALI rejected (each then decoded by PyAV, once found)

    @property
    def drop_last(self) -> bool:
        return self.dataset.train

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches of this rank's epoch; the next one is loaded in a background thread meanwhile.

        The epoch and the sampler's order are taken now, so a later ``set_loader_epoch`` does not
        change the batches of an iterator already started. One thread owns the pipelines (DALI runs
        release the GIL), so the trainer's step and the next batch's file reads, decode and augmentation
        overlap. All randomness is per clip, so this does not change what a batch holds.
        """
        epoch = self.dataset.epoch
        order = list(self.sampler)
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        chunks = [order[s : s + self.batch_size] for s in range(0, stop, self.batch_size)]
        return self._batches(chunks, epoch)

    def _batches(self, chunks: list[list[int]], epoch: int) -> Iterator[dict[str, Any]]:
        if not chunks:
            return
        device_id = self.dataset.device_id
        # On CUDA the thread's current device must be ours before DALI or torch touch the GPU, or a
        # stray context lands on GPU 0.
        init = (lambda: torch.cuda.set_device(device_id)) if device_id is not None else None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dali-loader", initializer=init) as pool:
            pending = pool.submit(self.load_batch, chunks[0], epoch)
            for chunk in chunks[1:]:
                batch = pending.result()  # an exception in the loader thread is raised here
                pending = pool.submit(self.load_batch, chunk, epoch)
                yield batch
            yield pending.result()

    # ------------------------------------------------------------------------------------- batches
    def _pipeline(self) -> Any:
        if self._pipe is None:
            self._pipe = self.dataset.build_pipeline(self.batch_size, self.num_threads)
        return self._pipe

    def _augment_decoded(self, items: Sequence[_Decoded]) -> torch.Tensor:
        if self._frames_pipe is None:
            self._frames_pipe = build_frames_pipeline(
                batch_size=self.batch_size,
                size=self.dataset.size,
                device_id=self.dataset.device_id,
                num_threads=self.num_threads,
            )
        pipe = self._frames_pipe
        pipe.feed_input("frames", [it.frames for it in items], layout="FHWC")
        _feed_augment(pipe, items)
        (out,) = pipe.run()
        return _outputs_to_torch(out, self.dataset.device_id)

    def _run_batched(self, items: Sequence[_Prepared]) -> tuple[torch.Tensor | None, str]:
        """One DALI run over prepared clips: (batch, "") or, when DALI rejected it, (None, its error).

        A pipeline that raised cannot run again, so it is dropped and rebuilt on next use. Out-of-memory
        errors (torch's or DALI's) propagate: they are not a bad clip.
        """
        pipe = self._pipeline()
        per_clip = self.dataset.samples_per_clip
        try:
            for name in items[0].inputs:
                pipe.feed_input(name, [sample for it in items for sample in it.inputs[name]])
            _feed_augment(pipe, items, per_clip)
            (out,) = pipe.run()
            batch = _outputs_to_torch(out, self.dataset.device_id)
            return (batch.unflatten(0, (len(items), per_clip)) if per_clip > 1 else batch), ""
        except RuntimeError as e:
            self._pipe = None
            if isinstance(e, torch.OutOfMemoryError) or any(m in str(e).lower() for m in _OOM_MARKERS):
                raise
            return None, _dali_error_summary(e)

    def _rejected(self, item: _Prepared, error: str) -> None:
        """DALI failed on this clip alone: PyAV decodes it from now on, and the count says so."""
        self._reference_only.add(item.index)
        self.fallbacks += 1
        if self.fallbacks == 1 or self.fallbacks % _FALLBACK_WARN_EVERY == 0:
            log.warning(
                "DALI rejected %s (%s); it is decoded by PyAV from now on (%d clip%s so far, counted as "
                "`dali_fallbacks` in log.jsonl and metrics.json)",
                item.name,
                error,
                self.fallbacks,
                "" if self.fallbacks == 1 else "s",
            )

    def decode_counts(self) -> dict[str, int]:
        """Clips this loader decoded with PyAV instead of DALI: ``dali_screened`` by the decoder's limits
        before DALI saw them, ``dali_fallbacks`` rejected by DALI (each counted once, then remembered)."""
        return {"dali_screened": len(self.dataset.screened), "dali_fallbacks": self.fallbacks}

    def _first_good(
        self, i: int, skipped: list[str], epoch: int, decode: bool
    ) -> _Prepared | _Decoded | None:
        """Clip ``i`` or, in training, the next entry that passes (``decode``: by the reference decoder)."""
        clips = self.dataset
        tries = min(MAX_SUBSTITUTIONS, len(clips)) if clips.train else 1
        first_error = ""
        for k in range(tries):
            j = (i + k) % len(clips)
            if j in self._known_bad:
                skipped.append(clips.name(j))
                first_error = first_error or self._bad_reason.get(j, "")
                continue
            try:
                if decode or j in self._reference_only:
                    return clips.decode_reference(j, epoch)
                prepared = clips.prepare(j, epoch)
                return prepared if prepared is not None else clips.decode_reference(j, epoch)
            except VideoDecodeError as e:
                log.debug("skipping bad clip: %s", e)
                if isinstance(e, _BadClip):
                    self._mark_bad(j, e)
                skipped.append(clips.name(j))
                first_error = first_error or str(e)
        if not clips.train:
            return None
        # Raised in the loader thread; DaliLoader's iterator re-raises it, unchanged, in the caller.
        raise UnreadableDataError(unreadable_data_message(tries, i, skipped[-tries], first_error))

    def _mark_bad(self, j: int, err: VideoDecodeError) -> None:
        self._known_bad.add(j)
        self._bad_reason[j] = str(err)

    def load_batch(self, indices: Sequence[int], epoch: int | None = None) -> dict[str, Any]:
        """The collated batch for these sampler indices (bad clips replaced in training, dropped in eval).

        ``epoch`` defaults to the dataset's current one. Calls are serialised: the pipelines and what the
        loader learnt about bad clips are shared by every iterator of this loader.
        """
        with self._lock:
            return self._load_batch(indices, self.dataset.epoch if epoch is None else epoch)

    def _load_batch(self, indices: Sequence[int], epoch: int) -> dict[str, Any]:
        skipped: list[str] = []
        slots = [self._first_good(i, skipped, epoch, decode=False) for i in indices]
        batched = [k for k, s in enumerate(slots) if isinstance(s, _Prepared)]
        parts: list[tuple[list[int], torch.Tensor]] = []
        if batched:
            out, error = self._run_batched([slots[k] for k in batched])  # type: ignore[misc]
            if out is not None:
                parts.append((batched, out))
            else:
                # DALI fails a batch for one clip: run each clip alone to find which, so only that clip
                # goes to PyAV, in this epoch and every later one.
                for k in batched:
                    item: _Prepared = slots[k]  # type: ignore[assignment]
                    one, error = self._run_batched([item]) if len(batched) > 1 else (None, error)
                    if one is not None:
                        parts.append(([k], one))
                        continue
                    self._rejected(item, error)
                    try:  # the reference decoder decides whether the clip is bad
                        slots[k] = self.dataset.decode_reference(item.index, epoch)
                    except VideoDecodeError as e:
                        log.debug("skipping bad clip: %s", e)
                        if isinstance(e, _BadClip):
                            self._mark_bad(item.index, e)
                        skipped.append(item.name)
                        nxt = (item.index + 1) % len(self.dataset)
                        slots[k] = (
                            self._first_good(nxt, skipped, epoch, decode=True) if self.dataset.train else None
                        )
        decoded = [k for k, s in enumerate(slots) if isinstance(s, _Decoded)]
        if decoded:
            parts.append((decoded, self._augment_decoded([slots[k] for k in decoded])))  # type: ignore[misc]
        return self._collate(slots, parts, skipped)

    def _collate(
        self,
        slots: Sequence[_Prepared | _Decoded | None],
        parts: Sequence[tuple[list[int], torch.Tensor]],
        skipped: list[str],
    ) -> dict[str, Any]:
        """The reference collator's dict, reusing DALI's batch tensor when it already is the batch."""
        keep = [k for k, s in enumerate(slots) if s is not None]
        if not keep:
            return self.collate([{"video": None, "caption": "", "index": -1, "skipped": skipped}])
        if len(parts) == 1 and parts[0][0] == keep:
            video = parts[0][1]
        else:
            first = parts[0][1]
            video = first.new_empty((len(keep), *first.shape[1:]))
            row = {k: r for r, k in enumerate(keep)}
            for ks, batch in parts:
                video[torch.tensor([row[k] for k in ks], device=video.device)] = batch
        captions = [slots[k].caption for k in keep]  # type: ignore[union-attr]
        indices = [slots[k].index for k in keep]  # type: ignore[union-attr]
        return self.collate.batch(video, captions, indices, skipped)


def build_dali_loader(
    source: Sequence[ManifestEntry] | ShardIndex,
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
    device: str | torch.device | None = None,
    test_clip: tuple[int, int] = (0, 1),
) -> DaliLoader:
    """The DALI counterpart of ``build_reference_loader`` (same arguments and batches).

    ``source``: manifest entries (raw videos) or a :class:`ShardIndex` (frame shards). ``device``: cpu,
    cuda[:N], or None for the current CUDA device if any. ``num_workers`` becomes DALI's thread count.
    Call ``set_loader_epoch`` (reference_loader) before iterating each epoch, as for the reference.
    """
    common = {
        "num_frames": num_frames,
        "size": size,
        "train": train,
        "seed": seed,
        "hflip": hflip,
        "device_id": resolve_device_id(device),
        "test_clip": test_clip,
    }
    clips: _Clips = (
        ShardClips(source, **common) if isinstance(source, ShardIndex) else RawVideoClips(source, **common)
    )
    return DaliLoader(
        clips,
        tokenizer,
        batch_size=batch_size,
        num_threads=num_workers,
        rank=rank,
        world_size=world_size,
        max_length=max_length,
    )


def dali_support(
    source: Sequence[ManifestEntry] | ShardIndex, device: str | torch.device | None
) -> tuple[bool, str]:
    """Whether DALI can decode this data on ``device``, and why, in one line (for ``data.backend=auto``).

    Frame shards: always. Raw videos: up to 64 files, spread over the manifest, are probed and screened
    against this device's decoder (:mod:`data_dali.codecs`); unreadable ones are left to the bad-clip
    handling. On the CPU every probed file must be VP8, VP9 or MJPEG. On a GPU, DALI is used when NVDEC
    decodes at least one probed file; the line says how many go to PyAV instead, and why.
    """
    try:
        device_id = resolve_device_id(device)
    except ValueError as e:
        return False, f"DALI cannot run here: {e}"
    where = "CPU" if device_id is None else f"GPU {device_id}"
    if isinstance(source, ShardIndex):
        return True, f"DALI on {where}: frame shards ({len(source)} clips), JPEG frames decoded by DALI"
    entries = [e for e in source if not is_image(e.video)]
    if not entries:
        return True, f"DALI on {where}: image manifest, images decoded by PIL, augmented by DALI"
    picks = sorted(
        {round(k * (len(entries) - 1) / max(1, _SUPPORT_PROBES - 1)) for k in range(_SUPPORT_PROBES)}
    )
    capability = _capability(device_id)
    codecs: set[str] = set()
    screened: list[tuple[Path, str]] = []
    for k in picks:
        try:
            info = probe_video(entries[k].video)
        except VideoDecodeError:
            continue
        reason = decoder_rejects(info, capability)
        if reason is not None and capability is None:
            return False, f"DALI not used: {_unsupported_message(entries[k].video, info.codec)}"
        if reason is not None:
            screened.append((entries[k].video, reason))
            continue
        codecs.add(info.codec)
    if not codecs:
        if screened:
            path, reason = screened[0]
            return False, f"DALI not used: no probed video decodes on {where} ({path}: {reason})"
        return False, "DALI not used: none of the probed videos could be opened"
    what = f"raw {'/'.join(sorted(codecs))} videos"
    if capability is None:
        return True, f"DALI on CPU: {what} ({len(picks)} probed)"
    line = f"DALI on {where}: {what} decoded by NVDEC"
    images = len(source) - len(entries)
    if images:
        line += f", {images} images by PIL"
    if screened:
        path, reason = screened[0]
        line += (
            f"; {len(screened)} of {len(picks)} probed are decoded by PyAV instead (e.g. {path}: {reason})"
        )
    return True, line
