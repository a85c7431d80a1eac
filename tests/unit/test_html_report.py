"""The Optuna study a search keeps (pruned trials included) and the parts of report.html that
need no Tune run: trial ranking, tables, sections whose source is gone."""

from __future__ import annotations

import math

import optuna
import pytest
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from ctray.registry import get_family
from ctray.tune.html_report import (
    TrialRow,
    _baselines,
    _section,
    _study,
    _trials_table,
    rank_trials,
)
from ctray.tune.run_record import begin_record, finish_session, read_record
from ctray.tune.study import (
    StudySearch,
    check_new_study,
    load_study,
    open_storage,
    redact,
    startup_trials,
)

SPACE = {"lr": tune.loguniform(1e-4, 1e-2), "depth": tune.choice([1, 2, 3])}


def _searcher(cls, url: str, name: str, **kwargs) -> OptunaSearch:
    searcher = cls(storage=open_storage(url), study_name=name, seed=0, **kwargs)
    searcher.set_search_properties("val/loss", "min", SPACE)
    return searcher


def _run(searcher: OptunaSearch, trial: str, values: list[float], *, stopped: bool) -> None:
    """What Tune calls: a result per epoch; the result that made ASHA stop a trial goes only
    to ``on_trial_complete`` (tune_controller: a STOP decision skips on_trial_result)."""
    searcher.suggest(trial)
    for epoch, value in enumerate(values, 1):
        result = {"val/loss": value, "epochs_done": epoch, "training_iteration": epoch}
        if not (stopped and epoch == len(values)):
            searcher.on_trial_result(trial, result)
    searcher.on_trial_complete(trial, result=result)


