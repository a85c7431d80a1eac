"""One local Ray session for every integration test, and small shared shard folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctray.data.build import BuildConfig

TINY = BuildConfig(patch_size=(16, 16, 16), spacing=(8.0, 8.0, 8.0), patches_per_subject=2)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from ctray.session import init_ray

    init_ray(num_cpus=8)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def phantom_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three phantom subjects at 8 mm, 16^3 patches: seconds to build, enough to train."""
    from ctray.families.phase_gan.data import build

    out = tmp_path_factory.mktemp("phantom_shards")
    build(out=out, phantom=3, config=TINY, progress=False)
    return out


def _smoke_export(script: str, root: Path) -> Path:
    """Run ``experiments/<script>.py --smoke-test`` in this process (sharing the Ray session)."""
    import importlib
    import sys

    scripts = str(Path(__file__).resolve().parents[2] / "experiments")
    sys.path.insert(0, scripts)
    try:
        module = importlib.import_module(script)
    finally:
        sys.path.remove(scripts)
    rc = module.main(
        [
            "--smoke-test",
            "--storage",
            str(root / "runs"),
            "--export",
            str(root / "exported"),
            "--shards-dir",
            str(root / "shards"),
            "--name",
            "smoke",
        ]
    )
    assert rc == 0, f"{script} --smoke-test failed"
    return root / "exported"


@pytest.fixture(scope="session")
def smoke_export(ray_session, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`experiments/tune_phase_gan.py --smoke-test`, once; its export folder holds `smoke`."""
    return _smoke_export("tune_phase_gan", tmp_path_factory.mktemp("smoke"))


@pytest.fixture(scope="session")
def pix2pix_smoke_export(ray_session, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`experiments/tune_pix2pix.py --smoke-test`, once; its export folder holds `smoke`."""
    return _smoke_export("tune_pix2pix", tmp_path_factory.mktemp("p2p_smoke"))


@pytest.fixture(scope="session")
def xray2ct_smoke_export(ray_session, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`experiments/tune_xray2ct.py --smoke-test`, once; its export folder holds `smoke`."""
    return _smoke_export("tune_xray2ct", tmp_path_factory.mktemp("xray_smoke"))


@pytest.fixture(scope="session")
def slice_ldm_smoke_export(ray_session, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`experiments/tune_slice_ldm.py --smoke-test` (both stages), once; its export folder
    holds `smoke-autoencoder` (stage 1) and `smoke` (the servable stage-2 model)."""
    return _smoke_export("tune_slice_ldm", tmp_path_factory.mktemp("ldm_smoke"))


@pytest.fixture(scope="session")
def maskgit_smoke_export(ray_session, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`experiments/tune_maskgit_fsq.py --smoke-test` (both stages), once; its export folder
    holds `smoke-tokenizer` (stage 1, with pareto.json) and `smoke` (the servable model)."""
    return _smoke_export("tune_maskgit_fsq", tmp_path_factory.mktemp("maskgit_smoke"))
