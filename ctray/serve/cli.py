"""`ctray serve`, `ctray predict` and `ctray models`: added to the main parser by ctray.cli."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from ctray.config import ConfigError
from ctray.serve.config import TOKEN_ENV, ServeConfig, token_from

URL_ENV = "CTRAY_SERVE_URL"


def _default(name: str) -> Any:
    """ServeConfig's default for a field, so a flag's default is written once."""
    return next(f.default for f in dataclasses.fields(ServeConfig) if f.name == name)


def add_commands(sub: Any) -> None:
    """Register the three serving subcommands on the `ctray` subparsers object."""
    s = sub.add_parser("serve", help="host every exported model in a folder over HTTP (Ray Serve)")
    s.add_argument("--models", required=True, help="folder of exported models (EXPORT/<name>/)")
    s.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--token", help=f"bearer token for every route but /healthz (or ${TOKEN_ENV})")
    s.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without a token (refused otherwise)",
    )
    s.add_argument("--max-body-mb", type=float, default=256.0, help="largest upload (MiB)")
    s.add_argument("--max-voxels", type=int, help="largest volume a header may claim")
    s.add_argument("--replicas", type=int, default=1, help="replicas (autoscaling minimum)")
    s.add_argument("--max-replicas", type=int, help="autoscale between --replicas and this")
    s.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    s.add_argument("--num-gpus-per-replica", type=float, default=0.0)
    s.add_argument("--max-batch-size", type=int, default=4)
    s.add_argument("--batch-wait-ms", type=float, default=20.0)
    s.add_argument("--no-batching", action="store_true", help="one request per forward pass")
    s.add_argument(
        "--max-queue",
        type=int,
        default=_default("max_queue"),
        help="predict requests a replica admits at once; more get 503 + Retry-After",
    )
    s.add_argument(
        "--memory-budget-mb",
        type=float,
        default=_default("memory_budget_mb"),
        help="working memory a replica admits for requests (MiB; reserved from Ray, plus base)",
    )
    s.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap")
    s.add_argument("--address", help="join a running Ray cluster instead of starting one")
    s.set_defaults(func=_serve)

    p = sub.add_parser("predict", help="send a volume (or X-ray views) to a running `ctray serve`")
    p.add_argument(
        "input",
        metavar="IN",
        nargs="?",
        help=".nii/.nii.gz volume, or a DICOM series folder or .zip (converted to NIfTI first)",
    )
    p.add_argument(
        "--views",
        nargs="+",
        metavar="FILE",
        help="X-ray views instead of a volume (PNG, TIFF or 2D NIfTI), in the model's order",
    )
    p.add_argument("-o", "--out", required=True, help="where to write the .nii.gz prediction")
    p.add_argument("--url", default=os.environ.get(URL_ENV, "http://127.0.0.1:8000"))
    p.add_argument("--model", required=True, help="model name (see GET /v1/models)")
    p.add_argument("--target-phase", help="shorthand for --cond target_phase=VALUE")
    p.add_argument("--cond", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--token", help=f"bearer token (or ${TOKEN_ENV})")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds")
    p.set_defaults(func=_predict)

    d = sub.add_parser("drr", help="render the X-ray views a model expects from a CT")
    d.add_argument("ct", metavar="CT", help="CT (HU): .nii/.nii.gz, DICOM series folder or .zip")
    d.add_argument("--model", required=True, help="exported model directory, or its name")
    d.add_argument("--models", default="exported", help="folder to find --model NAME in")
    d.add_argument("--out", required=True, help="folder the views are written to (.nii.gz)")
    d.set_defaults(func=_drr)

    m = sub.add_parser("models", help="list exported models in a folder, with their metrics")
    m.add_argument("dir", help="folder of exported models")
    m.set_defaults(func=_models)


def _serve(args: argparse.Namespace) -> int:
    from ctray.serve.config import DEFAULT_MAX_VOXELS
    from ctray.serve.server import serve_forever

    config = ServeConfig(
        models=args.models,
        host=args.host,
        port=args.port,
        token=token_from(args.token),
        insecure=args.insecure,
        max_body_mb=args.max_body_mb,
        max_voxels=args.max_voxels or DEFAULT_MAX_VOXELS,
        replicas=args.replicas,
        max_replicas=args.max_replicas,
        num_cpus_per_replica=args.num_cpus_per_replica,
        num_gpus_per_replica=args.num_gpus_per_replica,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        batching=not args.no_batching,
        max_queue=args.max_queue,
        memory_budget_mb=args.memory_budget_mb,
        overlap=args.overlap,
    )
    return serve_forever(config, address=args.address)


def _predict(args: argparse.Namespace) -> int:
    from ctray.serve.client import CtrayClient, ServeError

    conditioning = {}
    for item in args.cond:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--cond needs KEY=VALUE, got {item!r}")
        conditioning[key] = value
    if args.target_phase is not None:
        conditioning["target_phase"] = args.target_phase
    if (args.input is None) == (args.views is None):
        raise ConfigError("give either a volume IN or --views FILE [FILE ...]")
    source = args.input if args.views is None else list(args.views)
    token = token_from(args.token)
    try:
        with CtrayClient(args.url, token, timeout=args.timeout) as client:
            out = client.predict_file(source, args.out, args.model, **conditioning)
    except ServeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1 if err.status >= 500 else 2
    print(f"wrote {out}")
    return 0


def _drr(args: argparse.Namespace) -> int:
    from ctray.serve.views import render_views

    paths = render_views(args.ct, args.model, args.out, models_root=args.models)
    for path in paths:
        print(f"wrote {path}")
    names = " ".join(str(p) for p in paths)
    print(f"query a served model with: ctray predict --model NAME --views {names} -o ct.nii.gz")
    return 0


def _models(args: argparse.Namespace) -> int:
    from ctray.serve.catalog import table

    print(table(args.dir))
    return 0
