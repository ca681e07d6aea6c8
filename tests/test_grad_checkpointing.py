"""model.grad_checkpointing: blocks recomputed in backward, gradients those of the plain run."""

from __future__ import annotations

import torch

import kernels
from miles.config import build_config
from miles.model import MilesModel


def test_checkpointed_gradients_equal_the_plain_run(minilm_dir) -> None:
    torch.manual_seed(0)
    plain = MilesModel(build_config("smoke"))
    checkpointed = MilesModel(build_config("smoke", overrides=["model.grad_checkpointing=true"]))
    checkpointed.load_state_dict(plain.state_dict())
    text = checkpointed.text_model
    assert checkpointed.video_model.grad_checkpointing
    assert getattr(text, "is_activation_checkpointing", None) or text.is_gradient_checkpointing
    video = torch.randn(2, 2, 3, 32, 32)
    tokens = plain.tokenizer(
        ["a red square slides left", "a blue circle grows"], padding=True, return_tensors="pt"
    )
    mask, visible = kernels.tube_mask(2, plain.video_model.grid_size, 0.5, seed=0, step=0, device="cpu")
    targets = torch.randn(2, 2, plain.video_model.patches_per_frame, 64)
    block_calls = []
    grads, losses = [], []
    for model in (plain, checkpointed):
        model.train()  # dropout on: the recomputation must replay the same masks
        block = model.video_model.blocks[0]
        forward = block.forward
        block.forward = lambda *a, _f=forward, **k: block_calls.append(1) or _f(*a, **k)  # count runs
        torch.manual_seed(1)
        out = model(video, tokens["input_ids"], tokens["attention_mask"], mask, targets, visible)
        out.loss.backward()
        del block.forward
        losses.append(out.loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        block_calls.append("|")
    # smoke runs bert mode with contrastive on a second, unmasked pass: 2 forwards plain, 4 checkpointed
    assert block_calls == [1, 1, "|", 1, 1, 1, 1, "|"]
    assert losses[0] == losses[1]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)
