"""The exported-model directory: what `ctray serve` hosts and `ctray models` lists.

Layout of ``EXPORT/<name>/``::

    model.json           format, name, family, family config, data geometry (patch size,
                         spacing, HU window), validation metrics, conditioning inputs, source
    weights.safetensors  the inference modules' tensors, keys "<module>.<parameter>"

No pickle anywhere: JSON plus safetensors, so loading a model cannot execute code. A directory
is written under a temporary name and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ctray import __version__
from ctray.config import from_dict
from ctray.registry import DataInfo, FamilySpec, get_family

FORMAT = "ctray-model/1"
META = "model.json"
WEIGHTS = "weights.safetensors"


@dataclass(kw_only=True, eq=False)
class LoadedModel:
    """An exported model, ready to predict."""

    name: str
    path: Path
    spec: FamilySpec
    config: Any
    data: DataInfo
    metrics: dict[str, float]
    meta: dict[str, Any]
    models: dict[str, nn.Module]

    def to(self, device: torch.device | str) -> LoadedModel:
        for m in self.models.values():
            m.to(device)
        return self


def export_model(
    out: str | Path,
    *,
    spec: FamilySpec,
    family_config: dict[str, Any],
    data: dict[str, Any],
    state: dict[str, dict[str, torch.Tensor]],
    metrics: dict[str, Any],
    source: dict[str, Any] | None = None,
) -> Path:
    """Write a model directory at ``out`` (replacing one that is there) and return its path."""
    out = Path(out)
    missing = [m for m in spec.inference_models if m not in state]
    if missing:
        raise ValueError(f"checkpoint lacks module(s) {', '.join(missing)} needed by {spec.name}")
    tensors = {
        f"{module}.{key}": value.detach().cpu().contiguous()
        for module in spec.inference_models
        for key, value in state[module].items()
    }
    meta = {
        "format": FORMAT,
        "name": out.name,
        "family": spec.name,
        "family_config": family_config,
        "data": data,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
        "conditioning": {
            k: {"default": c.default, "help": c.help} for k, c in spec.conditioning.items()
        },
        "modules": list(spec.inference_models),
        "source": source or {},
        "created": time.time(),
        "ctray_version": __version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / META).write_text(json.dumps(meta, indent=2))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_meta(path: str | Path) -> dict[str, Any]:
    """The model.json of a model directory, checked for the format."""
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: not an exported ctray model (no {META})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unsupported model format {meta.get('format')!r}")
    return meta


def load_model(path: str | Path, *, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the family's modules from model.json and load the safetensors weights."""
    path = Path(path)
    meta = read_meta(path)
    spec = get_family(meta["family"])
    config = from_dict(spec.config_cls, meta["family_config"], where=f"{path / META}")
    data = DataInfo.from_dict(meta["data"])
    built = spec.build_models(config, data)
    tensors = load_file(str(path / WEIGHTS))
    models = {}
    for module in meta["modules"]:
        prefix = f"{module}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        built[module].load_state_dict(state)
        models[module] = built[module].eval()
    return LoadedModel(
        name=meta["name"],
        path=path,
        spec=spec,
        config=config,
        data=data,
        metrics=meta["metrics"],
        meta=meta,
        models=models,
    ).to(device)


def find_models(root: str | Path) -> list[Path]:
    """Every model directory at or below ``root`` (sorted), skipping temporary ones."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such directory")
    found = [p.parent for p in root.rglob(META) if not p.parent.name.startswith(".")]
    return sorted(found)
