"""The `miles` command: demo-data, pretrain, eval."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from data_dali.manifest import ManifestError
from miles.config import ConfigError, available_presets, build_config, check_data_files


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="miles", description="MILES video-text pre-training")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo-data", help="write the procedural demo video-text data set")
    demo.add_argument("dir", type=Path)
    demo.add_argument("--train", type=int, default=1200)
    demo.add_argument("--val", type=int, default=200)
    demo.add_argument("--seed", type=int, default=0)

    pre = sub.add_parser("pretrain", help="pre-train (no arguments: the embedded demo, end to end)")
    pre.add_argument("--preset", default="demo", help=f"one of: {', '.join(available_presets())}")
    pre.add_argument("--config", type=Path, default=None, help="YAML file merged over the preset")
    pre.add_argument("--out", type=Path, default=None, help="run folder (default runs/<preset>)")
    pre.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    pre.add_argument("overrides", nargs="*", help="key=value, e.g. train.max_steps=200 mvm.mask_ratio=0.6")

    ev = sub.add_parser("eval", help="retrieval and zero-shot metrics of a checkpoint")
    ev.add_argument("--checkpoint", type=Path, required=True)
    ev.add_argument("--data", type=Path, required=True, help="manifest (CSV/JSONL) of videos and captions")
    ev.add_argument("--classes", type=Path, default=None, help="class names, one per line (zero-shot)")
    ev.add_argument("--out", type=Path, default=None, help="write the metrics as JSON here")
    ev.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging()
    try:
        if args.command == "demo-data":
            from data_dali.demo import write_demo_dataset

            paths = write_demo_dataset(args.dir, n_train=args.train, n_val=args.val, seed=args.seed)
            for name, path in paths.items():
                print(f"{name}: {path}")
        elif args.command == "pretrain":
            cfg = build_config(args.preset, args.config, args.overrides)
            check_data_files(cfg)
            from miles.pretrain import run_pretraining

            run_pretraining(cfg, args.out or Path("runs") / cfg.preset, resume=args.resume)
        elif args.command == "eval":
            from miles.pretrain import run_eval

            run_eval(args.checkpoint, args.data, args.out, args.classes, args.overrides)
    except (ConfigError, ManifestError, FileNotFoundError, ValueError, RuntimeError) as err:
        if os.environ.get("MILES_TRACEBACK"):
            raise
        print(f"miles: error: {err}", file=sys.stderr)
        print("(set MILES_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
