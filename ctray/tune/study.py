"""The Optuna study of a search, persisted where optuna-dashboard and ``optuna.load_study`` see it.

By default the study is an SQLite file in the Tune run folder (``<storage>/<name>/optuna.db``,
study name ``<name>``); any SQLAlchemy URL (PostgreSQL, MySQL ...) may replace it. Tune pickles
the searcher with the run, storage URL included, so ``--resume`` keeps writing to the same study.

Ray 2.60's ``OptunaSearch`` tells a trial that ASHA stopped at a rung as COMPLETE with the value
it had there: the study would then hold 2-epoch results as finished ones, for the dashboard and
for TPE alike. ``StudySearch`` records those as PRUNED (with the rung's value as their last
intermediate value), which is what they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

STUDY_FILE = "optuna.db"


def default_storage_url(run_dir: str | Path) -> str:
    """``sqlite:///<run_dir>/optuna.db`` (absolute), creating the folder."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{run_dir / STUDY_FILE}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage for ``url``; a malformed or unreachable URL is a ValueError saying so."""
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as err:  # SQLAlchemy raises many kinds; the user needs the URL and why
        raise ValueError(f"Optuna storage {redact(url)}: {err}") from err


def redact(url: str) -> str:
    """The URL without its password (for logs and reports)."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return url
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"


def check_new_study(storage: optuna.storages.RDBStorage, name: str, url: str) -> None:
    """A fresh search must not silently append to another search's study of the same name."""
    if name in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        raise ValueError(
            f"Optuna storage {redact(url)} already holds a study named {name!r}; "
            "pick another --name, or --resume that experiment"
        )


def startup_trials(num_samples: int) -> int:
    """How many trials TPE draws at random before it models the results.

    Optuna's default is 10, which turns every search of 10 trials or fewer (the demos, most
    first searches) into random search. A quarter of the budget, at least 2 and at most
    Optuna's 10, leaves TPE three quarters of a small search and changes nothing from 40
    trials up.
    """
    return max(2, min(10, num_samples // 4))


class StudySearch(OptunaSearch):
    """OptunaSearch that records trials the scheduler stopped early as PRUNED.

    Args:
        time_attr: the result key the scheduler counts progress in (``epochs_done``).
        max_t: its value for a trial that ran to the end; a trial completed below it was
            stopped by the scheduler.
        num_samples: the search's trial budget; given (and no ``sampler``), the TPE sampler
            draws ``startup_trials(num_samples)`` random trials first instead of Optuna's 10.
        **kwargs: OptunaSearch's (metric, mode, storage, study_name, seed ...).
    """

    def __init__(
        self, *, time_attr: str, max_t: int, num_samples: int | None = None, **kwargs: Any
    ) -> None:
        if num_samples is not None and kwargs.get("sampler") is None:
            kwargs["sampler"] = optuna.samplers.TPESampler(
                seed=kwargs.pop("seed", None), n_startup_trials=startup_trials(num_samples)
            )
        super().__init__(**kwargs)
        self._time_attr = time_attr
        self._max_t = max_t

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        progress = (result or {}).get(self._time_attr)
        if error or progress is None or progress >= self._max_t:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        # Tune hands the result that made the scheduler stop the trial to the scheduler only;
        # record it as the last intermediate value, then complete without a value and without
        # an error, which OptunaSearch tells as PRUNED.
        if isinstance(self.metric, str) and self.metric in result:
            super().on_trial_result(trial_id, result)
        super().on_trial_complete(trial_id, result=None, error=False)


def load_study(url: str, name: str) -> optuna.Study:
    """The study of a run, for reports; a missing one says where it was looked for."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError(f"{url}: no such Optuna database")
    try:
        return optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError as err:
        raise FileNotFoundError(f"no Optuna study {name!r} in {redact(url)}") from err
