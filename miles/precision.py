"""`train.precision` and `mvm.snapshot_precision`: which dtype a step computes in, and whether this CPU
can run bf16 at all.

`auto` is bf16 on CUDA. On a CPU it is decided from whole pre-training runs, not from the step alone
(docs/benchmarks.md, "Precision on a CPU"): see :func:`resolve_precision`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from miles.config import PRECISIONS

log = logging.getLogger("miles")

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that run bf16 matmuls natively


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The BF16 instruction flags this CPU reports (`/proc/cpuinfo`, or the text given).

    Without one, oneDNN emulates bf16 matmuls and CPU autocast is several times slower than fp32 (on a
    2-core Zen 3, a 512x768x3072 linear: 5x). Where /proc/cpuinfo cannot be read, torch's own probe."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
            return [flag for flag, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()]
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return [flag for flag in BF16_CPU_FLAGS if flag in flags]


def resolve_precision(device: torch.device, precision: str) -> str:
    """`fp32` or `bf16` for `train.precision`: auto is bf16 on CUDA and fp32 on a CPU, also one with BF16
    instructions. Whole runs decided it, not the step alone: the demo run (frame shards, DALI, `bert`
    mode, MiniLM) took 356 s in bf16 against 272 s in fp32 on a Sapphire Rapids CPU with AMX (and 351
    against 324 s on a Zen 4 with AVX-512 BF16), at the same retrieval, although a bare `drop` step is
    1.4x faster in bf16 there. No configuration has shown a whole-run gain on a CPU (docs/benchmarks.md,
    "Precision on a CPU"), so none gets bf16 by default; `train.precision=bf16` is one key away."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def snapshot_dtype(device: torch.device, train_precision: str, snapshot_precision: str) -> torch.dtype:
    """The compute dtype of the snapshot's no-grad forward (`mvm.snapshot_precision`; auto: the step's)."""
    if snapshot_precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"mvm.snapshot_precision must be auto, fp32 or bf16, got {snapshot_precision!r}")
    chosen = snapshot_precision
    if chosen == "auto":
        chosen = resolve_precision(device, train_precision)
    return torch.bfloat16 if chosen == "bf16" else torch.float32


def warn_slow_bf16(device: torch.device, precision: str, snapshot_precision: str = "auto") -> None:
    """bf16 asked for on a CPU that would emulate it: say so once, with the fix, rather than run slowly."""
    asked = [
        f"{key}=bf16"
        for key, value in (("train.precision", precision), ("mvm.snapshot_precision", snapshot_precision))
        if value == "bf16"
    ]
    if device.type == "cpu" and asked and not cpu_bf16_flags():
        log.warning(
            "%s on a CPU without BF16 instructions (no %s in /proc/cpuinfo): bf16 matmuls are emulated, "
            "several times slower than fp32; set them to fp32 (or auto) on this machine",
            " and ".join(asked),
            " / ".join(BF16_CPU_FLAGS),
        )
