"""Shared helpers for the pytest-benchmark suites: the pairing convention, peak memory, run length.

Pairing convention (read by `miles bench` / `miles.bench.write_report`):
- `benchmark.group` is the case name; every timing of one case uses the same inputs in the same run.
- `extra_info["path"]` is "reference" (the plain PyTorch path), "fast" (a fast variant, named by
  `extra_info["label"]`, e.g. "triton", "sdpa") or "yardstick" (a bound such as the device copy, not paired).
  `extra_info["path"]` "peak" marks the machine's own limits (`test_machine_peak.py`, which `miles bench`
  runs with every selection, so the peaks come from the same run and land in the same folder).
  "peer" is another code base's way of doing the same case (the decord loader that Frozen-in-Time,
  UMT and VindLU use): its own column, with how much faster our reference and fast paths are.
- Optional `extra_info`: `clips_per_s` or `gb_per_s` (throughput), `yardstick` (the group of the bound
  that `gb_per_s` is compared with), `peak_mem_bytes` + `peak_mem_kind` ("cuda_max_allocated" or
  "cpu_peak_rss").
- Work of one timed call, for the report's achieved / % of peak / limit columns (`record_work()`):
  `flops` (counted once with `count_flops()`, on the reference path) with `compute_dtype` ("fp32" or
  "bf16", which picks the matching matmul peak), and / or `bytes` (reads + writes a perfect kernel must
  do, for memory-bound cases: compared with the copy peak). With both, the limit is the one closer to
  its peak (a roofline). A case with neither sets `limit` ("decode/I-O" for data loading) or shows "–".
The report's speed-up of a fast variant is (reference median time) / (fast median time) within its
group. `pair()` sets the pairing in one call. Skipped and failed cases are written into the benchmark JSON
(keys "skipped" and "failed") so the report lists them with their reasons.

`MILES_BENCH_QUICK=1` (set by `miles bench --quick`) cuts every suite to one or two rounds: a smoke run.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from miles.bench import COMPUTE_DTYPES as DTYPE_NAMES
from miles.bench import LIMITS  # what the report's limit column says: the report checks the same names

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PATHS = ("reference", "fast", "yardstick", "peak", "peer")
COMPUTE_DTYPES = dict(zip((torch.float32, torch.bfloat16), DTYPE_NAMES, strict=True))
QUICK = os.environ.get("MILES_BENCH_QUICK", "").strip().lower() in ("1", "true", "yes", "on")

_outcomes: dict[str, list[dict[str, str]]] = {"skipped": [], "failed": []}


def pair(benchmark, case: str, path: str, label: str, yardstick: str | None = None) -> None:
    """Name the case and this timing's side of the comparison, so the report can pair fast with reference."""
    if path not in PATHS:
        raise ValueError(f"benchmark path must be one of {PATHS}, got {path!r}")
    benchmark.group = case
    benchmark.extra_info.update(path=path, label=label)
    if yardstick is not None:
        benchmark.extra_info["yardstick"] = yardstick


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn`, as torch.utils.flop_counter counts them (matmul, conv, attention ops).

    Count on the reference path and record the same number on every variant of the case: the counter
    cannot see inside Triton kernels or CPU SDPA, and the math is the same. `fn` runs once; use
    `loss.backward()` in it, not `torch.autograd.grad` on leaf tensors, which FlopCounterMode's module
    tracker refuses (torch 2.11-2.14).
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def record_work(
    benchmark,
    *,
    flops: int | None = None,
    nbytes: int | None = None,
    compute_dtype: str | torch.dtype | None = None,
    limit: str | None = None,
) -> None:
    """Set the convention's work keys (`flops`, `bytes`, `compute_dtype`, `limit`) of one timed call."""
    if isinstance(compute_dtype, torch.dtype):
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype {compute_dtype} has no peak; use one of {list(COMPUTE_DTYPES)}")
        compute_dtype = COMPUTE_DTYPES[compute_dtype]
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES.values():
        raise ValueError(
            f"compute_dtype must be one of {list(COMPUTE_DTYPES.values())}, got {compute_dtype!r}"
        )
    if flops is not None and compute_dtype is None:
        raise ValueError(
            "flops need compute_dtype ('fp32' or 'bf16'): it picks the matmul peak to compare with"
        )
    if limit is not None and limit not in LIMITS:
        raise ValueError(f"limit must be one of {LIMITS}, got {limit!r}")
    for key, value in (("flops", flops), ("bytes", nbytes)):
        if value is not None:
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key} must be a positive int (work of one timed call), got {value!r}")
            benchmark.extra_info[key] = value
    if compute_dtype is not None:
        benchmark.extra_info["compute_dtype"] = compute_dtype
    if limit is not None:
        benchmark.extra_info["limit"] = limit


def time_calls(
    benchmark,
    fn: Callable[[], object],
    device: torch.device,
    *,
    cpu: int,
    cuda: int,
    cuda_calls: int = 25,
    min_rounds: int = 1,
) -> None:
    """Time `fn` with pytest-benchmark, per call; on CUDA `cuda_calls` calls per round and one sync.

    On CUDA a call may move tens of MB in microseconds: a host sync per call would time the launch and
    the sync, not the kernel. The stats stay per call (pytest-benchmark divides by the iterations).
    `min_rounds` holds even under MILES_BENCH_QUICK (a peak from one round is one sample, not a median).
    """
    calls = cuda_calls if device.type == "cuda" else 1
    done = [0]

    def run() -> None:
        fn()
        done[0] += 1
        if device.type == "cuda" and done[0] % calls == 0:
            torch.cuda.synchronize(device)

    for _ in range(calls):  # compile / warm up, ending on a sync
        run()
    rounds = max(min_rounds, bench_rounds(device, cpu, cuda))
    benchmark.pedantic(run, rounds=rounds, iterations=calls, warmup_rounds=1)


def bench_rounds(device: torch.device, cpu: int, cuda: int) -> int:
    """Rounds per case: as asked, or a smoke run's one (CPU) / three (CUDA) under MILES_BENCH_QUICK."""
    if QUICK:
        return 1 if device.type != "cuda" else min(cuda, 3)
    return cuda if device.type == "cuda" else cpu


def reset_peak_memory(device: torch.device) -> None:
    """CUDA: reset the allocator's peak; CPU: reset the kernel's peak-RSS counter (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    return peak_memory_info(device)["peak_mem_bytes"] / 2**20


def peak_memory_info(device: torch.device) -> dict[str, float | str]:
    """Peak since `reset_peak_memory`, in the convention's `extra_info` keys."""
    if device.type == "cuda":
        return {
            "peak_mem_bytes": torch.cuda.max_memory_allocated(device),
            "peak_mem_kind": "cuda_max_allocated",
        }
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return {"peak_mem_bytes": int(line.split()[1]) * 1024, "peak_mem_kind": "cpu_peak_rss"}
    return {"peak_mem_bytes": float("nan"), "peak_mem_kind": "cpu_peak_rss"}


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    """What the report names the machine by: CPU model and cores, the GPU if any, torch and CUDA versions."""
    machine_info["cpu_model"] = _cpu_model()
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["torch"] = torch.__version__
    machine_info["quick"] = QUICK
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        machine_info["cuda_device"] = props.name
        machine_info["cuda_memory_gb"] = round(props.total_memory / 2**30, 1)
        machine_info["cuda_version"] = torch.version.cuda


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        _outcomes["skipped"].append({"fullname": report.nodeid, "reason": reason})
    elif report.failed:
        message = str(report.longrepr).strip().splitlines()
        _outcomes["failed"].append(
            {"fullname": report.nodeid, "reason": f"{report.when}: {message[-1] if message else 'failed'}"}
        )


def pytest_benchmark_update_json(config, benchmarks, output_json: dict) -> None:
    output_json["skipped"] = list(_outcomes["skipped"])
    output_json["failed"] = list(_outcomes["failed"])
