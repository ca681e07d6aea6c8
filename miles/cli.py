"""The `miles` command: demo-data, pretrain, finetune, ablate, eval, convert, data, prepare, bench."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from data_dali.demo import DEMO_KINDS
from data_dali.manifest import ManifestError
from miles.config import Config, ConfigError, available_presets, build_config, check_data_files
from miles.stop import EXIT_INTERRUPTED, EXIT_REFUSED, RunFailed, StopRequested


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)


_TEXT_MODEL_HELP = (
    "text tower architecture and tokenizer: a local Hugging Face folder (a released checkpoint holds no "
    "config; default distilbert-base-uncased, its weights come from the checkpoint)"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="miles", description="MILES video-text pre-training")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo-data", help="write the procedural demo video-text data set")
    demo.add_argument("dir", type=Path)
    demo.add_argument("--train", type=int, default=1200)
    demo.add_argument("--val", type=int, default=200)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--kind",
        choices=DEMO_KINDS,
        default="pretrain",
        help="downstream: the retrieval split whose colour x shape pairs and phrasings pre-training lacks; "
        "relational: two shapes a clip, captions that name both and where the moving one is",
    )

    pre = sub.add_parser("pretrain", help="pre-train (no arguments: the embedded demo, end to end)")
    pre.add_argument("--preset", default="demo", help=f"one of: {', '.join(available_presets())}")
    pre.add_argument("--config", type=Path, default=None, help="YAML file merged over the preset")
    pre.add_argument("--out", type=Path, default=None, help="run folder (default runs/<preset>)")
    pre.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="auto",
        help="continue from the newest readable checkpoint in --out, or start afresh there when it has none "
        "(one command line for the first start and every requeue)",
    )
    pre.add_argument(
        "--allow-data-change",
        action="store_true",
        help="with --resume: accept a training manifest changed since the checkpoint (restarts the epoch)",
    )
    pre.add_argument("overrides", nargs="*", help="key=value, e.g. train.max_steps=200 mvm.mask_ratio=0.6")

    ft = sub.add_parser(
        "finetune", help="fine-tune for retrieval from a checkpoint (contrastive; the best checkpoint kept)"
    )
    ft.add_argument(
        "--init", type=Path, required=True, help="ours, released MILES / Frozen-in-Time / MCQ, safetensors"
    )
    ft.add_argument("--train", type=Path, default=None, help="training manifest (default: the preset's)")
    ft.add_argument("--val", type=Path, default=None, help="manifest evaluated every train.eval_every steps")
    ft.add_argument("--preset", default="finetune_demo", help=f"one of: {', '.join(available_presets())}")
    ft.add_argument("--config", type=Path, default=None, help="YAML file merged over the preset")
    ft.add_argument("--out", type=Path, default=None, help="run folder (default runs/<preset>)")
    ft.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto", help="as for pretrain")
    ft.add_argument("--allow-data-change", action="store_true", help="as for pretrain")
    ft.add_argument("--text-model", default=None, help=_TEXT_MODEL_HELP)
    ft.add_argument("overrides", nargs="*", help="key=value, e.g. train.eval_every=50 mvm.enabled=true")

    abl = sub.add_parser(
        "ablate", help="the ablations: each variant pre-trained and evaluated alike, a table and a chart"
    )
    abl.add_argument("--axis", default="target", help="target | masking | snapshot | all")
    abl.add_argument("--steps", type=int, default=80, help="pre-training steps of every run")
    abl.add_argument("--seeds", type=int, default=2, help="runs per variant (train.seed 0, 1, ...)")
    abl.add_argument("--out", type=Path, default=Path("runs/ablate"), help="runs, ablation.md / .png / .json")
    abl.add_argument("--preset", default="demo", help=f"one of: {', '.join(available_presets())}")
    abl.add_argument("overrides", nargs="*", help="key=value applied to every run, e.g. data.num_workers=2")

    ev = sub.add_parser("eval", help="retrieval and zero-shot metrics of a checkpoint")
    ev.add_argument("--checkpoint", type=Path, required=True)
    ev.add_argument("--data", type=Path, required=True, help="manifest (CSV/JSONL) of videos and captions")
    ev.add_argument("--classes", type=Path, default=None, help="class names, one per line (zero-shot)")
    ev.add_argument("--out", type=Path, default=None, help="write the metrics as JSON here")
    ev.add_argument("--text-model", default=None, help=_TEXT_MODEL_HELP)
    ev.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config")

    conv = sub.add_parser("convert", help="a checkpoint (ours or released) to safetensors + config JSON")
    conv.add_argument(
        "checkpoint", type=Path, help="ours, released MILES / Frozen-in-Time / MCQ, safetensors"
    )
    conv.add_argument("out", type=Path, help="OUT.safetensors (OUT.json is written beside it)")
    conv.add_argument("--text-model", default=None, help=_TEXT_MODEL_HELP)
    conv.add_argument("overrides", nargs="*", help="key=value overrides of the model's config")

    bench_data = sub.add_parser(
        "data", help="manifests of a benchmark data set from its own annotation files"
    )
    bench_data.add_argument("name", help="msrvtt | didemo | msvd | lsmdc | ucf101 | hmdb51")
    bench_data.add_argument("root", type=Path, help="the data set's folder, as downloaded and unpacked")
    bench_data.add_argument("out_dir", type=Path, help="where the manifests (and classes.txt) go")
    bench_data.add_argument(
        "--split", default=None, help="e.g. 1k-A | miech | full (MSR-VTT), test1 (UCF101)"
    )
    bench_data.add_argument("--relative", action="store_true", help="video paths relative to OUT_DIR")

    prep = sub.add_parser("prepare", help="decode a manifest once into JPEG frame shards (resumable)")
    prep.add_argument("manifest", type=Path, help="CSV/TSV/JSONL manifest of videos (or images) and captions")
    prep.add_argument("out_dir", type=Path, help="output folder (rerun with the same arguments to resume)")
    prep.add_argument("--fps", type=float, default=4.0, help="frames stored per second of video")
    prep.add_argument("--size", type=int, default=256, help="short side in pixels (never upscaled)")
    prep.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100")
    prep.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    prep.add_argument("--clips-per-shard", type=int, default=1000)
    prep.add_argument("--max-frames", type=int, default=512, help="frames kept per clip at most")
    prep.add_argument("--video-column", default="video")
    prep.add_argument("--caption-column", default="caption")
    prep.add_argument("--label-column", default="label", help="class label column (zero-shot), optional")

    bench = sub.add_parser("bench", help="run the benchmark suites, write REPORT.md and ratios.png")
    bench.add_argument(
        "--suite",
        action="append",
        default=None,
        help="kernels|attention|data|train_step|peak|all (default all; the machine's peaks always run first)",
    )
    bench.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="JSON, report, chart")
    bench.add_argument("--quick", action="store_true", help="one round per case: a smoke run")
    bench.add_argument("--suite-timeout", type=float, default=None, help="seconds per suite before it is cut")
    bench.add_argument("--junit", type=Path, action="append", default=None, help="test results to report")
    bench.add_argument("--machine", default=None, help="machine name for the table (default: CPU / GPU)")
    bench.add_argument("--report-only", action="store_true", help="run nothing, report the JSON in --out")
    bench.add_argument("--note", action="append", default=None, help="a line for the report's notes")
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """argparse takes one run of positionals; `key=value` overrides may also follow later options."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    overrides = getattr(args, "overrides", None)
    unknown = [a for a in extra if overrides is None or a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "resume", None) not in (None, "auto"):  # `--resume key=value`: an override, in place
        overrides.append(args.resume)
        args.resume = "auto"
    if overrides is not None:
        overrides.extend(extra)
    return args


