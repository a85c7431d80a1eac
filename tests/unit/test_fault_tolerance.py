"""Faults a long run must survive, without Ray: a crash or a full disk while exporting or
checkpointing, a damaged checkpoint or experiment state, a preview on one rank only."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray.train
import torch
from torch import nn

import ctray.modeldir
from ctray.config import from_dict, to_dict
from ctray.experiment import run
from ctray.modeldir import VERSIONS, export_model, find_models, load_model
from ctray.registry import DataInfo, FamilySpec, Stage, get_family
from ctray.serve.catalog import discover
from ctray.train.local import local_context
from ctray.train.loop import LoopConfig, StageModels, resume_candidates, validate
from ctray.train.state import (
    DIGEST_FILE,
    STATE_FILE,
    CheckpointError,
    load_resumable,
    read_state,
    write_checkpoint,
)
from ctray.train.trainer import make_trainer
from ctray.tune.runner import ExperimentStateError, check_experiment_state

SPEC = get_family("phase_gan")
DATA = DataInfo(patch_size=(16, 16, 16), spacing=(8.0, 8.0, 8.0), window={"lo": -1000, "hi": 1000})
CONFIG = from_dict(SPEC.config_cls, dict(SPEC.preset("debug")), where="debug preset")


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---------------------------------------------------------------- export: crash, disk full


class Crash(BaseException):
    """The process dies here: no later file-system change reaches the disk."""


class _Crasher:
    """A sys.audit hook that makes the n-th file-system change below ``root`` raise Crash, and
    every later one too (so cleanup code cannot run either: the disk is left as a crash leaves
    it). Installed once per process (audit hooks cannot be removed); inert unless armed.

    ``shutil.rmtree`` counts as one change (its inner removals use relative names).
    """

    MUTATING = ("os.mkdir", "os.rename", "os.symlink", "os.remove", "os.rmdir", "shutil.rmtree")
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def __init__(self) -> None:
        self.root: str | None = None
        self.left = -1
        self.seen = 0

    def _changes(self, event: str, args: tuple) -> bool:
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if mode else bool(flags & self.WRITE_FLAGS)
        elif event in self.MUTATING:
            path, writes = (args[1] if event == "os.symlink" else args[0]), True
        else:
            return False
        return writes and isinstance(path, str | os.PathLike) and str(path).startswith(self.root)

    def __call__(self, event: str, args: tuple) -> None:
        if self.root is None or not self._changes(event, args):
            return
        self.seen += 1
        if 0 <= self.left < self.seen:
            raise Crash(f"{event} {args[:2]}")

    @contextlib.contextmanager
    def armed(self, root: Path, crash_at: int = -1) -> Iterator[_Crasher]:
        """Count changes below ``root``; the ``crash_at``-th (0-based; -1: none) crashes."""
        self.root, self.left, self.seen = str(root), crash_at, 0
        try:
            yield self
        finally:
            self.root = None


_CRASHER = _Crasher()
sys.addaudithook(_CRASHER)


def _export(root: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    models = SPEC.build_models(CONFIG, DATA)
    return export_model(
        root / "m",
        spec=SPEC,
        family_config=to_dict(CONFIG),
        data=DATA.as_dict(),
        state={k: m.state_dict() for k, m in models.items()},
        metrics={"seed": seed},
        extra_files={"report.txt": f"seed {seed}\n"},
    )


def _weights(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return next(SPEC.build_models(CONFIG, DATA)["generator"].parameters()).detach()


def _which(path: Path) -> int:
    """The seed of the model at ``path``; its metadata and weights must be the same version."""
    model = load_model(path)
    seed = int(model.metrics["seed"])
    assert torch.equal(next(model.models["generator"].parameters()), _weights(seed))
    assert (path / "report.txt").read_text() == f"seed {seed}\n"
    return seed


def test_a_crash_at_any_step_of_an_export_leaves_the_old_or_the_new_model(tmp_path) -> None:
    """Before versioned exports, a crash between 'old out of the way' and 'new into place'
    left no model at all (only a temporary name)."""
    with _CRASHER.armed(tmp_path / "count") as counted:
        _export(tmp_path / "count", seed=0)
    assert counted.seen >= 5
    outcomes = []
    for k in range(counted.seen + 2):  # and one past the end: every step, then none
        root = tmp_path / f"crash{k}"
        _export(root, seed=1)
        with _CRASHER.armed(root, crash_at=k), contextlib.suppress(Crash):
            _export(root, seed=2)
        outcomes.append(_which(root / "m"))
        # The next export cleans up whatever the crash left, and keeps one earlier version.
        _export(root, seed=3)
        assert _which(root / "m") == 3
        assert len(list((root / VERSIONS / "m").iterdir())) <= 2
        assert [p.name for p in find_models(root)] == ["m"]
    assert set(outcomes) == {1, 2}, outcomes  # old before the switch, new after it


def test_a_reader_keeps_the_version_it_opened_while_a_new_one_is_published(tmp_path) -> None:
    path = _export(tmp_path, seed=1)
    opened = path.resolve()
    _export(tmp_path, seed=2)
    assert _which(opened) == 1 and _which(path) == 2  # the previous version is kept ...
    _export(tmp_path, seed=3)
    assert not opened.exists()  # ... until the one after it


def test_a_full_disk_during_an_export_leaves_the_old_model(tmp_path, monkeypatch) -> None:
    _export(tmp_path, seed=1)
    before = sorted((tmp_path / VERSIONS / "m").iterdir())

    def half_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        _enospc()

    monkeypatch.setattr(ctray.modeldir, "save_file", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        _export(tmp_path, seed=2)
    assert _which(tmp_path / "m") == 1
    assert sorted((tmp_path / VERSIONS / "m").iterdir()) == before  # nothing half written left


def test_models_are_listed_by_name_and_a_pre_versioning_directory_is_taken_over(
    tmp_path,
) -> None:
    legacy = _export(tmp_path / "old", seed=1).resolve()
    os.replace(legacy, tmp_path / "m")  # a plain directory, as exports used to be
    assert _which(tmp_path / "m") == 1
    _export(tmp_path, seed=2)
    assert (tmp_path / "m").is_symlink() and _which(tmp_path / "m") == 2
    assert list(discover(tmp_path)) == ["m"]
    assert find_models(tmp_path / "m") == [tmp_path / "m"]


# ---------------------------------------------------------------- checkpoints


def _state(epoch: int) -> dict:
    return {
        "epoch": epoch,
        "step": 10 * epoch,
        "models": {"body": nn.Linear(3, 3).state_dict()},
        "optimizers": {},
        "rng": [],
    }


def _checkpoints(root: Path, epochs: int) -> list[ray.train.Checkpoint]:
    """Checkpoint directories of epochs 0..epochs-1, newest first."""
    out = []
    for epoch in range(epochs):
        directory = root / f"checkpoint_{epoch}"
        directory.mkdir(parents=True)
        write_checkpoint(directory, _state(epoch), {"loop": {}})
        out.append(ray.train.Checkpoint.from_directory(directory))
    return out[::-1]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # torch.load alone reads this without complaint
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [_truncate, _flip_a_bit, lambda p: p.write_bytes(b""), Path.unlink],
    ids=["truncated", "flipped-bit", "empty", "missing"],
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    tmp_path, caplog, damage
) -> None:
    latest, previous = _checkpoints(tmp_path, 2)
    damage(Path(latest.path) / STATE_FILE)
    with caplog.at_level(logging.WARNING, logger="ctray.train.state"):
        state, used = load_resumable([latest, previous])
    assert state["epoch"] == 0 and used is previous
    said = caplog.text
    assert f"checkpoint {latest.path} is damaged" in said
    assert f"resuming from the older checkpoint {previous.path} (epoch 0)" in said


def test_no_readable_checkpoint_is_an_error_that_lists_each(tmp_path) -> None:
    latest, previous = _checkpoints(tmp_path, 2)
    (Path(latest.path) / STATE_FILE).write_bytes(b"")
    _truncate(Path(previous.path) / STATE_FILE)
    with pytest.raises(CheckpointError, match="no readable checkpoint") as err:
        load_resumable([latest, previous])
    assert latest.path in str(err.value) and previous.path in str(err.value)


def test_resume_tries_older_checkpoints_only_after_the_latest_fails(tmp_path, monkeypatch):
    """The loop's candidates: the latest, then what Ray Train still keeps, newest first."""
    newest, middle, oldest = _checkpoints(tmp_path, 3)
    kept = [
        ray.train.ReportedCheckpoint(
            checkpoint=c, metrics={"epoch": e}, status=ray.train.ReportedCheckpointStatus.COMMITTED
        )
        for c, e in ((oldest, 0), (newest, 2), (middle, 1))
    ]
    asked = []
    monkeypatch.setattr(
        ray.train, "get_all_reported_checkpoints", lambda **kw: asked.append(kw) or kept
    )
    assert load_resumable(resume_candidates(newest))[0]["epoch"] == 2
    assert not asked, "the kept list is only fetched when the latest is unreadable"
    (Path(newest.path) / STATE_FILE).write_bytes(b"")
    (Path(middle.path) / DIGEST_FILE).write_text("0" * 64)
    assert load_resumable(resume_candidates(newest))[0]["epoch"] == 0


