"""Whole dual encoders from checkpoint files: ours, released MILES / Frozen-in-Time / MCQ, and safetensors.

The released code saves `{"state_dict": {...}}` from a DataParallel model, so every key starts with
`module.`: `video_model.*` (the SpaceTimeTransformer, our names), `text_model.*` (a `transformers`
DistilBERT), the text projection (ReLU + Linear) as `text_proj.1.*` in MILES and `txt_proj.1.*` in
Frozen-in-Time / MCQ, and `vid_proj.0.*`. Our modules carry the released names, so mapping a file onto
`MilesModel` is prefix stripping plus one rename, and every tensor is accounted for: loaded, or listed
as missing or unexpected with its reason. A released file holds no config of ours (its trainer's pickled
run config is read as data and not used); the video encoder's shape is read off its tensors. MCQ's file
holds its VideoFormer (our blocks without temporal attention: `model.temporal_attention=false`, final
norm `norm1`) and its BridgeFormer, which only MCQ's pre-training uses: listed as unused, with that reason.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from miles import checkpoint as ckpt
from miles.checkpoint import CheckpointError

log = logging.getLogger("miles")

TOWERS = ("video_model.", "text_model.", "txt_proj.", "vid_proj.")
# Used only by MVM pre-training (the `bert`-mode mask token, the predictor): no released file has them, and
# evaluation and fine-tuning never use them, so they start from their initialisation.
PRETRAINING_ONLY = ("predictor.", "video_model.mask_token")
# MCQ's BridgeFormer (inside every block, its final norm and projection): only MCQ's pre-training uses it.
MCQ_BRIDGE = re.compile(
    r"^(bridge_proj\.|video_model\.norm2\.|video_model\.blocks\.\d+\.(crossattn|bridgeattn|bridge_mlp|norm[4-7])\.)"
)
# Tensors some files hold that this model does not use, and why that loses nothing.
HARMLESS_EXTRAS = {
    "text_model.pooler.": "the text pooler, unused (the CLS token is taken directly)",
    "text_model.embeddings.position_ids": "a constant buffer older transformers versions saved",
}


@dataclass
class CheckpointFile:
    """A checkpoint's tensors in our key layout, our config if the file has one, and its layout's name."""

    path: Path
    state: dict[str, torch.Tensor]
    config: dict[str, Any] | None
    layout: str


@dataclass
class WholeLoadReport:
    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)  # model key -> why it keeps its initialisation
    unexpected: dict[str, str] = field(default_factory=dict)  # file key -> why it is not used

    def random_parts(self) -> list[str]:
        """Towers with at least one tensor that evaluation uses and the file did not give."""
        return sorted({k.split(".", 1)[0] for k in self.missing if not k.startswith(PRETRAINING_ONLY)})


def _released_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    out, milesnames = {}, False
    for key, value in state.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if name.startswith("text_proj."):
            name, milesnames = "txt_proj." + name[len("text_proj.") :], True
        out[name] = value
    if any(MCQ_BRIDGE.match(k) for k in out):  # MCQ's VideoFormer calls its final norm `norm1`
        out = {re.sub(r"^video_model\.norm1\.", "video_model.norm.", k): v for k, v in out.items()}
        return out, "released MCQ"
    return out, "released MILES" if milesnames else "released Frozen-in-Time"


def _tensors(state: Any, path: Path, entry: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path}: entry '{entry}' is a {type(state).__name__}, not a state dict of tensors"
        )
    odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(f"checkpoint {path}: entry '{entry}' holds non-tensor values (e.g. {odd[0]!r})")
    return state


def read_checkpoint_file(path: str | Path) -> CheckpointFile:
    """Any supported file, read without running code from it (see miles.checkpoint)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        state = load_file(str(path))
        sidecar = path.with_suffix(".json")
        config = json.loads(sidecar.read_text())["config"] if sidecar.is_file() else None
        if config is not None:
            return CheckpointFile(path, state, config, "miles (safetensors)")
        state, layout = _released_keys(state)
        return CheckpointFile(path, state, None, f"{layout} (safetensors)")
    data = ckpt.load(path)
    if "model" in data and "config" in data:
        if not isinstance(data["config"], dict):
            raise CheckpointError(
                f"checkpoint {path}: entry 'config' is a {type(data['config']).__name__}, not a mapping"
            )
        return CheckpointFile(path, _tensors(data["model"], path, "model"), data["config"], "miles")
    if "state_dict" in data:
        state, layout = _released_keys(_tensors(data["state_dict"], path, "state_dict"))
        return CheckpointFile(path, state, None, layout)
    if data and all(isinstance(v, torch.Tensor) for v in data.values()):
        state, layout = _released_keys(data)
        return CheckpointFile(path, state, None, layout + " (bare state dict)")
    raise CheckpointError(
        f"{path} is neither a MILES checkpoint ('config' and 'model' entries) nor a released one "
        f"('state_dict'); it has: {', '.join(map(str, list(data)[:6])) or 'nothing'}"
    )