def _stop_between_safe_points(signum: int, frame: object) -> None:
    """SIGTERM / SIGUSR1 while no step is running (loading, evaluating): stop now, nothing to save."""
    raise StopRequested(
        signum,
        f"stopped by {signal.Signals(signum).name} outside a training step: nothing in progress needed "
        "saving, checkpoints already written are intact; the same command with --resume continues",
    )


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _setup_logging()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, _stop_between_safe_points) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return _run(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "demo-data":
            from data_dali.demo import write_demo_dataset

            paths = write_demo_dataset(
                args.dir, n_train=args.train, n_val=args.val, seed=args.seed, kind=args.kind
            )
            for name, path in paths.items():
                print(f"{name}: {path}")
        elif args.command == "pretrain":
            cfg = build_config(args.preset, args.config, args.overrides)
            check_data_files(cfg)
            from miles.pretrain import run_pretraining

            _run_job(run_pretraining, cfg, args)
        elif args.command == "finetune":
            from miles.finetune import finetune_config, run_finetuning

            cfg = finetune_config(
                args.init, args.preset, args.config, args.overrides, args.train, args.val, args.text_model
            )
            check_data_files(cfg)
            _run_job(run_finetuning, cfg, args)
        elif args.command == "ablate":
            from miles.ablate import run_ablation

            run_ablation(args.axis, args.steps, args.seeds, args.out, args.preset, args.overrides)
            print((args.out / "ablation.md").read_text())
            print(f"chart: {args.out / 'ablation.png'} | every run: {args.out / 'ablation.json'}")
        elif args.command == "eval":
            from miles.pretrain import run_eval

            run_eval(args.checkpoint, args.data, args.out, args.classes, args.overrides, args.text_model)
        elif args.command == "convert":
            from miles.pretrain import run_convert

            path = run_convert(args.checkpoint, args.out, args.text_model, args.overrides)
            print(f"wrote {path} and {path.with_suffix('.json')}")
        elif args.command == "data":
            from data_dali.benchmark_sets import write_benchmark_manifests

            report = write_benchmark_manifests(
                args.name, args.root, args.out_dir, split=args.split, relative=args.relative
            )
            print(report.summary())
        elif args.command == "prepare":
            from data_dali.shard_writer import prepare_shards

            report = prepare_shards(
                args.manifest,
                args.out_dir,
                fps=args.fps,
                size=args.size,
                quality=args.quality,
                workers=args.workers,
                clips_per_shard=args.clips_per_shard,
                max_frames=args.max_frames,
                video_column=args.video_column,
                caption_column=args.caption_column,
                label_column=args.label_column,
            )
            print(report.summary())
        elif args.command == "bench":
            from miles.bench import main as bench_main

            return bench_main(
                args.suite or ["all"],
                args.out,
                quick=args.quick,
                timeout_s=args.suite_timeout,
                junit_paths=args.junit,
                machine=args.machine,
                report_only=args.report_only,
                notes=args.note,
            )
    except StopRequested as err:  # a signal: state saved, the message says how to go on
        print(f"miles: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a stoppable loop (loading, evaluating): nothing to save
        print("\nmiles: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RunFailed as err:
        return _report(err, err.exit_code)
    except (ConfigError, ManifestError, FileNotFoundError, ValueError, RuntimeError) as err:
        return _report(err, EXIT_REFUSED)
    return 0


def _run_job(job: Callable[..., object], cfg: Config, args: argparse.Namespace) -> None:
    """A training job (pretrain, finetune) into --out (default runs/<preset>), resumed if asked."""
    out = args.out or Path("runs") / cfg.preset
    job(cfg, out, resume=args.resume is not None, allow_data_change=args.allow_data_change)


def _report(err: Exception, code: int) -> int:
    if os.environ.get("MILES_TRACEBACK"):
        raise err
    print(f"miles: error: {err}", file=sys.stderr)
    print("(set MILES_TRACEBACK=1 for the full traceback)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
