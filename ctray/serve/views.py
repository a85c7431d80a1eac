"""`ctray drr`: the X-ray views a model expects, rendered from a CT by the family's own hook."""

from __future__ import annotations

from pathlib import Path

from ctray.config import from_dict
from ctray.data.images import encode_nifti_view
from ctray.data.volumes import load_volume
from ctray.files import atomic_write_bytes
from ctray.modeldir import read_meta
from ctray.registry import DataInfo, get_family


def resolve_model(model: str | Path, models_root: str | Path = "exported") -> Path:
    """A model directory given as a path, or as a name below ``models_root``."""
    path = Path(model)
    if (path / "model.json").is_file():
        return path
    from ctray.serve.catalog import discover

    found = discover(models_root)
    if str(model) not in found:
        raise FileNotFoundError(
            f"no model {str(model)!r}: not a model directory, nor a model in {models_root} "
            f"(there: {', '.join(sorted(found)) or 'none'})"
        )
    return found[str(model)]


def render_views(
    ct: str | Path, model: str | Path, out: str | Path, *, models_root: str | Path = "exported"
) -> list[Path]:
    """Write ``<out>/<index>_<view>.nii.gz`` for each view the model takes, in its order."""
    path = resolve_model(model, models_root)
    meta = read_meta(path)
    spec = get_family(meta["family"])
    if spec.views is None:
        raise ValueError(f"{path} is a {spec.name} model: it takes a volume, not X-ray views")
    config = from_dict(spec.config_cls, meta["family_config"], where=str(path / "model.json"))
    data = DataInfo.from_dict(meta["data"])
    views = spec.views.render(load_volume(ct), config, data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [
        atomic_write_bytes(out / f"{i}_{name}.nii.gz", encode_nifti_view(array))
        for i, (name, array) in enumerate(views.items())
    ]
