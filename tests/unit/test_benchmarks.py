"""The benchmarks still import, parse their arguments and compute their figures.

They are too long for the default run (minutes each); these checks keep them from rotting.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_bench_train_splits_a_run_from_the_worker_timestamps(bench):
    mod = bench("bench_train")
    settings, doc = mod.parse_args(["--quick", "--no-doc", "--workers", "1", "2"])
    assert doc is None and settings.quick and settings.workers == (1, 2)
    # fit() at t=0; the loop starts at 10; epochs of 3 s of train + val, then 0.5 s of state
    # and save_state, then a 1 s report; the loop ends at 2 s after the last report.
    reports, t = [], 10.0 + 1.0  # 1 s of setup in the loop
    for _ in range(3):
        start = t + 3.0 + 0.5
        reports.append((start, start + 1.0, 3.0))
        t = start + 1.0
    bounds, split = mod.ray_split(reports, entry=10.0, exit_=t, fit=(0.0, t + 2.0))
    assert bounds == pytest.approx([11.0, 15.5, 20.0, 24.5])
    assert split["start-up (fit to loop)"] == pytest.approx(10.0)
    assert split["setup in loop"] == pytest.approx(1.0)
    assert split["state dict + save_state"] == pytest.approx(1.5)
    assert split["report (checkpoint persisted)"] == pytest.approx(3.0)
    assert split["teardown (loop to fit end)"] == pytest.approx(2.0)
    assert sum(split.values()) == pytest.approx(t + 2.0)
    run = mod.Run(rows=9, epochs=[4.5] * 3, cpu=[9.0, 4.5, 4.5], total_s=t + 2.0, split=split)
    assert run.rate == pytest.approx(2.0) and run.rate_with_startup == pytest.approx(27 / 26.5)
    assert run.cpu_per_sample == pytest.approx(0.5)  # the epochs after the first
    with pytest.raises(ValueError, match="no epoch"):
        mod.ray_split([], entry=0.0, exit_=1.0, fit=(0.0, 1.0))
    meter = mod.CpuMeter()
    meter.samples = [(0.0, 100.0), (10.0, 105.0)]  # (wall clock, CPU seconds) samples
    assert meter.between([2.0, 4.0, 10.0]) == pytest.approx([1.0, 3.0])


def test_bench_hpo_counts_trial_epochs_to_random_searchs_best(bench):
    mod = bench("bench_hpo")
    settings, _ = mod.parse_args(["--quick", "--no-doc", "--seeds", "3", "4"])
    assert settings.seeds == (3, 4) and settings.quick
    random = mod.Search(name="random", seed=3, results=[("a", 9.0), ("a", 7.0), ("b", 8.0)])
    fast = mod.Search(name="ctray", seed=3, results=[("c", 7.5), ("c", 6.0)])
    slow = mod.Search(name="ctray", seed=3, results=[("c", 7.5), ("d", 8.0)])
    reached = mod.compare(fast, random, budget=6)
    assert (reached.target, reached.random, reached.ctray) == (7.0, 2, 2)
    never = mod.compare(slow, random, budget=6)
    assert never.ctray is None and never.ctray_cost == 6  # charged random's whole budget
    assert mod.epochs_ratio([reached, never]) == pytest.approx((2 + 6) / (2 + 2))
    assert mod.epochs_to_reach([float("nan"), 5.0], 5.0) == 2
    low, high = mod.bootstrap_interval([reached, never])
    assert low == pytest.approx(2 / 2) and high == pytest.approx(6 / 2)  # all one seed or other
    assert mod.bootstrap_interval([reached] * 3) == pytest.approx((1.0, 1.0))
    # The random start's cost: every epoch the first-started trials reported, in any order.
    started = mod.Search(name="ctray", seed=3, results=slow.results + fast.results)
    started.started = ["d", "c"]
    assert started.epochs_of_first(1) == 1 and started.epochs_of_first(2) == 4


def test_bench_hpo_gp_sampler_starts_with_random_searchs_draws(bench):
    """``--sampler gp`` keeps the pair matched: its random start is random search's draws."""
    import optuna

    mod = bench("bench_hpo")
    settings, _ = mod.parse_args(["--no-doc", "--sampler", "gp", "--samples", "64"])
    assert settings.sampler == "gp" and settings.samples == 64
    assert "--samples 64 --sampler gp" in mod.doc_section(settings, "", "", "", 0.0, ("", ""))
    space = {
        "lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True),
        "norm": optuna.distributions.CategoricalDistribution(["instance", "batch"]),
    }

    def draws(sampler) -> list[dict]:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study, out = optuna.create_study(sampler=sampler), []
        for i in range(4):  # ASHA stops some: PRUNED trials do not end GP's random start
            trial = study.ask(space)
            out.append(trial.params)
            if i % 2:
                study.tell(trial, float(i))
            else:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return out

    assert draws(mod.gp_sampler(3, 64)) == draws(optuna.samplers.RandomSampler(seed=3))
    with pytest.raises(SystemExit):
        mod.parse_args(["--sampler", "cmaes"])


def test_bench_data_parses_its_arguments(bench):
    mod = bench("bench_data")
    settings, doc = mod.parse_args(["--quick", "--no-doc"])
    assert doc is None and settings.quick and settings.patches < mod.Settings().patches
