"""The whole reference train step (bert-mode MILES: masking, snapshot targets, forward, backward, AdamW,
EMA update) for the `demo` and `base` presets, on synthetic clips so that only the step is timed.

Reported per case in `extra_info`: clips/s and peak memory (CUDA max allocated, or CPU peak RSS).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import peak_memory_mb, reset_peak_memory
from kernels import tube_mask
from miles.config import build_config
from miles.model import MilesModel
from miles.snapshot import SnapshotEncoder
from miles.train import autocast_context, param_groups

# On these 2-core CPUs the `base` step takes seconds per clip: a small batch keeps the suite short.
CPU_BATCH = {"demo": 32, "base": 2}
GPU_BATCH = {"demo": 128, "base": 32}


def _step_fn(preset: str, device: torch.device):
    batch = (GPU_BATCH if device.type == "cuda" else CPU_BATCH)[preset]
    cfg = build_config(preset, overrides=[f"train.batch_size={batch}"])
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
            mask, _ = tube_mask(
                batch,
                model.video_model.grid_size,
                cfg.mvm.mask_ratio,
                seed=0,
                step=state["step"],
                device=device,
            )
            targets = snapshot.targets(video)
            out = model(video, input_ids, attention_mask, mask, targets)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        snapshot.update(model.video_model, state["step"] + 1)
        state["step"] += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step, batch


@pytest.mark.parametrize("preset", ["demo", "base"])
def test_reference_train_step(benchmark, preset: str, device: torch.device) -> None:
    step, batch = _step_fn(preset, device)
    step()  # warm-up: allocator, lazy init
    reset_peak_memory(device)
    rounds = 5 if preset == "demo" or device.type == "cuda" else 2
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    benchmark.extra_info.update(
        preset=preset,
        path="reference (bert mode, reference masking)",
        batch=batch,
        clips_per_s=batch / benchmark.stats.stats.mean,
        peak_memory_mb=peak_memory_mb(device),
        device=str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
    )
