"""`miles finetune` on the smoke data: from a smoke pre-training checkpoint, periodic evaluation, the best
checkpoint by the logged metric, exact resume, early stopping, and bad settings refused before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from runs import data_overrides, run_miles

from data_dali.demo import write_demo_dataset
from data_dali.loaders import open_source
from miles import checkpoint as ckpt
from miles.cli import main as miles_main
from miles.config import ConfigError, best_metric_terms, build_config
from miles.distributed import init_distributed
from miles.finetune import finetune_config, run_finetuning
from miles.model import MilesModel
from miles.pretrain import run_eval, run_pretraining
from miles.run_position import seed_everything
from miles.stop import StopRequested
from miles.train import Trainer

pytestmark = pytest.mark.slow

PRESET = "finetune_smoke"  # 6 steps, evaluated at 2, 4 and 6
FINETUNE = ["--preset", PRESET, "data.num_workers=1"]


@pytest.fixture(scope="module")
def pretrained(smoke_data: Path, tiny_text: Path, tmp_path_factory) -> Path:
    """A checkpoint of a short smoke pre-training run (with its MVM predictor), the --init of every test;
    fine-tuning takes its shape, the tiny text tower included."""
    out = tmp_path_factory.mktemp("pretrained")
    overrides = [
        *data_overrides(smoke_data),
        f"model.text_model={tiny_text}",
        "train.max_steps=2",
        "eval.before_training=false",
    ]
    run_pretraining(build_config("smoke", overrides=overrides), out)
    path = ckpt.checkpoint_path(out / "checkpoints", 2)
    assert any(k.startswith("predictor.") for k in ckpt.load(path)["model"])
    return path


@pytest.fixture(scope="module")
def downstream(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("downstream")
    write_demo_dataset(root, n_train=24, n_val=8, seed=0, kind="downstream")
    return root


def _data(root: Path) -> list[str]:
    return ["--train", str(root / "train.csv"), "--val", str(root / "val.csv")]


def _records(run: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training records, evaluation records) of log.jsonl."""
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "eval" in r]


@pytest.fixture(scope="module")
def finetuned(pretrained: Path, downstream: Path, tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("finetune") / "run"
    proc = run_miles("finetune", "--init", str(pretrained), *_data(downstream), "--out", str(run), *FINETUNE)
    return run, proc.stdout


def test_finetune_end_to_end_keeps_the_best_logged_evaluation(
    finetuned: tuple[Path, str], pretrained: Path, downstream: Path, tmp_path: Path
) -> None:
    run, stdout = finetuned
    train, evals = _records(run)
    assert [r["step"] for r in train] == list(range(1, 7))
    assert all(r["mvm"] == 0 and r["contrastive"] == r["loss"] for r in train)  # contrastive only
    assert [r["step"] for r in evals] == [2, 4, 6]
    for r in evals:  # the logged value is the default metric, t2v R@1 + R@5 + R@10, of that evaluation
        assert r["value"] == pytest.approx(sum(r["eval"]["t2v"][k] for k in ("R1", "R5", "R10")))
    best = max(evals, key=lambda r: r["value"])  # the first of equal values: a tie is no improvement
    saved = ckpt.load(run / "checkpoints" / "best.pt")
    assert saved["step"] == best["step"] and saved["best"]["value"] == best["value"]
    assert saved["best"]["metrics"] == best["eval"]
    assert evals[-1]["best_step"] == best["step"] and evals[-1]["best_value"] == best["value"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best"]["step"] == best["step"] and metrics["best"]["value"] == best["value"]
    assert metrics["t2v"] == evals[-1]["eval"]["t2v"]  # the final numbers are the last step's evaluation
    assert not metrics["early_stopped"]
    header = next(line for line in stdout.splitlines() if "chance" in line)
    assert [c.strip() for c in header.split("|")[1:]] == ["chance", "zero-shot", "finetuned", "best"]
    assert f"best: step {best['step']}, t2v_R1+t2v_R5+t2v_R10 = " in stdout

    # best.pt holds the weights of its step: `miles eval` on it gives that step's logged numbers ...
    val, classes = downstream / "val.csv", downstream / "classes.txt"
    again = run_eval(run / "checkpoints" / "best.pt", val, None, classes)
    assert again["t2v"] == best["eval"]["t2v"] and again["v2t"] == best["eval"]["v2t"]
    # ... and fine-tuning started from --init: the zero-shot column is the init checkpoint's numbers
    init = run_eval(pretrained, val, None, classes)
    assert metrics["zero_shot"]["t2v"] == init["t2v"] and metrics["zero_shot"]["v2t"] == init["v2t"]


@pytest.mark.parametrize("stop_step", [3, 4])
def test_finetune_resume_is_exact(
    stop_step: int,
    finetuned: tuple[Path, str],
    pretrained: Path,
    downstream: Path,
    tmp_path: Path,
    monkeypatch,
) -> None:
    """SIGTERM during step 3 (after the first evaluation), or during step 4, whose evaluation is due: the
    checkpoint is written first and the evaluation put off to the resumed run, which runs it on the same
    weights. Either way --resume gives the same losses, the same evaluation records (patience count
    included) and the same best.pt as the uninterrupted run, and takes its weights from its checkpoint,
    not --init again.
    In this process (the CLI's own path is the fixture's), on one thread as the CLI runs were."""
    import miles.model

    init_loads = []
    load_whole = miles.model.load_whole
    monkeypatch.setattr(
        miles.model, "load_whole", lambda *a, **k: init_loads.append(1) or load_whole(*a, **k)
    )
    reference, _ = finetuned
    run = tmp_path / "run"
    data = {"train": downstream / "train.csv", "val": downstream / "val.csv"}
    overrides = ["data.num_workers=1", "train.threads=1"]
    threads = torch.get_num_threads()
    try:
        crash = [f"train.crash_at_step={stop_step}", "train.crash_signal=TERM"]
        with pytest.raises(StopRequested, match=f"stopped by SIGTERM after step {stop_step} of 6"):
            run_finetuning(finetune_config(pretrained, PRESET, None, overrides + crash, **data), run)
        assert [r["step"] for r in _records(run)[1]] == [2] and init_loads == [1]  # step 4's: not yet
        saved = ckpt.load(ckpt.checkpoint_path(run / "checkpoints", stop_step))
        assert saved["eval_pending"] == (stop_step == 4)
        run_finetuning(finetune_config(pretrained, PRESET, None, overrides, **data), run, resume=True)
        assert init_loads == [1]
    finally:
        torch.set_num_threads(threads)
    (train, evals), (train_ref, evals_ref) = _records(run), _records(reference)
    assert [(r["step"], r["loss"]) for r in train] == [(r["step"], r["loss"]) for r in train_ref]
    assert evals == evals_ref
    best, best_ref = ckpt.load(run / "checkpoints/best.pt"), ckpt.load(reference / "checkpoints/best.pt")
    assert best["step"] == best_ref["step"] and best["best"] == best_ref["best"]
    assert all(torch.equal(v, best_ref["model"][k]) for k, v in best["model"].items())


class _Scripted:
    """An evaluator that reports a given t2v mean rank per step and keeps the weights it was shown."""

    def __init__(self, mean_rank: dict[int, float]) -> None:
        self.mean_rank = mean_rank
        self.trainer: Trainer | None = None
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, model: MilesModel) -> dict[str, Any]:
        step = self.trainer.state.step  # type: ignore[union-attr]
        self.weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"t2v": {"MeanR": self.mean_rank[step]}}


