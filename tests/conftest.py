"""Shared fixtures: paths to the shared real CT, and one local Ray session for integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CT = REPO.parent / "shared" / "data" / "ct"


@pytest.fixture(scope="session")
def real_ct_dir() -> Path:
    """The real labelled CT beside the clone (../shared/data/ct); CI always has it."""
    if not (SHARED_CT / "abdomen_native.nii.gz").is_file():
        pytest.skip(f"real CT sample not found at {SHARED_CT}")
    return SHARED_CT
