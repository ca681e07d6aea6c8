"""The whole MILES train step (masking, snapshot targets, forward, backward, AdamW, EMA update) for the
`demo` and `base` presets at mask ratio 0.75, on synthetic clips so that only the step is timed.

Cases (benchmark groups), each timed against its own reference in the same run:
- `train step <preset>`: the fast path (`drop` mode, kernels `auto`) against the reference path (`bert`
  mode, reference kernels), same inputs, same objective otherwise (contrastive on the masked pass in
  both, so the ratio measures token dropping alone);
- `train step <preset>: precision`: the fast path in fp32 against bf16 autocast (`train.precision=bf16`)
  and against the snapshot's no-grad pass alone in bf16 (`mvm.snapshot_precision=bf16`). On a CPU
  without BF16 instructions bf16 is emulated, many times slower: the bf16 variants are skipped there;
- `train step base: activation checkpointing`: step time and peak memory with `model.grad_checkpointing`;
- `train step demo: torch.compile`: eager against inductor (`train.compile=true`); the first step's time
  (compilation included) is `extra_info["first_step_s"]`. `base` is not compiled here: see docs/benchmarks.md;
- `train step demo: loader vs step`: one round is one batch of the demo preset's size, so the ratio is
  how many times faster than the step each loader delivers clips (above 1: data is not the bottleneck).

Reported per case in `extra_info`: clips/s, peak memory (CUDA max allocated, or CPU peak RSS) and
`peak_over_start_mb` (what the rounds add to the model and optimizer state), `flops` of one round as it
runs (counted on the warm-up step by `count_flops`, the video attention through its matmul reference,
since the counter sees nothing inside CPU SDPA; checkpointing's recomputation included), and
`compute_dtype` of the online encoder, with `snapshot_compute_dtype` beside it.

`python -m benchmarks.test_train_step [demo|base] [KEY=VALUE ...] [--cpu-time]` prints where the time of
one fast-path step goes, with config overrides applied last (`train.precision=bf16`, `mvm.mode=bert`;
`--cpu-time`: one thread, CPU seconds, for a machine that other jobs share).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.conftest import (
    QUICK,
    bench_rounds,
    count_flops,
    pair,
    peak_memory_info,
    peak_memory_mb,
    record_work,
    reset_peak_memory,
)
from miles.attention import DividedAttention, set_attention_backend
from miles.config import Config, build_config
from miles.model import MilesModel
from miles.optim import param_groups
from miles.precision import autocast_context, cpu_bf16_flags, resolve_precision, snapshot_dtype
from miles.snapshot import SnapshotEncoder
from miles_kernels.ops import tube_mask

# On these 2-core CPUs the `base` step takes seconds per clip: a small batch keeps the suite short.
CPU_BATCH = {"demo": 32, "base": 2}
GPU_BATCH = {"demo": 128, "base": 32}

PATHS = {
    "reference": ["mvm.mode=bert", "mvm.kernels=reference"],
    "fast": ["mvm.mode=drop", "mvm.kernels=auto"],
}
LABELS = {"reference": "bert + reference kernels", "fast": "drop + kernels auto"}

# Options over the fast path: (label, overrides). The first of each group is that group's reference.
PRECISIONS = {
    "fp32": ("drop + auto, fp32", ["train.precision=fp32"]),
    "bf16": ("drop + auto, bf16 autocast", ["train.precision=bf16"]),
    "snapshot_bf16": (
        "drop + auto, fp32, snapshot bf16",
        ["train.precision=fp32", "mvm.snapshot_precision=bf16"],
    ),
}
CHECKPOINTING = {
    "plain": ("drop + auto", []),
    "checkpointing": ("drop + auto, grad checkpointing", ["model.grad_checkpointing=true"]),
}
COMPILE = {
    "eager": ("drop + auto, eager", []),
    "inductor": (
        "drop + auto, torch.compile (inductor)",
        ["train.compile=true", "train.compile_backend=inductor"],
    ),
}
NO_BF16 = (
    "this CPU has no BF16 instructions (no avx512_bf16 / amx_bf16 in /proc/cpuinfo): bf16 is emulated "
    "(on a Zen 3, one thread: a demo step 16 CPU s in bf16 against 2.3 in fp32), nothing to measure"
)
SLOW_COMPILE = (
    "--quick on a CPU: inductor's first demo step (compilation) took 225-334 s on the 2-core development "
    "CPU under load, and the compiled step was no faster there; run without --quick to time it"
)


class Step:
    """One trainer step as `miles.train.Trainer` runs it, on a fixed synthetic batch: the fast path
    (`drop`, kernels auto) at ratio 0.75 unless `overrides` (applied last) say otherwise."""

    def __init__(self, preset: str, overrides: list[str], device: torch.device) -> None:
        batch = (GPU_BATCH if device.type == "cuda" else CPU_BATCH)[preset]
        common = [f"train.batch_size={batch}", "mvm.mask_ratio=0.75", "mvm.contrastive_input=masked"]
        cfg = build_config(preset, overrides=common + PATHS["fast"] + overrides)
        torch.manual_seed(0)
        self.cfg, self.device, self.batch, self.index = cfg, device, batch, 0
        self.model = MilesModel(cfg).to(device)
        self.snapshot = SnapshotEncoder(self.model.video_model, momentum=cfg.mvm.ema_momentum).to(device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg))
        size, frames = cfg.data.size, cfg.data.num_frames
        self.video = torch.randn(batch, frames, 3, size, size, device=device)
        self.input_ids = torch.randint(1000, 20000, (batch, 16), device=device)
        self.attention_mask = torch.ones_like(self.input_ids)
        self.precision = resolve_precision(device, cfg.train.precision)
        self.snapshot_dtype = snapshot_dtype(device, cfg.train.precision, cfg.mvm.snapshot_precision)

    def compile(self) -> None:
        """In place, as the trainer does under train.compile: the towers and the snapshot."""
        for module in (self.model.video_model, self.model.text_model, self.snapshot.encoder):
            module.compile(backend=self.cfg.train.compile_backend)

    def mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        grid, ratio = self.model.video_model.grid_size, self.cfg.mvm.mask_ratio
        return tube_mask(
            self.batch, grid, ratio, seed=0, step=self.index, device=self.device, impl=self.cfg.mvm.kernels
        )

    def __call__(self) -> None:
        with autocast_context(self.device, self.cfg.train.precision):
            mask, visible = self.mask()
            targets = self.snapshot.targets(self.video, self.snapshot_dtype)
            out = self.model(self.video, self.input_ids, self.attention_mask, mask, targets, visible)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.index += 1
        self.snapshot.update(self.model.video_model, self.index)
        _sync(self.device)

    def saved_for_backward_mb(self) -> float:
        """Run one step; MiB of the distinct tensors its forward saved for backward, the parameters left
        out (activation memory: inside a checkpointed block nothing is kept, so nothing is seen)."""
        params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self()
        return sum(storages.values()) / 2**20

    def count_flops(self) -> int:
        """FLOPs of one step (this runs one). The video attention runs through the reference (matmul)
        backend meanwhile: FlopCounterMode sees no FLOPs inside CPU SDPA, and the math is the same."""
        modules = [m for root in (self.model, self.snapshot) for m in root.modules()]
        attention = [m for m in modules if isinstance(m, DividedAttention)]
        backends = [m.backend for m in attention]
        set_attention_backend(self.model, "reference")
        set_attention_backend(self.snapshot, "reference")
        try:
            return count_flops(self)
        finally:
            for module, backend in zip(attention, backends, strict=True):
                module.backend = backend


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    return str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")


def _record(benchmark, device: torch.device, preset: str, batch: int, **extra: Any) -> None:
    benchmark.extra_info.update(
        preset=preset,
        batch=batch,
        clips_per_s=batch / benchmark.stats.stats.mean,
        peak_memory_mb=peak_memory_mb(device),
        device=_device_name(device),
        **extra,
    )
    benchmark.extra_info.update(peak_memory_info(device))


def _time_step(benchmark, step: Step, preset: str, warm: Callable[[], None] | None = None) -> None:
    """Warm-up (the FLOP count; then `warm`, or on CUDA one more step on the step's own attention
    backend), reset the peak, time the rounds."""
    flops = step.count_flops()
    if warm is not None:
        warm()
    elif step.device.type == "cuda":
        step()
    reset_peak_memory(step.device)
    start = _memory_now_mb(step.device)
    rounds = bench_rounds(step.device, cpu=5 if preset == "demo" else 2, cuda=5)
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    over = peak_memory_mb(step.device) - start  # what the step adds to the model and AdamW state
    snapshot = "bf16" if step.snapshot_dtype == torch.bfloat16 else "fp32"
    _record(
        benchmark, step.device, preset, step.batch, peak_over_start_mb=over, snapshot_compute_dtype=snapshot
    )
    record_work(benchmark, flops=flops, compute_dtype=step.precision)


def _memory_now_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("preset", ["demo", "base"])
def test_train_step(benchmark, preset: str, path: str, device: torch.device) -> None:
    pair(benchmark, f"train step {preset}", path, LABELS[path])
    _time_step(benchmark, Step(preset, PATHS[path], device), preset)


@pytest.mark.parametrize("variant", list(PRECISIONS))
@pytest.mark.parametrize("preset", ["demo", "base"])
def test_train_step_precision(benchmark, preset: str, variant: str, device: torch.device) -> None:
    if device.type == "cpu" and not cpu_bf16_flags():
        pytest.skip(NO_BF16)  # the fp32 side as well: it would pair with nothing
    label, overrides = PRECISIONS[variant]
    pair(benchmark, f"train step {preset}: precision", "reference" if variant == "fp32" else "fast", label)
    _time_step(benchmark, Step(preset, overrides, device), preset)
    benchmark.extra_info["cpu_bf16_flags"] = ",".join(cpu_bf16_flags()) or "none"


@pytest.mark.parametrize("variant", list(CHECKPOINTING))
def test_train_step_checkpointing(benchmark, variant: str, device: torch.device) -> None:
    label, overrides = CHECKPOINTING[variant]
    pair(
        benchmark,
        "train step base: activation checkpointing",
        "reference" if variant == "plain" else "fast",
        label,
    )
    step = Step("base", overrides, device)
    kept: dict[str, float] = {}

    def warm() -> None:  # on the step's own attention backend, counting what autograd keeps
        kept["mb"] = step.saved_for_backward_mb()

    _time_step(benchmark, step, "base", warm=warm)
    # CPU peak RSS barely moves at batch 2 (the weights and AdamW state dominate, and freed memory stays
    # with the process): what autograd keeps for backward is the number checkpointing changes
    benchmark.extra_info["saved_for_backward_mb"] = kept["mb"]


@pytest.mark.parametrize("variant", list(COMPILE))
def test_train_step_compile(benchmark, variant: str, device: torch.device) -> None:
    if QUICK and device.type == "cpu":
        pytest.skip(SLOW_COMPILE)
    label, overrides = COMPILE[variant]
    pair(benchmark, "train step demo: torch.compile", "reference" if variant == "eager" else "fast", label)
    step = Step("demo", overrides, device)
    first: dict[str, float] = {}

    def compile_and_warm() -> None:  # FLOPs were counted eagerly: compiled, they are the same matmuls
        if step.cfg.train.compile:
            torch._dynamo.reset()
            step.compile()
        start = time.perf_counter()
        step()
        first["s"] = time.perf_counter() - start

    _time_step(benchmark, step, "demo", warm=compile_and_warm)
    benchmark.extra_info["first_step_s"] = first["s"]


# ------------------------------------------------------------------------------------- data vs step
LOADER_CLIPS = 256  # 8 batches of the demo preset per epoch: epoch restarts count, as in training


@pytest.fixture(scope="module")
def demo_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small copy of the demo data set (same generator, clip length and size), and its frame shards."""
    from data_dali.demo import write_demo_dataset

    root = tmp_path_factory.mktemp("demo_clips")
    paths = write_demo_dataset(root, n_train=LOADER_CLIPS, n_val=2, seed=0)
    return {"manifest": paths["train"], "root": root}


