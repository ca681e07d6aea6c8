"""Video weights load from timm ViT files, released-style MILES checkpoints and safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from miles.pretrained import load_video_weights
from miles.video_encoder import SpaceTimeTransformer

KW = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


def _vit() -> VisionTransformer:
    torch.manual_seed(0)
    vit = VisionTransformer(num_classes=10, qkv_bias=True, **KW).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.1)
    return vit


@pytest.mark.parametrize("form", ["timm", "released", "safetensors"])
def test_image_vit_weights_give_the_image_model_on_one_frame(form: str, tmp_path: Path) -> None:
    vit = _vit()
    state = vit.state_dict()
    if form == "timm":
        path = tmp_path / "vit.pth"
        torch.save(state, path)
    elif form == "released":  # DataParallel-wrapped MILES / Frozen layout, with a text tower beside it
        path = tmp_path / "miles.pth"
        wrapped = {f"module.video_model.{k}": v for k, v in state.items()}
        wrapped["module.text_model.embeddings.word_embeddings.weight"] = torch.zeros(3, 4)
        torch.save({"state_dict": wrapped, "epoch": 1}, path)
    else:
        path = tmp_path / "vit.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    torch.manual_seed(1)
    model = SpaceTimeTransformer(num_frames=4, time_init="zeros", **KW).eval()
    report = load_video_weights(model, path)
    assert "head.weight" in report.ignored or "module.video_model.head.weight" in report.ignored
    assert "temporal_embed" in report.missing and "blocks.0.timeattn.qkv.weight" in report.missing
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = vit.forward_head(vit.forward_features(x), pre_logits=True)
        got = model(x[:, None])
    assert (expected - got).abs().max().item() < 1e-5


def test_shape_mismatch_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "vit.pth"
    torch.save(_vit().state_dict(), path)
    model = SpaceTimeTransformer(num_frames=4, img_size=48, patch_size=8, embed_dim=64, depth=2, num_heads=4)
    with pytest.raises(ValueError, match="pos_embed"):
        load_video_weights(model, path)
    with pytest.raises(FileNotFoundError, match="model.video_weights"):
        load_video_weights(model, tmp_path / "missing.pth")
