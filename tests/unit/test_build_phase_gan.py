"""`ctray data build` for the phase GAN: phantoms, native scans, multi-phase studies, bad inputs."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctray.config import ConfigError
from ctray.data.build import REPORT, BuildConfig, BuildError, assign_splits, sample_origins
from ctray.data.nifti import Volume
from ctray.data.phantom import PhantomConfig, make_phantom
from ctray.data.phases import PHASES, SimulatorConfig, simulate_phases
from ctray.data.shards import MANIFEST, column_numpy, load_manifest, read_split
from ctray.families.phase_gan.data import build
from ctray.metrics import LABEL_CLASSES

PATCH = (16, 16, 16)
SMALL = PhantomConfig(shape=(48, 40, 24), spacing=(8.0, 8.0, 8.0))
# Native-scan tests build on the phantom's own 8 mm grid (cheap); the phantom build uses 6 mm.
NATIVE_CFG = BuildConfig(patch_size=PATCH, spacing=(8.0, 8.0, 8.0), patches_per_subject=2)
PHANTOM_CFG = BuildConfig(patch_size=PATCH, spacing=(6, 6, 6), patches_per_subject=2)
TENSORS = ("source", "target", "truth")
VALID_OPTION_KEYS = (
    "source_phases, target_phases, pairs_per_patch, simulations, semi_paired, register, "
    "psf_sigma_voxels"
)


@functools.cache
def _phantom(seed: int) -> tuple[Volume, np.ndarray]:
    return make_phantom(seed, config=SMALL)


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _scan(folder: Path, name: str, seed: int, *, seg: bool = True) -> Path:
    vol, labels = _phantom(seed)
    path = _save(folder / f"{name}.nii.gz", vol.array, vol.affine)
    if seg:
        _save(folder / f"{name}_seg.nii.gz", labels, vol.affine)
    return path


def _seg_for(folder: Path, name: str) -> None:
    vol, labels = _phantom(1)
    _save(folder / f"{name}_seg.nii.gz", labels, vol.affine)


def _shard_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(out.glob("*/*.parquet"))
    }


def _by_name(skipped: list[dict[str, str]]) -> dict[str, str]:
    return {Path(s["path"]).name: s["reason"] for s in skipped}


def _read(out: Path, split: str) -> dict[str, np.ndarray]:
    table = read_split(out, split)
    return {name: column_numpy(table[name]) for name in table.column_names}


# --------------------------------------------------------------------------- phantom build


@pytest.fixture(scope="module")
def phantom_build(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("phantom_shards")
    return out, build(out=out, phantom=3, config=PHANTOM_CFG, progress=False)


def test_phantom_build_counts_and_files(phantom_build) -> None:
    out, manifest = phantom_build
    # 3 subjects -> 1 val; 2 patch positions x 3 (source, target) pairs per subject
    assert manifest.counts == {"train": 12, "val": 6}
    assert sorted(r.subject for r in manifest.inputs) == [f"phantom-{k:03d}" for k in range(3)]
    assert sorted(r.split for r in manifest.inputs) == ["train", "train", "val"]
    assert all(r.rows == 6 for r in manifest.inputs)
    assert manifest.skipped == []
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted([MANIFEST, REPORT] + [r.shard for r in manifest.inputs])
    for rec in manifest.inputs:  # written by the folder's first build (generation 1)
        assert rec.shard == f"{rec.split}/{rec.subject}.g1.parquet"


def test_phantom_build_columns(phantom_build) -> None:
    out, manifest = phantom_build
    tensor = {"dtype": "float", "shape": list(PATCH)}
    assert manifest.columns["source"] == manifest.columns["target"] == tensor
    assert manifest.columns["truth"] == tensor
    assert manifest.columns["labels"] == {"dtype": "uint8", "shape": list(PATCH)}
    assert manifest.columns["source_phase"] == {"dtype": "int8", "shape": []}
    assert manifest.columns["target_phase"] == {"dtype": "int8", "shape": []}
    for split, n in (("train", 12), ("val", 6)):
        cols = _read(out, split)
        for name in TENSORS:
            assert cols[name].dtype == np.float32 and cols[name].shape == (n, *PATCH), name
            assert cols[name].min() >= 0.0 and cols[name].max() <= 1.0, name
        assert cols["labels"].dtype == np.uint8 and cols["labels"].shape == (n, *PATCH)
        assert set(np.unique(cols["labels"])) <= {0, *LABEL_CLASSES.values()}
        # patch centres are drawn inside the body
        assert (cols["labels"][:, 8, 8, 8] > 0).all()
        src, tgt = cols["source_phase"], cols["target_phase"]
        assert src.dtype == np.int8 and tgt.dtype == np.int8
        assert (src != tgt).all()
        assert set(src) | set(tgt) <= {0, 1, 2, 3}
        subjects = {r.subject for r in manifest.inputs if r.split == split}
        assert set(cols["subject"]) == subjects


def test_phantom_val_rows_are_aligned_truth_train_rows_are_observed(phantom_build) -> None:
    out, _ = phantom_build
    val = _read(out, "val")
    assert np.array_equal(val["target"], val["truth"])
    train = _read(out, "train")
    # semi-paired training targets are the observed (moved, noisy) phase, not the truth
    differs = [
        not np.array_equal(t, u) for t, u in zip(train["target"], train["truth"], strict=True)
    ]
    assert all(differs)
    # the same patch position and pair appears with different source and target intensities
    assert not np.array_equal(train["source"], train["target"])


def test_phantom_manifest_content(phantom_build) -> None:
    out, manifest = phantom_build
    assert manifest.family == "phase_gan"
    assert manifest.patch_size == [16, 16, 16]
    assert manifest.spacing == [6, 6, 6]
    assert manifest.window == {"lo": -1000.0, "hi": 1000.0}
    assert manifest.build["patches_per_subject"] == 2
    assert manifest.build["family_options"]["source_phases"] == list(PHASES)
    for k, rec in enumerate(sorted(manifest.inputs, key=lambda r: r.subject)):
        assert rec.paths == {"phantom": f"phantom:seed={k}"}
        (checksum,) = rec.checksums.values()
        assert len(checksum) == 64 and int(checksum, 16) >= 0
        assert rec.spacing == [6.0, 6.0, 6.0]
        assert all(s >= p for s, p in zip(rec.shape, PATCH, strict=True))
        assert set(rec.hu) == {"min", "max", "mean", "std"}
        assert rec.hu["min"] <= rec.hu["mean"] <= rec.hu["max"] and rec.hu["std"] > 0
        assert rec.hu["min"] <= -900 and rec.hu["max"] > 100  # air and bone
        assert rec.extra["phases"] == sorted(PHASES)
        if rec.split == "val":  # aligned validation rows: nothing to register
            assert set(rec.extra) == {"phases"}
            continue
        # every training target is registered onto its source: error vs the simulated motion
        reg, motion = rec.extra["registration_mm"], rec.extra["motion_mm"]
        assert set(reg) == set(motion) and len(reg) == 12  # every ordered pair
        assert all(reg[k] < min(2.5, motion[k] / 3) for k in reg), (reg, motion)
        assert np.mean(list(reg.values())) < 1.5
    assert len({next(iter(r.checksums.values())) for r in manifest.inputs}) == 3

    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk["counts"] == {"train": 12, "val": 6}
    assert on_disk["fingerprint"] == manifest.fingerprint
    assert load_manifest(out).to_json() == manifest.to_json()


def test_phantom_rebuild_reuses_everything(phantom_build) -> None:
    out, manifest = phantom_build
    before = _shard_stats(out)
    again = build(out=out, phantom=3, config=PHANTOM_CFG, progress=False)
    assert _shard_stats(out) == before
    assert again.fingerprint == manifest.fingerprint
    assert again.counts == manifest.counts
    assert again.columns == manifest.columns


# --------------------------------------------------------------------------- native scans


@pytest.fixture(scope="module")
def messy_build(tmp_path_factory: pytest.TempPathFactory):
    """Two valid native scans among every kind of bad input."""
    root = tmp_path_factory.mktemp("messy_in")
    _scan(root, "good1", 1)
    _scan(root, "good2", 2)
    rng = np.random.default_rng(0)
    (root / "bad.nii.gz").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    _seg_for(root, "bad")
    vol, _ = _phantom(3)
    full = _save(root / "trunc.nii.gz", vol.array, vol.affine).read_bytes()
    (root / "trunc.nii.gz").write_bytes(full[: len(full) // 2])
    _seg_for(root, "trunc")
    _save(root / "flat.nii.gz", vol.array[:, :, 5].copy(), vol.affine)
    _seg_for(root, "flat")
    _save(root / "multi.nii.gz", rng.normal(size=(16, 16, 16, 2)).astype(np.float32), vol.affine)
    _seg_for(root, "multi")
    nan = vol.array.copy()
    nan[10:12, 10, 10] = np.nan
    _save(root / "nanvol.nii.gz", nan, vol.affine)
    _seg_for(root, "nanvol")
    _scan(root, "noseg", 4, seg=False)
    (root / "readme.txt").write_text("scans from the PACS export\n")
    out = tmp_path_factory.mktemp("messy_out")
    return root, out, build(out=out, inputs=root, config=NATIVE_CFG, progress=False)


def test_native_build_keeps_valid_scans(messy_build) -> None:
    root, out, manifest = messy_build
    assert sorted(r.subject for r in manifest.inputs) == ["good1", "good2"]
    assert manifest.counts == {"train": 6, "val": 6}
    for rec in manifest.inputs:
        assert rec.paths == {
            "scan": str(root / f"{rec.subject}.nii.gz"),
            "labels": str(root / f"{rec.subject}_seg.nii.gz"),
        }
        assert set(rec.checksums) == {"scan", "labels", "simulation"}
        assert rec.shape == list(SMALL.shape)
        assert rec.spacing == [8.0, 8.0, 8.0]
    cols = _read(out, "val")
    assert np.array_equal(cols["target"], cols["truth"])
    assert (cols["source_phase"] != cols["target_phase"]).all()


def test_native_build_records_every_bad_input(messy_build) -> None:
    root, _, manifest = messy_build
    reasons = _by_name(manifest.skipped)
    assert sorted(reasons) == sorted(
        ["bad.nii.gz", "trunc.nii.gz", "flat.nii.gz", "multi.nii.gz", "nanvol.nii.gz",
         "noseg.nii.gz", "readme.txt"]
    )  # fmt: skip
    assert len(manifest.skipped) == 7
    assert "not a NIfTI" in reasons["bad.nii.gz"]
    assert "truncated" in reasons["trunc.nii.gz"]
    assert "2D" in reasons["flat.nii.gz"] and "3D" in reasons["flat.nii.gz"]
    assert "2 volumes" in reasons["multi.nii.gz"] and "3D" in reasons["multi.nii.gz"]
    assert "2 NaN" in reasons["nanvol.nii.gz"]
    assert "no organ label map noseg_seg.nii.gz" in reasons["noseg.nii.gz"]
    assert "not a NIfTI" in reasons["readme.txt"]
    for entry in manifest.skipped:
        assert Path(entry["path"]).parent == root
    assert _by_name(load_manifest(messy_build[1]).skipped) == reasons


def test_native_simulations_make_distinct_subjects(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    _scan(root, "only", 1)
    manifest = build(
        out=tmp_path / "out", inputs=root, config=NATIVE_CFG, options={"simulations": 2},
        progress=False,
    )  # fmt: skip
    assert sorted(r.subject for r in manifest.inputs) == ["only-sim0", "only-sim1"]
    assert {r.split for r in manifest.inputs} == {"train", "val"}
    a, b = (r.checksums for r in manifest.inputs)
    assert a["scan"] == b["scan"] and a["simulation"] != b["simulation"]


def test_native_build_is_deterministic(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    _scan(root, "s1", 1)
    _scan(root, "s2", 2)
    first = build(out=tmp_path / "a", inputs=root, config=NATIVE_CFG, progress=False)
    second = build(out=tmp_path / "b", inputs=root, config=NATIVE_CFG, progress=False)
    assert first.fingerprint == second.fingerprint
    for split in ("train", "val"):
        a, b = _read(tmp_path / "a", split), _read(tmp_path / "b", split)
        for name in (*TENSORS, "labels", "source_phase", "target_phase"):
            assert np.array_equal(a[name], b[name]), (split, name)


def test_rebuild_reuses_unchanged_and_rebuilds_changed(tmp_path: Path) -> None:
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    for k, name in enumerate(("a", "b", "c")):
        _scan(root, name, k + 1)
    first = build(out=out, inputs=root, config=NATIVE_CFG, progress=False)
    stats = _shard_stats(out)
    assert len(stats) == 3

    second = build(out=out, inputs=root, config=NATIVE_CFG, progress=False)
    assert _shard_stats(out) == stats
    assert second.fingerprint == first.fingerprint

    shard_b = next(r.shard for r in first.inputs if r.subject == "b")
    old_rows = _read(out, next(r.split for r in first.inputs if r.subject == "b"))
    vol, labels = _phantom(7)  # new content for subject b
    _save(root / "b.nii.gz", vol.array, vol.affine)
    _save(root / "b_seg.nii.gz", labels, vol.affine)
    third = build(out=out, inputs=root, config=NATIVE_CFG, progress=False)
    now = _shard_stats(out)
    rec_b = next(r for r in third.inputs if r.subject == "b")
    assert rec_b.shard != shard_b and rec_b.shard in now  # a new file; the old one is gone
    assert {k: v for k, v in now.items() if k != rec_b.shard} == {
        k: v for k, v in stats.items() if k != shard_b
    }
    assert third.fingerprint != first.fingerprint
    assert (
        rec_b.checksums["scan"]
        != next(r for r in first.inputs if r.subject == "b").checksums["scan"]
    )
    new_rows = _read(out, rec_b.split)
    assert not np.array_equal(new_rows["source"], old_rows["source"])

    # a removed input takes its shard with it
    (root / "c.nii.gz").unlink()
    (root / "c_seg.nii.gz").unlink()
    fourth = build(out=out, inputs=root, config=NATIVE_CFG, progress=False)
    assert sorted(r.subject for r in fourth.inputs) == ["a", "b"]
    assert sorted(_shard_stats(out)) == sorted(r.shard for r in fourth.inputs)


def test_changed_build_settings_rebuild_everything(tmp_path: Path) -> None:
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    _scan(root, "a", 1)
    _scan(root, "b", 2)
    build(out=out, inputs=root, config=NATIVE_CFG, progress=False)
    stats = _shard_stats(out)
    cfg = BuildConfig(patch_size=PATCH, spacing=(8.0, 8.0, 8.0), patches_per_subject=3)
    manifest = build(out=out, inputs=root, config=cfg, progress=False)
    now = _shard_stats(out)
    assert len(now) == len(stats) and not set(now) & set(stats)  # every shard new, old ones gone
    assert manifest.counts == {"train": 9, "val": 9}


# --------------------------------------------------------------------------- multi-phase studies


def _study(
    root: Path, patient: str, seed: int, phases: dict[str, str], *, coarse: str = ""
) -> None:
    """One folder per patient, one file per phase; ``coarse`` is written at half resolution."""
    vol, labels = _phantom(seed)
    sim = simulate_phases(vol, labels, seed=seed, config=SimulatorConfig(semi_paired=False))
    folder = root / patient
    folder.mkdir()
    for file_name, phase in phases.items():
        array = sim[PHASES.index(phase)].truth
        affine = vol.affine
        if file_name == coarse:
            array = np.ascontiguousarray(array[::2, ::2, ::2])
            affine = affine.copy()
            affine[:3, :3] *= 2.0
        _save(folder / f"{file_name}.nii.gz", array, affine)


@pytest.fixture(scope="module")
def study_build(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("studies_in")
    _study(root, "patient1", 1, {"arterial": "arterial", "venous": "venous", "native": "native"})
    _study(
        root, "patient2", 2,
        {"non-contrast": "native", "venous": "venous", "delayed": "delayed"}, coarse="delayed",
    )  # fmt: skip
    vol, _ = _phantom(1)
    _save(root / "patient1" / "wrongphase.nii.gz", vol.array, vol.affine)
    (root / "patient1" / "notes.txt").write_text("arterial timing: bolus tracking\n")
    _study(root, "patient3", 3, {"venous": "venous"})
    out = tmp_path_factory.mktemp("studies_out")
    return root, out, build(out=out, inputs=root, config=NATIVE_CFG, progress=False)


def test_study_build_uses_phase_files(study_build) -> None:
    root, out, manifest = study_build
    recs = {r.subject: r for r in manifest.inputs}
    assert sorted(recs) == ["patient1", "patient2"]
    assert recs["patient1"].paths == {
        p: str(root / "patient1" / f"{p}.nii.gz") for p in ("arterial", "venous", "native")
    }
    assert recs["patient2"].paths == {
        "native": str(root / "patient2" / "non-contrast.nii.gz"),
        "venous": str(root / "patient2" / "venous.nii.gz"),
        "delayed": str(root / "patient2" / "delayed.nii.gz"),
    }
    assert set(recs["patient2"].checksums) == {"native", "venous", "delayed"}
    assert recs["patient1"].extra == {"phases": ["arterial", "native", "venous"]}
    assert recs["patient2"].extra == {"phases": ["delayed", "native", "venous"]}
    allowed = {"patient1": {0, 1, 3}, "patient2": {1, 2, 3}}
    for split in ("train", "val"):
        cols = _read(out, split)
        # real studies have no aligned truth: it is the observed target (in training rows,
        # registered onto the source: these phases were aligned, so nearly unchanged)
        if split == "val":
            assert np.array_equal(cols["target"], cols["truth"])
        else:
            assert np.abs(cols["target"] - cols["truth"]).mean() * 2000 < 10.0
        assert (cols["source_phase"] != cols["target_phase"]).all()
        for subject, src, tgt in zip(
            cols["subject"], cols["source_phase"], cols["target_phase"], strict=True
        ):
            assert {int(src), int(tgt)} <= allowed[subject]
        assert np.isfinite(cols["source"]).all() and np.isfinite(cols["target"]).all()


def test_study_build_skips_wrong_names_and_single_phase(study_build) -> None:
    root, _, manifest = study_build
    reasons = {s["path"]: s["reason"] for s in manifest.skipped}
    assert sorted(reasons) == sorted(
        [
            str(root / "patient1" / "wrongphase.nii.gz"),
            str(root / "patient1" / "notes.txt"),
            str(root / "patient3"),
        ]
    )
    wrong = reasons[str(root / "patient1" / "wrongphase.nii.gz")]
    assert "file name is not a phase" in wrong and "'wrongphase'" in wrong
    assert "valid: arterial, venous, delayed, native (non-contrast), or 0-3" in wrong
    assert "not a NIfTI" in reasons[str(root / "patient1" / "notes.txt")]
    assert reasons[str(root / "patient3")] == "needs at least 2 phases, found 1"


# --------------------------------------------------------------------------- errors


@pytest.fixture()
def two_scans(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    root.mkdir()
    _scan(root, "s1", 1)
    _scan(root, "s2", 2)
    return root


def test_strict_turns_a_skipped_file_into_an_error(two_scans: Path, tmp_path: Path) -> None:
    (two_scans / "readme.txt").write_text("hi")
    strict = BuildConfig(patch_size=PATCH, spacing=(8.0, 8.0, 8.0), patches_per_subject=1,
                         strict=True)  # fmt: skip
    with pytest.raises(BuildError, match=r"readme\.txt: not a NIfTI file"):
        build(out=tmp_path / "out", inputs=two_scans, config=strict, progress=False)
    assert not (tmp_path / "out" / MANIFEST).exists()
    # without strict the same inputs build, with the skip recorded
    lenient = build(out=tmp_path / "out2", inputs=two_scans, config=NATIVE_CFG, progress=False)
    assert _by_name(lenient.skipped) == {
        "readme.txt": "not a NIfTI file (.nii or .nii.gz), a DICOM series folder or a .zip of one"
    }


def test_strict_turns_an_unreadable_scan_into_an_error(two_scans: Path, tmp_path: Path) -> None:
    vol, _ = _phantom(1)
    nan = vol.array.copy()
    nan[0, 0, 0] = np.nan
    _save(two_scans / "a_nan.nii.gz", nan, vol.affine)
    _seg_for(two_scans, "a_nan")
    strict = BuildConfig(patch_size=PATCH, spacing=(8.0, 8.0, 8.0), strict=True)
    with pytest.raises(BuildError, match=r"^a_nan: contains 1 NaN/inf voxel values"):
        build(out=tmp_path / "out", inputs=two_scans, config=strict, progress=False)


def test_unknown_option_key_lists_valid_keys(two_scans: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        build(out=tmp_path / "o", inputs=two_scans, options={"pairs": 2}, progress=False)
    msg = str(info.value)
    assert msg.startswith("phase_gan data options: unknown key(s) 'pairs'")
    assert msg.endswith(f"valid keys: {VALID_OPTION_KEYS}")
    assert not (tmp_path / "o").exists()


def test_bad_phase_options(two_scans: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown phase 'portal-arterial'"):
        build(out=tmp_path / "o", inputs=two_scans, options={"source_phases": ["portal-arterial"]},
              progress=False)  # fmt: skip
    same = {"source_phases": ["venous"], "target_phases": ["pv"]}
    with pytest.raises(ValueError, match="leave no pair with different phases"):
        build(out=tmp_path / "o", inputs=two_scans, options=same, progress=False)


def test_restricted_phase_pairs(two_scans: Path, tmp_path: Path) -> None:
    opts = {"source_phases": ["native"], "target_phases": ["arterial", "venous"]}
    build(out=tmp_path / "o", inputs=two_scans, config=NATIVE_CFG, options=opts, progress=False)
    cols = _read(tmp_path / "o", "train")
    assert set(cols["source_phase"].tolist()) == {3}
    assert set(cols["target_phase"].tolist()) <= {0, 1}
    assert len(cols["source_phase"]) == 2 * 2  # 2 patches x min(3, 2 pairs)


def test_no_usable_input_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    (root / "readme.txt").write_text("x")
    _scan(root, "lonely", 1, seg=False)
    with pytest.raises(
        BuildError, match=r"no usable inputs\n(?s:.*)lonely\.nii\.gz: no organ label map"
    ):
        build(out=tmp_path / "out", inputs=root, config=NATIVE_CFG, progress=False)
    with pytest.raises(FileNotFoundError, match="input folder does not exist"):
        build(out=tmp_path / "out", inputs=tmp_path / "missing", config=NATIVE_CFG, progress=False)


def test_one_subject_cannot_be_split(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    _scan(root, "only", 1)
    with pytest.raises(BuildError, match=r"need at least 2 subjects.*--option simulations=K"):
        build(out=tmp_path / "out", inputs=root, config=NATIVE_CFG, progress=False)


# --------------------------------------------------------------------------- helpers


def test_assign_splits_is_stable_and_sized() -> None:
    subjects = [f"s{i}" for i in range(8)]
    splits = assign_splits(subjects, 0.25, seed=0)
    assert sorted(splits) == subjects
    assert list(splits.values()).count("val") == 2
    assert assign_splits(list(reversed(subjects)), 0.25, seed=0) == splits
    # neither side is ever empty
    assert list(assign_splits(["a", "b"], 0.9, seed=0).values()).count("val") == 1
    assert list(assign_splits(["a", "b"], 0.0, seed=0).values()).count("val") == 1
    with pytest.raises(BuildError, match="need at least 2 subjects"):
        assign_splits(["a"], 0.25, seed=0)


def test_sample_origins_inside_mask_and_range() -> None:
    mask = np.zeros((40, 30, 20), dtype=bool)
    mask[20:25, 10:15, 5:15] = True
    rng = np.random.default_rng(0)
    origins = sample_origins(mask, (8, 8, 8), 50, rng, z_range=(4, 16))
    assert len(origins) == 50
    for o in origins:
        centre = tuple(v + 4 for v in o)
        assert mask[centre]
        assert 4 <= o[2] <= 16 - 8
        assert all(0 <= v <= n - 8 for v, n in zip(o, mask.shape, strict=True))
    with pytest.raises(ValueError, match="smaller than the patch"):
        sample_origins(mask, (8, 8, 32), 1, rng)
    # an empty mask falls back to the centre
    assert sample_origins(np.zeros((16, 16, 16), bool), (8, 8, 8), 2, rng) == [(4, 4, 4)] * 2


def test_small_scan_is_padded_to_the_patch(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    small = PhantomConfig(shape=(20, 18, 12), spacing=(8.0, 8.0, 8.0))
    for k, name in enumerate(("p", "q")):
        vol, labels = make_phantom(k, config=small)
        _save(root / f"{name}.nii.gz", vol.array, vol.affine)
        _save(root / f"{name}_seg.nii.gz", labels, vol.affine)
    manifest = build(out=tmp_path / "out", inputs=root, config=NATIVE_CFG, progress=False)
    assert all(r.shape == [20, 18, 12] for r in manifest.inputs)
    cols = _read(tmp_path / "out", "train")
    assert cols["source"].shape[1:] == PATCH
    # padding is outside the body: label 0, intensity 0 (below the window)
    assert (cols["labels"][:, :, :, 12:] == 0).all()
    assert (cols["truth"][:, :, :, 12:] == 0).all()


def test_moved_inputs_are_reused_with_current_paths(tmp_path: Path, two_scans: Path) -> None:
    """Moving the input folder keeps checksums, so shards are reused, and paths are updated."""
    out = tmp_path / "out"
    build(out=out, inputs=two_scans, config=NATIVE_CFG, progress=False)
    stats = _shard_stats(out)
    moved = tmp_path / "moved"
    shutil.copytree(two_scans, moved)
    manifest = build(out=out, inputs=moved, config=NATIVE_CFG, progress=False)
    assert _shard_stats(out) == stats
    assert all(Path(r.paths["scan"]).parent == moved for r in manifest.inputs)
