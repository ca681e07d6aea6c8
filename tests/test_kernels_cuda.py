"""The compiled Triton kernels against their references on a CUDA device, at training sizes and dtypes.

The interpreter tests (`test_*_triton.py`) check the kernels' logic on the CPU; this module checks what the
compiler makes of them: bf16 patch embeddings with fp32 position tables and bf16 predictions against fp32
targets (what bf16 autocast hands the kernels), `base` and large grids, forward and backward. It must run in
a process where no interpreter test module was imported first (triton decides at import time whether a
kernel is interpreted): `benchmarks/gpu_check.sh` runs it on its own, first.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("compiled Triton kernels need a CUDA GPU", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0"):
    pytest.skip("TRITON_INTERPRET is set: this module checks the compiled kernels", allow_module_level=True)

from kernel_checks import rel_err  # noqa: E402

import miles_kernels.masked_feature_loss_triton as mt  # noqa: E402
import miles_kernels.tokens_triton as tt  # noqa: E402
import miles_kernels.tube_mask_triton as mk  # noqa: E402
from miles_kernels import ops  # noqa: E402
from miles_kernels.masked_feature_loss import masked_feature_loss_reference  # noqa: E402
from miles_kernels.tokens import drop_tokens_reference, restore_tokens_reference  # noqa: E402
from miles_kernels.tube_mask import tube_mask_reference  # noqa: E402

CUDA = torch.device("cuda")
# (B, F, N, C, ratio): the `base` step, a long clip at 448 px with ViT-L width, and odd sizes.
SHAPES = [(32, 4, 196, 768, 0.75), (8, 16, 784, 1024, 0.9), (5, 3, 49, 100, 0.5)]


@pytest.fixture(scope="module", autouse=True)
def _compiled() -> None:
    interpreted = [m.__name__ for m in (tt, mt, mk) if m.INTERPRETED]
    assert not interpreted, (
        f"{interpreted} were imported under TRITON_INTERPRET in this process: run this module on its own "
        "(pytest tests/test_kernels_cuda.py), as benchmarks/gpu_check.sh does"
    )


def _tol(*tensors: torch.Tensor) -> float:
    return 1e-2 if any(t.dtype == torch.bfloat16 for t in tensors) else 1e-5


def _leaf(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=CUDA).to(dtype).requires_grad_(True)


def _grads_match(out, ref, inputs, tol: float, gen: torch.Generator) -> None:
    upstream = torch.randn(ref.shape, generator=gen, device=CUDA).to(ref.dtype)
    got = torch.autograd.grad(out, inputs, upstream)
    want = torch.autograd.grad(ref, inputs, upstream)
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        err = rel_err(a, e)
        where = f"gradient of input {i} {tuple(e.shape)} {e.dtype}"
        assert err <= tol, f"{where}: relative error {err:.3g} > {tol}"


def test_every_mask_type_compiled_bit_identical() -> None:
    """random_tube / *_frame (the ablations) through the compiled kernel, bit for bit as the reference."""
    for mask_type in ops.MASK_TYPES:
        for grid, ratio in [((14, 14), 0.75), ((7, 9), 0.5), ((16, 16), 0.9)]:
            kwargs = dict(mask_type=mask_type, seed=5, step=3, device=CUDA)
            got = ops.mvm_mask(8, 4, grid, ratio, impl="triton", **kwargs)
            want = ops.mvm_mask(8, 4, grid, ratio, impl="reference", **kwargs)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (mask_type, grid, ratio)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}F{}N{}C{}".format(*s[:4]))
def test_tube_mask_drop_restore_compiled(
    shape: tuple[int, int, int, int, float], x_dtype: torch.dtype
) -> None:
    b, f, n, c, ratio = shape
    side = int(n**0.5)
    grid = (side, side) if side * side == n else (7, 7)
    gen = torch.Generator(device=CUDA).manual_seed(n * c)
    mask, visible = ops.tube_mask(b, grid, ratio, seed=3, step=11, device=CUDA, impl="triton")
    want_mask, want_visible = tube_mask_reference(b, grid, ratio, seed=3, step=11, device=CUDA)
    assert torch.equal(mask, want_mask) and torch.equal(visible, want_visible)  # bit for bit
    k = visible.shape[1]
    # Position tables are fp32 parameters while the patch embeddings are bf16 under autocast.
    x = _leaf((b, f, n, c), x_dtype, gen)
    pos, time = _leaf((n, c), torch.float32, gen), _leaf((f, c), torch.float32, gen)
    out = ops.drop_tokens(x, visible, pos, time, impl="triton")
    ref = drop_tokens_reference(x, visible, pos, time)
    tol = _tol(x)
    assert rel_err(out, ref) <= tol
    _grads_match(out, ref, (x, pos, time), tol, gen)
    y = _leaf((b, f, k, c), x_dtype, gen)
    mask_token = _leaf((c,), torch.float32, gen)
    out = ops.restore_tokens(y, visible, mask_token, pos, time, impl="triton")
    ref = restore_tokens_reference(y, visible, mask_token, pos, time)
    assert rel_err(out, ref) <= tol
    _grads_match(out, ref, (y, mask_token, pos, time), tol, gen)


@pytest.mark.parametrize("kind", ["mse", "smooth_l1"])
@pytest.mark.parametrize("pred_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}F{}N{}C{}".format(*s[:4]))
def test_masked_feature_loss_compiled(
    shape: tuple[int, int, int, int, float], pred_dtype: torch.dtype, kind: str
) -> None:
    b, f, n, c, ratio = shape
    gen = torch.Generator(device=CUDA).manual_seed(n + c)
    m = ops.num_hidden(n, ratio)
    hidden = torch.stack([torch.randperm(n, generator=gen, device=CUDA)[:m] for _ in range(b)])
    pred = _leaf((b, f, n, c), pred_dtype, gen)
    target = torch.randn(b, f, n, c, generator=gen, device=CUDA) * 3 + 1  # fp32, as the snapshot gives
    got = ops.masked_feature_loss(pred, target, hidden, kind=kind, impl="triton")
    want = masked_feature_loss_reference(pred, target, hidden, kind=kind)
    tol = _tol(pred)
    assert abs(got.item() - want.item()) <= tol * abs(want.item())
    (g_got,) = torch.autograd.grad(got, pred)
    (g_want,) = torch.autograd.grad(want, pred)
    assert rel_err(g_got, g_want) <= tol
    assert got.item() == ops.masked_feature_loss(pred, target, hidden, kind=kind, impl="triton").item()


def test_auto_dispatch_runs_the_kernels_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """`impl="auto"` on CUDA tensors goes to Triton, not to the reference."""
    calls = []
    real = tt.drop_tokens_triton
    monkeypatch.setattr(tt, "drop_tokens_triton", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 4, 196, 64, device=CUDA)
    _, visible = ops.tube_mask(2, (14, 14), 0.75, seed=0, device=CUDA)
    pos, time = torch.randn(196, 64, device=CUDA), torch.randn(4, 64, device=CUDA)
    ops.drop_tokens(x, visible, pos, time, impl="auto")
    assert calls == [1]
