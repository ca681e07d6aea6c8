"""Each token kernel against its PyTorch reference at the `base` shapes, with the device copy as the
bandwidth yardstick (B=32..128, F=4, N=196, C=768, ratio 0.75).

`extra_info` carries `bytes` (what a perfect kernel must move per call: the report's achieved GB/s and
% of the copy peak, all of these being memory-bound) and GB/s. The Triton cases need CUDA: on a CPU they
skip (the Triton interpreter checks correctness, it is not meant to be fast).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import pair, record_work, time_calls
from miles_kernels import ops

F, N, C, RATIO = 4, 196, 768, 0.75
BATCHES = [32, 128]
IMPLS = ["reference", "triton"]


def _skip_unless_runnable(impl: str, device: torch.device) -> None:
    if impl == "triton" and device.type != "cuda":
        pytest.skip("Triton kernels run compiled only on CUDA; on this CPU they are tested, not timed")


def _side(impl: str) -> str:
    return "reference" if impl == "reference" else "fast"


def _inputs(b: int, device: torch.device, dtype: torch.dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(b, F, N, C, generator=g).to(device, dtype)
    _, visible = ops.tube_mask(b, (14, 14), RATIO, seed=0, device=device)
    pos = torch.randn(N, C, generator=g).to(device, dtype)
    time = torch.randn(F, C, generator=g).to(device, dtype)
    return x, visible, pos, time


def _timed(benchmark, fn, nbytes: int, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Time per call; record the bytes a perfect kernel moves (the report compares them with copy)."""
    time_calls(benchmark, fn, device, cpu=3, cuda=10)
    benchmark.extra_info["gb_per_s"] = nbytes / benchmark.stats.stats.mean / 1e9
    record_work(benchmark, nbytes=nbytes, compute_dtype=dtype)


@pytest.mark.parametrize("b", BATCHES)
def test_copy_bandwidth(benchmark, b: int, device: torch.device) -> None:
    """The yardstick: a plain device copy of the kept tokens' bytes (read + write)."""
    pair(benchmark, f"device copy B={b}", "yardstick", "copy")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    k = N - ops.num_hidden(N, RATIO)
    src = torch.randn(b, F, k, C, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    _timed(benchmark, lambda: dst.copy_(src), 2 * src.numel() * src.element_size(), device, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b", BATCHES)
def test_drop_tokens(benchmark, impl: str, b: int, device: torch.device) -> None:
    _skip_unless_runnable(impl, device)
    pair(benchmark, f"drop_tokens B={b}", _side(impl), impl, yardstick=f"device copy B={b}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x, visible, pos, time = _inputs(b, device, dtype)
    k = visible.shape[1]
    nbytes = 2 * b * F * k * C * x.element_size()  # read the kept rows, write them
    drop = lambda: ops.drop_tokens(x, visible, pos, time, impl=impl)  # noqa: E731
    _timed(benchmark, drop, nbytes, device, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b", BATCHES)
def test_restore_tokens(benchmark, impl: str, b: int, device: torch.device) -> None:
    _skip_unless_runnable(impl, device)
    pair(benchmark, f"restore_tokens B={b}", _side(impl), impl, yardstick=f"device copy B={b}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x, visible, pos, time = _inputs(b, device, dtype)
    k = visible.shape[1]
    y = x[:, :, :k].contiguous()
    token = torch.randn(C, device=device, dtype=dtype)
    nbytes = b * F * (k + N) * C * x.element_size()  # read the kept rows, write the full grid
    restore = lambda: ops.restore_tokens(y, visible, token, pos, time, impl=impl)  # noqa: E731
    _timed(benchmark, restore, nbytes, device, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_tube_mask(benchmark, impl: str, device: torch.device) -> None:
    _skip_unless_runnable(impl, device)
    pair(benchmark, "tube_mask B=128", _side(impl), impl)
    k = N - ops.num_hidden(N, RATIO)
    _timed(  # it reads nothing: it writes the bool mask [B, N] and the int64 visible indices [B, K]
        benchmark,
        lambda: ops.tube_mask(128, (14, 14), RATIO, seed=0, step=1, device=device, impl=impl),
        128 * N + 128 * k * 8,
        device,
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_feature_loss(benchmark, impl: str, device: torch.device) -> None:
    """MVM loss forward + backward at base shapes (B=32, M=147 hidden of N=196, C=768).

    `bytes` is what the fused kernel moves: the hidden pred and target rows read twice (forward, then
    backward recomputes the normalised target) and the full pred gradient written once.
    """
    _skip_unless_runnable(impl, device)
    b = 32
    pair(benchmark, f"masked_feature_loss B={b}", _side(impl), impl)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    pred = torch.randn(b, F, N, C, generator=g).to(device, dtype).requires_grad_(True)
    target = (3 * torch.randn(b, F, N, C, generator=g) + 1).to(device, dtype)
    mask, visible = ops.tube_mask(b, (14, 14), RATIO, seed=0, device=device)
    hidden = ops.hidden_indices(mask, N - visible.shape[1])
    m = hidden.shape[1]
    nbytes = (4 * b * F * m * C + b * F * N * C) * pred.element_size()

    def step() -> None:
        loss = ops.masked_feature_loss(pred, target, hidden, impl=impl)
        torch.autograd.grad(loss, (pred,))

    _timed(benchmark, step, nbytes, device, dtype)