def infer_model_overrides(state: dict[str, torch.Tensor]) -> list[str]:
    """`model.*` / `data.*` overrides read off the video tower's tensors (a released file has no config).

    The head count cannot be read off weights: it stays the config's (12 for ViT-B/16)."""
    try:
        proj = state["video_model.patch_embed.proj.weight"]  # [D, 3, p, p]
        pos = state["video_model.pos_embed"]  # [1, N + 1, D]
        fc1 = state["video_model.blocks.0.mlp.fc1.weight"]  # [hidden, D]
    except KeyError as err:
        raise CheckpointError(f"no video tower to read the model's shape from (missing {err})") from None
    dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    side = round((pos.shape[1] - 1) ** 0.5)
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("video_model.blocks."))
    out = [
        f"model.embed_dim={dim}",
        f"model.patch_size={patch}",
        f"model.img_size={side * patch}",
        f"data.size={side * patch}",
        f"model.depth={depth}",
        f"model.mlp_ratio={fc1.shape[0] / dim}",
    ]
    temporal = state.get("video_model.temporal_embed")  # [1, T, D]; MCQ's VideoFormer has none
    if temporal is not None:
        out.insert(4, f"model.num_frames={int(temporal.shape[1])}")
    else:
        out.append("model.temporal_attention=false")
    if "vid_proj.0.weight" in state:
        out.append(f"model.projection_dim={int(state['vid_proj.0.weight'].shape[0])}")
    return out


def _part(key: str) -> str:
    """`predictor` for the predictor's tensors, the key itself for a single pre-training tensor."""
    return "predictor" if key.startswith("predictor.") else key


def _why_missing(key: str) -> str:
    if key.startswith(PRETRAINING_ONLY):
        return "pre-training only (MVM): starts from its initialisation"
    return "not in the file"


def _why_unexpected(key: str, model_has_predictor: bool) -> str | None:
    """The reason a file tensor may go unused, or None when it must not."""
    for prefix, why in HARMLESS_EXTRAS.items():
        if key.startswith(prefix):
            return why
    if MCQ_BRIDGE.match(key):
        return "MCQ's BridgeFormer, which only MCQ's pre-training uses (its evaluation ignores it too)"
    if key.startswith(PRETRAINING_ONLY) and not model_has_predictor:
        return "the MVM predictor of a pre-training run: this model has none (mvm.enabled=false)"
    return None


def load_whole(model: nn.Module, file: CheckpointFile, *, allow_partial: bool = False) -> WholeLoadReport:
    """Every model tensor from the file, strictly: refused (naming keys) unless all of the released model
    is there, or `allow_partial` (then the missing towers keep their initialisation, and the log says so).
    """
    own = model.state_dict()
    report = WholeLoadReport(file.layout)
    mismatched = [
        f"{k}: {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
        for k, v in file.state.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise CheckpointError(
            f"checkpoint {file.path} ({file.layout}) does not fit the model: {len(mismatched)} shape "
            f"mismatches, e.g. {'; '.join(mismatched[:3])}; check model.* (and --text-model) against it"
        )
    report.missing = {k: _why_missing(k) for k in own if k not in file.state}
    has_predictor = any(k.startswith("predictor.") for k in own)
    extra = {k: _why_unexpected(k, has_predictor) for k in file.state if k not in own}
    report.unexpected = {k: why or "not part of this model" for k, why in extra.items()}
    must_have = [k for k in report.missing if not k.startswith(PRETRAINING_ONLY)]
    unexplained = [k for k, why in extra.items() if why is None]
    if (must_have or unexplained) and not allow_partial:
        parts = []
        if must_have:
            towers = sorted({k.split(".", 1)[0] for k in must_have})
            parts.append(
                f"{len(must_have)} model tensors missing from it ({', '.join(towers)}; e.g. {must_have[0]})"
            )
        if unexplained:
            parts.append(f"{len(unexplained)} tensors of the file unused (e.g. {', '.join(unexplained[:3])})")
        raise CheckpointError(
            f"checkpoint {file.path} ({file.layout}) is not a whole model of this shape: {'; '.join(parts)}. "
            "Check --text-model / model.text_model, or set model.allow_partial_init=true to start the "
            "missing parts from their initialisation"
        )
    report.loaded = sorted(k for k in file.state if k in own)
    model.load_state_dict({k: file.state[k] for k in report.loaded}, strict=False)
    random_parts = report.random_parts()
    pretraining = sorted({_part(k) for k in report.missing if k.startswith(PRETRAINING_ONLY)})
    log.info(
        "weights from %s (%s): %d tensors loaded; %s%s",
        file.path,
        file.layout,
        len(report.loaded),
        f"RANDOM (initialisation kept): {', '.join(random_parts)}" if random_parts else "no part left random",
        f"; pre-training only, initialised: {', '.join(pretraining)}" if pretraining else "",
    )
    if must_have:
        log.warning(
            "model.allow_partial_init: %s start from their initialisation, not from %s: this is NOT the "
            "checkpoint's model",
            ", ".join(sorted({k.split(".", 1)[0] for k in must_have})),
            file.path,
        )
    return report


def save_safetensors(model: nn.Module, config: dict[str, Any], out: Path, source: str, layout: str) -> Path:
    """Our key layout as safetensors, plus `<out>.json` with the config: loadable with no pickle at all."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"output {out} must end in .safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": "pt", "source": source, "layout": layout})
    os.replace(tmp, out)
    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps({"config": config, "source": source, "layout": layout}, indent=2))
    return out