def _frame_shards(demo_clips: dict[str, Any]) -> Path:
    from data_dali.shard_writer import prepare_shards

    shards = demo_clips["root"] / "shards"
    if not shards.is_dir():
        prepare_shards(demo_clips["manifest"], shards, fps=4.0, size=112, workers=2, progress=False)
    return shards


def _loader(backend: str, demo_clips: dict[str, Any], cfg: Config, device: torch.device) -> Any:
    from data_dali.loaders import build_loader, open_source
    from miles.text_encoder import build_text_encoder

    source = open_source(_frame_shards(demo_clips) if backend == "dali" else demo_clips["manifest"])
    _, tokenizer, _ = build_text_encoder(cfg.model.text_model)
    d = cfg.data
    return build_loader(
        backend,
        source,
        tokenizer,
        device=device,
        batch_size=cfg.train.batch_size,
        num_frames=d.num_frames,
        size=d.size,
        train=True,
        seed=cfg.train.seed,
        hflip=d.hflip,
        num_workers=d.num_workers,
        max_length=d.max_text_length,
    )


LOADERS = {
    "step": "the fast step (drop + auto)",
    "reference": "PyAV loader, raw H.264, demo workers",
    "dali": "DALI {where}, frame shards, demo threads",
}


@pytest.mark.parametrize("backend", list(LOADERS))
def test_loader_vs_step(benchmark, backend: str, demo_clips: dict[str, Any], device: torch.device) -> None:
    from miles.run_position import BatchStream, DataPosition

    if backend == "dali":
        pytest.importorskip(
            "nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)"
        )
    label = LOADERS[backend].format(where=device.type.upper())
    pair(benchmark, "train step demo: loader vs step", "reference" if backend == "step" else "fast", label)
    if backend == "step":
        _time_step(benchmark, Step("demo", [], device), "demo")
        return
    batch = (GPU_BATCH if device.type == "cuda" else CPU_BATCH)["demo"]  # the step's: clips/s ratio
    cfg = build_config("demo", overrides=[f"train.batch_size={batch}"])
    stream = BatchStream(_loader(backend, demo_clips, cfg, device), DataPosition())

    def next_batch() -> None:
        video = stream.next()["video"].to(device, non_blocking=True)  # as the trainer takes it
        assert video.shape[0] == batch
        _sync(device)

    for _ in range(1 + 2 * max(1, cfg.data.num_workers)):  # workers started, prefetched batches drained
        next_batch()
    reset_peak_memory(device)
    rounds = 8 if QUICK else 24  # batches are cheap; a few rounds average the epoch restarts in
    benchmark.pedantic(next_batch, rounds=rounds, iterations=1)
    _record(benchmark, device, "demo", batch, workers=cfg.data.num_workers, backend=backend)
    record_work(benchmark, limit="decode/I-O")


