"""`miles ablate`: the paper's hypotheses as one command.

Every variant is the same pre-training run (preset, data, steps, seeds) with a few keys changed, then
evaluated the same way; a contrastive-only row (`mvm.enabled=false`) is always the baseline. The table
gives the mean and spread over seeds and says whether a variant's difference from the baseline exceeds
that spread, so a table cannot be read as showing more than the runs do.

Runs are kept in `<out>/<variant>/seed<k>/`; a run whose `metrics.json` exists is not repeated, so an
interrupted ablation resumes where it stopped (the finished runs' configurations are checked first).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miles.config import Config, ConfigError, build_config
from miles.stop import StopRequested

log = logging.getLogger("miles")

AXES = ("target", "masking", "snapshot")
BASELINE = "contrastive only"
DEFAULT_VARIANT = "MILES (snapshot, block tubes, EMA)"  # the preset as it is: in every axis


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]


def variants(axis: str, steps: int) -> list[Variant]:
    """The baseline, the preset's own MILES setting, then the axis' alternatives (`all`: every axis)."""
    if axis not in (*AXES, "all"):
        raise ConfigError(f"--axis must be one of {', '.join((*AXES, 'all'))}, got {axis!r}")
    by_axis = {
        "target": [
            Variant("target: frozen initial encoder", ("mvm.target=frozen",)),
            Variant("target: normalised pixels", ("mvm.target=pixel",)),
            Variant("target: HOG", ("mvm.target=hog",)),
        ],
        "masking": [
            Variant("mask: random tubes", ("mvm.mask_type=random_tube",)),
            # per-frame masks need bert mode (a no-op in the bert presets; said in the row's overrides)
            Variant("mask: blocks per frame", ("mvm.mask_type=block_frame", "mvm.mode=bert")),
            Variant("mask: random per frame", ("mvm.mask_type=random_frame", "mvm.mode=bert")),
        ],
        "snapshot": [
            Variant("snapshot: EMA, cosine to 1", ("mvm.ema_schedule=cosine",)),
            Variant(
                f"snapshot: copy every {max(1, steps // 10)}",
                (
                    "mvm.snapshot=copy",
                    f"mvm.copy_every={max(1, steps // 10)}",
                ),
            ),
        ],
    }
    chosen = AXES if axis == "all" else (axis,)
    out = [Variant(BASELINE, ("mvm.enabled=false",)), Variant(DEFAULT_VARIANT, ())]
    for name in chosen:
        out += by_axis[name]
    return out


# (column, where it sits in metrics.json, higher is better)
COLUMNS: tuple[tuple[str, tuple[str, str], bool], ...] = (
    ("t2v R@1", ("t2v", "R1"), True),
    ("t2v R@5", ("t2v", "R5"), True),
    ("t2v MedR", ("t2v", "MedR"), False),
    ("v2t R@1", ("v2t", "R1"), True),
    ("zero-shot top-1", ("zeroshot", "top1"), True),
)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


def _value(metrics: dict[str, Any], where: tuple[str, str]) -> float:
    group = metrics.get(where[0]) or {}
    value = group.get(where[1], math.nan)
    return float(value) if value is not None else math.nan


def _spread(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


# Keys the ablation sets itself: a user override of one would be silently replaced, or would make a row's
# name wrong, so it is refused.
MANAGED_KEYS = ("train.seed", "train.max_steps", "eval.before_training", "mvm.enabled")


def check_overrides(overrides: list[str], chosen: list[Variant]) -> None:
    varied = {o.split("=", 1)[0] for v in chosen for o in v.overrides}
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key in MANAGED_KEYS or key in varied:
            raise ConfigError(
                f"override '{text}': miles ablate sets {key} itself in every run (use --steps / --seeds, or "
                "an --axis that does not vary it)"
            )


def run_config(preset: str, variant: Variant, steps: int, seed: int, overrides: list[str]) -> Config:
    """The configuration of one run; refused here, before any run starts, if any variant is invalid."""
    return build_config(
        preset,
        overrides=[
            *overrides,
            *variant.overrides,
            f"train.max_steps={steps}",
            f"train.seed={seed}",
            "eval.before_training=false",
        ],
    )


def run_ablation(
    axis: str = "target",
    steps: int = 80,
    seeds: int = 2,
    out_dir: Path = Path("runs/ablate"),
    preset: str = "demo",
    overrides: list[str] | None = None,
    pretrain: Callable[[Config, Path], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Every variant x seed (finished runs reused), then `ablation.md`, `ablation.png`, `ablation.json`."""
    if steps < 1 or seeds < 1:
        raise ConfigError(f"--steps and --seeds must be at least 1, got {steps} and {seeds}")
    if pretrain is None:
        from miles.pretrain import run_pretraining

        pretrain = functools.partial(run_pretraining, resume=True)  # an interrupted run continues
    chosen = variants(axis, steps)
    check_overrides(overrides or [], chosen)
    # seed-major: every variant's first seed finishes before any second one, so an ablation cut short
    # still gives a one-seed table (rerun with --seeds 1: the finished runs are reused)
    plan = [(v, s, run_config(preset, v, steps, s, overrides or [])) for s in range(seeds) for v in chosen]
    run_dirs = [out_dir / _slug(variant.name) / f"seed{seed}" for variant, seed, _ in plan]
    for run_dir, (_, _, cfg) in zip(run_dirs, plan, strict=True):  # all of them before any run starts
        _check_earlier_run(run_dir, cfg)
    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    for index, (run_dir, (variant, seed, cfg)) in enumerate(zip(run_dirs, plan, strict=True), 1):
        metrics = _finished(run_dir)
        if metrics is None:
            log.info("ablation run %d/%d: %s, seed %d -> %s", index, len(plan), variant.name, seed, run_dir)
            try:
                metrics = pretrain(cfg, run_dir)
            except StopRequested as err:  # the run's message says "--resume": ablate needs no flag
                raise StopRequested(
                    err.signum,
                    f"{err} (for miles ablate: rerun the same ablate command; it reuses the finished runs "
                    f"and resumes {run_dir})",
                ) from err
        else:
            log.info(
                "ablation run %d/%d: %s, seed %d: done earlier (%s)",
                index,
                len(plan),
                variant.name,
                seed,
                run_dir,
            )
        records.append(
            {
                "variant": variant.name,
                "overrides": list(variant.overrides),
                "seed": seed,
                "run": str(run_dir),
                "metrics": metrics,
            }
        )
    summary = summarise(records)
    report = {
        "axis": axis,
        "preset": preset,
        "steps": steps,
        "seeds": seeds,
        "overrides": overrides or [],
        "wall_seconds": time.perf_counter() - started,
        "date": time.strftime("%Y-%m-%d"),
        "rows": summary,
        "runs": records,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablation.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (out_dir / "ablation.md").write_text(markdown_table(report))
    write_chart(summary, out_dir / "ablation.png", title=f"{preset}, {steps} steps, {seeds} seed(s)")
    return report


def _check_earlier_run(run_dir: Path, cfg: Config) -> None:
    """A run folder that exists (finished or cut short) must hold exactly this configuration: resuming
    or reusing one of another would mix two configurations in one row."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return
    import yaml

    if yaml.safe_load(config_path.read_text()) != json.loads(json.dumps(cfg.to_dict())):
        raise ConfigError(
            f"{run_dir} holds a run of another configuration (compare {config_path}); "
            "give a new --out, or delete that folder to run it again"
        )


def _finished(run_dir: Path) -> dict[str, Any] | None:
    """The metrics of a finished earlier run (its configuration already checked), or None."""
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file() or not (run_dir / "config.yaml").is_file():
        return None  # not run, or metrics without the config they came from: not trusted as this run
    metrics = json.loads(metrics_path.read_text())
    return metrics if "t2v" in metrics else None  # only the untrained evaluation: not finished


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant: mean and standard deviation over seeds, and whether each column's difference
    from the baseline exceeds the seeds' spread (|mean difference| > the two spreads combined)."""
    names = list(dict.fromkeys(r["variant"] for r in records))
    rows = []
    for name in names:
        runs = [r for r in records if r["variant"] == name]
        row: dict[str, Any] = {"variant": name, "overrides": runs[0]["overrides"], "seeds": len(runs)}
        for column, where, _ in COLUMNS:
            row[column] = _spread([_value(r["metrics"], where) for r in runs])
        speeds = [float(r["metrics"].get("train_clips_per_s", math.nan)) for r in runs]
        row["train clips/s"] = _spread(speeds)
        rows.append(row)
    base = next((row for row in rows if row["variant"] == BASELINE), None)
    for row in rows:
        verdicts = {}
        for column, _, higher in COLUMNS:
            mean, std = row[column]
            if base is None or row is base or not math.isfinite(mean):
                continue
            b_mean, b_std = base[column]
            diff = mean - b_mean
            noise = math.hypot(std, b_std)
            if row["seeds"] < 2 or base["seeds"] < 2:
                verdicts[column] = "one seed: no spread"
            elif abs(diff) <= noise:
                verdicts[column] = "within seed noise"
            else:
                verdicts[column] = "better" if (diff > 0) == higher else "worse"
        row["vs baseline"] = verdicts
    return rows


def _cell(mean: float, std: float, seeds: int) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.1f} ± {std:.1f}" if seeds > 1 else f"{mean:.1f}"


