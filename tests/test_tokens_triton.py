"""Triton drop / restore kernels against the PyTorch references, forward and backward, on CPU.

The kernels run through the Triton interpreter (`kernel_checks.import_interpreted`); TRITON_INTERPRET is set
again around each test, since triton reads it once more at the first launch.
"""

from __future__ import annotations

import sys

import pytest
import torch
from kernel_checks import import_interpreted, rel_err

from miles_kernels import ops
from miles_kernels.tokens import drop_tokens_reference, restore_tokens_reference

tt = import_interpreted("miles_kernels.tokens_triton")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _interpret_and_poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Interpreter on; outputs the kernels must fully write are allocated as NaN (unwritten -> NaN)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(tt, "POISON_OUTPUTS", True)


def _visible(b: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(b)])


def _leaf(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype).requires_grad_(True)


def _check_grads(
    out: torch.Tensor, ref: torch.Tensor, inputs: tuple[torch.Tensor, ...], upstream: torch.Tensor, tol: float
) -> None:
    """Gradients of every input through the kernel and through the reference, same upstream gradient."""
    got = torch.autograd.grad(out, inputs, upstream)
    want = torch.autograd.grad(ref, inputs, upstream)
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        err = rel_err(a, e)
        assert err <= tol, f"gradient of input {i} {tuple(e.shape)}: relative error {err:.3g} > {tol}"


