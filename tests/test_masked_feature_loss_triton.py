"""Fused Triton MVM loss against the PyTorch reference, loss value and pred gradient, on CPU.

The kernels run through the Triton interpreter (`kernel_checks.import_interpreted`); TRITON_INTERPRET is set
again around each test, since triton reads it once more at the first launch.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import import_interpreted, rel_err

from miles_kernels import ops
from miles_kernels.masked_feature_loss import masked_feature_loss_reference

mt = import_interpreted("miles_kernels.masked_feature_loss_triton")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _interpret_and_poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Interpreter on; outputs the kernels must fully write are allocated as NaN (unwritten -> NaN)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(mt, "POISON_OUTPUTS", True)


def _hidden(b: int, n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(n, generator=gen)[:m].sort().values for _ in range(b)])


def _grids(b: int, f: int, n: int, c: int, dtype: torch.dtype, gen: torch.Generator):
    """pred ~ N(0, 1) (a leaf), target ~ N(1, 3^2): LN changes it, and smooth-L1 sees both branches."""
    pred = torch.randn(b, f, n, c, generator=gen).to(dtype).requires_grad_(True)
    target = (3 * torch.randn(b, f, n, c, generator=gen) + 1).to(dtype)
    return pred, target


def _check_against_reference(
    pred: torch.Tensor,
    target: torch.Tensor,
    hidden: torch.Tensor,
    kind: str,
    normalize: bool,
    tol: float,
    upstream: float = 1.7,
) -> torch.Tensor:
    """Loss and pred gradient (upstream gradient not 1) through the kernel and through the reference."""
    got = ops.masked_feature_loss(pred, target, hidden, kind=kind, normalize_target=normalize, impl="triton")
    want = masked_feature_loss_reference(pred, target, hidden, kind=kind, normalize_target=normalize)
    assert got.shape == () and got.dtype == want.dtype == torch.float32
    assert torch.isfinite(got)
    assert rel_err(got, want) <= tol, f"loss {got.item()} vs reference {want.item()}"
    g = torch.tensor(upstream)
    (grad,) = torch.autograd.grad(got, (pred,), g)
    (grad_ref,) = torch.autograd.grad(want, (pred,), g)
    assert grad.dtype == pred.dtype and grad.shape == pred.shape
    err = rel_err(grad, grad_ref)
    assert err <= tol, f"pred gradient: relative error {err:.3g} > {tol}"
    return grad


# (B, F, N, C, M): C = 192 / 768 / 1024 and non-powers of two; N = 196, 10 and 7; M = 0, 1, some, all.
SHAPES = [
    (2, 2, 10, 100, 4),
    (1, 2, 196, 192, 147),
    (2, 1, 10, 768, 7),
    (1, 1, 10, 1024, 10),
    (3, 1, 7, 33, 7),
    (1, 1, 196, 384, 1),
    (2, 3, 10, 64, 0),
]


@pytest.mark.parametrize("normalize", [True, False], ids=["ln", "raw"])
@pytest.mark.parametrize("kind", ["mse", "smooth_l1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}F{}N{}C{}M{}".format(*s))
def test_matches_reference(
    shape: tuple[int, int, int, int, int], dtype: torch.dtype, kind: str, normalize: bool
) -> None:
    b, f, n, c, m = shape
    # crc32, not hash(): Python salts string hashes per process, so a failing input would not reproduce
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, kind, normalize)).encode()))
    pred, target = _grids(b, f, n, c, dtype, gen)
    hidden = _hidden(b, n, m, gen)
    grad = _check_against_reference(pred, target, hidden, kind, normalize, TOL[dtype])
    # the gradient is zero exactly at the positions that are not hidden (and written there: no NaN)
    unselected = torch.ones(b, n, dtype=torch.bool).scatter_(1, hidden, False)
    assert (grad.float().permute(0, 2, 1, 3)[unselected] == 0).all()
    if m == 0:
        assert (grad == 0).all()


def test_no_hidden_position_gives_zero_not_nan() -> None:
    """An empty mean would be NaN; both paths give 0 with a zero gradient."""
    gen = torch.Generator().manual_seed(0)
    pred, target = _grids(2, 2, 5, 8, torch.float32, gen)
    none = torch.zeros(2, 0, dtype=torch.int64)
    for impl in ("reference", "triton"):
        loss = ops.masked_feature_loss(pred, target, none, impl=impl)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, (pred,))
        assert (grad == 0).all()


def test_known_value_by_hand() -> None:
    """One hidden row with a two-channel target: LN makes it (+-1), so mse = ((0-1)^2 + (0+1)^2) / 2."""
    pred = torch.zeros(1, 1, 3, 2, requires_grad=True)
    target = torch.tensor([[[[9.0, 9.0], [5.0, -5.0], [7.0, 7.0]]]])
    hidden = torch.tensor([[1]])
    loss = ops.masked_feature_loss(pred, target, hidden, impl="triton")
    assert loss.item() == pytest.approx(1.0 / (1.0 + 1e-6 / 25.0), rel=1e-6)
    loss.backward()
    want = torch.zeros(1, 1, 3, 2)
    want[0, 0, 1] = torch.tensor([-1.0, 1.0])  # 2 * (0 - t) / 2 elements, t = (1, -1)
    torch.testing.assert_close(pred.grad, want, rtol=1e-5, atol=1e-6)
    raw = ops.masked_feature_loss(
        pred, target, hidden, kind="smooth_l1", normalize_target=False, impl="triton"
    )
    assert raw.item() == pytest.approx(4.5)  # |d| = 5 each: 5 - 0.5


def test_repeated_positions_int32_noncontiguous_mixed_dtypes() -> None:
    """Listing a position twice counts it twice (as the gather does); int32 indices and strided grids work."""
    gen = torch.Generator().manual_seed(1)
    b, f, n, c = 2, 3, 6, 48
    pred = torch.randn(b, n, f, c, generator=gen).to(torch.bfloat16).transpose(1, 2).requires_grad_(True)
    target = torch.randn(b, f, n, c, generator=gen)  # fp32 target, bf16 prediction
    hidden = torch.tensor([[0, 3, 3, 5], [2, 2, 2, 1]], dtype=torch.int32)
    for kind in ("mse", "smooth_l1"):
        _check_against_reference(pred, target, hidden, kind, True, 1e-2)


def test_target_gets_no_gradient_and_loss_is_deterministic() -> None:
    gen = torch.Generator().manual_seed(2)
    pred, target = _grids(2, 2, 10, 100, torch.float32, gen)
    target.requires_grad_(True)
    hidden = _hidden(2, 10, 6, gen)
    a = ops.masked_feature_loss(pred, target, hidden, impl="triton")
    b = ops.masked_feature_loss(pred, target, hidden, impl="triton")
    assert a.item() == b.item()  # per-program partials, summed in a fixed order
    grad_pred, grad_target = torch.autograd.grad(a, (pred, target), allow_unused=True)
    assert grad_target is None and grad_pred is not None


def test_reference_is_fp32_under_autocast_and_matches_the_row_form() -> None:
    """The grid reference equals gather + miles' [B, M, C] loss; bf16 autocast does not lower the math."""
    from miles.losses import masked_feature_loss

    gen = torch.Generator().manual_seed(3)
    pred, target = _grids(2, 2, 9, 16, torch.float32, gen)
    hidden = _hidden(2, 9, 5, gen)
    want = masked_feature_loss_reference(pred, target, hidden)
    idx = hidden[:, None, :, None].expand(2, 2, 5, 16)
    rows = masked_feature_loss(
        torch.gather(pred, 2, idx).flatten(1, 2), torch.gather(target, 2, idx).flatten(1, 2)
    )
    torch.testing.assert_close(rows, want)
    by_hand = F.mse_loss(
        torch.gather(pred, 2, idx), F.layer_norm(torch.gather(target, 2, idx), (16,), eps=1e-6)
    )
    torch.testing.assert_close(want, by_hand)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = masked_feature_loss_reference(pred, target, hidden)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, want)


