"""`miles pretrain`: data (the demo set is generated if missing), pre-training, evaluation, metrics.json."""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_dali.demo import write_demo_dataset
from data_dali.loaders import DataSource, first_readable, open_source, resolve_data_backend
from data_dali.manifest import DEFAULT_LABEL_COLUMN
from data_dali.shard_writer import prepare_shards
from data_dali.shards import is_shard_dir
from miles import checkpoint as ckpt
from miles.attention import resolve_attention, set_attention_backend
from miles.config import Config, ConfigError, best_metric_terms, check_data_files
from miles.distributed import barrier, broadcast_from_main, init_distributed
from miles.evaluate import EvalSet, chance_column, evaluate, format_table, read_classes
from miles.model import MilesModel, without_starting_weights
from miles.released import (
    CheckpointFile,
    infer_model_overrides,
    load_whole,
    read_checkpoint_file,
    save_safetensors,
)
from miles.run_position import seed_everything
from miles.train import Trainer, metric_groups, peak_memory_mb, truncate_log, write_config

log = logging.getLogger("miles")


def _exists(path: str) -> bool:
    return Path(path).is_file() or is_shard_dir(path)


def ensure_data(cfg: Config, main: bool) -> None:
    d = cfg.data
    missing = [p for p in (d.train_manifest, d.val_manifest) if not _exists(p)]
    if missing and d.generate_demo:
        if main:
            log.info("generating the %s demo data set in %s", d.demo_kind, d.root)
            write_demo_dataset(Path(d.root), n_train=d.demo_train, n_val=d.demo_val, seed=0, kind=d.demo_kind)
        barrier()
    check_data_files(cfg)
    for p in (d.train_manifest, d.val_manifest):
        if not _exists(p):
            raise ConfigError(f"manifest {p} is still missing after demo generation; check data.root")
    if d.generate_demo and d.demo_shards and d.backend != "reference":
        use_demo_shards(cfg, main)


def use_demo_shards(cfg: Config, main: bool) -> None:
    """Point the data keys at frame shards of the demo manifests (prepared on first use, resumed if a
    preparation was interrupted), so the demo runs DALI's fast path; data.backend=reference keeps PyAV."""
    d = cfg.data
    shards = Path(d.root) / "shards"
    targets = {}
    for key in ("train_manifest", "val_manifest"):
        manifest = Path(getattr(d, key))
        if is_shard_dir(manifest):
            continue
        targets[key] = (manifest, shards / ("train" if key == "train_manifest" else "val"))
    if main:
        for manifest, out in targets.values():
            start = time.perf_counter()
            report = prepare_shards(manifest, out, workers=max(1, d.num_workers), progress=False)
            if report.clips > report.resumed_clips:
                log.info(
                    "demo: %d clips of %s prepared as frame shards in %s (%.0f s, once)",
                    report.clips - report.resumed_clips,
                    manifest,
                    out,
                    time.perf_counter() - start,
                )
    barrier()
    for key, (_, out) in targets.items():
        setattr(d, key, str(out))
    if targets:
        log.info(
            "demo: training and evaluating from frame shards in %s (DALI); data.backend=reference reads "
            "the videos with PyAV instead",
            shards,
        )


def _read(cfg: Config, path: str, labelled: bool = False) -> DataSource:
    """`labelled`: zero-shot labels are wanted, so a label column named in the config must exist."""
    d = cfg.data
    return open_source(
        path,
        video_column=d.video_column,
        caption_column=d.caption_column,
        label_column=d.label_column,
        require_label_column=labelled and d.label_column != DEFAULT_LABEL_COLUMN,
    )


def _classes_for(cfg: Config, val_source: DataSource) -> list[str] | None:
    """Zero-shot class names, checked against the validation labels before any training."""
    if not cfg.data.classes:
        return None
    path = Path(cfg.data.classes)
    if not path.is_file():
        raise ConfigError(
            f"config key 'data.classes': class list {path} does not exist; give one class name per line, "
            "or data.classes='' to skip zero-shot evaluation"
        )
    classes = read_classes(path)
    labels = EvalSet.from_source(val_source).labels
    zeroshot = any(name.startswith("zeroshot_") for name in best_metric_terms(cfg.train.best_metric)[0])
    if cfg.train.eval_every and zeroshot and None in labels:
        raise ConfigError(
            f"config key 'train.best_metric': {cfg.train.best_metric} needs zero-shot accuracy, and some "
            f"videos of {cfg.data.val_manifest} have no label; give labels or pick retrieval metrics"
        )
    unknown = sorted({label for label in labels if label is not None and label not in classes})
    if unknown:
        raise ConfigError(
            f"config key 'data.classes': labels {unknown[:5]} of the validation manifest are not in {path}"
        )
    return classes