def test_trials_asha_stopped_are_pruned_with_their_rung_value(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = _searcher(
        StudySearch, url, "exp", metric="val/loss", time_attr="epochs_done", max_t=4
    )
    _run(searcher, "a", [0.9, 0.5, 0.4, 0.3], stopped=False)
    _run(searcher, "b", [1.5, 1.4], stopped=True)  # ASHA stopped it at epoch 2
    searcher.suggest("c")
    searcher.on_trial_complete("c", error=True)
    study = optuna.load_study(study_name="exp", storage=url)
    states = [t.state for t in study.trials]
    assert states == [
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.PRUNED,
        optuna.trial.TrialState.FAIL,
    ]
    assert study.trials[0].value == 0.3
    assert study.trials[1].value == 1.4  # the value at the rung, not lost
    assert study.trials[1].intermediate_values == {1: 1.5, 2: 1.4}
    assert study.best_trial.number == 0


def test_ray_alone_records_a_stopped_trial_as_complete(tmp_path):
    """Why StudySearch exists: if Ray starts telling PRUNED itself, this fails and the override
    can go."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = _searcher(OptunaSearch, url, "exp", metric="val/loss")
    _run(searcher, "b", [1.5, 1.4], stopped=True)
    (trial,) = optuna.load_study(study_name="exp", storage=url).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE


def test_multi_objective_stopped_trial_is_pruned(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = StudySearch(
        storage=open_storage(url),
        study_name="mo",
        metric=["val/psnr", "val/size"],
        mode=["max", "min"],
        time_attr="epochs_done",
        max_t=3,
    )
    searcher.set_search_properties(None, None, SPACE)
    searcher.suggest("a")
    searcher.on_trial_complete(
        "a", result={"val/psnr": 20.0, "val/size": 8.0, "epochs_done": 3, "training_iteration": 3}
    )
    searcher.suggest("b")
    searcher.on_trial_complete(
        "b", result={"val/psnr": 9.0, "val/size": 8.0, "epochs_done": 1, "training_iteration": 1}
    )
    study = load_study(url, "mo")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"]
    assert study.trials[0].values == [20.0, 8.0]


def test_a_new_search_does_not_append_to_an_existing_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = open_storage(url)
    check_new_study(storage, "exp", url)  # none yet
    optuna.create_study(study_name="exp", storage=storage)
    with pytest.raises(ValueError, match="already holds a study named 'exp'"):
        check_new_study(storage, "exp", url)


def test_storage_errors_name_the_url_without_its_password(tmp_path):
    assert redact("postgresql://me:s3cret@db:5432/ctray") == "postgresql://me:***@db:5432/ctray"
    assert redact("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    with pytest.raises(ValueError, match=r"nosuchdb://me:\*\*\*@host"):
        open_storage("nosuchdb://me:s3cret@host/x")
    with pytest.raises(FileNotFoundError, match="no such Optuna database"):
        load_study(f"sqlite:///{tmp_path / 'missing.db'}", "exp")
    assert not (tmp_path / "missing.db").exists()


def _trial(trial_id: str, value: float, *, state: str = "complete", epochs: int = 4) -> TrialRow:
    last = {
        "val/balanced_mae_hu": value,
        "val/identity_balanced_mae_hu": 50.0,
        "val/mae_hu": value / 2,
        "val/identity_mae_hu": 25.0,
        "val/venous/mae_hu": value / 3,
        "val/venous/identity_mae_hu": 20.0,
        "time_total_s": 75.0,
    }
    return TrialRow(
        trial_id=trial_id,
        state=state,
        epochs=epochs,
        last=last,
        config={"lr_g": 0.001, "grl_schedule": "dann"},
        history={"epochs_done": [1.0, 2.0], "val/balanced_mae_hu": [value + 1, value]},
    )


def test_trials_rank_best_first_with_unreported_ones_last():
    trials = [_trial("a", 40.0), _trial("b", math.nan), _trial("c", 30.0, state="pruned")]
    assert [t.trial_id for t in rank_trials(trials, "val/balanced_mae_hu", "min")] == [
        "c",
        "a",
        "b",
    ]
    assert [t.trial_id for t in rank_trials(trials, "val/balanced_mae_hu", "max")][:2] == [
        "a",
        "c",
    ]


def test_trials_table_marks_the_export_and_where_asha_stopped():
    trials = [_trial("a", 30.0), _trial("b", 45.0, state="pruned", epochs=2)]
    text = _trials_table(trials, ["val/balanced_mae_hu"], best_id="a")
    assert 'class="trials"' in text and "<tr class=best><td" in text
    assert "a (exported)" in text and "epoch 2" in text and "1 complete, 1 pruned" in text
    assert "grl_schedule" in text and "lr_g" in text and "1 min 15 s" in text


def test_model_beside_baselines_overall_and_per_group():
    text = _baselines(get_family("phase_gan"), _trial("a", 30.0))
    assert 'class="baselines"' in text and "model/identity" in text
    assert "<details><summary>venous</summary>" in text
    assert '<td class="num">0.6</td>' in text  # balanced MAE 30 vs identity 50


def test_a_section_whose_source_is_gone_says_why_and_the_report_goes_on(tmp_path):
    stage = get_family("phase_gan").final
    info = {"study_name": "exp"}
    text = _section("study", lambda: _study(info, f"sqlite:///{tmp_path / 'gone.db'}", stage))
    assert "not available" in text and "gone.db" in text
    assert "in memory" in _study(info, None, stage)


def test_importances_need_completed_trials(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="exp", storage=url)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=4)
    stage = get_family("phase_gan").final
    assert "need at least 5 completed trials" in _study({"study_name": "exp"}, url, stage)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1) - 0.3) ** 2, n_trials=2)
    text = _study({"study_name": "exp"}, url, stage)
    assert 'class="plot" alt="parameter importances"' in text
    assert "<dt>trials</dt><dd>6 (6 complete)</dd>" in text


def test_a_resumed_run_keeps_its_record_and_adds_a_session(tmp_path):
    first = begin_record(tmp_path, resume=False, family="phase_gan", settings={"epochs": 3})
    assert read_record(tmp_path)["sessions"] == first["sessions"]
    finish_session(first, export="x")  # the interrupted session never finishes on disk
    again = begin_record(tmp_path, resume=True, family="ignored", settings={"epochs": 9})
    assert again["family"] == "phase_gan" and again["settings"] == {"epochs": 3}
    assert len(again["sessions"]) == 2 and again["sessions"][0]["wall_time_s"] is None
    done = finish_session(again, export="exported/x")
    assert done["sessions"][1]["wall_time_s"] >= 0 and done["export"] == "exported/x"
    fresh = begin_record(tmp_path, resume=False, family="pix2pix")
    assert fresh["family"] == "pix2pix" and len(fresh["sessions"]) == 1
    with pytest.raises(FileNotFoundError, match=r"no ctray-run\.json"):
        read_record(tmp_path / "elsewhere")


@pytest.mark.parametrize(("budget", "startup"), [(1, 2), (4, 2), (24, 6), (40, 10), (200, 10)])
def test_tpe_starts_modelling_after_a_quarter_of_a_small_budget(budget, startup):
    assert startup_trials(budget) == startup


def test_a_four_trial_search_is_tpe_after_two_random_trials(tmp_path):
    """With Optuna's default start (10 random trials) a 4-trial demo would be random search:
    the first two suggestions are random search's (same seed), the next ones TPE's own."""

    def suggestions(searcher: OptunaSearch) -> list[float]:
        out = []
        for i in range(4):
            config = searcher.suggest(f"t{i}")
            out.append(config["lr"])
            result = {"val/loss": config["lr"], "epochs_done": 2, "training_iteration": 2}
            searcher.on_trial_complete(f"t{i}", result=result)
        return out

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    tpe = _searcher(
        StudySearch, url, "tpe", metric="val/loss", time_attr="epochs_done", max_t=2, num_samples=4
    )
    random = OptunaSearch(metric="val/loss", mode="min", sampler=optuna.samplers.RandomSampler(0))
    random.set_search_properties("val/loss", "min", SPACE)
    ours, theirs = suggestions(tpe), suggestions(random)
    assert ours[:2] == theirs[:2]
    assert ours[2:] != theirs[2:]
