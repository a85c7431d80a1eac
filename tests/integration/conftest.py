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


@pytest.fixture(scope="session")
def smoke_export(ray_session, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run `experiments/tune_phase_gan.py --smoke-test` once; returns the export folder.

    The folder holds one exported model, ``smoke``, as a user's tune run would leave it.
    """
    import sys

    root = tmp_path_factory.mktemp("smoke")
    scripts = str(Path(__file__).resolve().parents[2] / "experiments")
    sys.path.insert(0, scripts)
    try:
        import tune_phase_gan
    finally:
        sys.path.remove(scripts)
    rc = tune_phase_gan.main(
        [
            "--smoke-test",
            "--storage",
            str(root / "runs"),
            "--export",
            str(root / "exported"),
            "--name",
            "smoke",
        ]
    )
    assert rc == 0, "the smoke-test run failed"
    return root / "exported"
