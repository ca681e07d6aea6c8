"""Contrastive and masked-feature losses against hand-written formulas."""

from __future__ import annotations

import math

import pytest
import torch

from miles.losses import NormSoftmaxLoss, masked_feature_loss


def _infonce_by_hand(v: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    v = v / v.norm(dim=1, keepdim=True)
    t = t / t.norm(dim=1, keepdim=True)
    logits = v @ t.T / temperature
    n = logits.shape[0]
    v2t = sum(torch.logsumexp(logits[i, :], 0) - logits[i, i] for i in range(n)) / n
    t2v = sum(torch.logsumexp(logits[:, j], 0) - logits[j, j] for j in range(n)) / n
    return v2t + t2v


@pytest.mark.parametrize("temperature", [0.05, 0.3])
def test_norm_softmax_matches_formula(temperature: float):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(7, 16, generator=g, dtype=torch.float64)
    t = torch.randn(7, 16, generator=g, dtype=torch.float64)
    loss = NormSoftmaxLoss(temperature)(v, t)
    assert loss.ndim == 0
    torch.testing.assert_close(loss, _infonce_by_hand(v, t, temperature), rtol=1e-10, atol=1e-10)
    # Symmetric: swapping the modalities transposes the logits and leaves the sum unchanged.
    torch.testing.assert_close(NormSoftmaxLoss(temperature)(t, v), loss, rtol=1e-10, atol=1e-10)
    # Scale invariance: embeddings are normalised inside.
    torch.testing.assert_close(NormSoftmaxLoss(temperature)(3 * v, 0.5 * t), loss, rtol=1e-10, atol=1e-10)


def test_norm_softmax_closed_form():
    # v = t = identity, T = 1: every row and column has logit 1 on the diagonal and 0 elsewhere.
    b = 5
    loss = NormSoftmaxLoss(1.0)(torch.eye(b), torch.eye(b))
    assert loss.item() == pytest.approx(2 * (math.log(math.e + b - 1) - 1), rel=1e-6)


def test_norm_softmax_second_term_is_text_to_video():
    # A matrix whose row- and column-softmax differ: a loss with two video->text terms would give
    # 2 * row term; the symmetric loss gives row term + column term.
    v = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    logits = v @ t.T / 0.5
    rows = torch.nn.functional.cross_entropy(logits, torch.arange(3))
    cols = torch.nn.functional.cross_entropy(logits.T, torch.arange(3))
    assert abs(rows - cols) > 1e-3
    torch.testing.assert_close(NormSoftmaxLoss(0.5)(v, t), rows + cols)


def test_norm_softmax_gradcheck():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(NormSoftmaxLoss(0.5), (v, t))


def test_norm_softmax_rejects_bad_shapes():
    with pytest.raises(ValueError):
        NormSoftmaxLoss()(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(ValueError):
        NormSoftmaxLoss(0.0)


def _layer_norm_by_hand(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6)


def _smooth_l1_by_hand(d: torch.Tensor) -> torch.Tensor:
    a = d.abs()
    return torch.where(a < 1, 0.5 * d**2, a - 0.5).mean()


def test_masked_feature_loss_known_values():
    pred = torch.zeros(1, 2, 2)
    target = torch.tensor([[[0.5, -0.5], [2.0, 0.0]]])
    # mse: (0.25 + 0.25 + 4 + 0) / 4; smooth_l1: (0.125 + 0.125 + 1.5 + 0) / 4
    assert masked_feature_loss(pred, target, normalize_target=False).item() == pytest.approx(1.125)
    got = masked_feature_loss(pred, target, kind="smooth_l1", normalize_target=False)
    assert got.item() == pytest.approx(0.4375)
    # Normalised per token every 2-d target becomes (+-1): mse = 1 - eps-correction
    want = 1.0 / (1.0 + 1e-6 / 0.25) * 0.5 + 1.0 / (1.0 + 1e-6 / 1.0) * 0.5
    assert masked_feature_loss(pred, target).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("normalize_target", [False, True])
def test_masked_feature_loss_random(normalize_target: bool):
    g = torch.Generator().manual_seed(2)
    pred = (3 * torch.randn(2, 5, 8, generator=g, dtype=torch.float64)).requires_grad_(True)
    target = (4 * torch.randn(2, 5, 8, generator=g, dtype=torch.float64) + 1).requires_grad_(True)
    ref_target = _layer_norm_by_hand(target.detach()) if normalize_target else target.detach()
    mse = masked_feature_loss(pred, target, normalize_target=normalize_target)
    torch.testing.assert_close(mse, ((pred - ref_target) ** 2).mean())
    sl1 = masked_feature_loss(pred, target, kind="smooth_l1", normalize_target=normalize_target)
    torch.testing.assert_close(sl1, _smooth_l1_by_hand(pred - ref_target))
    (mse + sl1).backward()
    assert pred.grad is not None and target.grad is None  # the target is never trained through


def test_masked_feature_loss_bad_kind():
    with pytest.raises(ValueError, match="mse.*smooth_l1"):
        masked_feature_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), kind="l1")
    with pytest.raises(ValueError):
        masked_feature_loss(torch.zeros(1, 2, 3), torch.zeros(1, 3, 3))
