"""Which exported models a folder holds, and how they are described to users.

Shared by the server (/v1/models) and `ctray models`; reads only model.json (no weights, no Ray),
so listing a folder is instant and a broken directory is reported before anything is deployed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ctray.modeldir import find_models, read_meta
from ctray.registry import get_family


def discover(root: str | Path) -> dict[str, Path]:
    """Model name (its directory's name, the URL segment) -> directory, for every model in root.

    Raises:
        FileNotFoundError: root is missing or holds no exported model.
        ValueError: two directories share a name, or a model.json is unusable.
    """
    root = Path(root)
    paths = find_models(root)
    if not paths:
        raise FileNotFoundError(f"{root}: no exported models (no */model.json below it)")
    found: dict[str, Path] = {}
    for path in paths:
        meta = read_meta(path)
        get_family(meta["family"])  # an unknown family fails here, listing the valid ones
        if path.name in found:
            raise ValueError(
                f"two models are called {path.name!r}: {found[path.name]} and {path}; "
                "rename one directory (the directory name is the model's URL name)"
            )
        found[path.name] = path
    return found


def describe(name: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The public description of one model (no paths, no training config)."""
    data = meta["data"]
    return {
        "name": name,
        "family": meta["family"],
        "metrics": {k: v for k, v in meta.get("metrics", {}).items() if _finite(v)},
        "input": {
            "spacing": list(data["spacing"]),
            "patch_size": list(data["patch_size"]),
            "window": dict(data["window"]),
        },
        "conditioning": {
            k: {"default": c.get("default"), "help": c.get("help", "")}
            for k, c in meta.get("conditioning", {}).items()
        },
    }


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def table(root: str | Path) -> str:
    """A text table of the models below root: family, target metric and its identity baseline."""
    rows = [("NAME", "FAMILY", "METRIC", "VALUE", "IDENTITY", "CONDITIONING", "SPACING", "PATCH")]
    for name, path in discover(root).items():
        meta = read_meta(path)
        spec = get_family(meta["family"])
        metrics = meta.get("metrics", {})
        rows.append(
            (
                name,
                spec.name,
                f"{spec.metric} ({spec.mode})",
                _fmt(metrics.get(spec.metric)),
                _fmt(metrics.get(f"identity_{spec.metric}")),
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
