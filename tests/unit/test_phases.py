"""Phase vocabulary and the contrast-enhancement simulator (phantom and real CT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctray.data.nifti import Volume, load_nifti
from ctray.data.organs import ENHANCING_ORGANS, organ_mask
from ctray.data.phantom import PhantomConfig, make_phantom
from ctray.data.phases import (
    ENHANCEMENT_HU,
    PHASES,
    SimulatorConfig,
    parse_phase,
    phase_name,
    simulate_phases,
)

REAL_CT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ct"
SMALL = PhantomConfig(shape=(48, 40, 24), spacing=(8.0, 8.0, 8.0))
VALID = "valid: arterial, venous, delayed, native (non-contrast), or 0-3"


@pytest.fixture(scope="module")
def phantom() -> tuple[Volume, np.ndarray]:
    return make_phantom(11, config=SMALL)


def test_phase_order_is_the_seeds() -> None:
    assert PHASES == ("arterial", "venous", "delayed", "native")
    assert [phase_name(i) for i in range(4)] == list(PHASES)


@pytest.mark.parametrize(
    ("value", "index"),
    [
        ("arterial", 0),
        ("ARTERIAL", 0),
        (" Arterial ", 0),
        (0, 0),
        ("0", 0),
        ("venous", 1),
        ("portal-venous", 1),
        ("portal_venous", 1),
        ("PV", 1),
        (1, 1),
        ("delayed", 2),
        ("Delayed", 2),
        ("2", 2),
        (np.int64(2), 2),
        ("native", 3),
        ("non-contrast", 3),
        ("noncontrast", 3),
        ("non_contrast", 3),
        ("Unenhanced", 3),
        ("NON CONTRAST", 3),
        ("3", 3),
        (3, 3),
    ],
)
def test_parse_phase_accepts(value: str | int, index: int) -> None:
    assert parse_phase(value) == index


@pytest.mark.parametrize("value", ["arterail", "", "4", -1, 4, "venous2", True, 1.0])
def test_parse_phase_rejects(value: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_phase(value)  # type: ignore[arg-type]
    assert str(info.value) == f"unknown phase {value!r}; {VALID}"


def test_phase_name_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="0-3"):
        phase_name(7)


def test_table_matches_design() -> None:
    assert set(ENHANCEMENT_HU) == set(ENHANCING_ORGANS)
    assert ENHANCEMENT_HU["aorta"]["arterial"] == (300, 350)
    assert ENHANCEMENT_HU["ivc"]["arterial"] == (60, 100)
    assert ENHANCEMENT_HU["liver"]["native"] == (55, 55)
    for organ, row in ENHANCEMENT_HU.items():
        assert set(row) == set(PHASES), organ


def _bounds(organ: str, phase: str, v: float = 0.2) -> tuple[float, float]:
    lo, hi = ENHANCEMENT_HU[organ][phase]
    return lo * (1 - v) - 3.0, hi * (1 + v) + 3.0  # 3 HU for the phantom's own noise


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_truth_means_within_widened_table(seed: int) -> None:
    native, labels = make_phantom(seed, config=SMALL)
    sims = simulate_phases(native, labels, seed=seed, config=SimulatorConfig(semi_paired=False))
    assert sorted(sims) == [0, 1, 2, 3]
    for idx, sim in sims.items():
        for organ in ENHANCING_ORGANS:
            values = sim.truth[organ_mask(labels, organ)]
            # Kidney delayed adds a bright collecting system: its parenchyma is the median.
            stat = np.median(values) if organ == "kidney" else values.mean()
            lo, hi = _bounds(organ, PHASES[idx])
            assert lo <= stat <= hi, (seed, PHASES[idx], organ, float(stat))


def test_kidney_delayed_collecting_system_is_bright(phantom) -> None:
    native, labels = phantom
    sim = simulate_phases(native, labels, seed=0, phases=["delayed"])[2]
    kidney = sim.truth[organ_mask(labels, "kidney")]
    assert kidney.max() > 300 and np.median(kidney) < 150


def test_native_truth_is_input_and_other_labels_unchanged(phantom) -> None:
    native, labels = phantom
    sims = simulate_phases(native, labels, seed=5)
    np.testing.assert_array_equal(sims[3].truth, native.array)
    untouched = ~np.isin(labels, [i for o in ENHANCING_ORGANS for i in _ids(o)])
    for sim in sims.values():
        np.testing.assert_array_equal(sim.truth[untouched], native.array[untouched])
        assert sim.truth.dtype == np.float32 and sim.observed.dtype == np.float32
        assert sim.truth.shape == sim.observed.shape == native.shape


def _ids(organ: str) -> tuple[int, ...]:
    from ctray.data.organs import ORGANS

    return ORGANS[organ]


@pytest.mark.parametrize("seed", [3, 4])
def test_semi_paired_observed_differs_but_similar_distribution(phantom, seed: int) -> None:
    native, labels = phantom
    cfg = SimulatorConfig()
    sims = simulate_phases(native, labels, seed=seed, config=cfg)
    nz = native.shape[2]
    for sim in sims.values():
        start, stop = sim.z_range
        assert 0 <= start < stop <= nz and stop - start >= int(np.ceil(cfg.min_z_coverage * nz))
        assert np.all(sim.observed[:, :, :start] == -1024)
        assert np.all(sim.observed[:, :, stop:] == -1024)
        cov_obs = sim.observed[:, :, start:stop]
        cov_truth = sim.truth[:, :, start:stop]
        assert not np.allclose(cov_obs, cov_truth, atol=1.0)
        # Same anatomy, slightly moved: body size, median and bright fraction barely change
        # (interpolation blurs edges on this coarse 8 mm grid, so the tails are not compared).
        body_obs = cov_obs[cov_obs > -500]
        body_truth = cov_truth[cov_truth > -500]
        assert abs(body_obs.size - body_truth.size) < 0.1 * body_truth.size
        assert abs(np.median(body_obs) - np.median(body_truth)) < 30
        assert abs(body_obs.mean() - body_truth.mean()) < 30
        assert abs((body_obs > 100).mean() - (body_truth > 100).mean()) < 0.05


def test_not_semi_paired_is_identical(phantom) -> None:
    native, labels = phantom
    sims = simulate_phases(native, labels, seed=3, config=SimulatorConfig(semi_paired=False))
    for sim in sims.values():
        np.testing.assert_array_equal(sim.observed, sim.truth)
        assert sim.z_range == (0, native.shape[2])


def test_deterministic_and_independent_of_requested_phases(phantom) -> None:
    native, labels = phantom
    a = simulate_phases(native, labels, seed=9)
    b = simulate_phases(native, labels, seed=9, phases=["venous", 0])
    assert sorted(b) == [0, 1]
    for idx in (0, 1):
        np.testing.assert_array_equal(a[idx].truth, b[idx].truth)
        np.testing.assert_array_equal(a[idx].observed, b[idx].observed)
        assert a[idx].z_range == b[idx].z_range
    c = simulate_phases(native, labels, seed=10, phases=[0])
    assert not np.array_equal(a[0].truth, c[0].truth)


def test_shape_mismatch_rejected(phantom) -> None:
    native, labels = phantom
    with pytest.raises(ValueError, match="shape"):
        simulate_phases(native, labels[:-1], seed=0)


@pytest.mark.skipif(
    not (REAL_CT / "abdomen_native_seg.nii.gz").exists(),
    reason="shared real CT sample (../shared/data/ct) not available",
)
def test_real_ct() -> None:
    native = load_nifti(REAL_CT / "abdomen_native.nii.gz")
    labels = load_nifti(REAL_CT / "abdomen_native_seg.nii.gz", dtype=np.uint8).array
    sims = simulate_phases(native, labels, seed=0)
    np.testing.assert_array_equal(sims[3].truth, native.array)
    for idx in (0, 1, 2):
        truth = sims[idx].truth
        for organ in ENHANCING_ORGANS:
            mask = organ_mask(labels, organ)
            assert mask.any(), organ
            shift = float(np.median(truth[mask] - native.array[mask]))
            lo, hi = _bounds(organ, PHASES[idx])
            native_hu = ENHANCEMENT_HU[organ]["native"][0]
            assert lo - native_hu <= shift <= hi - native_hu, (PHASES[idx], organ, shift)
        others = ~np.isin(labels, [i for o in ENHANCING_ORGANS for i in _ids(o)])
        np.testing.assert_array_equal(truth[others], native.array[others])
    # Arterial aorta is clearly brighter than venous, venous liver brighter than arterial.
    aorta, liver = organ_mask(labels, "aorta"), organ_mask(labels, "liver")
    assert sims[0].truth[aorta].mean() > sims[1].truth[aorta].mean() + 50
    assert sims[1].truth[liver].mean() > sims[0].truth[liver].mean() + 10
