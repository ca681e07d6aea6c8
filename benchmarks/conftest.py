"""Shared helpers for the pytest-benchmark suites: the pairing convention, peak memory, run length.

Pairing convention (read by `miles bench` / `miles.bench.write_report`):
- `benchmark.group` is the case name; every timing of one case uses the same inputs in the same run.
- `extra_info["path"]` is "reference" (the plain PyTorch path), "fast" (a fast variant, named by
  `extra_info["label"]`, e.g. "triton", "sdpa") or "yardstick" (a bound such as the device copy, not paired).
- Optional `extra_info`: `clips_per_s` or `gb_per_s` (throughput), `yardstick` (the group of the bound
  that `gb_per_s` is compared with), `peak_mem_bytes` + `peak_mem_kind` ("cuda_max_allocated" or
  "cpu_peak_rss").
The report's speed-up of a fast variant is (reference mean time) / (fast mean time) within its group.
`pair()` sets all of this in one call. Skipped and failed cases are written into the benchmark JSON
(keys "skipped" and "failed") so the report lists them with their reasons.

`MILES_BENCH_QUICK=1` (set by `miles bench --quick`) cuts every suite to one or two rounds: a smoke run.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PATHS = ("reference", "fast", "yardstick")
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
