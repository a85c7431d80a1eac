"""Which exported models a folder holds, and how they are described to users.

Shared by the server (/v1/models) and `ctray models`; reads only model.json (no weights, no Ray),
so listing a folder is instant and a broken directory is reported before anything is deployed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ctray.modeldir import find_models, read_meta
from ctray.registry import get_family


def discover(root: str | Path, *, servable_only: bool = True) -> dict[str, Path]:
    """Model name (its directory's name, the URL segment) -> directory, for every model in root.

    Exports of an intermediate training stage (e.g. a diffusion family's autoencoder) are
    skipped unless ``servable_only`` is False: only a family's last stage predicts.

    Raises:
        FileNotFoundError: root is missing or holds no exported model.
        ValueError: two directories share a name, or a model.json is unusable.
    """
    root = Path(root)
    paths = find_models(root)
    if not paths:
        raise FileNotFoundError(f"{root}: no exported models (no */model.json below it)")
    found = _collect(paths, servable_only)
    if not found:
        raise FileNotFoundError(
            f"{root}: only intermediate-stage exports; train the family's last stage to serve"
        )
    return found


def model_bytes(paths: Iterable[Path]) -> int:
    """Bytes of the files in these model directories: what loading them holds in memory
    (float32 safetensors load at about their size on disk)."""
    return sum(f.stat().st_size for p in paths for f in Path(p).iterdir() if f.is_file())


def _collect(paths: list[Path], servable_only: bool) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in paths:
        meta = read_meta(path)
        get_family(meta["family"])  # an unknown family fails here, listing the valid ones
        if servable_only and not meta.get("servable", True):
            continue
        if path.name in found:
            raise ValueError(
                f"two models are called {path.name!r}: {found[path.name]} and {path}; "
                "rename one directory (the directory name is the model's URL name)"
            )
        found[path.name] = path
    return found


def describe(
    name: str, meta: dict[str, Any], *, views: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The public description of one model (no paths, no training config).

    ``views`` (the family's ViewInputs.describe) is added for models that take X-ray views:
    what to send, in which order, at which size (``input`` then describes the output CT grid).
    """
    data = meta["data"]
    scale = [int(s) for s in data.get("output_scale", (1, 1, 1))]
    return {
        "name": name,
        "family": meta["family"],
        "metrics": {k: v for k, v in meta.get("metrics", {}).items() if _finite(v)},
        "input": {
            "spacing": list(data["spacing"]),
            "patch_size": list(data["patch_size"]),
            "window": dict(data["window"]),
        },
        # The output grid: the input's own, or refined `scale` times per axis over the same
        # world extent (e.g. [1, 1, 5]: five thin slices per thick one).
        "output": {
            "grid": "input" if scale == [1, 1, 1] else "refined",
            "scale": scale,
        },
        "conditioning": {
            k: {"default": c.get("default"), "help": c.get("help", "")}
            for k, c in meta.get("conditioning", {}).items()
        },
        **({"views": views} if views is not None else {}),
    }


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def table(root: str | Path) -> str:
    """A text table of the models below root: family, target metric and its identity baseline."""
    rows = [
        (
            "NAME",
            "FAMILY",
            "STAGE",
            "METRIC",
            "VALUE",
            "BASELINE",
            "CONDITIONING",
            "SPACING",
            "PATCH",
        )
    ]
    for name, path in discover(root, servable_only=False).items():
        meta = read_meta(path)
        spec = get_family(meta["family"])
        stage = spec.stage(meta.get("stage") or spec.final.name)
        metrics = meta.get("metrics", {})
        baseline = next((b for b in spec.baselines if f"{b}_{stage.metric}" in metrics), None)
        rows.append(
            (
                name,
                spec.name,
                stage.name if meta.get("servable", True) else f"{stage.name} (not servable)",
                f"{stage.metric} ({stage.mode})",
                _fmt(metrics.get(stage.metric)),
                f"{baseline} {_fmt(metrics[f'{baseline}_{stage.metric}'])}" if baseline else "-",
                ",".join(meta.get("conditioning", {})) or "-",
                "x".join(f"{s:g}" for s in meta["data"]["spacing"]) + " mm",
                "x".join(str(p) for p in meta["data"]["patch_size"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if _finite(v) else "-"
