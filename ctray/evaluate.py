"""Evaluate an exported model on shards it never saw (e.g. built from real scans), beside the
family's baselines, without Ray: the check of "does it generalise" that any user can run.

    ctray data build --family slice_ldm --input /my/thin_cts --out /tmp/eval --val-fraction 1 \\
        --patch-size ... --spacing ... --option factor=3     # the model's settings
    ctray evaluate --model exported/slice_ldm-... --shards /tmp/eval

The shards must have the model's geometry (patch size, spacing, HU window, output grid) and
the data options that are also model settings; a mismatch says which, and the exact build
command that matches. Modules the export does not carry (e.g. a GAN's discriminator or a phase
detector) keep their initial weights, so only metrics of the exported modules mean anything:
the report shows the metrics that have a baseline beside them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctray.config import field_names, from_dict
from ctray.data.shards import Manifest, column_numpy, load_manifest, read_split
from ctray.modeldir import read_meta, read_weights
from ctray.registry import DataInfo, FamilySpec
from ctray.train.local import local_context
from ctray.train.loop import Mean


def check_compatible(meta: dict[str, Any], spec: FamilySpec, manifest: Manifest, shards: Path):
    """Raise ValueError naming every setting where the shards differ from the model's data."""
    model = DataInfo.from_dict(meta["data"])
    theirs = DataInfo.from_manifest(manifest)
    if manifest.family != spec.shards_family:
        raise ValueError(
            f"{shards} holds {manifest.family!r} shards, the {spec.name!r} model reads "
            f"{spec.shards_family!r} shards"
        )
    diffs = [
        f"{name}: model {a}, shards {b}"
        for name, a, b in (
            ("patch_size", tuple(model.patch_size), tuple(theirs.patch_size)),
            ("spacing", tuple(model.spacing), tuple(theirs.spacing)),
            ("window", model.window, theirs.window),
            ("output_scale", tuple(model.output_scale), tuple(theirs.output_scale)),
        )
        if a != b
    ]
    fields = set(field_names(spec.config_cls))
    options = manifest.build.get("family_options") or {}
    for key, value in options.items():
        if key in fields and meta["family_config"].get(key) != value:
            diffs.append(f"{key}: model {meta['family_config'].get(key)!r}, shards {value!r}")
    if diffs:
        raise ValueError(
            f"{shards} does not match the model's data ({'; '.join(diffs)}); build matching "
            f"shards with: {build_command(meta, spec)}"
        )


def build_command(meta: dict[str, Any], spec: FamilySpec) -> str:
    """The `ctray data build` command that makes shards this model can be evaluated on."""
    data = DataInfo.from_dict(meta["data"])
    fields = set(field_names(spec.config_cls))
    options = (meta.get("build") or {}).get("family_options") or {}
    opts = " ".join(f"--option {k}={v}" for k, v in options.items() if k in fields)
    window = data.window
    return (
        f"ctray data build --family {spec.name} --input DIR --out SHARDS --val-fraction 1 "
        f"--patch-size {' '.join(map(str, data.patch_size))} "
        f"--spacing {' '.join(f'{s:g}' for s in data.spacing)} "
        f"--window {window['lo']:g} {window['hi']:g} {opts}"
    ).strip()


def _batches(table, columns: tuple[str, ...], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    arrays = {c: column_numpy(table.column(c)) for c in columns}
    for start in range(0, table.num_rows, batch_size):
        yield {
            c: torch.from_numpy(np.array(a[start : start + batch_size])) for c, a in arrays.items()
        }


@torch.no_grad()
def evaluate(
    model_dir: str | Path,
    shards: str | Path,
    *,
    split: str = "val",
    batch_size: int = 4,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Validation metrics (``val/...``) of an exported model on a shard folder's ``split``."""
    from ctray.registry import get_family

    model_dir, shards = Path(model_dir), Path(shards)
    meta = read_meta(model_dir)
    spec = get_family(meta["family"])
    stage = spec.stage(meta.get("stage") or spec.final.name)
    manifest = load_manifest(shards)
    check_compatible(meta, spec, manifest, shards)
    config = from_dict(spec.config_cls, meta["family_config"], where=str(model_dir))
    data = DataInfo.from_dict(meta["data"])
    built = spec.build_models(config, data)
    for name, state in read_weights(model_dir, meta["modules"]).items():
        built[name].load_state_dict(state)
    ctx = local_context(spec, config, data, stage=stage.name, models=built)
    for module in ctx.models.values():
        module.eval()
    table = read_split(shards, split, spec.columns)
    if table.num_rows == 0:
        raise ValueError(f"{shards}: the {split!r} split has no rows")
    mean = Mean()
    for i, batch in enumerate(_batches(table, spec.columns, batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        for key, values in stage.eval_step(ctx, batch).items():
            mean.add(key, values)
    return {f"val/{k}": v for k, v in mean.result().items()}
