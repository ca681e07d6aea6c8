"""The PyAV + torch DataLoader reference loader: dataset, collator, epoch sampler and the loader itself.

This is the plain CPU path that every fast loader (DALI on GPU/CPU, frame shards) is tested and
benchmarked against, and the loader that runs wherever DALI cannot. Clips are decoded by
:mod:`data_dali.video_decode` (Frozen-in-Time's frame sampling rule, seeking) and augmented by
:mod:`data_dali.augment`; all randomness comes from (seed, epoch, index), so a sample is the same
whatever the worker count and after a resume.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from data_dali.augment import _augment_rgb
from data_dali.lifetime import die_with_parent, ignore_stop_signals
from data_dali.manifest import ManifestEntry, is_image
from data_dali.video_decode import (
    VideoDecodeError,
    _decode_video,
    decode_image,
)

__all__ = [
    "ReferenceDataLoader",
    "ShardedEpochSampler",
    "UnreadableDataError",
    "VideoTextCollator",
    "VideoTextDataset",
    "build_reference_loader",
    "load_clip",
    "sample_rng",
    "set_loader_epoch",
    "unreadable_data_message",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

MAX_SUBSTITUTIONS = 20


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
