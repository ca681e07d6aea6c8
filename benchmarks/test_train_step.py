"""The whole MILES train step (masking, snapshot targets, forward, backward, AdamW, EMA update) for the
`demo` and `base` presets at mask ratio 0.75, on synthetic clips so that only the step is timed:
the fast path (`drop` mode, kernels `auto`) against the reference path (`bert` mode, reference kernels),
same inputs, same objective otherwise (contrastive on the masked pass in both, so the ratio measures
token dropping alone).

Reported per case in `extra_info`: clips/s and peak memory (CUDA max allocated, or CPU peak RSS).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import bench_rounds, pair, peak_memory_info, peak_memory_mb, reset_peak_memory
from kernels import tube_mask
from miles.config import build_config
from miles.model import MilesModel
from miles.snapshot import SnapshotEncoder
from miles.train import autocast_context, param_groups

# On these 2-core CPUs the `base` step takes seconds per clip: a small batch keeps the suite short.
CPU_BATCH = {"demo": 32, "base": 2}
GPU_BATCH = {"demo": 128, "base": 32}


PATHS = {
    "reference": ["mvm.mode=bert", "mvm.kernels=reference"],
    "fast": ["mvm.mode=drop", "mvm.kernels=auto"],
}
LABELS = {"reference": "bert + reference kernels", "fast": "drop + kernels auto"}


def _step_fn(preset: str, path: str, device: torch.device):
    batch = (GPU_BATCH if device.type == "cuda" else CPU_BATCH)[preset]
    overrides = [f"train.batch_size={batch}", "mvm.mask_ratio=0.75", "mvm.contrastive_input=masked"]
    cfg = build_config(preset, overrides=overrides + PATHS[path])
    torch.manual_seed(0)
    model = MilesModel(cfg).to(device)
    snapshot = SnapshotEncoder(model.video_model, momentum=cfg.mvm.ema_momentum).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg))
    size, frames = cfg.data.size, cfg.data.num_frames
    video = torch.randn(batch, frames, 3, size, size, device=device)
    input_ids = torch.randint(1000, 20000, (batch, 16), device=device)
    attention_mask = torch.ones_like(input_ids)
    state = {"step": 0}

    def step() -> None:
        with autocast_context(device, "auto"):
            mask, visible = tube_mask(
                batch,
                model.video_model.grid_size,
                cfg.mvm.mask_ratio,
                seed=0,
                step=state["step"],
                device=device,
                impl=cfg.mvm.kernels,
            )
            targets = snapshot.targets(video)
            out = model(video, input_ids, attention_mask, mask, targets, visible)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        snapshot.update(model.video_model, state["step"] + 1)
        state["step"] += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step, batch


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("preset", ["demo", "base"])
def test_train_step(benchmark, preset: str, path: str, device: torch.device) -> None:
    pair(benchmark, f"train step {preset}", path, LABELS[path])
    step, batch = _step_fn(preset, path, device)
    step()  # warm-up: allocator, lazy init
    reset_peak_memory(device)
    rounds = bench_rounds(device, cpu=5 if preset == "demo" else 2, cuda=5)
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    benchmark.extra_info.update(
        preset=preset,
        path=path,
        batch=batch,
        clips_per_s=batch / benchmark.stats.stats.mean,
        peak_memory_mb=peak_memory_mb(device),
        device=str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
    )
    benchmark.extra_info.update(peak_memory_info(device))
