"""`ctray evaluate`: an exported model on evaluation-only shards, without Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ctray.cli import main
from ctray.config import from_dict, to_dict
from ctray.data.build import BuildConfig
from ctray.evaluate import evaluate
from ctray.modeldir import export_model
from ctray.registry import DataInfo, get_family

CONFIG = BuildConfig(
    patch_size=(16, 16, 16), spacing=(8.0, 8.0, 8.0), patches_per_subject=2, val_fraction=1.0
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ctray.families.phase_gan.data import build

    out = tmp_path_factory.mktemp("eval_shards")
    manifest = build(out=out, phantom=1, config=CONFIG, progress=False)
    assert {r.split for r in manifest.inputs} == {"val"}, "val_fraction 1: evaluation only"
    return out


def _export(root: Path, patch=(16, 16, 16)) -> Path:
    spec = get_family("phase_gan")
    cfg = from_dict(spec.config_cls, spec.preset("debug"))
    data = DataInfo(patch_size=patch, spacing=(8.0, 8.0, 8.0), window=CONFIG.window)
    torch.manual_seed(0)
    models = spec.build_models(cfg, data)
    return export_model(
        root / "m",
        spec=spec,
        family_config=to_dict(cfg),
        data=data.as_dict(),
        state={k: m.state_dict() for k, m in models.items()},
        metrics={},
    )


def test_an_untrained_identity_model_scores_as_the_identity(shards: Path, tmp_path: Path) -> None:
    metrics = evaluate(_export(tmp_path), shards)
    # A zero-initialised residual head is the identity: model and baseline agree exactly.
    for key in ("mae_hu", "psnr", "roi_liver_hu"):
        assert metrics[f"val/{key}"] == pytest.approx(metrics[f"val/identity_{key}"], rel=1e-5)
    assert metrics["val/mae_hu"] > 1.0


def test_mismatched_shards_say_how_to_build_matching_ones(shards: Path, tmp_path: Path, capsys):
    model = _export(tmp_path, patch=(32, 32, 16))
    assert main(["evaluate", "--model", str(model), "--shards", str(shards)]) == 2
    err = capsys.readouterr().err
    assert "patch_size: model (32, 32, 16), shards (16, 16, 16)" in err
    assert "ctray data build --family phase_gan" in err and "--patch-size 32 32 16" in err