def _choose_data_backend(
    cfg: Config, source: DataSource, device: torch.device, main: bool
) -> tuple[str, str]:
    """Rank 0 probes the data once and every rank takes its answer, so all ranks decode alike."""
    decision: tuple[str, str] | str = ""
    if main:
        try:
            decision = resolve_data_backend(cfg.data.backend, source, device)
        except ValueError as e:
            decision = f"config key 'data.backend': {e}"
    decision = broadcast_from_main(decision)
    if isinstance(decision, str):
        raise ConfigError(decision)
    return decision


def check_val_readable(cfg: Config, source: DataSource, main: bool) -> None:
    """Refuse, before training, a validation set in which no video can be read (cost: one clip).

    Rank 0 looks and every rank takes its answer, so all of them stop together."""
    problem = ""
    if main:
        found, errors = first_readable(source, cfg.data.num_frames)
        if found is None:
            problem = (
                f"config key 'data.val_manifest': none of the {len(errors)} videos of "
                f"{cfg.data.val_manifest} can be read (first: {errors[0] if errors else 'no entries'}); "
                "fix the paths or give another validation set"
            )
        elif errors:
            log.warning(
                "validation set: %d unreadable videos before the first good one (first: %s)",
                len(errors),
                errors[0],
            )
    problem = broadcast_from_main(problem)
    if problem:
        raise ConfigError(problem)


def _find_resume_point(ckpt_dir: Path, main: bool) -> tuple[Path, dict[str, Any]] | None:
    """Rank 0 picks the newest readable checkpoint (passing over damaged ones); every rank loads it."""
    found = ckpt.load_latest(ckpt_dir) if main else None
    chosen = broadcast_from_main(str(found[0]) if found else "")
    if not chosen:
        return None
    return found if main else (Path(chosen), ckpt.load(Path(chosen)))  # type: ignore[return-value]


@dataclass(frozen=True)
class Columns:
    """What a job calls itself (its progress bar) and its evaluations: before training (also its
    metrics.json key) and after."""

    job: str = "pretrain"
    before: str = "untrained"
    after: str = "trained"
    before_key: str = "untrained"


