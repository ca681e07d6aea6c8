"""The training and evaluation augmentation of a clip: one random resized crop and flip for all its frames
(torchvision's parameters, drawn from the clip's own generator), ImageNet normalisation; evaluation is
resize + centre crop. DALI's graphs replay the same boxes, so both paths give the same pixels.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "augment_clip"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN_255 = [255.0 * m for m in IMAGENET_MEAN]
_STD_255 = [255.0 * s for s in IMAGENET_STD]


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
