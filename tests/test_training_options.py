"""Training options for memory and speed: activation checkpointing, torch.compile, frozen text embeddings,
precision (bf16 on CPUs, the snapshot's own precision)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runs import as_killed_after, data_overrides, logged_losses, run_miles

from miles import checkpoint as ckpt
from miles.config import ConfigError, build_config
from miles.model import MilesModel
from miles.precision import cpu_bf16_flags, resolve_precision, snapshot_dtype
from miles.snapshot import SnapshotEncoder
from miles_kernels import ops


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
    mask, visible = ops.tube_mask(2, plain.video_model.grid_size, 0.5, seed=0, step=0, device="cpu")
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


# A Sapphire Rapids and a Zen 3 flags line (abridged): the first has both BF16 instruction sets.
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile\n"
ZEN3 = "processor\t: 0\nmodel name\t: EPYC (avx512_bf16 in a name is no flag)\nflags\t\t: fpu avx avx2 fma\n"


def test_cpu_bf16_flags_read_the_flags_line() -> None:
    assert cpu_bf16_flags(SAPPHIRE_RAPIDS) == ["avx512_bf16", "amx_bf16"]
    assert cpu_bf16_flags(ZEN3) == []
    assert cpu_bf16_flags("flags\t: avx512f avx512_bf16\n") == ["avx512_bf16"]  # Zen 4: no AMX
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else None
    if flags is not None:  # this machine: what /proc/cpuinfo says, and torch's own probe agrees
        assert cpu_bf16_flags() == cpu_bf16_flags(flags)
        assert ("avx512_bf16" in cpu_bf16_flags()) == torch.cpu._is_avx512_bf16_supported()


def test_precision_resolution() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [resolve_precision(cpu, p) for p in ("auto", "fp32", "bf16")] == ["fp32", "fp32", "bf16"]
    assert [resolve_precision(cuda, p) for p in ("auto", "fp32", "bf16")] == ["bf16", "fp32", "bf16"]
    assert snapshot_dtype(cpu, "auto", "auto") == torch.float32
    assert snapshot_dtype(cpu, "fp32", "bf16") == torch.bfloat16
    assert snapshot_dtype(cuda, "auto", "auto") == torch.bfloat16
    assert snapshot_dtype(cuda, "auto", "fp32") == torch.float32
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision(cpu, "fp16")
    with pytest.raises(ConfigError, match="mvm.snapshot_precision"):
        build_config("smoke", overrides=["mvm.snapshot_precision=fp16"])


def test_snapshot_targets_run_in_the_asked_precision(minilm_dir) -> None:
    torch.manual_seed(0)
    model = MilesModel(build_config("smoke"))
    snapshot = SnapshotEncoder(model.video_model)
    video = torch.randn(2, 2, 3, 32, 32)
    plain = snapshot.targets(video)
    assert plain.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the step's autocast does not reach an fp32 snapshot
        assert torch.equal(snapshot.targets(video, torch.float32), plain)
        under_autocast = snapshot.targets(video)
    low = snapshot.targets(video, torch.bfloat16)  # no autocast outside: bf16 matmuls all the same
    assert torch.equal(low, under_autocast)  # None: the caller's autocast decides, here bf16
    assert low.shape == plain.shape and not torch.equal(low.float(), plain)
    torch.testing.assert_close(low.float(), plain, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="float16"):
        snapshot.targets(video, torch.float16)


@pytest.mark.slow
def test_bf16_training_resumes_exactly(smoke_data: Path, tmp_path: Path, tiny_text_args: list[str]) -> None:
    """train.precision=bf16 on the CPU: a run cut back to its step-2 checkpoint and resumed gives the
    uninterrupted run's losses and weights, bit for bit. The cut run is a copy of the uninterrupted one's
    folder as a kill after step 2 leaves it (two launches, not three; test_pretrain_e2e kills for real):
    what resume needs is in the checkpoint. Emulated bf16 where the CPU lacks BF16 instructions: it warns."""
    common = ["pretrain", "--preset", "smoke", *data_overrides(smoke_data), "train.precision=bf16"]
    common += ["train.max_steps=4", "train.checkpoint_every=2", "eval.before_training=false"]
    common += tiny_text_args
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = run_miles(*common, "--out", str(full))
    assert ("without BF16 instructions" in proc.stderr) == (not cpu_bf16_flags())
    as_killed_after(full, cut, 2)
    final = ckpt.checkpoint_path(Path("checkpoints"), 4)
    run_miles(*common, "--out", str(cut), "--resume")
    assert [s for s, _, _ in logged_losses(cut)] == [1, 2, 3, 4]
    assert logged_losses(cut) == logged_losses(full)
    a, b = ckpt.load(full / final), ckpt.load(cut / final)
    assert a["config"]["train"]["precision"] == "bf16"
    for part in ("model", "snapshot"):
        assert a[part].keys() == b[part].keys()
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"