def test_poison_mode_allocates_nan() -> None:
    assert torch.isnan(mt._alloc((3, 5), torch.bfloat16, torch.device("cpu"))).all()


def _small(gen: torch.Generator):
    pred, target = _grids(2, 2, 7, 32, torch.float32, gen)
    return pred, target, _hidden(2, 7, 3, gen)


def test_dispatch_auto_is_reference_on_cpu_and_triton_is_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    fused = mt.masked_feature_loss_triton
    monkeypatch.setattr(
        mt, "masked_feature_loss_triton", lambda *a, **k: calls.append("triton") or fused(*a, **k)
    )
    pred, target, hidden = _small(torch.Generator().manual_seed(4))

    auto = ops.masked_feature_loss(pred, target, hidden)  # CPU tensors: never the interpreter
    assert calls == []
    ref = ops.masked_feature_loss(pred, target, hidden, impl="reference")
    assert calls == []
    got = ops.masked_feature_loss(pred, target, hidden, impl="triton")
    assert calls == ["triton"]
    torch.testing.assert_close(auto, ref)
    torch.testing.assert_close(got, ref)

    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="CUDA"):
        ops.masked_feature_loss(pred, target, hidden, impl="triton")


def test_bad_inputs_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    pred, target, hidden = _small(torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="impl"):
        ops.masked_feature_loss(pred, target, hidden, impl="cuda")
    for impl in ("reference", "triton"):
        with pytest.raises(ValueError, match="mse.*smooth_l1"):
            ops.masked_feature_loss(pred, target, hidden, kind="l1", impl=impl)
        with pytest.raises(ValueError, match="target"):
            ops.masked_feature_loss(pred, target[:, :1], hidden, impl=impl)
        with pytest.raises(ValueError, match="hidden"):
            ops.masked_feature_loss(pred, target, hidden[:1], impl=impl)
        with pytest.raises(ValueError, match="integer"):
            ops.masked_feature_loss(pred, target, hidden.float(), impl=impl)
        with pytest.raises(ValueError, match=r"\[B, F, N, C\]"):
            ops.masked_feature_loss(pred[0], target[0], hidden, impl=impl)
    # fp64: the kernel refuses and names the way out; the reference (and so auto) computes it
    with pytest.raises(ValueError, match='impl="reference"'):
        ops.masked_feature_loss(pred.double(), target.double(), hidden, impl="triton")
    assert ops.masked_feature_loss(pred.double(), target.double(), hidden).dtype == torch.float64
    monkeypatch.setattr(ops, "_triton_import_error", lambda: "ImportError: no triton")
    with pytest.raises(RuntimeError, match="triton package"):
        ops.masked_feature_loss(pred, target, hidden, impl="triton")