def run_pretraining(
    cfg: Config,
    out_dir: Path,
    resume: bool = False,
    allow_data_change: bool = False,
    columns: Columns = Columns(),
) -> dict[str, Any]:
    """The whole job; returns what it writes to `out_dir/metrics.json` (rank 0).

    `resume`: continue from the newest readable checkpoint in `out_dir` if there is one, else start
    afresh there (so one command line serves the first start and every requeue); `columns`: the job's
    names (`miles finetune` is this job, with its --init as `model.init_checkpoint`)."""
    dist = init_distributed()
    main = dist.rank == 0
    attention = resolve_attention(cfg.model.attention, dist.device)  # refuses xformers without CUDA, now
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    started = time.perf_counter()
    ensure_data(cfg, main)
    train_entries = _read(cfg, cfg.data.train_manifest)
    val_entries = _read(cfg, cfg.data.val_manifest, labelled=bool(cfg.data.classes))
    if len(train_entries) // dist.world_size < cfg.train.batch_size:
        raise ConfigError(
            f"config key 'train.batch_size': {cfg.train.batch_size} per process exceeds the "
            f"{len(train_entries)} training rows shared by {dist.world_size} process(es); lower it"
        )
    classes = _classes_for(cfg, val_entries)
    check_val_readable(cfg, val_entries, main)
    data_backend, data_why = _choose_data_backend(cfg, train_entries, dist.device, main)
    seed_everything(cfg.train.seed)
    latest = _find_resume_point(out_dir / "checkpoints", main) if resume else None
    # before anything on disk changes: a model that cannot be built moves nothing. A resumed run's
    # checkpoint holds every weight, so its starting files are not read again (nor needed any more).
    model = MilesModel(without_starting_weights(cfg) if latest is not None else cfg)
    if main and not resume and out_dir.is_dir() and any(out_dir.iterdir()):
        aside = out_dir.with_name(f"{out_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        out_dir.rename(aside)
        log.warning(
            "%s held an earlier run: moved it to %s (--resume continues a run instead)", out_dir, aside
        )
    barrier()
    if main:
        log.info(
            "preset %s | %s | attention %s | training data: %s | %d train / %d val clips | %d process(es) "
            "on %s",
            cfg.preset,
            f"masking mode {cfg.mvm.mode}, ratio {cfg.mvm.mask_ratio:.2f}, contrastive on "
            f"{cfg.mvm.contrastive_input} clips"
            if cfg.mvm.enabled
            else "contrastive only (mvm.enabled=false)",
            attention.describe(),
            data_why,
            len(train_entries),
            len(val_entries),
            dist.world_size,
            dist.device,
        )
    set_attention_backend(model, attention.backend)

    def evaluator(m: MilesModel) -> dict[str, Any]:
        return evaluate(m, val_entries, cfg, dist.device, classes, progress=main)

    trainer = Trainer(
        cfg,
        train_entries,
        out_dir,
        dist,
        model=model,
        data_backend=data_backend,
        evaluator=evaluator,
        job=columns.job,
    )
    if resume and latest is None:
        log.info("--resume: no checkpoint in %s yet, starting from scratch", trainer.ckpt_dir)
        if main:
            truncate_log(trainer.log_path, 0)
    untrained = None
    metrics_path = out_dir / "metrics.json"
    if latest is not None:
        trainer.resume(*latest, allow_data_change=allow_data_change)
    if main:  # only once a resume is accepted: a refused one leaves the run's config as it was
        write_config(cfg, out_dir)
    if latest is not None:
        if metrics_path.is_file():
            untrained = json.loads(metrics_path.read_text()).get(columns.before_key)
    elif cfg.eval.before_training:
        untrained = evaluator(trainer.model)
        if main:
            _write_json(metrics_path, {columns.before_key: untrained})
            trainer.log_scalars(f"eval_{columns.before_key}", metric_groups(untrained), step=0)
    barrier()
    summary = trainer.fit()
    result: dict[str, Any] = {}
    if trainer.last_eval is not None and trainer.last_eval[0] == summary["steps"]:
        trained = trainer.last_eval[1]  # the periodic evaluation of the last step
    else:
        trained = evaluator(trainer.model)  # all ranks
    best = summary["best"]
    if main:
        trainer.log_scalars("eval", metric_groups(trained))
        trainer.close()
        result = {
            "t2v": trained["t2v"],
            "v2t": trained["v2t"],
            "zeroshot": trained.get("zeroshot"),
            "chance": trained["chance"],
            columns.before_key: untrained,
            "best": best and {**best, "path": str(trainer.best_path)},
            "early_stopped": summary["early_stopped"],
            # a file bad in both splits is one bad file: counted once, listed per split too
            "skipped_videos": len(set(summary["skipped_videos"]) | set(trained["skipped_paths"])),
            "skipped_paths": sorted(set(summary["skipped_videos"]) | set(trained["skipped_paths"])),
            "skipped_by_split": {"train": summary["skipped_videos"], "val": sorted(trained["skipped_paths"])},
            "preset": cfg.preset,
            "mvm_mode": cfg.mvm.mode,
            "attention": cfg.model.attention,
            "attention_backend": attention.backend,
            "data_backend": data_backend,
            "eval_data_backend": trained["data_backend"],
            # clips the DALI loaders decoded with PyAV instead (screened by the decoder's limits, or
            # rejected by DALI), summed over ranks; empty for the reference loader
            "decode_counts": {"train": summary["decode_counts"], "val": trained.get("decode_counts", {})},
            "protocol": trained["protocol"],
            "num_clips": trained["num_clips"],
            "dsl": trained.get("dsl"),
            "steps": summary["steps"],
            "train_seconds": summary["train_seconds"],
            "train_clips_per_s": summary["clips_per_s"],
            "wall_seconds": time.perf_counter() - started,
            "peak_memory_mb": peak_memory_mb(dist.device),
            "world_size": dist.world_size,
            "device": str(dist.device),
        }
        _write_json(metrics_path, result)
        chance = trained["chance"]
        table = {"chance": chance_column(chance)}
        if untrained:
            table[columns.before] = untrained
        table[columns.after] = trained
        if "dsl" in trained:
            table[f"{columns.after} + DSL"] = trained["dsl"]
        if best:
            table["best"] = best["metrics"]
        print(
            f"\nretrieval on {cfg.data.val_manifest} ({trained['num_videos']} videos, "
            f"{trained['num_captions']} captions; R@K in %):"
        )
        print(format_table(table))
        if best:
            stopped = f"; early stop after step {summary['steps']}" if summary["early_stopped"] else ""
            print(
                f"best: step {best['step']}, {best['metric']} = {best['value']:.2f} "
                f"({trainer.best_path}){stopped}"
            )
        print(
            f"skipped videos: {result['skipped_videos']} | train {summary['clips_per_s']:.1f} clips/s | "
            f"wall {result['wall_seconds']:.0f} s | metrics: {metrics_path}"
        )
    barrier()
    return result


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _checkpoint_config(file: CheckpointFile, text_model: str | None, overrides: list[str]) -> Config:
    """Ours: the checkpoint's own config (then `overrides`). Released: the `base` preset with the video
    encoder's shape read off the tensors, then `--text-model` and `overrides`."""
    from miles.config import build_config, config_from_dict, parse_override

    if file.config is None:
        inferred = infer_model_overrides(file.state)
        chosen = [f"model.text_model={text_model}"] if text_model else []
        return build_config("base", overrides=[*inferred, *chosen, *overrides])
    data = copy.deepcopy(file.config)
    if text_model:
        overrides = [f"model.text_model={text_model}", *overrides]
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{k}' is not a section of the checkpoint's config")
        node[keys[-1]] = value
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"checkpoint {file.path}: its config is refused: {err}") from err