# ----------------------------------------------------------------------------- where the time goes
def where_the_time_goes(
    preset: str = "base",
    repeats: int = 2,
    timer: Callable[[], float] = time.perf_counter,
    overrides: list[str] | None = None,
) -> dict[str, float]:
    """Seconds per fast-path step by part, each part timed on its own on the step's inputs (best of
    `repeats` rounds, the parts taken in turn so that a changing machine load hits all alike):
    snapshot targets, video encoder forward + backward, text tower forward + backward, the rest of the
    model (projections, contrastive loss, predictor, MVM loss: whole model minus the two towers), AdamW,
    the EMA update, and the whole step for comparison with their sum. On a shared machine pass
    `timer=time.process_time` with one torch thread: CPU seconds, which other jobs do not inflate."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step = Step(preset, overrides or [], device)
    model, cfg = step.model, step.cfg
    step()  # warm-up (and AdamW's state)
    mask, visible = step.mask()
    targets = step.snapshot.targets(step.video, step.snapshot_dtype)

    def video_fwd_bwd() -> None:
        out = model.video_model.forward_visible(step.video, visible, cfg.mvm.kernels)
        (out.last_hidden.float().pow(2).mean() + out.cls.float().pow(2).mean()).backward()

    def text_fwd_bwd() -> None:
        model.encode_text(step.input_ids, step.attention_mask).pow(2).mean().backward()

    def whole() -> None:
        with autocast_context(device, cfg.train.precision):
            out = model(step.video, step.input_ids, step.attention_mask, mask, targets, visible)
        out.loss.backward()

    parts: dict[str, Callable[[], Any]] = {
        "snapshot targets": lambda: step.snapshot.targets(step.video, step.snapshot_dtype),
        "video encoder fwd+bwd": video_fwd_bwd,
        "text tower fwd+bwd": text_fwd_bwd,
        "whole model fwd+bwd": whole,
        "AdamW step": step.optimizer.step,
        "EMA update": lambda: step.snapshot.update(model.video_model, 1),
        "whole step": step,
    }
    seconds = dict.fromkeys(parts, float("inf"))
    for _ in range(repeats):
        for name, fn in parts.items():
            step.optimizer.zero_grad(set_to_none=True)
            if name == "AdamW step":
                whole()  # gradients for it to apply, untimed
            with autocast_context(device, cfg.train.precision):
                start = timer()
                fn()
                _sync(device)
                seconds[name] = min(seconds[name], timer() - start)
    seconds["predictor, projections, losses"] = (
        seconds["whole model fwd+bwd"] - seconds["video encoder fwd+bwd"] - seconds["text tower fwd+bwd"]
    )
    return seconds


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--cpu-time"]
    if "--cpu-time" in sys.argv:  # a shared machine: one thread, CPU seconds
        torch.set_num_threads(1)
    clock = time.process_time if "--cpu-time" in sys.argv else time.perf_counter
    preset = args[0] if args and "=" not in args[0] else "base"
    overrides = [a for a in args if "=" in a]  # e.g. train.precision=bf16 mvm.mode=bert
    for part, secs in where_the_time_goes(preset, timer=clock, overrides=overrides).items():
        print(f"{secs:8.3f} s  {part}")
