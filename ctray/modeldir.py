"""The exported-model directory: what `ctray serve` hosts and `ctray models` lists.

Layout of ``EXPORT/<name>/``::

    model.json           format, name, family, stage (and whether it is servable), lineage
                         (the export and weights digest each earlier stage came from),
                         family config, data geometry (patch size, spacing, HU window,
                         output grid), validation metrics, conditioning inputs, source
    weights.safetensors  the inference modules' tensors, keys "<module>.<parameter>"

No pickle anywhere: JSON plus safetensors, so loading a model cannot execute code.

Replacing a model is atomic: ``EXPORT/<name>`` is a symbolic link to a version directory
``EXPORT/.versions/<name>/<version>/``. A new version is written completely and flushed to
disk, then a new link replaces the old one with one rename(2), atomic on a local POSIX
filesystem, so a reader finds the old model or the new one, never neither and
never a mix: :func:`load_model` resolves the link once and reads both files from that version.
The version the link showed before is kept (a reader may still be reading it); older ones go.
A crash at any point leaves the link on a complete version; leftovers are removed by the next
export of that name. One writer per name at a time (an experiment name is one run).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
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
VERSIONS = ".versions"


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


def weights_digest(path: str | Path) -> str:
    """SHA-256 of a model directory's weights file: the fingerprint lineage records."""
    digest = hashlib.sha256()
    with open(Path(path) / WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_model(
    out: str | Path,
    *,
    spec: FamilySpec,
    stage: str | None = None,
    family_config: dict[str, Any],
    data: dict[str, Any],
    state: dict[str, dict[str, torch.Tensor]],
    metrics: dict[str, Any],
    source: dict[str, Any] | None = None,
    lineage: list[dict[str, Any]] | None = None,
    extra_files: dict[str, str] | None = None,
    build: dict[str, Any] | None = None,
) -> Path:
    """Write a model directory at ``out`` (replacing one that is there) and return its path.

    ``stage`` names the trained stage (default: the family's last); the directory carries every
    module that stage's inference needs, earlier stages' included, and ``lineage`` records
    which export each earlier stage came from. ``extra_files`` (name -> text, e.g. the
    validation report) are written inside the same atomic rename.
    """
    out = Path(out)
    trained = spec.stage(stage) if stage is not None else spec.final
    modules = trained.inference_models
    missing = [m for m in modules if m not in state]
    if missing:
        raise ValueError(f"checkpoint lacks module(s) {', '.join(missing)} needed by {spec.name}")
    tensors = {
        f"{module}.{key}": value.detach().cpu().contiguous()
        for module in modules
        for key, value in state[module].items()
    }
    meta = {
        "format": FORMAT,
        "name": out.name,
        "family": spec.name,
        "stage": trained.name,
        "servable": trained is spec.final,
        "lineage": list(lineage or []),
        "build": build or {},
        "family_config": family_config,
        "data": data,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
        "conditioning": {
            k: {"default": c.default, "help": c.help} for k, c in spec.conditioning.items()
        },
        "modules": list(modules),
        "source": source or {},
        "created": time.time(),
        "ctray_version": __version__,
    }
    for name in extra_files or {}:
        if Path(name).name != name or name in (META, WEIGHTS):
            raise ValueError(f"extra file name {name!r} must be a plain, unused file name")

    def fill(version: Path) -> None:
        save_file(tensors, str(version / WEIGHTS))
        (version / META).write_text(json.dumps(meta, indent=2))
        for name, text in (extra_files or {}).items():
            (version / name).write_text(text)

    return publish(out, fill)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(out: str | Path, fill: Callable[[Path], None]) -> Path:
    """Point ``out`` at a new version that ``fill(directory)`` writes, in one atomic rename.

    If anything fails before the switch (a full disk, an error in ``fill``), the new version is
    removed and ``out`` still shows the previous one. A directory at ``out`` from before
    versioned exports is first moved to ``.versions/<name>/`` (the one step during which
    ``out`` is absent, once per name).
    """
    out = Path(out)
    versions = out.parent / VERSIONS / out.name
    versions.mkdir(parents=True, exist_ok=True)
    new = versions / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    link = versions / f".link-{new.name}"
    new.mkdir()
    try:
        fill(new)
        for path in (*new.iterdir(), new):
            _fsync(path)
        os.symlink(os.path.relpath(new, out.parent), link)
        _fsync(versions)
        previous = _current_version(out, versions)
        os.replace(link, out)
    except BaseException:
        link.unlink(missing_ok=True)
        shutil.rmtree(new, ignore_errors=True)
        raise
    _fsync(out.parent)
    for entry in versions.iterdir():
        if entry.name not in (new.name, previous):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    return out


def _current_version(out: Path, versions: Path) -> str | None:
    """The name of the version ``out`` shows now, moving a pre-versioning directory there."""
    if out.is_symlink():
        return Path(os.readlink(out)).name
    if not out.exists():
        return None
    legacy = versions / f"legacy-{secrets.token_hex(4)}"
    os.replace(out, legacy)
    return legacy.name


def read_meta(path: str | Path) -> dict[str, Any]:
    """The model.json of a model directory, checked for the format."""
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: not an exported ctray model (no {META})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unsupported model format {meta.get('format')!r}")
    return meta


def read_weights(path: str | Path, modules: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Per-module state dicts of a model directory's safetensors file (no pickle)."""
    tensors = load_file(str(Path(path) / WEIGHTS))
    out = {}
    for module in modules:
        prefix = f"{module}."
        out[module] = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not out[module]:
            raise ValueError(f"{path}: no weights for module {module!r}")
    return out


def load_model(path: str | Path, *, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the family's modules from model.json and load the safetensors weights.

    Both files come from the version ``path`` shows when it is opened (the link is resolved
    once), so a model replaced meanwhile is never read half old, half new.
    """
    path = Path(path)
    version = path.resolve()
    meta = read_meta(version)
    spec = get_family(meta["family"])
    config = from_dict(spec.config_cls, meta["family_config"], where=f"{path / META}")
    data = DataInfo.from_dict(meta["data"])
    built = spec.build_models(config, data)
    models = {}
    for module, state in read_weights(version, meta["modules"]).items():
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
    """Every model at or below ``root`` (sorted), by the name it is published under.

    A model is a directory, or a link to a version, holding model.json; hidden entries (the
    ``.versions`` store, leftovers of an interrupted export) are skipped.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such directory")
    if (root / META).is_file():
        return [root]
    found: list[Path] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if (entry / META).is_file():
            found.append(entry)
        elif not entry.is_symlink():
            found.extend(find_models(entry))
    return found