def model_from_checkpoint(
    checkpoint: Path, text_model: str | None, overrides: list[str] | None, device: torch.device
) -> tuple[MilesModel, Config, CheckpointFile]:
    """The whole model of any supported checkpoint file, every tensor accounted for (miles.released)."""
    from miles.config import config_differences

    file = read_checkpoint_file(checkpoint)
    cfg = _checkpoint_config(file, text_model, overrides or [])
    # ours holds every weight: the run's starting files are not read again
    model = MilesModel(without_starting_weights(cfg) if file.config is not None else cfg).to(device)
    set_attention_backend(model, resolve_attention(cfg.model.attention, device).backend)
    if file.config is not None:
        diff = config_differences(file.config, cfg)
        ckpt.load_module_state(model, file.state, checkpoint, "model", diff)
    else:
        load_whole(model, file, allow_partial=cfg.model.allow_partial_init)
    return model, cfg, file


def run_convert(
    checkpoint: Path, out: Path, text_model: str | None = None, overrides: list[str] | None = None
) -> Path:
    """`miles convert`: any supported checkpoint to safetensors in our key layout plus its config JSON."""
    model, cfg, file = model_from_checkpoint(checkpoint, text_model, overrides, torch.device("cpu"))
    path = save_safetensors(model, cfg.to_dict(), out, str(checkpoint), file.layout)
    log.info("wrote %s and %s (%s, %s)", path, path.with_suffix(".json"), file.layout, checkpoint)
    return path


def run_eval(
    checkpoint: Path,
    manifest: Path,
    out: Path | None,
    classes_path: Path | None,
    overrides: list[str] | None = None,
    text_model: str | None = None,
) -> dict[str, Any]:
    """`miles eval`: a checkpoint (ours, released, safetensors) on any manifest."""
    dist = init_distributed()
    model, cfg, file = model_from_checkpoint(checkpoint, text_model, overrides, dist.device)
    entries = _read(cfg, str(manifest), labelled=classes_path is not None)
    if classes_path is None and any(label is not None for label in EvalSet.from_source(entries).labels):
        # labels but no --classes: the class list the checkpoint was trained with, if it is still there
        trained_with = Path(cfg.data.classes) if cfg.data.classes else None
        classes_path = trained_with if trained_with and trained_with.is_file() else None
    classes = read_classes(classes_path) if classes_path else None
    result = evaluate(model, entries, cfg, dist.device, classes, progress=dist.rank == 0)
    result["checkpoint_layout"] = file.layout
    result["world_size"] = dist.world_size
    if dist.rank != 0:
        return result
    columns = {"chance": chance_column(result["chance"]), "model": result}
    if "dsl" in result:
        columns["model + DSL"] = result["dsl"]
    print(format_table(columns))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_json(out, result)
    return result
