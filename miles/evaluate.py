"""Retrieval (text-to-video, video-to-text) and zero-shot action recognition of a MILES model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_dali.loaders import DataSource, build_loader, decode_counts, resolve_data_backend, sum_counts
from data_dali.manifest import ManifestEntry
from data_dali.shards import ShardIndex
from miles.config import Config
from miles.distributed import all_gather_objects, get_rank, get_world_size
from miles.metrics import chance_levels, retrieval_metrics, zeroshot_accuracy
from miles.model import MilesModel

log = logging.getLogger("miles")


@dataclass
class EvalSet:
    """A manifest grouped by video: several captions may point at one video."""

    videos: list[ManifestEntry] | ShardIndex  # one item per distinct video
    captions: list[str]
    caption_to_video: list[int]
    labels: list[str | None]  # per video

    @classmethod
    def from_source(cls, source: DataSource) -> EvalSet:
        """Frame shards already hold one clip per video with all its captions; a manifest is grouped."""
        if isinstance(source, ShardIndex):
            captions = [c for clip in source.clips for c in clip.captions]
            owner = [v for v, clip in enumerate(source.clips) for _ in clip.captions]
            return cls(source, captions, owner, [clip.label for clip in source.clips])
        return cls.from_entries(list(source))

    @classmethod
    def from_entries(cls, entries: list[ManifestEntry]) -> EvalSet:
        index: dict[Path, int] = {}
        videos: list[ManifestEntry] = []
        captions: list[str] = []
        owner: list[int] = []
        for entry in entries:
            if entry.video not in index:
                index[entry.video] = len(videos)
                videos.append(entry)
            captions.append(entry.caption)
            owner.append(index[entry.video])
        return cls(videos, captions, owner, [v.label for v in videos])


def read_classes(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"class list {path} does not exist; give one class name per line")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"class list {path} is empty")
    return names


@torch.no_grad()
def embed_texts(
    model: MilesModel, texts: list[str], device: torch.device, batch_size: int, max_length: int
) -> torch.Tensor:
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = model.tokenizer(
            texts[start : start + batch_size],
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        emb = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        out.append(F.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_videos(
    model: MilesModel,
    videos: DataSource,
    cfg: Config,
    device: torch.device,
    progress: bool = True,
    backend: str = "reference",
    test_clip: tuple[int, int] = (0, 1),
    counts: dict[str, int] | None = None,
) -> tuple[torch.Tensor, list[int], list[str]]:
    """(embeddings of the readable videos, their indices into `videos`, paths that could not be read).

    With several ranks each embeds its share (the sampler's split) and every rank gets all of them,
    in index order, so the ranking that follows is the single-process one. `counts`, when given, gains
    the loader's decode counts over all ranks (clips DALI left to PyAV)."""
    loader = build_loader(
        backend,
        videos,
        model.tokenizer,
        device=device,
        batch_size=cfg.eval.batch_size,
        num_frames=cfg.data.num_frames,
        size=cfg.data.size,
        train=False,
        seed=cfg.train.seed,
        num_workers=cfg.data.num_workers,
        max_length=cfg.data.max_text_length,
        rank=get_rank(),
        world_size=get_world_size(),
        test_clip=test_clip,
    )
    embeddings, kept, skipped = [], [], []
    rng = torch.get_rng_state()  # evaluating must not shift the training RNG stream
    for batch in tqdm(loader, desc="embed videos", unit="batch", disable=not progress, leave=False):
        skipped.extend(batch["skipped"])
        if batch["video"] is None:
            continue
        emb = model.encode_video(batch["video"].to(device))
        embeddings.append(F.normalize(emb.float(), dim=-1).cpu())
        kept.extend(batch["index"].tolist())
    torch.set_rng_state(rng)
    if counts is not None:
        for key, value in sum_counts(all_gather_objects(decode_counts(loader))).items():
            counts[key] = counts.get(key, 0) + value
    local = torch.cat(embeddings) if embeddings else torch.empty(0)
    by_index: dict[int, torch.Tensor] = {}
    bad: set[str] = set()
    for emb, idx, paths in all_gather_objects((local, kept, skipped)):
        by_index.update(zip(idx, emb, strict=True))  # the sampler pads ranks with repeats: kept once
        bad.update(paths)
    skipped = sorted(bad)
    for path in skipped if get_rank() == 0 else []:  # every rank has the gathered list: say it once
        log.warning("skipped unreadable video %s (left out of the evaluation)", path)
    if not by_index:
        raise RuntimeError("no video of the evaluation set could be read")
    kept = sorted(by_index)
    return torch.stack([by_index[i] for i in kept]), kept, skipped


def embed_clips(
    model: MilesModel,
    videos: DataSource,
    cfg: Config,
    device: torch.device,
    progress: bool,
    backend: str,
    counts: dict[str, int] | None = None,
) -> tuple[torch.Tensor, list[int], list[str]]:
    """`embed_videos` over `eval.num_clips` test clips per video: the mean of their unit embeddings,
    normalised again (a video unreadable in any clip is left out)."""
    clips = cfg.eval.num_clips
    passes = [
        embed_videos(model, videos, cfg, device, progress, backend, (k, clips), counts) for k in range(clips)
    ]
    if clips == 1:
        return passes[0]
    common = sorted(set.intersection(*(set(kept) for _, kept, _ in passes)))
    total = torch.zeros(len(common), passes[0][0].shape[1])
    for emb, kept, _ in passes:
        row = {v: i for i, v in enumerate(kept)}
        total += emb[[row[v] for v in common]]
    skipped = sorted({p for _, _, paths in passes for p in paths})
    return F.normalize(total, dim=-1), common, skipped


def dual_softmax(sim: torch.Tensor, temperature: float, over: int) -> torch.Tensor:
    """Dual-softmax re-scoring (DSL): each score times a softmax prior over the query set (`over` is the
    query axis), which demotes candidates that many queries like; applied to the whole query set."""
    return sim * torch.softmax(sim * temperature, dim=over)


def embed_texts_sharded(
    model: MilesModel, texts: list[str], device: torch.device, batch_size: int, max_length: int
) -> torch.Tensor:
    """`embed_texts` with the texts split into one contiguous chunk per rank, gathered in order."""
    world, rank = get_world_size(), get_rank()
    if world == 1:
        return embed_texts(model, texts, device, batch_size, max_length)
    chunk = -(-len(texts) // world)
    mine = texts[rank * chunk : (rank + 1) * chunk]
    local = embed_texts(model, mine, device, batch_size, max_length) if mine else torch.empty(0)
    return torch.cat([part for part in all_gather_objects(local) if part.numel()])


TEST_FRAMES = "the middle frame of each of F equal segments"  # both protocols: Frozen's "uniform"


def protocol_settings(cfg: Config, model: MilesModel) -> dict[str, Any]:
    """What the evaluation does, recorded in metrics.json. `released` is the released MILES test script:
    captions cut only at the text model's position table (no 32-token cap), text-to-video ties broken
    optimistically, video-to-text ties averaged; `ours` caps captions at data.max_text_length (as in
    training) and breaks every tie optimistically. Test frames are sampled alike in both."""
    if cfg.eval.protocol == "released":
        longest = int(getattr(model.text_model.config, "max_position_embeddings", 512))
        return {
            "name": "released",
            "max_text_length": longest,
            "t2v_ties": "optimistic",
            "v2t_ties": "average",
            "test_frames": TEST_FRAMES,
        }
    return {
        "name": "ours",
        "max_text_length": cfg.data.max_text_length,
        "t2v_ties": "optimistic",
        "v2t_ties": "optimistic",
        "test_frames": TEST_FRAMES,
    }


def evaluate(
    model: MilesModel,
    source: DataSource,
    cfg: Config,
    device: torch.device,
    classes: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Retrieval metrics, and zero-shot accuracy when class names and labels are given.

    `source` is a manifest's entries or a frame-shard index; `data.backend` picks its loader as in training.
    Every rank must call it: each embeds a share, all rank the gathered whole.
    """
    backend, why = resolve_data_backend(cfg.data.backend, source, device)
    log.info("evaluation data: %s", why)
    was_training = model.training
    model.eval()
    data = EvalSet.from_source(source)
    counts: dict[str, int] = {}
    video_emb, kept, skipped = embed_clips(model, data.videos, cfg, device, progress, backend, counts)
    position = {v: i for i, v in enumerate(kept)}
    caption_ids = [i for i, v in enumerate(data.caption_to_video) if v in position]
    protocol = protocol_settings(cfg, model)
    captions = [data.captions[i] for i in caption_ids]
    text_emb = embed_texts_sharded(model, captions, device, cfg.eval.batch_size, protocol["max_text_length"])
    sim = text_emb @ video_emb.T
    owners = [position[data.caption_to_video[i]] for i in caption_ids]
    result: dict[str, Any] = retrieval_metrics(
        sim, owners, t2v_ties=protocol["t2v_ties"], v2t_ties=protocol["v2t_ties"]
    )
    result["protocol"] = protocol
    if cfg.eval.dual_softmax:  # its own numbers, beside the plain ones
        t = cfg.eval.dsl_temperature
        t2v = retrieval_metrics(dual_softmax(sim, t, over=0), owners, v2t_ties=protocol["v2t_ties"])["t2v"]
        v2t = retrieval_metrics(dual_softmax(sim, t, over=1), owners, v2t_ties=protocol["v2t_ties"])["v2t"]
        result["dsl"] = {"t2v": t2v, "v2t": v2t, "temperature": t}
    result["num_clips"] = cfg.eval.num_clips
    result["num_videos"] = len(kept)
    result["num_captions"] = len(caption_ids)
    labelled = [data.labels[v] for v in kept]
    num_classes = None
    if classes and all(label is not None for label in labelled):
        unknown = sorted({label for label in labelled if label not in classes})
        if unknown:
            raise ValueError(f"labels {unknown[:5]} are not in the class list; check the classes file")
        prompts = [cfg.eval.prompt.format(name) for name in classes]
        class_emb = embed_texts(model, prompts, device, cfg.eval.batch_size, protocol["max_text_length"])
        result["zeroshot"] = zeroshot_accuracy(video_emb @ class_emb.T, [classes.index(x) for x in labelled])
        num_classes = len(classes)
    result["chance"] = chance_levels(len(kept), len(caption_ids), num_classes)
    result["data_backend"] = backend
    result["decode_counts"] = counts  # clips DALI left to PyAV (empty for the reference loader)
    result["skipped_videos"] = len(skipped)
    result["skipped_paths"] = skipped
    model.train(was_training)
    return result


def chance_column(chance: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Chance levels shaped like a metrics dict, for a column of `format_table`."""
    return {
        "t2v": {"R1": chance["R1"]},
        "v2t": {"R1": chance["R1"]},
        "zeroshot": {"top1": chance.get("top1")},
    }


def format_table(columns: dict[str, dict[str, Any]]) -> str:
    """Side-by-side table of metric dicts (e.g. untrained / trained / chance)."""
    rows: list[tuple[str, list[str]]] = []
    keys = [("t2v", k) for k in ("R1", "R5", "R10", "MedR", "MeanR")]
    keys += [("v2t", k) for k in ("R1", "R5", "R10", "MedR", "MeanR")]
    keys += [("zeroshot", k) for k in ("top1", "top5")]
    for group, key in keys:
        cells = []
        for metrics in columns.values():
            value = metrics.get(group, {}).get(key) if isinstance(metrics.get(group), dict) else None
            cells.append("-" if value is None else f"{value:.1f}")
        if any(c != "-" for c in cells):
            rows.append((f"{group} {key}", cells))
    width = max(len(name) for name, _ in rows) if rows else 10
    header = " " * width + " | " + " | ".join(f"{name:>9}" for name in columns)
    lines = [header, "-" * len(header)]
    lines += [f"{name:<{width}} | " + " | ".join(f"{c:>9}" for c in cells) for name, cells in rows]
    return "\n".join(lines)