def test_a_trainer_keeps_a_checkpoint_to_fall_back_to(tmp_path) -> None:
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 2"):
        make_trainer(
            spec=SPEC,
            loop=LoopConfig(family="phase_gan"),
            family_config=CONFIG,
            data_dir=tmp_path,
            keep_checkpoints=1,
        )


def test_a_full_disk_while_checkpointing_leaves_no_partial_state(tmp_path, monkeypatch):
    (previous,) = _checkpoints(tmp_path, 1)
    new = tmp_path / "checkpoint_1"
    new.mkdir()

    def half_then_full(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04" + b"\0" * 100)
        _enospc()

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        write_checkpoint(new, _state(1), {"loop": {}})
    assert list(new.iterdir()) == []  # nothing for Ray Train to pick up as a checkpoint
    with pytest.raises(CheckpointError, match="missing"):
        read_state(new)
    assert read_state(previous.path)["epoch"] == 0


# ---------------------------------------------------------------- preview on one rank


class _Collective(nn.Module):
    """Stands in for DDP: its forward is a collective, so every rank must call it equally
    often (DDP's forward syncs buffers and sets up the gradient all-reduce)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.module(x)


def _toy() -> FamilySpec:
    def eval_step(ctx, batch):
        return {"mse": (ctx.models["head"](ctx.models["body"](batch["x"])) ** 2).mean(1)}

    def preview(models, batch, cfg):
        assert not any(isinstance(m, _Collective) for m in models.values())
        out = models["head"](models["body"](batch["x"]))
        return batch["x"], out, out

    stage = Stage(
        name="train",
        trains=("body", "head"),
        build_optimizers=lambda c, m: {"body": torch.optim.SGD(m["body"].parameters(), 0.1)},
        train_step=lambda ctx, b: {},
        eval_step=eval_step,
        preview=preview,
        metric="mse",
        mode="min",
        inference_models=("body", "head"),
        ema=("head",),
    )
    return FamilySpec(
        name="toy",
        description="toy",
        config_cls=LoopConfig,
        build_models=lambda cfg, data: {"body": nn.Linear(3, 3), "head": nn.Linear(3, 3)},
        stages=(stage,),
        predict=lambda m, x, c, cond: x,
        build_shards=lambda **kw: None,
        columns=("x",),
    )


def test_the_rank_0_preview_never_calls_a_ddp_wrapped_module() -> None:
    """Rank 0 previews, the others do not: their wrapped (collective) forwards must still be
    called the same number of times, or DDP would wait for a rank that never comes."""
    spec = _toy()
    stage = spec.stages[0]
    loop = LoopConfig(family="toy")
    batches = [{"x": torch.randn(4, 3)} for _ in range(3)]
    calls = {}
    for rank, preview in ((0, True), (1, False)):
        models = StageModels(spec, stage, loop, DATA, loop)
        models.freeze_and_place(torch.device("cpu"), _Collective)
        ctx = local_context(spec, loop, DATA, models=models.train_mode(), optimizers={})
        metrics, shown = validate(ctx, models, stage, batches, preview=preview)
        assert (shown is not None) == preview and "val/mse" in metrics
        calls[rank] = models.wrapped["body"].calls
    assert calls[0] == calls[1] == len(batches)


# ---------------------------------------------------------------- experiment state


def _tune_folder(run_dir: Path, sessions: tuple[str, ...] = ("2026-01-01_00-00-00",)) -> None:
    """The files Tuner.restore reads (contents only need to be whole JSON / pickles here)."""
    run_dir.mkdir(parents=True)
    (run_dir / "tuner.pkl").write_bytes(pickle.dumps({"tuner": 1}))
    for session in sessions:
        (run_dir / f"experiment_state-{session}.json").write_text(json.dumps({"trial_data": []}))
        (run_dir / f"searcher-state-{session}.pkl").write_bytes(pickle.dumps({"s": 1}))
        (run_dir / f"search_gen_state-{session}.json").write_bytes(pickle.dumps({"g": 1}))


@pytest.mark.parametrize(
    ("file", "damage"),
    [
        ("tuner.pkl", lambda p: p.write_bytes(b"")),  # ray-project/ray#58179: EOFError
        ("experiment_state-2026-01-01_00-00-00.json", _truncate),
        ("searcher-state-2026-01-01_00-00-00.pkl", _truncate),
        ("search_gen_state-2026-01-01_00-00-00.json", lambda p: p.write_bytes(b"")),
    ],
)
def test_resume_of_a_damaged_experiment_says_which_file_and_what_to_do(
    tmp_path, capsys, file, damage
) -> None:
    storage = tmp_path / "runs"
    _tune_folder(storage / "pg")
    damage(storage / "pg" / file)
    argv = ["--resume", "--name", "pg", "--storage", str(storage)]
    rc = run("phase_gan", [*argv, "--shards-dir", str(tmp_path / "shards")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert f"{storage / 'pg' / file} is " in err
    assert "start again: rerun without --resume under another --name" in err
    assert not (tmp_path / "shards").exists(), "refused before building data or starting Ray"


def test_an_earlier_intact_session_is_offered_to_resume_from(tmp_path) -> None:
    run_dir = tmp_path / "pg"
    _tune_folder(run_dir, sessions=("2026-01-01_00-00-00", "2026-01-02_00-00-00"))
    newest = run_dir / "experiment_state-2026-01-02_00-00-00.json"
    newest.write_text('{"trial_data": [["{\\n  \\"stub\\"')
    with pytest.raises(ExperimentStateError, match="truncated or corrupted") as err:
        check_experiment_state(str(run_dir))
    said = str(err.value)
    assert "as its session 2026-01-01_00-00-00 saved it" in said
    last = sorted(run_dir.glob("*2026-01-02_00-00-00*"))
    assert len(last) == 3 and all(p.name in said for p in last)
    for path in last:  # the advice: move the last session's files away
        path.rename(tmp_path / path.name)
    check_experiment_state(str(run_dir))  # Tune now reads the earlier session's state
    (run_dir / "searcher-state-2026-01-01_00-00-00.pkl").write_bytes(b"")
    with pytest.raises(ExperimentStateError, match="no earlier intact copy"):
        check_experiment_state(str(run_dir))  # a damaged only session is not offered
