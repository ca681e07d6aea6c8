"""This machine's own limits, measured in the same `miles bench` run as the suites it is compared with:
the matrix-product rate in fp32 and bf16 (torch.matmul, 2 n^3 FLOPs) and the memory copy bandwidth
(`copy_` of a tensor far larger than the last-level cache, bytes = read + write).

`miles bench` runs this file before whichever suites are selected; the report divides each case's
achieved GFLOP/s or GB/s by the matching peak here. These are what torch reaches, not datasheet numbers.
On CUDA the fp32 product runs under the process's TF32 setting (recorded as `tf32`; torch's default is off).
"""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks.conftest import COMPUTE_DTYPES, pair, record_work, time_calls

DTYPES = {name: dtype for dtype, name in COMPUTE_DTYPES.items()}
CUDA_MATMUL_N = 8192
# On a CPU n grows by doubling while one product stays under the budget: a CPU without BF16 instructions
# runs bf16 products a hundred times slower than fp32, and 2048^3 would then take half a minute.
CPU_MATMUL_SIZES = (256, 512, 1024, 2048)
CPU_CALL_BUDGET_S = 1.0
COPY_BYTES = {"cpu": 256 * 2**20, "cuda": 2**30}  # per tensor; read + write is twice this
MIN_ROUNDS = 3  # even under --quick: a peak from one round is one sample, not a median


def _cpu_matmul_size(dtype: torch.dtype) -> int:
    """The largest of CPU_MATMUL_SIZES whose product is predicted (from the one below) within budget."""
    n = CPU_MATMUL_SIZES[0]
    for bigger in CPU_MATMUL_SIZES[1:]:
        a = torch.randn(n, n).to(dtype)
        torch.matmul(a, a)  # first call: library initialisation
        start = time.perf_counter()
        torch.matmul(a, a)
        if (time.perf_counter() - start) * (bigger / n) ** 3 > CPU_CALL_BUDGET_S:
            break
        n = bigger
    return n


def _tf32() -> bool:
    """Whether CUDA fp32 products may use TF32: the newer per-backend setting where set, else the legacy flag
    (mixing the two APIs' getters makes torch 2.9+ warn)."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    return (
        precision == "tf32" if precision in ("tf32", "ieee") else bool(torch.backends.cuda.matmul.allow_tf32)
    )


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_matmul_peak(benchmark, dtype: str, device: torch.device) -> None:
    torch_dtype = DTYPES[dtype]
    n = CUDA_MATMUL_N if device.type == "cuda" else _cpu_matmul_size(torch_dtype)
    label = f"torch.matmul {n}^3"
    if device.type == "cuda" and dtype == "fp32":
        label += ", TF32 on" if _tf32() else ", TF32 off"
    pair(benchmark, f"peak matmul {dtype}", "peak", label)
    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, torch_dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=torch_dtype)
    time_calls(
        benchmark,
        lambda: torch.matmul(a, b, out=out),
        device,
        cpu=5,
        cuda=10,
        cuda_calls=5,
        min_rounds=MIN_ROUNDS,
    )
    record_work(benchmark, flops=2 * n**3, compute_dtype=dtype)
    benchmark.extra_info["n"] = n
    if device.type == "cuda":
        benchmark.extra_info["tf32"] = _tf32()


def test_copy_peak(benchmark, device: torch.device) -> None:
    nbytes = COPY_BYTES[device.type if device.type in COPY_BYTES else "cpu"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the kernels' dtype there
    src = torch.ones(nbytes // dtype.itemsize, device=device, dtype=dtype)
    dst = torch.empty_like(src)  # allocated and touched once, so no page faults are timed
    dst.copy_(src)
    pair(benchmark, "peak memory copy", "peak", f"copy_ of {nbytes / 2**20:.0f} MiB")
    time_calls(benchmark, lambda: dst.copy_(src), device, cpu=5, cuda=10, min_rounds=MIN_ROUNDS)
    record_work(benchmark, nbytes=2 * src.numel() * src.element_size())
