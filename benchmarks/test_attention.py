"""Divided space-time attention (temporal then spatial, as in one encoder block, with the residuals)
forward + backward: the einsum reference against SDPA and xformers, at the `demo` and `base` shapes,
on the full grid (`bert`, K = N tokens per frame) and after token dropping (`drop`, K visible at 0.75).

Every backend gets the same weights and the same input in the same run. `sdpa` lets PyTorch pick its
kernel (what a run uses by default); `sdpa-flash`, `sdpa-efficient` and `sdpa-cudnn` pin one of SDPA's
kernels (FlashAttention-2, memory-efficient, cuDNN), so they compare with each other and with xformers,
which dispatches to FlashAttention-2 and cutlass kernels of its own. Efficient, cuDNN and xformers need
CUDA; a pinned kernel that refuses the shapes or the dtype is skipped with its reason.
`flops` (one forward + backward) are counted once per case on the reference backend and recorded on every
backend: the math is the same, and the FLOP counter cannot see inside CPU SDPA or xformers.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import miles.attention as attention
from benchmarks.conftest import (
    bench_rounds,
    count_flops,
    pair,
    peak_memory_info,
    record_work,
    reset_peak_memory,
)
from miles.attention import DividedAttention
from miles_kernels.ops import num_hidden

FRAMES, RATIO = 4, 0.75
# preset: (embed dim, heads, grid side, CPU batch, CUDA batch), as in miles/configs/{demo,base}.yaml.
SHAPES = {"demo": (128, 4, 6, 32, 128), "base": (768, 12, 14, 2, 32)}
BACKENDS = ["reference", "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "xformers"]
# SDPA's kernels, pinned one at a time; the CPU has flash (its own) and math only.
SDPA_PINNED = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
}
_FLOPS: dict[tuple[str, str, str], int] = {}  # (preset, mode, device) -> FLOPs of one step, counted once


def _skip_unless_runnable(backend: str, device: torch.device) -> None:
    known = getattr(attention, "ATTENTION_BACKENDS", getattr(attention, "BACKENDS", ()))
    if backend in SDPA_PINNED:
        if device.type != "cuda" and backend != "sdpa-flash":
            pytest.skip(f"{backend}: SDPA has this kernel on CUDA only")
        return
    if backend not in known:
        pytest.skip(f"miles.attention has no {backend!r} backend (has {', '.join(known)})")
    if backend == "xformers":
        if device.type != "cuda":
            pytest.skip("xformers has no CPU kernels")
        probe = getattr(attention, "probe_xformers", None)  # runs one real call: wheels may lack kernels
        ok, why = probe(device) if probe is not None else (True, "")
        if not ok:
            pytest.skip(why)


def _block(backend: str, dim: int, heads: int, batch: int, k: int, device: torch.device, dtype: torch.dtype):
    """Temporal then spatial attention with residuals: (forward, input, output gradient, parameters)."""
    torch.manual_seed(0)  # same weights for every backend
    time_attn = DividedAttention(dim, heads, backend=backend).to(device, dtype)
    space_attn = DividedAttention(dim, heads, backend=backend).to(device, dtype)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, 1 + FRAMES * k, dim, generator=g).to(device, dtype).requires_grad_()
    grad_out = torch.randn(x.shape, generator=g).to(device, dtype)

    def forward() -> torch.Tensor:
        h = x + time_attn(x, FRAMES, "time")
        return h + space_attn(h, FRAMES, "space")

    return forward, x, grad_out, [*time_attn.parameters(), *space_attn.parameters()]


def _reference_flops(
    dim: int, heads: int, batch: int, k: int, device: torch.device, dtype: torch.dtype
) -> int:
    """FLOPs of one forward + backward, on the reference (`backward()`: the counter refuses autograd.grad)."""
    forward, _, grad_out, _ = _block("reference", dim, heads, batch, k, device, dtype)
    return count_flops(lambda: forward().backward(grad_out))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["bert", "drop"])
@pytest.mark.parametrize("preset", ["demo", "base"])
def test_divided_attention(benchmark, preset: str, mode: str, backend: str, device: torch.device) -> None:
    _skip_unless_runnable(backend, device)
    dim, heads, side, cpu_batch, cuda_batch = SHAPES[preset]
    batch = cuda_batch if device.type == "cuda" else cpu_batch
    n = side * side
    k = n - num_hidden(n, RATIO) if mode == "drop" else n
    pair(
        benchmark,
        f"attention {preset} {mode} B={batch} K={k}",
        "reference" if backend == "reference" else "fast",
        backend,
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    key = (preset, mode, str(device))
    if key not in _FLOPS:
        _FLOPS[key] = _reference_flops(dim, heads, batch, k, device, dtype)
    pinned = SDPA_PINNED.get(backend)
    forward, x, grad_out, params = _block("sdpa" if pinned else backend, dim, heads, batch, k, device, dtype)

    def step() -> None:
        with sdpa_kernel([pinned]) if pinned else contextlib.nullcontext():
            torch.autograd.grad(forward(), [x, *params], grad_out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        step()  # warm-up: kernel selection, allocator
    except RuntimeError as e:  # a pinned SDPA kernel that does not take these inputs says so
        if pinned is None:
            raise
        pytest.skip(f"{backend}: {next(iter(str(e).splitlines()), '')}")
    reset_peak_memory(device)
    benchmark.pedantic(step, rounds=bench_rounds(device, cpu=5, cuda=20), iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        preset=preset, mode=mode, batch=batch, clips_per_s=batch / benchmark.stats.stats.mean
    )
    benchmark.extra_info.update(peak_memory_info(device))
    record_work(benchmark, flops=_FLOPS[key], compute_dtype=dtype)