SHAPES = [(b, f, n, c) for b in (1, 3) for f in (1, 4) for n in (7, 49, 196) for c in (64, 100, 192)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}F{}N{}C{}".format(*s))
def test_drop_and_restore_match_reference(shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    b, f, n, c = shape
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    k = max(1, n // 2)
    t_rows = f + (b == 3)  # also a time table longer than F (extra rows get zero gradient)
    visible = _visible(b, n, k, gen)
    pos, time = _leaf((n, c), dtype, gen), _leaf((t_rows, c), dtype, gen)
    tol = TOL[dtype]

    # drop_tokens
    x = _leaf((b, f, n, c), dtype, gen)
    out = ops.drop_tokens(x, visible, pos, time, impl="triton")
    ref = drop_tokens_reference(x, visible, pos, time)
    assert rel_err(out, ref) <= tol
    upstream = torch.randn(ref.shape, generator=gen).to(dtype)
    _check_grads(out, ref, (x, pos, time), upstream, tol)
    # restore_tokens
    y = _leaf((b, f, k, c), dtype, gen)
    mask_token = _leaf((c,), dtype, gen)
    out = ops.restore_tokens(y, visible, mask_token, pos, time, impl="triton")
    ref = restore_tokens_reference(y, visible, mask_token, pos, time)
    assert rel_err(out, ref) <= tol
    upstream = torch.randn(ref.shape, generator=gen).to(dtype)
    inputs = (y, mask_token, pos, time)
    _check_grads(out, ref, inputs, upstream, tol)


@pytest.mark.parametrize("c", [384, 768, 1024])
def test_wide_channels(c: int) -> None:
    """Several column blocks per row (BLOCK_C is capped)."""
    gen = torch.Generator().manual_seed(c)
    b, f, n, k = 2, 2, 7, 3
    visible = _visible(b, n, k, gen)
    x, y = _leaf((b, f, n, c), torch.float32, gen), _leaf((b, f, k, c), torch.float32, gen)
    mask_token, pos, time = (_leaf(s, torch.float32, gen) for s in ((c,), (n, c), (f, c)))
    out = ops.drop_tokens(x, visible, pos, time, impl="triton")
    ref = drop_tokens_reference(x, visible, pos, time)
    assert rel_err(out, ref) <= 1e-5
    g = torch.randn(ref.shape, generator=gen)
    _check_grads(out, ref, (x, pos, time), g, 1e-5)
    out = ops.restore_tokens(y, visible, mask_token, pos, time, impl="triton")
    ref = restore_tokens_reference(y, visible, mask_token, pos, time)
    assert rel_err(out, ref) <= 1e-5
    g = torch.randn(ref.shape, generator=gen)
    inputs = (y, mask_token, pos, time)
    _check_grads(out, ref, inputs, g, 1e-5)


def test_edge_cases_all_visible_none_visible_int32_noncontiguous_partial_grads() -> None:
    gen = torch.Generator().manual_seed(0)
    b, f, n, c = 2, 3, 6, 100
    pos, time = _leaf((n, c), torch.float32, gen), _leaf((f + 2, c), torch.float32, gen)
    mask_token = _leaf((c,), torch.float32, gen)
    # every position visible, int32 indices, non-contiguous x
    visible = torch.arange(n, dtype=torch.int32).expand(b, n)
    x = torch.randn(b, n, f, c, generator=gen).transpose(1, 2).requires_grad_(True)
    out = ops.drop_tokens(x, visible, pos, time, impl="triton")
    ref = drop_tokens_reference(x, visible.long(), pos, time)
    assert rel_err(out, ref) <= 1e-5
    # only pos requires a gradient
    g = torch.randn(ref.shape, generator=gen)
    (got,) = torch.autograd.grad(out, (pos,), g)
    (want,) = torch.autograd.grad(ref, (pos,), g)
    assert rel_err(got, want) <= 1e-5
    # nothing visible: the grid is mask_token + pos + time everywhere
    none = torch.zeros(b, 0, dtype=torch.int64)
    y = torch.zeros(b, f, 0, c, requires_grad=True)
    out = ops.restore_tokens(y, none, mask_token, pos, time, impl="triton")
    ref = restore_tokens_reference(y, none, mask_token, pos, time)
    assert rel_err(out, ref) <= 1e-5
    g = torch.randn(ref.shape, generator=gen)
    inputs = (y, mask_token, pos, time)
    _check_grads(out, ref, inputs, g, 1e-5)
    assert ops.drop_tokens(x, none, pos, time, impl="triton").shape == (b, f, 0, c)


def test_mixed_dtypes_follow_reference_promotion() -> None:
    """bf16 tokens with fp32 embeddings: the output is fp32 like the reference, the token grad bf16."""
    gen = torch.Generator().manual_seed(1)
    b, f, n, c = 2, 2, 9, 64
    visible = _visible(b, n, 4, gen)
    x = _leaf((b, f, n, c), torch.bfloat16, gen)
    pos, time = _leaf((n, c), torch.float32, gen), _leaf((f, c), torch.float32, gen)
    out = ops.drop_tokens(x, visible, pos, time, impl="triton")
    ref = drop_tokens_reference(x, visible, pos, time)
    assert out.dtype == ref.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5
    g = torch.randn(ref.shape, generator=gen)
    _check_grads(out, ref, (x, pos, time), g, 1e-2)


def test_poison_mode_allocates_nan() -> None:
    buf = tt._alloc((3, 5), torch.bfloat16, torch.device("cpu"))
    assert torch.isnan(buf).all()


def _inputs(gen: torch.Generator):
    b, f, n, c = 2, 2, 7, 64
    visible = _visible(b, n, 3, gen)
    x = torch.randn(b, f, n, c, generator=gen)
    y = torch.randn(b, f, 3, c, generator=gen)
    mask_token, pos, time = torch.randn(c, generator=gen), torch.randn(n, c), torch.randn(f, c)
    return x, y, visible, mask_token, pos, time


def test_dispatch_auto_is_reference_on_cpu_and_triton_is_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    drop, restore = tt.drop_tokens_triton, tt.restore_tokens_triton
    monkeypatch.setattr(tt, "drop_tokens_triton", lambda *a: calls.append("drop") or drop(*a))
    monkeypatch.setattr(tt, "restore_tokens_triton", lambda *a: calls.append("restore") or restore(*a))
    x, y, visible, mask_token, pos, time = _inputs(torch.Generator().manual_seed(2))

    # auto on CPU tensors never pays for the interpreter, even when it is switched on
    auto_out = ops.drop_tokens(x, visible, pos, time)
    auto_grid = ops.restore_tokens(y, visible, mask_token, pos, time)
    assert calls == []
    out = ops.drop_tokens(x, visible, pos, time, impl="triton")
    grid = ops.restore_tokens(y, visible, mask_token, pos, time, impl="triton")
    assert calls == ["drop", "restore"]
    torch.testing.assert_close(out, auto_out)
    torch.testing.assert_close(grid, auto_grid)
    ops.drop_tokens(x, visible, pos, time, impl="reference")
    assert calls == ["drop", "restore"]  # "reference" never runs the kernels

    # CPU tensors without the interpreter: "triton" refuses clearly
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="CUDA"):
        ops.drop_tokens(x, visible, pos, time, impl="triton")


def test_triton_unavailable_and_bad_impl(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y, visible, mask_token, pos, time = _inputs(torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="impl"):
        ops.drop_tokens(x, visible, pos, time, impl="cuda")
    with pytest.raises(ValueError, match="impl"):
        ops.restore_tokens(y, visible, mask_token, pos, time, impl="fast")
    with pytest.raises(ValueError, match="impl"):
        ops.tube_mask(2, (4, 4), 0.5, seed=0, impl="fast")
    monkeypatch.setattr(ops, "_triton_import_error", lambda: "ImportError: no triton")
    with pytest.raises(RuntimeError, match="triton package"):
        ops.restore_tokens(y, visible, mask_token, pos, time, impl="triton")
    # auto quietly uses the reference when triton is missing
    torch.testing.assert_close(
        ops.restore_tokens(y, visible, mask_token, pos, time),
        restore_tokens_reference(y, visible, mask_token, pos, time),
    )


def test_shape_errors() -> None:
    x, y, visible, mask_token, pos, time = _inputs(torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="pos"):
        ops.drop_tokens(x, visible, pos[:-1], time, impl="triton")
    with pytest.raises(ValueError, match="time"):
        ops.restore_tokens(y, visible, mask_token, pos, time[:1], impl="triton")
    with pytest.raises(ValueError, match="mask_token"):
        ops.restore_tokens(y, visible, mask_token[:-1], pos, time, impl="triton")


def test_a_triton_that_does_not_import_fails_the_kernel_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a module-level skip: a broken triton must show as failures, not as one quiet skip line."""
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    with pytest.raises(ImportError, match="triton does not import.*the kernel tests need it"):
        import_interpreted("miles_kernels.tokens_triton")
