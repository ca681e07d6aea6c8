"""Loading video-encoder weights: timm ViT image weights, released MILES / Frozen-in-Time checkpoints, ours.

Our parameter names are the released ones, so the key map is only prefix stripping (`module.`,
`video_model.`). An image ViT has no temporal parts: those keep their initialisation, with the temporal
embedding zeroed, so that with `time_init: zeros` the video model starts as the image model on every frame.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from miles.checkpoint import load as load_checkpoint
from miles.video_encoder import SpaceTimeTransformer

log = logging.getLogger("miles")

PREFIXES = ("module.", "video_model.")
CONTAINER_KEYS = ("state_dict", "model", "module")


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file: kept as initialised
    ignored: list[str] = field(default_factory=list)  # in the file, not part of the video encoder


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"video weights {path} do not exist (config key model.video_weights)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = load_checkpoint(path, what="video weights (model.video_weights)")  # never unpickles code
    for key in CONTAINER_KEYS:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors (looked under {', '.join(CONTAINER_KEYS)})")
    return state


def _strip(key: str) -> str | None:
    """Key in our video encoder's namespace, or None for another tower's (text, projections) key."""
    if key.startswith("module."):
        key = key[len("module.") :]
    if key.startswith("video_model."):
        return key[len("video_model.") :]
    if key.startswith(("text_model.", "txt_proj.", "vid_proj.", "predictor.")):
        return None
    return key


def load_video_weights(model: SpaceTimeTransformer, path: str | Path) -> LoadReport:
    path = Path(path)
    own = model.state_dict()
    report = LoadReport()
    selected: dict[str, torch.Tensor] = {}
    for key, value in _read_state(path).items():
        name = _strip(key)
        if name is None or name not in own:
            report.ignored.append(key)
            continue
        if value.shape != own[name].shape:
            raise ValueError(
                f"{path}: '{key}' has shape {tuple(value.shape)}, the model expects "
                f"{tuple(own[name].shape)}; "
                "check model.img_size / patch_size / embed_dim / num_frames against the checkpoint"
            )
        selected[name] = value
    if not selected:
        raise ValueError(f"{path}: no key matches the video encoder (first keys: {report.ignored[:3]})")
    report.loaded = sorted(selected)
    report.missing = sorted(set(own) - set(selected))
    with torch.no_grad():
        if "temporal_embed" in report.missing:
            model.temporal_embed.zero_()
        model.load_state_dict(selected, strict=False)
    heads = {k.removeprefix("module.").split(".")[0] for k in report.ignored}
    other_towers = sorted(heads & {"text_model", "txt_proj", "text_proj", "vid_proj"})
    if other_towers:
        log.warning(
            "model.video_weights loads only the video tower of %s: its %s are NOT loaded, so this is not "
            "the checkpoint's model; model.init_checkpoint loads it whole",
            path,
            ", ".join(other_towers),
        )
    log.info(
        "video weights %s: %d tensors loaded, %d kept as initialised (%s), %d ignored",
        path,
        len(report.loaded),
        len(report.missing),
        ", ".join(report.missing[:3]) + (", ..." if len(report.missing) > 3 else ""),
        len(report.ignored),
    )
    return report
