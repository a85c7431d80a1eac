"""The `ctray` command: build data, tune, list and serve models, predict over HTTP."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ctray.config import ConfigError
from ctray.experiment import (
    USER_ERRORS,
    ExperimentDefaults,
    add_data_arguments,
    build_config,
    parse_options,
    report_build,
    report_user_error,
)
from ctray.registry import family_names, get_family
from ctray.serve.cli import add_commands as add_serve_commands


def _families(args: argparse.Namespace) -> int:
    for name in family_names():
        spec = get_family(name)
        stages = ", ".join(f"{s.name}: val/{s.metric} {s.mode}" for s in spec.stages)
        print(
            f"{name:12s} {spec.description}  (stages {stages}; "
            f"presets: {', '.join(sorted(spec.presets))})"
        )
    return 0


def _data_build(args: argparse.Namespace) -> int:
    spec = get_family(args.family)
    if args.input is None and not args.phantom:
        raise ConfigError("give --input DIR and/or --phantom N")
    manifest = spec.build_shards(
        out=args.out,
        inputs=args.input,
        phantom=args.phantom or 0,
        config=build_config(args, ExperimentDefaults()),
        options=parse_options(args.option),
    )
    report_build(manifest)
    print(f"wrote {Path(args.out) / 'manifest.json'} (fingerprint {manifest.fingerprint})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from ctray.evaluate import evaluate
    from ctray.modeldir import read_meta
    from ctray.tune.export import report_files

    metrics = evaluate(
        args.model,
        args.shards,
        split=args.split,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
    )
    spec = get_family(read_meta(args.model)["family"])
    if spec.baselines:
        print(report_files(metrics, spec.baselines)["report.txt"], end="")
    else:
        print(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=2))
    if args.out:
        from ctray.files import atomic_write_bytes

        atomic_write_bytes(args.out, json.dumps(metrics, indent=2).encode())
        print(f"wrote {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from ctray.train.montage import display_window
    from ctray.tune.html_report import write_report

    if args.display_window:
        display_window(args.display_window)
    path = write_report(
        args.run_dir,
        out=args.out,
        optuna_storage=args.optuna_storage,
        display_window=args.display_window,
    )
    print(f"wrote {path}")
    return 0


def _tune(args: argparse.Namespace, rest: list[str]) -> int:
    from ctray.experiment import run

    return run(args.family, rest)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("families", help="list the registered model families").set_defaults(
        func=_families
    )

    data = sub.add_parser("data", help="data preparation").add_subparsers(
        dest="data_command", required=True
    )
    build = data.add_parser(
        "build", help="folder of NIfTI / DICOM series, or phantom -> Parquet shards + manifest"
    )
    build.add_argument("--family", required=True, help=f"one of {', '.join(family_names())}")
    build.add_argument(
        "--input", help="folder of NIfTI files and/or DICOM series (layouts: see docs/data.md)"
    )
    build.add_argument("--out", required=True, help="shard folder to create or update")
    build.add_argument("--seed", type=int, default=0)
    add_data_arguments(build, None)
    build.set_defaults(func=_data_build)

    tune = sub.add_parser(
        "tune", help="tune a family (same flags as experiments/tune_<family>.py)", add_help=False
    )
    tune.add_argument("family", help=f"one of {', '.join(family_names())}")
    tune.set_defaults(func=_tune, passthrough=True)

    ev = sub.add_parser(
        "evaluate", help="metrics of an exported model on shards it never saw, beside baselines"
    )
    ev.add_argument("--model", required=True, help="exported model directory")
    ev.add_argument("--shards", required=True, help="shard folder built with the model's settings")
    ev.add_argument("--split", default="val", choices=["val", "train"])
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--max-batches", type=int, help="stop after this many batches")
    ev.add_argument("--out", help="also write the metrics as JSON here")
    ev.set_defaults(func=_evaluate)

    rep = sub.add_parser(
        "report", help="(re)write report.html of a tune run: trials, curves, montage, data"
    )
    rep.add_argument(
        "run_dir",
        help="the run folder (<storage>/<experiment>); for a remote --storage, the export",
    )
    rep.add_argument("--out", help="write the report here (default: RUN_DIR/report.html)")
    rep.add_argument(
        "--optuna-storage", metavar="URL", help="the study's URL, if it holds a password"
    )
    rep.add_argument(
        "--display-window", help="montage window: soft_tissue, lung, bone or LEVEL/WIDTH"
    )
    rep.set_defaults(func=_report)

    add_serve_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    try:
        return args.func(args, rest) if getattr(args, "passthrough", False) else args.func(args)
    except USER_ERRORS as err:
        return report_user_error(err)


if __name__ == "__main__":
    sys.exit(main())