def _trainer(cfg, downstream: Path, out: Path, evaluator: _Scripted) -> Trainer:
    out.mkdir(parents=True, exist_ok=True)
    source = open_source(str(downstream / "train.csv"))
    seed_everything(cfg.train.seed)  # as the job does: the same initial weights in every run
    model = MilesModel(cfg)
    trainer = Trainer(cfg, source, out, init_distributed(), model=model, evaluator=evaluator)
    evaluator.trainer = trainer
    return trainer


def _copy_run(source: Path, dest: Path, checkpoints: list[str], step: int) -> Path:
    """`dest` as `source` was on disk after `step`: those checkpoint files and the log up to that step."""
    (dest / "checkpoints").mkdir(parents=True)
    for name in checkpoints:
        shutil.copy(source / "checkpoints" / name, dest / "checkpoints" / name)
    lines = (source / "log.jsonl").read_text().splitlines()
    (dest / "log.jsonl").write_text("".join(f"{x}\n" for x in lines if json.loads(x)["step"] <= step))
    return dest / "checkpoints"


def test_early_stopping_counts_evaluations_without_improvement_across_a_resume(
    downstream: Path, tiny_text: Path, tmp_path: Path
) -> None:
    """Mean rank is better low: best at 1, 2, then 4; patience 2 ends the run after the evaluation of
    step 6. Killed during that evaluation (step 5's checkpoint and step 4's best.pt on disk), it resumes
    with one bad evaluation counted and stops at step 6 too; a best.pt lost after its step's checkpoint
    is rewritten on resume."""
    overrides = [
        *data_overrides(downstream),
        f"model.text_model={tiny_text}",
        "train.max_steps=12",
        "train.eval_every=1",
        "train.early_stop_patience=2",
        "train.best_metric=t2v_MeanR",
        "train.checkpoint_every=5",
        "train.keep_checkpoints=10",
        "train.tensorboard=false",
        "eval.before_training=false",
    ]
    cfg = build_config(PRESET, overrides=overrides)
    ranks = {1: 5.0, 2: 4.0, 3: 4.5, 4: 3.0, 5: 3.5, 6: 3.2, 7: 1.0}
    full = _Scripted(ranks)
    summary = _trainer(cfg, downstream, tmp_path / "full", full).fit()
    assert summary["steps"] == 6 and summary["early_stopped"]
    assert summary["best"]["step"] == 4 and summary["best"]["value"] == 3.0
    assert summary["best"]["evals_without_improvement"] == 2
    folder = tmp_path / "full/checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(folder)] == [1, 2, 4, 5, 6]  # improvements, 5, the stop
    best = ckpt.load(folder / "best.pt")
    assert best["step"] == 4 and all(torch.equal(v, full.weights[4][k]) for k, v in best["model"].items())
    logged = [json.loads(line) for line in (tmp_path / "full/log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["improved"]) for r in logged if "eval" in r] == [
        (1, True), (2, True), (3, False), (4, True), (5, False), (6, False)
    ]  # fmt: skip

    killed = _copy_run(tmp_path / "full", tmp_path / "killed", ["step_00000005.pt", "best.pt"], 5)
    resumed = _Scripted(ranks)
    trainer = _trainer(cfg, downstream, killed.parent, resumed)
    trainer.resume(*ckpt.load_latest(killed))
    assert trainer.best.step == 4 and trainer.best.evals_without_improvement == 1
    summary = trainer.fit()
    assert summary["steps"] == 6 and summary["early_stopped"] and list(resumed.weights) == [6]
    assert ckpt.load(killed / "best.pt")["step"] == 4
    again = _Scripted(ranks)  # an early-stopped run stays stopped
    trainer = _trainer(cfg, downstream, killed.parent, again)
    trainer.resume(*ckpt.load_latest(killed))
    assert trainer.fit()["steps"] == 6 and not again.weights

    lost = _copy_run(tmp_path / "full", tmp_path / "lost", ["step_00000004.pt"], 4)  # no best.pt yet
    _trainer(cfg, downstream, lost.parent, _Scripted(ranks)).resume(*ckpt.load_latest(lost))
    rewritten = ckpt.load(lost / "best.pt")
    assert rewritten["step"] == 4 and rewritten["best"]["value"] == 3.0
    assert all(torch.equal(v, full.weights[4][k]) for k, v in rewritten["model"].items())


def test_best_metric_names() -> None:
    assert best_metric_terms("t2v_R1+t2v_R5+t2v_R10") == (["t2v_R1", "t2v_R5", "t2v_R10"], True)
    assert best_metric_terms(" V2T_r1 + dsl_t2v_R5 ") == (["v2t_R1", "dsl_t2v_R5"], True)
    assert best_metric_terms("t2v_MedR+v2t_MeanR") == (["t2v_MedR", "v2t_MeanR"], False)
    with pytest.raises(ConfigError, match="adds ranks"):
        best_metric_terms("t2v_R1+t2v_MedR")
    with pytest.raises(ConfigError, match="needs zero-shot evaluation"):
        build_config("finetune_smoke", overrides=["train.best_metric=zeroshot_top1", "data.classes="])
    with pytest.raises(ConfigError, match="eval.dual_softmax=true"):
        build_config("finetune_smoke", overrides=["train.best_metric=dsl_t2v_R1"])
    with pytest.raises(ConfigError, match="train.eval_every=0 makes none"):
        build_config("smoke", overrides=["train.early_stop_patience=3"])


@pytest.mark.parametrize(
    "extra,message",
    [
        (["train.best_metric=t2v_R2"], "config key 'train.best_metric': unknown metric 't2v_R2'"),
        (["train.eval_every=0"], "config key 'train.eval_every': miles finetune evaluates --val"),
        (["--train", "x.csv"], "--train and --val go together"),
    ],
)
def test_bad_settings_are_refused_before_any_work(
    extra: list[str], message: str, pretrained: Path, downstream: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    code = miles_main(["finetune", "--init", str(pretrained), "--out", str(out), *FINETUNE, *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_finetuning_with_mvm_takes_the_predictor_shape_and_target_of_the_init(
    tiny_text: Path, tmp_path: Path
) -> None:
    """With mvm.enabled=true the --init predictor loads whole: its head width follows mvm.target (108 for
    HOG at patch 8), so the target comes from the checkpoint's config along with the predictor's size."""
    cfg = build_config("smoke", overrides=[f"model.text_model={tiny_text}", "mvm.target=hog"])
    torch.manual_seed(0)
    state = MilesModel(cfg).state_dict()
    init = tmp_path / "hog.pt"
    torch.save({"config": cfg.to_dict(), "model": state, "step": 0}, init)
    tuned = finetune_config(init, PRESET, None, ["mvm.enabled=true"])
    assert tuned.mvm.target == "hog" and tuned.mvm.predictor_dim == cfg.mvm.predictor_dim
    model = MilesModel(tuned)  # loads model.init_checkpoint strictly
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key
