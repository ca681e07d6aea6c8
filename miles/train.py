"""The pre-training loop: data, MILES objective, AdamW with warm-up + cosine, DDP, checkpoints, resume.

Resume is exact on the CPU: the checkpoint holds the model, snapshot, optimizer, scheduler, every RNG
state and the data position (epoch, batches consumed); data augmentation and masking are pure functions
of (seed, epoch / step, index), so the resumed run sees the same batches and masks and produces the
same losses as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data_dali.loaders import DataSource, build_loader, data_fingerprint, decode_counts, sum_counts
from miles import checkpoint as ckpt
from miles.checkpoint import CheckpointError
from miles.config import (
    BEST_METRICS,
    Config,
    ConfigError,
    best_metric_terms,
    config_differences,
)
from miles.distributed import DistInfo, all_gather_objects, all_reduce_mean, broadcast_from_main
from miles.model import MilesModel
from miles.optim import lr_factor, param_groups
from miles.precision import autocast_context, snapshot_dtype, warn_slow_bf16
from miles.run_position import BatchStream, DataPosition, rng_state, seed_everything, set_rng_state
from miles.snapshot import SnapshotEncoder
from miles.stop import GracefulStop, NonFiniteError, StopRequested
from miles.targets import ENCODER_TARGETS, input_targets
from miles_kernels import ops

log = logging.getLogger("miles")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class RunState:
    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    skipped: set[str] = field(default_factory=set)


@dataclass
class BestRecord:
    """The periodic evaluations so far under `train.best_metric`: what `checkpoints/best.pt` holds, and how
    many evaluations since have not beaten it. In every checkpoint, so a resumed run goes on counting."""

    metric: str
    value: float | None = None  # None: no evaluation yet
    step: int = 0
    metrics: dict[str, Any] | None = None  # that evaluation's metric groups (t2v, v2t, zeroshot, dsl)
    evals_without_improvement: int = 0
    stopped_early: bool = False


def metric_groups(result: dict[str, Any]) -> dict[str, Any]:
    """The metric groups of an evaluation (not its paths, protocol or counts)."""
    return {k: result[k] for k in ("t2v", "v2t", "zeroshot", "dsl") if isinstance(result.get(k), dict)}


def metric_value(result: dict[str, Any], names: list[str]) -> float:
    """The sum of the named metrics (see `miles.config.BEST_METRICS`) of an evaluation's result."""
    total = 0.0
    for name in names:
        node: Any = result
        for key in BEST_METRICS[name]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, (int, float)):
            why = "validation videos lack labels" if name.startswith("zeroshot_") else "it was not computed"
            raise ConfigError(f"config key 'train.best_metric': the evaluation has no {name} ({why})")
        total += float(node)
    return total


# Keys that decide which clips, masks and batches follow a checkpoint: a resume must not change them.
RESUME_KEYS = [
    ("data", "train_manifest"),
    ("data", "num_frames"),
    ("data", "size"),
    ("data", "hflip"),
    ("train", "batch_size"),
    ("train", "grad_accum"),
    ("train", "seed"),
    ("mvm", "mask_ratio"),
    ("mvm", "mask_type"),
    ("mvm", "target"),  # frozen <-> snapshot keep every shape: only this check tells them apart
]


