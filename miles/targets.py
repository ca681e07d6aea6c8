"""What masked visual modelling reconstructs: the ablation axis `mvm.target`.

- `snapshot` (MILES): the snapshot encoder's last-block patch features of the unmasked clip;
- `frozen`: the same encoder, never updated after step 0 (features without the language the
  contrastive loss keeps teaching; the paper's argument for a *moving* snapshot is tested against it);
- `pixel` (VideoMAE): each frame's patch pixels, normalised per patch and channel;
- `hog` (MaskFeat): histograms of oriented gradients of each frame, per patch.

`pixel` and `hog` are computed from the input clip alone, with no second encoder pass: a step costs the
online encoder's forward and backward only, not the snapshot's forward over the full grid.

HOG follows scikit-image's `hog(orientations=9, pixels_per_cell=(c, c), cells_per_block=(1, 1),
block_norm="L2")` on each colour channel separately (as MaskFeat, rather than scikit-image's "channel
with the largest gradient"): central-difference gradients with zeros on the frame border, unsigned
orientation hard-binned into 9 bins over [0, 180) degrees, magnitudes averaged per cell, each cell's
histogram L2-normalised. A patch of side p holds 2 x 2 cells of side p / 2, so its target has
3 channels x 4 cells x 9 bins = 108 values, scaled by 3 (sqrt of 9 bins) so that they have a mean square
of about 1, as the layer-normalised snapshot features and the standardised pixels do: the same
`mvm.weight` then weighs every target alike.
"""

from __future__ import annotations

import torch

TARGETS = ("snapshot", "frozen", "pixel", "hog")
ENCODER_TARGETS = ("snapshot", "frozen")  # targets from a copy of the video encoder
HOG_ORIENTATIONS = 9
HOG_CELLS_PER_PATCH_SIDE = 2
HOG_EPS = 1e-5  # scikit-image's block-normalisation epsilon
PIXEL_EPS = 1e-6  # VideoMAE's: added to the per-patch standard deviation


def target_dim(target: str, embed_dim: int, patch_size: int, channels: int = 3) -> int:
    """Width of one patch's target: what the predictor's head must output."""
    if target in ENCODER_TARGETS:
        return embed_dim
    if target == "pixel":
        return channels * patch_size * patch_size
    if target == "hog":
        return channels * HOG_CELLS_PER_PATCH_SIDE**2 * HOG_ORIENTATIONS
    raise ValueError(f"mvm.target must be one of {TARGETS}, got {target!r}")


def _patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, F, C, H, W] -> [B, F, gh * gw, patch, patch, C], patches in row-major grid order."""
    b, f, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"frames of {h}x{w} px do not split into {patch}-px patches")
    x = x.reshape(b, f, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 1, 3, 5, 4, 6, 2).reshape(b, f, (h // patch) * (w // patch), patch, patch, c)


def pixel_targets(video: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, F, 3, H, W] -> [B, F, N, patch * patch * 3]: every patch's pixels of each channel standardised
    (mean 0, unbiased std 1), so the loss weighs texture and edges, not a patch's brightness."""
    x = _patches(video.float(), patch).flatten(3, 4)  # [B, F, N, p*p, C]
    mean = x.mean(dim=3, keepdim=True)
    std = x.var(dim=3, unbiased=True, keepdim=True).sqrt()
    return ((x - mean) / (std + PIXEL_EPS)).flatten(3)


def hog_cells(image: torch.Tensor, cell: int, orientations: int = HOG_ORIENTATIONS) -> torch.Tensor:
    """[..., H, W] -> [..., H // cell, W // cell, orientations]: L2-normalised per-cell histograms."""
    x = image.to(torch.float64 if image.dtype == torch.float64 else torch.float32)
    g_row = torch.zeros_like(x)
    g_col = torch.zeros_like(x)
    g_row[..., 1:-1, :] = x[..., 2:, :] - x[..., :-2, :]
    g_col[..., :, 1:-1] = x[..., :, 2:] - x[..., :, :-2]
    magnitude = torch.hypot(g_col, g_row)
    angle = torch.rad2deg(torch.atan2(g_row, g_col)) % 180.0
    edges = torch.arange(orientations, dtype=x.dtype, device=x.device) * (180.0 / orientations)
    # bin i holds angles in [edge_i, edge_i+1): counted by comparison, as scikit-image does; an angle
    # that rounds to 180.0 belongs to no bin there, and here.
    bins = (angle[..., None] >= edges).sum(-1) - 1
    votes = (bins[..., None] == torch.arange(orientations, device=x.device)) & (angle[..., None] < 180.0)
    weighted = magnitude[..., None] * votes  # [..., H, W, O]
    h, w = x.shape[-2] // cell, x.shape[-1] // cell
    weighted = weighted[..., : h * cell, : w * cell, :]
    cells = weighted.reshape(*x.shape[:-2], h, cell, w, cell, orientations).sum(dim=(-4, -2)) / (cell * cell)
    return cells / torch.sqrt((cells * cells).sum(-1, keepdim=True) + HOG_EPS**2)


def hog_targets(video: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, F, C, H, W] -> [B, F, N, C * 4 * 9]: each patch's HOG cells, channel-major, times sqrt(9)."""
    if patch % HOG_CELLS_PER_PATCH_SIDE:
        raise ValueError(f"mvm.target=hog needs an even patch size (2 x 2 HOG cells per patch), got {patch}")
    cell = patch // HOG_CELLS_PER_PATCH_SIDE
    b, f, c, h, w = video.shape
    cells = hog_cells(video, cell)  # [B, F, C, H/cell, W/cell, O]
    k = HOG_CELLS_PER_PATCH_SIDE
    gh, gw = h // patch, w // patch
    cells = cells.reshape(b, f, c, gh, k, gw, k, HOG_ORIENTATIONS) * HOG_ORIENTATIONS**0.5
    return cells.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, f, gh * gw, -1)


def input_targets(target: str, video: torch.Tensor, patch: int) -> torch.Tensor:
    """Targets computed from the clip itself (`pixel`, `hog`), fp32, never part of the graph."""
    with torch.no_grad(), torch.autocast(video.device.type, enabled=False):
        if target == "pixel":
            return pixel_targets(video, patch)
        if target == "hog":
            return hog_targets(video, patch)
    raise ValueError(f"{target!r} is not an input-derived target; use one of pixel, hog")
