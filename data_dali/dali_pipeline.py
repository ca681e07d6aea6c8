"""DALI graphs: decode (raw video or JPEG frame shards) and the one augmentation both share.

Randomness stays on the Python side: every clip's frame indices, crop box and flip are drawn from
``sample_rng(seed, epoch, index)`` with the reference loader's own functions and fed to the graph as
per-sample inputs, so DALI and the PyAV reference make the same choices for the same seed. The graph
only executes them: a region-of-interest resize (the crop box, evaluated on the source pixels), a
mirror and a normalisation, one box for all frames of a clip.

Evaluation uses the same graph: torchvision's "short side to size, then centre crop" is the box that
the centre crop covers, mapped back to source pixels, so one ROI resize reproduces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import DataNode, Pipeline

from data_dali.augment import _MEAN_255, _STD_255, _random_resized_crop_params
from data_dali.video_decode import sample_frame_indices

__all__ = [
    "ClipPlan",
    "augment",
    "build_frames_pipeline",
    "build_shard_pipeline",
    "build_video_pipeline",
    "define_shard_pipeline",
    "draw_box",
    "eval_box",
    "plan_clip",
]

TRAIN_SCALE = (0.5, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class ClipPlan:
    """Everything random about one clip, decided before decoding: which frames, which box, flip or not.

    ``box`` is (y0, x0, y1, x1) in source pixels (fractional in evaluation).
    """

    frame_ids: tuple[int, ...]
    box: tuple[float, float, float, float]
    flip: bool


def eval_box(height: int, width: int, size: int) -> tuple[float, float, float, float]:
    """The source region that torchvision's ``resize(size)`` + ``center_crop(size)`` keeps.

    Resize keeps the short side at ``size`` and truncates the long one (torchvision's rule); the crop
    offset is rounded as in ``center_crop``; both are then mapped back through the resize scale.
    """
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    sy, sx = height / new_h, width / new_w
    return top * sy, left * sx, (top + size) * sy, (left + size) * sx


def plan_clip(
    *,
    rng: np.random.Generator,
    total_frames: int | None,
    num_frames: int,
    height: int,
    width: int,
    size: int,
    train: bool,
    hflip: float,
    test_clip: tuple[int, int] = (0, 1),
) -> ClipPlan:
    """The reference loader's draws from the clip's generator, in its order: frame indices, crop box, flip.

    ``rng`` is ``sample_rng(seed, epoch, index)``; the caller may draw more from it afterwards (a shard
    clip's caption). ``total_frames=None`` marks an image: the reference decodes it without drawing frame
    indices, so none are drawn here either and its one frame is repeated ``num_frames`` times.
    """
    if total_frames is None:
        frame_ids = [0] * num_frames
    else:
        frame_ids = sample_frame_indices(total_frames, num_frames, train, rng, test_clip)
    box, flip = draw_box(rng, height=height, width=width, size=size, train=train, hflip=hflip)
    return ClipPlan(tuple(frame_ids), box, flip)


def draw_box(
    rng: np.random.Generator, *, height: int, width: int, size: int, train: bool, hflip: float
) -> tuple[tuple[float, float, float, float], bool]:
    """Crop box and flip, drawn after the frame indices exactly as ``augment_clip`` draws them."""
    if not train:
        return eval_box(height, width, size), False
    top, left, h, w = _random_resized_crop_params(height, width, rng, TRAIN_SCALE, TRAIN_RATIO)
    flip = bool(rng.random() < hflip)  # drawn whatever hflip is, as in the reference
    return (float(top), float(left), float(top + h), float(left + w)), flip


def augment(frames: DataNode, size: int, device: str, layout: str = "FCHW") -> DataNode:
    """Frames [F, H, W, 3] (or one frame [H, W, 3], ``layout="CHW"``) uint8 -> [F, 3, size, size] (or
    [3, size, size]) float32: box resize, mirror, normalise.

    The per-sample box and flip come from the external sources ``roi_start``, ``roi_end``, ``flip``.
    Resizing straight to float keeps the pixels unrounded until normalisation, as the reference does.
    """
    roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
    roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
    flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
    frames = fn.resize(
        frames,
        device=device,
        size=[size, size],
        roi_start=roi_start,
        roi_end=roi_end,
        roi_relative=False,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
        dtype=types.FLOAT,
    )
    return fn.crop_mirror_normalize(
        frames,
        device=device,
        mirror=flip,
        mean=_MEAN_255,
        std=_STD_255,
        dtype=types.FLOAT,
        output_layout=layout,
    )


def _devices(device_id: int | None) -> tuple[str, str]:
    """(decoder backend, backend of the ops after it): mixed + gpu with a GPU, cpu + cpu without."""
    return ("mixed", "gpu") if device_id is not None else ("cpu", "cpu")


def _common(batch_size: int, num_threads: int, device_id: int | None, seed: int) -> dict[str, Any]:
    # exec_dynamic: batches may be smaller than batch_size (last eval batch, per-sample fallback).
    return {
        "batch_size": batch_size,
        "num_threads": num_threads,
        "device_id": device_id,
        "seed": seed,
        "exec_dynamic": True,
        "prefetch_queue_depth": 1,
    }


def build_video_pipeline(
    *,
    batch_size: int,
    size: int,
    device_id: int | None,
    num_threads: int = 2,
    do_augment: bool = True,
    seed: int = 0,
) -> Pipeline:
    """Encoded video files -> the frames in ``frame_ids`` (any order, repeats allowed) -> augmentation.

    Inputs: ``encoded`` (uint8 file bytes), ``frame_ids`` (int32 [F]), plus the augmentation's. Frames
    past the end raise (``pad_mode="none"``) instead of coming back black, so a truncated file is an
    error the loader can catch, never silently padded.
    """
    decoder, dev = _devices(device_id)

    @pipeline_def(**_common(batch_size, num_threads, device_id, seed))
    def video_pipe() -> DataNode:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frame_ids = fn.external_source(name="frame_ids", dtype=types.INT32, ndim=1)
        frames = fn.decoders.video(encoded, device=decoder, frames=frame_ids, pad_mode="none")
        return augment(frames, size, dev) if do_augment else frames

    pipe = video_pipe()
    pipe.build()
    return pipe


def define_shard_pipeline(
    *,
    batch_size: int,
    size: int,
    device_id: int | None,
    num_threads: int = 2,
    do_augment: bool = True,
    seed: int = 0,
) -> Pipeline:
    """The frame-shard graph, not yet built: one JPEG frame per sample (input ``jpeg``) -> augmentation.

    A batch of B clips of F frames is B*F samples through one decoder (the caller repeats each clip's
    box and flip F times and regroups the output), so all frames share the decoder's buffers. On a GPU
    the ``mixed`` decoder is nvJPEG, told to upsample chroma as libjpeg-turbo does (what DALI's CPU
    decoder and PIL do on 4:2:0 shards), so ``data.backend`` and the device change speed, not pixels.
    """
    decoder, dev = _devices(device_id)

    @pipeline_def(**_common(batch_size, num_threads, device_id, seed))
    def shard_pipe() -> DataNode:
        jpeg = fn.external_source(name="jpeg", dtype=types.UINT8, ndim=1)
        frames = fn.decoders.image(jpeg, device=decoder, output_type=types.RGB, jpeg_fancy_upsampling=True)
        return augment(frames, size, dev, layout="CHW") if do_augment else frames

    return shard_pipe()


def build_shard_pipeline(**kwargs: Any) -> Pipeline:
    """:func:`define_shard_pipeline`, built (its arguments; ``batch_size`` counts frames)."""
    pipe = define_shard_pipeline(**kwargs)
    pipe.build()
    return pipe


def build_frames_pipeline(
    *, batch_size: int, size: int, device_id: int | None, num_threads: int = 2, seed: int = 0
) -> Pipeline:
    """Already decoded uint8 frames (input ``frames``, [F, H, W, 3]) -> augmentation.

    The per-sample fallback: clips that the batched decoders rejected are decoded by the reference
    decoders and still augmented by the same graph.
    """
    _, dev = _devices(device_id)

    @pipeline_def(**_common(batch_size, num_threads, device_id, seed))
    def frames_pipe() -> DataNode:
        frames = fn.external_source(name="frames", dtype=types.UINT8, ndim=4, layout="FHWC")
        if dev == "gpu":
            frames = frames.gpu()
        return augment(frames, size, dev)

    pipe = frames_pipe()
    pipe.build()
    return pipe