class Trainer:
    def __init__(
        self,
        cfg: Config,
        train_source: DataSource,
        out_dir: Path,
        dist: DistInfo,
        model: MilesModel | None = None,
        data_backend: str = "reference",
        evaluator: Callable[[MilesModel], dict[str, Any]] | None = None,
        job: str = "pretrain",
    ) -> None:
        """`evaluator` (collective, like `miles.evaluate.evaluate`) runs every `train.eval_every` steps and
        at the last one; its `train.best_metric` picks `checkpoints/best.pt` and drives early stopping.
        `job` names the progress bar."""
        self.cfg = cfg
        self.job = job
        self.out_dir = out_dir
        self.dist = dist
        self.device = dist.device
        seed_everything(cfg.train.seed + dist.rank)
        self.model = (model or MilesModel(cfg)).to(self.device)
        v = cfg.mvm
        self.snapshot = (
            SnapshotEncoder(
                self.model.video_model,
                "frozen" if v.target == "frozen" else v.snapshot,
                v.ema_momentum,
                v.copy_every,
                schedule=v.ema_schedule,
                total_steps=cfg.train.max_steps,
            ).to(self.device)
            if v.enabled and v.target in ENCODER_TARGETS
            else None
        )
        if cfg.model.freeze_text_embeddings:  # word / position embeddings: a third of a small text tower
            text = self.model.text_model
            embeddings = getattr(text, "embeddings", None) or text.get_input_embeddings()
            embeddings.requires_grad_(False)
        # One fused kernel per parameter group on CUDA instead of a loop of small ones.
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg), betas=(0.9, 0.98), eps=1e-8, **fused
        )
        t = cfg.train
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        )
        if cfg.train.compile:
            # Module.compile() compiles in place, so state_dict keys carry no `_orig_mod.` prefix and
            # checkpoints load the same either way. The snapshot copy was taken before: compiled alike.
            towers = [self.model.video_model, self.model.text_model]
            for module in towers + ([self.snapshot.encoder] if self.snapshot is not None else []):
                module.compile(backend=cfg.train.compile_backend)
        self.ddp: nn.Module = self.model
        if dist.world_size > 1:
            # No static_graph: on torch 2.14.1 it gives this step wrong gradients (norm 2.8x the
            # single-process one at step 1, measured with two gloo ranks), and under no_sync() it fails
            # in the reducer (pytorch/pytorch#187732). docs/scaling.md.
            self.ddp = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: one copy fewer
            )
        self.loader = build_loader(
            data_backend,
            train_source,
            self.model.tokenizer,
            device=self.device,
            batch_size=t.batch_size,
            num_frames=cfg.data.num_frames,
            size=cfg.data.size,
            train=True,
            seed=t.seed,
            hflip=cfg.data.hflip,
            num_workers=cfg.data.num_workers,
            rank=dist.rank,
            world_size=dist.world_size,
            max_length=cfg.data.max_text_length,
        )
        self.state = RunState()
        self.ckpt_dir = out_dir / "checkpoints"
        self.log_path = out_dir / "log.jsonl"
        # Rank 0 hashes the data once; every rank records and checks the same fingerprint.
        self.data_fingerprint = broadcast_from_main(
            data_fingerprint(cfg.data.train_manifest) if dist.rank == 0 else None
        )
        self.nonfinite_in_a_row = 0
        self.evaluator = evaluator if cfg.train.eval_every > 0 else None
        self.best_names, self.higher_is_better = best_metric_terms(cfg.train.best_metric)
        self.best = BestRecord(cfg.train.best_metric)
        self.best_path = self.ckpt_dir / "best.pt"
        self.last_eval: tuple[int, dict[str, Any]] | None = None  # (step, result) of the latest evaluation
        self.eval_pending = False  # a stop signal saved this step before its due evaluation ran
        self.stop = GracefulStop()
        self._tb: Any = None  # TensorBoard writer, opened on first use (rank 0)
        self._tb_missing = False  # the package is not installed: warned once
        if dist.rank == 0:
            # the snapshot's own precision matters only where there is a snapshot encoder
            snapshot_precision = cfg.mvm.snapshot_precision if self.snapshot is not None else "auto"
            warn_slow_bf16(self.device, cfg.train.precision, snapshot_precision)

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "step": self.state.step,
            "model": self.model.state_dict(),
            "snapshot": self.snapshot.state_dict() if self.snapshot else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data_position": {"epoch": self.state.position.epoch, "batches": self.state.position.batches},
            "skipped_videos": sorted(self.state.skipped),
            "rng": all_gather_objects(rng_state()),  # one entry per rank
            "world_size": self.dist.world_size,
            "data_fingerprint": self.data_fingerprint,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "best": asdict(self.best),
            "eval_pending": self.eval_pending,
        }

    def _check_finite_weights(self) -> None:
        named = list(self.model.named_parameters())
        finite = torch.stack([torch.isfinite(p).all() for _, p in named])  # one host sync, not one each
        if not bool(finite.all()):
            bad = [name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok]
            raise NonFiniteError(
                f"after step {self.state.step} the weights hold NaN/inf ({len(bad)} tensors, first: "
                f"{bad[0]}); not saving them over a good checkpoint. Last good checkpoint: "
                f"{ckpt.latest_checkpoint(self.ckpt_dir) or 'none yet'}; lower train.lr "
                f"(now {self.cfg.train.lr:g})"
            )

    def save(self) -> Path:
        self._check_finite_weights()
        path = ckpt.checkpoint_path(self.ckpt_dir, self.state.step)
        state = self.state_dict()  # collective: every rank contributes its RNG state

        def write() -> None:
            ckpt.save_atomic(state, path)
            ckpt.prune(self.ckpt_dir, self.cfg.train.keep_checkpoints)

        self._write_on_main(write)
        return path

    def save_best(self) -> Path:
        """`checkpoints/best.pt`: the model, its config, the step and the best record, without the optimizer
        (it is for `miles eval --checkpoint` and `--init`, which read it like any checkpoint of ours)."""
        state = {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "step": self.state.step,
            "best": asdict(self.best),
        }
        self._write_on_main(lambda: ckpt.save_atomic(state, self.best_path))
        return self.best_path

    def _write_on_main(self, write: Callable[[], None]) -> None:
        failure = ""
        if self.dist.rank == 0:
            try:
                write()
            except ckpt.CheckpointWriteError as err:
                failure = str(err)
        failure = broadcast_from_main(failure)  # every rank stops together, none waits in a collective
        if failure:
            raise ckpt.CheckpointWriteError(failure)

    def resume(self, path: Path, state: dict[str, Any], allow_data_change: bool = False) -> None:
        """Continue from `state` (read from `path`); refuses anything that would not continue exactly."""
        if state.get("world_size", 1) != self.dist.world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by {state.get('world_size')} processes, this run has "
                f"{self.dist.world_size}; the data position would not carry over exactly"
            )
        saved = state.get("config", {})
        if not isinstance(saved, dict):
            raise CheckpointError(f"checkpoint {path}: entry 'config' is a {type(saved).__name__}, not dict")
        data_changed = self._data_changed(path, state.get("data_fingerprint"))
        if data_changed and not allow_data_change:
            raise CheckpointError(
                f"{data_changed}; resuming would not continue the interrupted run's batches. Restore "
                "that file, start a new --out, or pass --allow-data-change to restart the epoch on the "
                "new data"
            )
        for section, key in RESUME_KEYS:
            if allow_data_change and (section, key) == ("data", "train_manifest"):
                continue
            now = getattr(getattr(self.cfg, section), key)
            # a key newer than the checkpoint held its default then
            before = saved.get(section, {}).get(key, getattr(getattr(Config(), section), key))
            if before != now:
                raise CheckpointError(
                    f"config key '{section}.{key}' was {before!r} in checkpoint {path} and is {now!r} now; "
                    "resume needs the same data order and batches: set it back or start a new --out"
                )
        diff = config_differences(saved, self.cfg)
        ckpt.load_module_state(self.model, state.get("model"), path, "model", diff)
        if self.snapshot is not None and state.get("snapshot") is None:
            raise CheckpointError(
                f"checkpoint {path} holds no snapshot encoder, which mvm.target={self.cfg.mvm.target!r} "
                "needs; resume with the checkpoint's own mvm settings or start a new --out"
            )
        if self.snapshot is not None:
            ckpt.load_module_state(self.snapshot, state["snapshot"], path, "snapshot", diff)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.state.step = int(state["step"])
            self.state.position = DataPosition(**state["data_position"])
            set_rng_state(state["rng"][self.dist.rank])
        except (KeyError, ValueError, TypeError, IndexError) as err:
            raise CheckpointError(
                f"checkpoint {path}: its optimizer / scheduler / data position / RNG entries do not fit "
                f"this run ({type(err).__name__}: {err}); start a new --out"
            ) from err
        self.state.skipped = set(state.get("skipped_videos", []))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self._resume_best(path, state.get("best"))
        self.eval_pending = bool(state.get("eval_pending", False))
        if data_changed:
            log.warning(
                "%s: --allow-data-change, so epoch %d restarts from its first batch on the new data",
                data_changed,
                self.state.position.epoch,
            )
            self.state.position.batches = 0
        if self.dist.rank == 0:
            truncate_log(self.log_path, self.state.step)
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            path,
            self.state.step,
            self.state.position.epoch,
            self.state.position.batches,
        )

    def _resume_best(self, path: Path, saved: Any) -> None:
        """The best record and the patience count go on from the checkpoint; best.pt is made to agree."""
        if saved is None:  # a checkpoint from before periodic evaluation existed
            return
        if not isinstance(saved, dict) or set(saved) != {f.name for f in fields(BestRecord)}:
            raise CheckpointError(f"checkpoint {path}: entry 'best' is not a best-checkpoint record")
        if saved["value"] is not None and saved["metric"] != self.cfg.train.best_metric:
            raise CheckpointError(
                f"config key 'train.best_metric' was {saved['metric']!r} in checkpoint {path} and is "
                f"{self.cfg.train.best_metric!r} now; the best so far was measured by the first: set it back "
                "or start a new --out"
            )
        self.best = BestRecord(**{**saved, "metric": self.cfg.train.best_metric})
        if self.best.value is None:
            return
        on_disk = broadcast_from_main(self._best_file_step() if self.dist.rank == 0 else None)
        if on_disk == self.best.step:
            return
        if self.best.step == self.state.step:  # killed between this step's checkpoint and its best.pt
            log.info("writing %s from resumed step %d, the best evaluation", self.best_path, self.state.step)
            self.save_best()
            return
        log.warning(
            "%s holds step %s, not step %d, the best so far by checkpoint %s (the interrupted run wrote it "
            "after that checkpoint, or it was lost); the next evaluation better than %.4g replaces it",
            self.best_path,
            on_disk,
            self.best.step,
            path,
            self.best.value,
        )

    def _best_file_step(self) -> int | None:
        if not self.best_path.is_file():
            return None
        try:
            step = ckpt.load(self.best_path, "best checkpoint").get("step")
        except CheckpointError as err:
            log.warning("%s", err)
            return None
        return step if isinstance(step, int) else None

    def _data_changed(self, path: Path, saved: Any) -> str:
        """'' when the training data is the checkpoint's; otherwise a sentence saying what changed."""
        if not isinstance(saved, dict):
            log.warning(
                "checkpoint %s records no data fingerprint (an older version wrote it): cannot check that "
                "%s is unchanged",
                path,
                self.cfg.data.train_manifest,
            )
            return ""
        if saved.get("sha256") == self.data_fingerprint["sha256"]:
            return ""
        return (
            f"the training data changed since checkpoint {path}: {self.data_fingerprint['path']} has "
            f"sha256 {self.data_fingerprint['sha256'][:12]}, the checkpoint was reading "
            f"{saved.get('path')} with sha256 {str(saved.get('sha256'))[:12]}"
        )

    # ------------------------------------------------------------------------------------------ step
    def _micro_step(self, batch: dict[str, Any], micro_index: int) -> tuple[float, float, float]:
        cfg = self.cfg
        video = batch["video"].to(self.device, non_blocking=True)
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        attention_mask = batch["attention_mask"].to(self.device, non_blocking=True)
        mask = targets = visible = None
        with autocast_context(self.device, cfg.train.precision):
            if cfg.mvm.enabled and cfg.mvm.mask_ratio > 0:
                mask, visible = ops.mvm_mask(
                    video.shape[0],
                    video.shape[1],
                    self.model.video_model.grid_size,
                    cfg.mvm.mask_ratio,
                    mask_type=cfg.mvm.mask_type,
                    seed=cfg.train.seed ^ (self.dist.rank << 20),
                    step=micro_index,
                    device=self.device,
                    min_area=cfg.mvm.block_min_area,
                    impl=cfg.mvm.kernels,
                )
                if self.snapshot is not None:
                    precision = (cfg.train.precision, cfg.mvm.snapshot_precision)
                    targets = self.snapshot.targets(video, snapshot_dtype(self.device, *precision))
                else:
                    targets = input_targets(cfg.mvm.target, video, cfg.model.patch_size)
            out = self.ddp(video, input_ids, attention_mask, mask, targets, visible)
        (out.loss / cfg.train.grad_accum).backward()
        return float(out.loss.detach()), float(out.contrastive), float(out.mvm)

    def train_step(self, stream: BatchStream, stop_signal: int = 0) -> dict[str, float]:
        """One optimizer step. `stop_signal` (this rank's pending signal number, 0 for none) rides on the
        step's one collective, so every rank learns in the same step that one of them must stop."""
        cfg = self.cfg
        self.ddp.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses = np.zeros(3)
        clips = 0
        data_wait = 0.0
        for micro in range(cfg.train.grad_accum):
            waited = time.perf_counter()
            batch = stream.next()
            data_wait += time.perf_counter() - waited
            for path in batch.get("skipped", []):
                if path not in self.state.skipped:
                    self.state.skipped.add(path)
                    log.warning("skipped unreadable video %s (replaced by another clip)", path)
            sync = micro == cfg.train.grad_accum - 1 or not isinstance(self.ddp, DistributedDataParallel)
            context = contextlib.nullcontext() if sync else self.ddp.no_sync()
            with context:
                losses += self._micro_step(batch, self.state.step * cfg.train.grad_accum + micro)
            clips += batch["video"].shape[0]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip))
        losses /= cfg.train.grad_accum
        # NaN on any rank makes the mean NaN, and the gradient norm is of the all-reduced gradient: every
        # rank takes the same decision below.
        *mean_losses, stop = all_reduce_mean([*losses.tolist(), float(stop_signal)])
        record = dict(zip(("loss", "contrastive", "mvm"), mean_losses, strict=True))
        finite = math.isfinite(record["loss"]) and math.isfinite(grad_norm)
        if finite:
            self.nonfinite_in_a_row = 0
            self.optimizer.step()
        else:
            self._on_nonfinite(record, grad_norm)
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        if finite and self.snapshot is not None:
            self.snapshot.update(self.model.video_model, self.state.step)
        return {
            **record,
            "grad_norm": grad_norm,
            "lr": self.optimizer.param_groups[0]["lr"],
            "clips": clips * self.dist.world_size,
            "skipped_update": 0.0 if finite else 1.0,
            "data_wait_s": data_wait,  # this rank's time blocked on the loader in this step
            **decode_counts(self.loader),  # this rank's clips decoded by PyAV instead of DALI, so far
            "stop": stop,
        }

    def _on_nonfinite(self, record: dict[str, float], grad_norm: float) -> None:
        """Stop with the facts, or (train.nonfinite=skip) drop this update, up to a limit in a row."""
        t = self.cfg.train
        step = self.state.step + 1
        parts = ", ".join(f"{k} {v:.4g}" for k, v in record.items())
        facts = f"step {step}: non-finite training ({parts}, gradient norm {grad_norm:.4g})"
        self.nonfinite_in_a_row += 1
        if t.nonfinite == "skip" and self.nonfinite_in_a_row <= t.max_nonfinite_skips:
            log.warning(
                "%s: update skipped (%d in a row, train.max_nonfinite_skips=%d)",
                facts,
                self.nonfinite_in_a_row,
                t.max_nonfinite_skips,
            )
            return
        if t.nonfinite == "skip":
            facts += f", {self.nonfinite_in_a_row} in a row (limit train.max_nonfinite_skips)"
        raise NonFiniteError(
            f"{facts}. Nothing was saved from it; last good checkpoint: "
            f"{ckpt.latest_checkpoint(self.ckpt_dir) or 'none yet'}. Lower train.lr (now {t.lr:g}) or "
            "train.text_lr, check the data, or set train.nonfinite=skip to drop such steps"
        )

    def fit(self) -> dict[str, Any]:
        """Train to max_steps; on SIGTERM / SIGUSR1 / SIGINT save after the current step and raise
        StopRequested (every rank, at the same step)."""
        with self.stop:
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        t = cfg.train
        stream = BatchStream(self.loader, self.state.position)
        main = self.dist.rank == 0
        bar = tqdm(
            total=t.max_steps,
            initial=self.state.step,
            disable=not main,
            desc=self.job,
            unit="step",
            dynamic_ncols=True,
        )
        log_file = open(self.log_path, "a") if main else None
        started = time.perf_counter()
        clips_done, step_seconds = 0, 0.0  # the steps alone (data included; evaluations, saves not)
        last: dict[str, float] = {}
        try:
            if self.eval_pending and self.evaluator is not None:
                self._run_pending_eval(log_file)
            while self.state.step < t.max_steps and not self.best.stopped_early:
                tick = time.perf_counter()
                last = self.train_step(stream, self.stop.signum or 0)
                elapsed = time.perf_counter() - tick
                clips_done += int(last["clips"])
                step_seconds += elapsed
                last["clips_per_s"] = last["clips"] / max(elapsed, 1e-9)
                agreed_stop = last.pop("stop") > 0
                if main:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{last['loss']:.3f}",
                        mvm=f"{last['mvm']:.3f}",
                        clips_s=f"{last['clips_per_s']:.1f}",
                    )
                    if self.state.step % t.log_every == 0 or self.state.step == t.max_steps:
                        last["peak_memory_mb"] = peak_memory_mb(self.device)
                        record = {"step": self.state.step, "epoch": self.state.position.epoch, **last}
                        log_file.write(json.dumps(record) + "\n")  # type: ignore[union-attr]
                        log_file.flush()  # type: ignore[union-attr]
                        self.log_scalars("train", last)
                if t.crash_at_step and self.state.step == t.crash_at_step and self.dist.rank == t.crash_rank:
                    self._crash(log_file)  # as if the signal came during this step
                eval_due = self.evaluator is not None and (
                    self.state.step % t.eval_every == 0 or self.state.step == t.max_steps
                )
                # Alone, a signal counts at once; with several ranks only once all of them know of it.
                if agreed_stop or (self.dist.world_size == 1 and self.stop.requested):
                    # The checkpoint first: a grace period may be shorter than an evaluation. The resumed
                    # run evaluates these weights before its first step, as this run would have.
                    self.eval_pending = eval_due
                    self._stop_here(self.save())
                saved = self._evaluate(log_file) if eval_due else None
                due = self.state.step % t.checkpoint_every == 0 or self.state.step == t.max_steps
                if saved is None and (due or self.best.stopped_early):
                    self.save()
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()
        wall = time.perf_counter() - started
        return {
            "steps": self.state.step,
            "train_seconds": wall,
            "clips_per_s": clips_done / max(step_seconds, 1e-9),
            "final": last,
            "skipped_videos": sorted(set().union(*all_gather_objects(self.state.skipped))),
            "decode_counts": sum_counts(all_gather_objects(decode_counts(self.loader))),
            "best": asdict(self.best) if self.best.value is not None else None,
            "early_stopped": self.best.stopped_early,
        }

    def _run_pending_eval(self, log_file: Any) -> None:
        """The evaluation a stop put off, on the weights it was due for; the step's checkpoint is then
        rewritten with its outcome, so a second resume does not evaluate (and log) it again."""
        self.eval_pending = False
        log.info("step %d: the evaluation put off by the stop signal runs now", self.state.step)
        if self._evaluate(log_file) is None:
            self.save()

    def _evaluate(self, log_file: Any) -> Path | None:
        """Evaluate (every rank), keep the best by `train.best_metric`, count towards early stopping.

        An improvement writes this step's checkpoint before best.pt, so after a kill at any point the
        newest checkpoint's best record and best.pt agree (`_resume_best` mends the one gap between)."""
        t = self.cfg.train
        result = self.evaluator(self.model)  # type: ignore[misc]
        value = broadcast_from_main(metric_value(result, self.best_names))  # every rank decides alike
        self.last_eval = (self.state.step, result)
        best = self.best
        improved = best.value is None or (value > best.value if self.higher_is_better else value < best.value)
        if improved:
            self.best = best = BestRecord(t.best_metric, value, self.state.step, metric_groups(result))
        else:
            best.evals_without_improvement += 1
            best.stopped_early = 0 < t.early_stop_patience <= best.evals_without_improvement
        if self.dist.rank == 0:
            record = {
                "step": self.state.step,
                "epoch": self.state.position.epoch,
                "eval": metric_groups(result),
                "best_metric": t.best_metric,
                "value": value,
                "improved": improved,
                "best_value": best.value,
                "best_step": best.step,
                "evals_without_improvement": best.evals_without_improvement,
            }
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            self.log_scalars("val", {**metric_groups(result), "best_metric": value})
            log.info(
                "step %d: %s = %.4g (%s; best %.4g at step %d)",
                self.state.step,
                t.best_metric,
                value,
                "new best" if improved else f"{best.evals_without_improvement} without improvement",
                best.value,
                best.step,
            )
        if best.stopped_early:
            log.info(
                "early stop after step %d: %d evaluations without a better %s (train.early_stop_patience)",
                self.state.step,
                best.evals_without_improvement,
                t.best_metric,
            )
        if not improved:
            return None
        saved = self.save()
        self.save_best()
        return saved

    def log_scalars(self, prefix: str, values: dict[str, Any], step: int | None = None) -> None:
        """Numbers of `values` (nested dicts flattened with `_`) to TensorBoard as `prefix/name`, rank 0.

        log.jsonl stays the record; this is a view of it (and of the evaluation metrics)."""
        writer = self._tensorboard()
        if writer is None:
            return
        step = self.state.step if step is None else step
        for name, value in _flatten(values):
            writer.add_scalar(f"{prefix}/{name}", value, step)
        writer.flush()

    def _tensorboard(self) -> Any:
        if self._tb is None and self.cfg.train.tensorboard and self.dist.rank == 0 and not self._tb_missing:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("train.tensorboard: the tensorboard package is not installed; log.jsonl only")
                self._tb_missing = True
                return None
            # a resumed run drops the events the interrupted one wrote after its checkpoint
            purge = self.state.step + 1 if self.state.step else None
            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=purge)
        return self._tb

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _crash(self, log_file: Any) -> None:
        """Testing aid (train.crash_at_step): this process signals itself, as a scheduler would."""
        if self.cfg.train.crash_signal == "KILL" and log_file is not None:
            log_file.close()
        os.kill(os.getpid(), getattr(signal, f"SIG{self.cfg.train.crash_signal}"))

    def _stop_here(self, path: Path) -> None:
        signum = self.stop.signum or signal.SIGTERM  # another rank received it
        raise StopRequested(
            signum,
            f"stopped by {signal.Signals(signum).name} after step {self.state.step} of "
            f"{self.cfg.train.max_steps}; checkpoint {path} written. The same command with --resume "
            "continues exactly",
        )


def _flatten(values: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}_")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield f"{prefix}{key}", float(value)


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (the killed run got further).

    A fresh run truncates to step 0."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by the kill
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def write_config(cfg: Config, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "config.yaml", "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