def markdown_table(report: dict[str, Any]) -> str:
    rows = report["rows"]
    head = ["variant", *(c for c, _, _ in COLUMNS), "train clips/s", f"vs {BASELINE} (t2v R@1)"]
    lines = [
        f"Ablation `{report['axis']}`: preset `{report['preset']}`, {report['steps']} steps, "
        f"{report['seeds']} seed(s), {report['date']}; mean ± standard deviation over seeds. "
        f"Wall time {report['wall_seconds'] / 60:.1f} min.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        cells = [row["variant"]]
        cells += [_cell(*row[c], row["seeds"]) for c, _, _ in COLUMNS]
        cells.append(_cell(*row["train clips/s"], row["seeds"]))
        cells.append("baseline" if row["variant"] == BASELINE else row["vs baseline"].get("t2v R@1", "-"))
        lines.append("| " + " | ".join(cells) + " |")
    keys = [f"`{r['variant']}`: {' '.join(r['overrides']) or '(the preset)'}" for r in rows]
    lines += ["", "Overrides: " + "; ".join(keys) + "."]
    return "\n".join(lines) + "\n"


def write_chart(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Grouped bars (t2v R@1, zero-shot top-1) with the seeds' standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("t2v R@1", "zero-shot top-1")
    width = 0.8 / len(shown)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows)), 4.0))
    for i, column in enumerate(shown):
        means = [row[column][0] for row in rows]
        stds = [row[column][1] for row in rows]
        xs = [k + (i - (len(shown) - 1) / 2) * width for k in range(len(rows))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=column)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([row["variant"] for row in rows], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
