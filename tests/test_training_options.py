"""Training options for memory and speed: activation checkpointing, torch.compile, frozen text embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runs import data_overrides, logged_losses, run_miles

import kernels
from miles import checkpoint as ckpt
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


@pytest.mark.slow
def test_compiled_training_with_frozen_text_embeddings(smoke_data: Path, tmp_path: Path) -> None:
    """train.compile (aot_eager here: the wiring, not inductor's speed) trains like eager, its checkpoints
    keep our keys, and model.freeze_text_embeddings keeps the text embeddings as loaded."""
    common = ["pretrain", "--preset", "smoke", *data_overrides(smoke_data), "train.max_steps=3"]
    common += ["eval.before_training=false", "model.freeze_text_embeddings=true"]
    run_miles(*common, "--out", str(tmp_path / "eager"))
    run_miles(
        *common, "--out", str(tmp_path / "compiled"), "train.compile=true", "train.compile_backend=aot_eager"
    )
    eager, compiled = logged_losses(tmp_path / "eager"), logged_losses(tmp_path / "compiled")
    for (s1, loss1, mvm1), (s2, loss2, mvm2) in zip(eager, compiled, strict=True):
        assert s1 == s2 and loss2 == pytest.approx(loss1, rel=1e-4) and mvm2 == pytest.approx(mvm1, rel=1e-4)
    trained = ckpt.load(tmp_path / "compiled" / ckpt.checkpoint_path(Path("checkpoints"), 3))["model"]
    fresh = MilesModel(build_config("smoke")).state_dict()
    assert trained.keys() == fresh.keys()  # no `_orig_mod.` anywhere
    word = "text_model.embeddings.word_embeddings.weight"
    assert torch.equal(trained[word], fresh[word])  # frozen: the shipped MiniLM embeddings
    layer = "text_model.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(trained[layer], fresh[layer])  # the rest of the text tower trained
