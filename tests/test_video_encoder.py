"""The space-time ViT against timm's ViT, and its divided-attention semantics."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from miles.attention import DividedAttention, attend, set_attention_backend
from miles.video_encoder import SpaceTimeTransformer

KW = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4)


def _pair(seed: int = 0) -> tuple[VisionTransformer, SpaceTimeTransformer]:
    torch.manual_seed(seed)
    vit = VisionTransformer(num_classes=0, qkv_bias=True, **KW).eval()
    with torch.no_grad():
        for p in vit.parameters():  # non-trivial weights everywhere, biases and norms included
            p.normal_(0, 0.1)
    model = SpaceTimeTransformer(num_frames=4, time_init="random", **KW).eval()
    missing, unexpected = model.load_state_dict(vit.state_dict(), strict=False)
    assert not unexpected
    assert all(("timeattn" in k or "norm3" in k or k in ("temporal_embed", "mask_token")) for k in missing)
    with torch.no_grad():
        model.temporal_embed.zero_()
        for blk in model.blocks:  # temporal attention zeroed: its output projection is zero
            blk.timeattn.proj.weight.zero_()
            blk.timeattn.proj.bias.zero_()
    return vit, model


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_one_frame_equals_timm_vit(backend: str) -> None:
    vit, model = _pair()
    set_attention_backend(model, backend)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = vit(x)
        got = model(x[:, None])
    assert expected.shape == got.shape == (3, 64)
    assert (expected - got).abs().max().item() < 1e-5


def test_released_zero_time_init_is_a_no_op_branch() -> None:
    torch.manual_seed(0)
    model = SpaceTimeTransformer(num_frames=4, time_init="zeros", **KW)
    blk = model.blocks[0]
    x = torch.randn(2, 1 + 4 * 16, 64)
    assert blk.timeattn(x, 4, "time").abs().max().item() == 0.0
    assert blk.attn(x, 4, "space").abs().max().item() > 0.0


def _dense_divided_attention(
    layer: DividedAttention, x: torch.Tensor, frames: int, along: str
) -> torch.Tensor:
    """Per-query loops written from the definition: CLS sees all; others see CLS + their time/space line."""
    b, t, d = x.shape
    h = layer.num_heads
    n = (t - 1) // frames
    q, k, v = layer.qkv(x).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
    out = torch.zeros(b, h, t, d // h)
    for i in range(t):
        if i == 0:
            keys = list(range(t))
        else:
            f, p = divmod(i - 1, n)
            line = (
                [1 + ff * n + p for ff in range(frames)]
                if along == "time"
                else [1 + f * n + pp for pp in range(n)]
            )
            keys = [0] + line
        w = (q[:, :, i : i + 1] @ k[:, :, keys].transpose(-1, -2) * (d // h) ** -0.5).softmax(-1)
        out[:, :, i] = (w @ v[:, :, keys])[:, :, 0]
    return layer.proj(out.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("along", ["time", "space"])
@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_divided_attention_matches_definition(along: str, backend: str) -> None:
    torch.manual_seed(1)
    layer = DividedAttention(32, 4, backend=backend).eval()
    frames, n = 3, 5
    x = torch.randn(2, 1 + frames * n, 32)
    with torch.no_grad():
        got = layer(x, frames, along)
        expected = _dense_divided_attention(layer, x, frames, along)
    assert (got - expected).abs().max().item() < 1e-5


def test_backends_agree_forward_and_backward() -> None:
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, 5, 7, 8, requires_grad=True) for _ in range(3))
    a = attend(q, k, v, "sdpa")
    ga = torch.autograd.grad(a.square().sum(), (q, k, v))
    b = attend(q, k, v, "reference")
    gb = torch.autograd.grad(b.square().sum(), (q, k, v))
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    for x, y in zip(ga, gb, strict=True):
        assert torch.allclose(x, y, atol=1e-4, rtol=1e-4)


def test_fewer_frames_than_embeddings_and_too_many() -> None:
    torch.manual_seed(3)
    model = SpaceTimeTransformer(num_frames=4, **KW).eval()
    out = model.forward_features(torch.randn(2, 2, 3, 32, 32))
    assert out.cls.shape == (2, 64) and out.patches.shape == (2, 2, 16, 64)
    with pytest.raises(ValueError, match="frames exceed"):
        model(torch.randn(1, 5, 3, 32, 32))


def test_bert_mask_replaces_hidden_patches_by_mask_token() -> None:
    torch.manual_seed(4)
    model = SpaceTimeTransformer(num_frames=4, **KW).eval()
    video = torch.randn(2, 2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5]] = True
    tokens = model.embed(video, mask)
    plain = model.embed(video)
    grid = (tokens - plain)[:, 1:].reshape(2, 2, 16, 64)
    changed = grid.abs().amax(-1) > 0
    assert torch.equal(changed, mask[:, None, :].expand(2, 2, 16))  # same positions in every frame
    expected = model.mask_token[0, 0] + model.pos_embed[0, 2] + model.temporal_embed[0, 1]
    assert torch.allclose(tokens[0, 1 + 16 + 1], expected, atol=1e-6)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_without_temporal_attention_it_is_mcqs_videoformer(backend: str) -> None:
    """`temporal_attention=False` computes MCQ's VideoFormer, written here from its definition: the spatial
    position embedding tiled over frames (no temporal one), pre-norm blocks of CLS-to-all / patch-to-its-frame
    attention then MLP, the final norm's CLS; and it has no temporal weights at all."""
    torch.manual_seed(3)
    model = SpaceTimeTransformer(num_frames=4, temporal_attention=False, **KW).eval()
    set_attention_backend(model, backend)
    names = list(model.state_dict())
    assert not [k for k in names if "timeattn" in k or "norm3" in k or k == "temporal_embed"]
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    video = torch.randn(2, 3, 3, 32, 32)
    b, f = video.shape[:2]
    with torch.no_grad():
        patches = model.patch_embed(video.flatten(0, 1)).reshape(b, -1, 64)  # frame-major tokens
        pos = torch.cat([model.pos_embed[:, :1], model.pos_embed[:, 1:].repeat(1, f, 1)], dim=1)
        x = torch.cat([model.cls_token.expand(b, -1, -1), patches], dim=1) + pos
        for blk in model.blocks:
            x = x + _dense_divided_attention(blk.attn, blk.norm1(x), f, "space")
            x = x + blk.mlp(blk.norm2(x))
        expected = model.norm(x)[:, 0]
        got = model(video)
    assert (got - expected).abs().max().item() < 1e-5
