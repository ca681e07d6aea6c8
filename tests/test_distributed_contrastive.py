"""Two gloo ranks under DDP give the same contrastive loss and gradients as one process on the whole batch."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from miles.distributed import gather_with_local_grad
from miles.losses import NormSoftmaxLoss

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "contrastive_ddp.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("contrastive_ddp", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ddp_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ddp") / "result.pt"
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK"}}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(SCRIPT),
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return torch.load(out)


def test_gather_order_rank0_first(ddp_result: dict):
    want = torch.tensor([[0.0] * 3, [1.0] * 3, [1.0] * 3, [2.0] * 3])
    torch.testing.assert_close(ddp_result["probe"], want, rtol=0, atol=0)
    assert ddp_result["mean_rank"] == pytest.approx(0.5)


def test_ddp_matches_single_process(ddp_result: dict):
    script = _load_script()
    model = script.build_model()
    video, text = script.make_batch()
    v_emb, t_emb = model(video, text)
    loss = NormSoftmaxLoss(script.TEMPERATURE)(v_emb, t_emb)
    loss.backward()

    losses = ddp_result["losses"]
    assert losses.shape == (2,)
    assert losses[0].item() == pytest.approx(losses[1].item(), abs=1e-12)  # every rank: same global loss
    assert losses[0].item() == pytest.approx(loss.item(), abs=1e-6)

    grads = ddp_result["grads"]
    assert set(grads) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 1e-3, name  # a real, non-trivial gradient
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=1e-6, msg=name)


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    y = gather_with_local_grad(x)
    assert y is x
