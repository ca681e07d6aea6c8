"""The MILES objective: contrastive input, MVM at the hidden positions only, snapshot EMA and copy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from miles.config import build_config
from miles.model import MilesModel
from miles.snapshot import SnapshotEncoder
from miles_kernels import ops


def _model(*overrides: str) -> MilesModel:
    torch.manual_seed(0)
    return MilesModel(build_config("smoke", overrides=list(overrides))).eval()


def _inputs(model: MilesModel, b: int = 4):
    torch.manual_seed(1)
    video = torch.randn(b, 2, 3, 32, 32)
    tokens = model.tokenizer(
        ["a red circle moves left", "a blue square grows"] * (b // 2), return_tensors="pt", padding=True
    )
    mask, visible = ops.tube_mask(b, model.video_model.grid_size, 0.5, seed=0)
    return video, tokens["input_ids"], tokens["attention_mask"], mask, visible


@pytest.mark.parametrize("contrastive_input", ["full", "masked"])
def test_contrastive_input(contrastive_input: str) -> None:
    model = _model(f"mvm.contrastive_input={contrastive_input}")
    video, ids, am, mask, visible = _inputs(model)
    targets = torch.randn(4, 2, 16, 64)
    with torch.no_grad():
        masked = model(video, ids, am, mask, targets, visible)
        plain = model(video, ids, am)
    same = torch.allclose(masked.contrastive, plain.contrastive, atol=1e-6)
    assert same == (contrastive_input == "full")
    assert plain.mvm.item() == 0.0 and masked.mvm.item() > 0


def test_mvm_loss_is_regression_at_hidden_positions_only() -> None:
    model = _model("mvm.contrastive_input=masked")
    video, ids, am, mask, visible = _inputs(model)
    targets = torch.randn(4, 2, 16, 64)
    with torch.no_grad():
        out = model(video, ids, am, mask, targets, visible)
        features = model.video_model.forward_features(video, mask)
        pred = model.predictor(features, torch.arange(16).expand(4, 16))
        hidden = mask[:, None, :, None].expand_as(pred)
        p = pred[hidden].reshape(-1, 64)
        t = F.layer_norm(targets[hidden].reshape(-1, 64), (64,), eps=1e-6)
        assert out.mvm.item() == pytest.approx(F.mse_loss(p, t).item(), rel=1e-5)
        # targets at visible positions do not matter
        changed = targets.clone()
        changed[~mask[:, None, :, None].expand_as(changed)] = 100.0
        assert model(video, ids, am, mask, changed, visible).mvm.item() == pytest.approx(
            out.mvm.item(), rel=1e-6
        )


def test_snapshot_ema_and_copy() -> None:
    model = _model()
    online = model.video_model
    ema = SnapshotEncoder(online, "ema", momentum=0.9)
    copy = SnapshotEncoder(online, "copy", copy_every=3)
    before = [p.clone() for p in ema.encoder.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    ema.update(online, 1)
    for b, s, o in zip(before, ema.encoder.parameters(), online.parameters(), strict=True):
        assert torch.allclose(s, 0.9 * b + 0.1 * o, atol=1e-6)
    assert not any(p.requires_grad for p in ema.encoder.parameters())
    copy.update(online, 2)
    assert not torch.equal(next(copy.encoder.parameters()), next(online.parameters()))
    copy.update(online, 3)
    assert all(torch.equal(s, o) for s, o in zip(copy.encoder.parameters(), online.parameters(), strict=True))
    ema.train()
    assert not ema.encoder.training  # targets never see dropout


def test_drop_mode_encoder_on_all_positions_equals_the_full_grid() -> None:
    model = _model()
    video = torch.randn(2, 2, 3, 32, 32)
    everything = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        full = model.video_model.forward_features(video)
        dropped = model.video_model.forward_visible(video, everything, impl="reference")
    assert torch.allclose(full.cls, dropped.cls, atol=1e-5)
    assert torch.allclose(full.last_hidden, dropped.last_hidden, atol=1e-5)


@pytest.mark.parametrize("mode", ["bert", "drop"])
def test_hidden_pixels_never_reach_the_masked_pass(mode: str) -> None:
    """Both modes see nothing of the hidden tubes: changing those pixels changes no prediction."""
    model = _model(f"mvm.mode={mode}", "mvm.contrastive_input=masked")
    video, ids, am, mask, visible = _inputs(model)
    targets = torch.randn(4, 2, 16, 64)
    patches = mask.reshape(4, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2)  # [B, 32, 32]
    changed = video.clone()
    changed[patches[:, None, None].expand_as(video)] = 5.0
    with torch.no_grad():
        a = model(video, ids, am, mask, targets, visible)
        b = model(changed, ids, am, mask, targets, visible)
    assert a.mvm.item() == pytest.approx(b.mvm.item(), rel=1e-6)
    assert a.contrastive.item() == pytest.approx(b.contrastive.item(), rel=1e-6)


def test_drop_mode_needs_visible_and_differs_from_bert() -> None:
    drop = _model("mvm.mode=drop", "mvm.contrastive_input=masked")
    bert = _model("mvm.mode=bert", "mvm.contrastive_input=masked")
    bert.load_state_dict(drop.state_dict())
    video, ids, am, mask, visible = _inputs(drop)
    targets = torch.randn(4, 2, 16, 64)
    with pytest.raises(ValueError, match="visible"):
        drop(video, ids, am, mask, targets)
    with torch.no_grad():
        d = drop(video, ids, am, mask, targets, visible)
        b = bert(video, ids, am, mask, targets, visible)
    assert torch.isfinite(d.loss) and d.mvm.item() > 0
    assert abs(d.contrastive.item() - b.contrastive.item()) > 1e-4  # mask tokens vs no hidden tokens
