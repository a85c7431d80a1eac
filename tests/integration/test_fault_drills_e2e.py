"""Fault drills on real Ray: a Train worker SIGKILLed mid-epoch, a Tune driver SIGKILLed
mid-search and resumed. Each prints a DRILL line with what it measured (run with -s)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "tune_phase_gan.py"
SNAPSHOT = "checkpoint_manager_snapshot.json"


def _registered(run: Path) -> list[dict]:
    """The checkpoints Ray Train has registered for a run, oldest first (its own snapshot):
    each with ``checkpoint_dir_name`` and the reported ``metrics``."""
    try:
        return json.loads((run / SNAPSHOT).read_text())["checkpoint_results"]
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or mid-write
        return []


def _epochs_registered(run: Path) -> list[int]:
    return [r["metrics"]["epoch"] for r in _registered(run)]


def _wait(condition, what: str, timeout: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert alive(), f"stopped before {what}"
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def _kill_a_train_worker(workers: int) -> None:
    """SIGKILL the process of one live Ray Train worker (rank unknown) of this session."""
    import ray
    from ray.util.state import list_actors

    alive = list_actors(
        address=ray.get_runtime_context().gcs_address,  # this session, not another on the host
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        timeout=30,
    )
    assert len(alive) == workers, f"expected {workers} live Train worker(s), got {alive}"
    os.kill(alive[0].pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("workers", "damaged"), [(1, False), pytest.param(2, True, marks=pytest.mark.slow)]
)
def test_a_train_worker_killed_mid_epoch_resumes_from_its_last_checkpoint(
    ray_session, phantom_shards, tmp_path, capfd, workers, damaged
):
    """A worker killed mid-epoch: the run resumes from the checkpoint of the epoch before.

    The slow form has 2 workers (DDP over gloo: the killed rank's peer is replaced too) and a
    second kill after the latest checkpoint was damaged: it resumes from the one before that.
    """
    from ctray.config import from_dict
    from ctray.registry import get_family
    from ctray.train.loop import LoopConfig
    from ctray.train.state import STATE_FILE, read_state
    from ctray.train.trainer import Resources, make_trainer

    spec = get_family("phase_gan")
    epochs = 3 if damaged else 2
    trainer = make_trainer(
        spec=spec,
        loop=LoopConfig(family="phase_gan", epochs=epochs, batch_size=1, max_val_batches=1),
        family_config=from_dict(spec.config_cls, spec.preset("debug")),
        data_dir=phantom_shards,
        resources=Resources(workers=workers),
        storage_path=str(tmp_path),
        name="drill",
        max_failures=2,
        keep_checkpoints=2 * epochs,  # keep every one, to count them
    )
    run = tmp_path / "drill"
    outcome: dict = {}
    fit = threading.Thread(target=lambda: outcome.update(result=trainer.fit()))
    fit.start()
    try:
        # Once a checkpoint is registered the worker has returned from that report and is
        # training the next epoch, which lasts longer than this (batch size 1, every row).
        _wait(lambda: len(_registered(run)) == 1, "the first checkpoint", 300, fit.is_alive)
        _kill_a_train_worker(workers)
        at_kill = _epochs_registered(run)
        if damaged:
            _wait(lambda: len(_registered(run)) == 2, "the next checkpoint", 300, fit.is_alive)
            latest = _registered(run)[-1]["checkpoint_dir_name"]
            (run / latest / STATE_FILE).write_bytes(b"")  # as a full disk or bad copy leaves it
            _kill_a_train_worker(workers)
            at_damage = _epochs_registered(run)
    finally:
        fit.join(timeout=600)
    result = outcome["result"]
    assert result.error is None, result.error
    reported = _epochs_registered(run)
    assert at_kill == [0], f"the kill landed after epoch 1 was reported: {at_kill}"
    # Killed in epoch 1: resumed at epoch 1, only the interrupted epoch is trained again.
    # Then killed in epoch 2 with epoch 1's checkpoint damaged: resumed from epoch 0's.
    assert reported == ([0, 1, 1, 2] if damaged else [0, 1]), reported
    assert result.metrics["epochs_done"] == epochs
    # The phantom rows fit in a worker: after its first pass a worker trains from memory
    assert result.metrics["data/train_rows_in_memory"] > 0
    # The global optimiser step continued from each checkpoint: same total as without kills.
    first = read_state(run / _registered(run)[0]["checkpoint_dir_name"])
    assert read_state(result.checkpoint.path)["step"] == first["step"] * epochs
    said = f"epoch 1 killed: resumed at epoch {reported[1]} from epoch 0's checkpoint"
    if damaged:
        assert at_damage == [0, 1], f"the kill landed after epoch 2 was reported: {at_damage}"
        time.sleep(2)  # the worker's log lines reach the driver asynchronously
        logged = capfd.readouterr()
        assert f"checkpoint {run / latest} is damaged" in logged.out + logged.err
        said += f"; epoch 2 killed, epoch 1's checkpoint damaged: resumed at {reported[2]}"
    print(f"\nDRILL train-worker-kill ({workers} worker(s)): {said}; reported {reported}")


def _rows(experiment: Path) -> dict[str, list[dict]]:
    """Tune's result.json rows of each trial."""
    out = {}
    for result in experiment.glob("*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def _tune_status(experiment: Path) -> dict[str, str]:
    """Trial id -> status in the newest experiment state Tune saved: what a resume reads."""
    saved = sorted(experiment.glob("experiment_state-*.json"))
    try:
        state = json.loads(saved[-1].read_text()) if saved else {"trial_data": []}
    except json.JSONDecodeError:  # being rewritten
        return {}
    trials = (json.loads(trial) for trial, _ in state["trial_data"])
    return {t["trial_id"]: t["status"] for t in trials}


def _train_progress(train_root: Path) -> dict[str, int]:
    """Trial id -> epochs its Train run has checkpointed (its latest registered epoch + 1)."""
    runs = train_root.glob("*/") if train_root.is_dir() else []
    return {run.name: max(_epochs_registered(run), default=-1) + 1 for run in runs}


def _session_pids(sid: int) -> list[int]:
    """Live processes of a session (Linux /proc): a driver started in a session of its own and
    everything it started (Ray gives each worker a process group of its own, not a session)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            state, _, _, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
            if int(session) == sid and state != "Z":
                pids.append(int(stat.parent.name))
    return pids


@pytest.mark.parametrize(
    ("trials", "concurrent"), [(2, 1), pytest.param(4, 2, marks=pytest.mark.slow)]
)
def test_a_killed_tune_driver_resumes_without_rerunning_finished_trials(
    ray_session, phantom_shards, tmp_path, trials, concurrent
):
    """SIGKILL the driver of a search once Tune has saved a finished trial while another is
    part-way, then --resume in this process: finished trials are not run again, unfinished
    ones continue from their own checkpoints, and the export is the best of all trials."""
    from ctray.tune.runner import metric_name

    storage, export = tmp_path / "runs", tmp_path / "exported"
    # The smoke test's 3 epochs: ASHA's grace period (warm-up 1 + 2) then covers every trial,
    # so none is stopped early and each trial's end is known.
    epochs = 3
    args = [
        "--smoke-test",
        "--data",
        str(phantom_shards),
        "--storage",
        str(storage),
        "--export",
        str(export),
        "--num-samples",
        str(trials),
        "--max-concurrent",
        str(concurrent),
        "--name",
        "drill",
    ]
    experiment, train_root = storage / "drill", storage / "drill-train"
    log_path = tmp_path / "driver.log"
    started = time.monotonic()
    with log_path.open("w") as log:
        driver = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own local Ray: a process tree of its own
            # Tune saves its experiment state every >= 10 s by default; every second here, so
            # that a finished trial is on record while another is still training.
            env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"},
        )
    try:

        def finished_beside_running() -> bool:
            status, progress = _tune_status(experiment), _train_progress(train_root)
            done = {t for t, s in status.items() if s == "TERMINATED"}
            return bool(done) and any(0 < n < epochs for t, n in progress.items() if t not in done)

        _wait(
            finished_beside_running,
            "a saved finished trial beside a running one",
            420,
            lambda: driver.poll() is None,
        )
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
        # Its Ray goes down with it, as a driver's actors do on a cluster: nothing of the
        # first run may write on while this one resumes.
        deadline = time.monotonic() + 60
        while pids := _session_pids(driver.pid):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            assert time.monotonic() < deadline, f"processes of the killed driver live on: {pids}"
            time.sleep(0.2)
    killed_after = time.monotonic() - started
    status, progress = _tune_status(experiment), _train_progress(train_root)
    finished = {t for t, s in status.items() if s == "TERMINATED"}
    rows_before = _rows(experiment)
    train_before = {t: _registered(train_root / t) for t in finished}
    assert finished and set(progress) - finished, (status, progress)

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import tune_phase_gan
    finally:
        sys.path.remove(str(SCRIPT.parent))
    resumed_at = time.monotonic()
    assert tune_phase_gan.main([*args, "--resume"]) == 0, log_path.read_text()[-3000:]
    resume_s = time.monotonic() - resumed_at
    rows_after = _rows(experiment)

    rerun = sorted(
        t
        for t in finished
        if rows_after[t] != rows_before[t] or _registered(train_root / t) != train_before[t]
    )
    assert not rerun, f"finished trials ran again: {rerun}"
    assert len(rows_after) == trials, f"expected {trials} trials in all: {list(rows_after)}"
    continued = {}
    for trial in set(rows_after) - finished:
        # A resumed trial's rows are those of its new run (Tune restarts its file): they must
        # start where its Train checkpoints ended. A run that had ended reports its end again.
        done = progress.get(trial, 0)
        expected = list(range(done, epochs)) if done < epochs else [epochs - 1]
        assert [r["epoch"] for r in rows_after[trial]] == expected, (trial, done, rows_after)
        continued[trial] = done
    metric = metric_name("phase_gan")
    last = {t: rows[-1][metric] for t, rows in rows_after.items()}
    best = min(last, key=last.get)  # phase_gan's metric is minimised
    meta = json.loads((export / "drill" / "model.json").read_text())
    assert meta["source"]["trial"] == best, (meta["source"]["trial"], last)
    # The resumed search kept writing to its Optuna study: one finished study trial per Tune
    # trial, none left RUNNING by the kill, none asked twice.
    study = optuna.load_study(study_name="drill", storage=f"sqlite:///{experiment / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    assert len(states) == trials and set(states) <= {"COMPLETE", "PRUNED"}, states
    print(
        f"\nDRILL tune-driver-kill: driver killed after {killed_after:.0f} s with "
        f"{len(finished)} finished trial(s) on record; resumed in {resume_s:.0f} s; trials "
        f"re-run {len(rerun)}; others continued from epoch {continued} (0: not started); "
        f"exported the best of all {trials} trials, {best} ({metric} {last[best]:.4g})"
    )


@pytest.mark.slow
def test_a_run_restored_after_its_end_reports_its_end_again(ray_session, phantom_shards, tmp_path):
    """A Tune trial resumed after its driver died may find its Train run already ended (its
    last report never reached Tune): the restored run must report that end once more."""
    from ctray.config import from_dict
    from ctray.registry import get_family
    from ctray.train.loop import LoopConfig
    from ctray.train.trainer import make_trainer

    spec = get_family("phase_gan")

    def fit():
        return make_trainer(
            spec=spec,
            loop=LoopConfig(
                family="phase_gan", epochs=1, batch_size=2, max_train_batches=1, max_val_batches=1
            ),
            family_config=from_dict(spec.config_cls, spec.preset("debug")),
            data_dir=phantom_shards,
            storage_path=str(tmp_path),
            name="ended",
        ).fit()

    first = fit()
    again = fit()
    assert again.error is None, again.error
    assert again.metrics["epochs_done"] == first.metrics["epochs_done"] == 1
    assert again.metrics["val/mae_hu"] == first.metrics["val/mae_hu"]
    assert again.checkpoint.path != first.checkpoint.path  # reported with a copy of it
    assert _epochs_registered(tmp_path / "ended") == [0, 0]
