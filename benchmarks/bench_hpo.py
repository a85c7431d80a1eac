"""Search efficiency: TPE + ASHA (``ctray.tune``) against random search, same trial budget.

The objective is a real, cheap training run: the ``pix2pix`` family's ``debug`` preset on
32 px axial slices of phantom pairs (A = the native scan, B = its venous phase), its search
space ``search_spaces/pix2pix.yaml`` with ``residual`` pinned to false (``PINNED``: residual
trials all end a few hundredths of a HU from the identity's error, a plateau where "best" is
noise) and its tuned metric ``val/mae_hu`` (lower is better), reported after every epoch.
Each trial trains in its Tune trial process with the family's own ``train_step`` /
``eval_step`` on in-memory tensors (1 torch thread, seeded, so a configuration always gives
the same curve): a ``TorchTrainer`` per trial would add ~15 s of start-up per trial and
nothing the searchers see.

Two searches with the same budget (``num_samples`` trials of at most ``epochs`` epochs,
``max_concurrent`` at a time, as ``ctray.tune.runner.TuneSettings``), for several seeds:

* ``ctray``: what ``run_tune`` builds: ``StudySearch`` (Optuna TPE, seeded) behind a
  ``ConcurrencyLimiter``, ``ASHAScheduler(**asha_args(...))``;
* ``random``: Optuna's ``RandomSampler`` (seeded), every trial to its last epoch.

Per seed, B is the best ``val/mae_hu`` random search reported (any trial, any epoch). The cost
of a search to reach B is the number of trial-epochs it had reported, in the order Tune
received them, when its running best first got to B or below. A ``ctray`` search that never
reaches B is charged random search's whole budget (``num_samples * epochs``).

``--sampler gp`` puts Optuna's ``GPSampler`` (same seeded random start, ``startup_trials``
finished trials) behind ``StudySearch`` instead of TPE, to compare samplers on the same
objective; ``ctray.tune`` itself runs TPE.

Usage::

    python benchmarks/bench_hpo.py [--quick] [--seeds 0 1 2] [--samples N] [--epochs E]
                                   [--sampler tpe|gp] [--doc docs/benchmarks.md | --no-doc]

The last line printed is ``RESULT hpo_epochs_ratio=<ctray / random>`` (sums over the seeds).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from bench_common import DOC, load_average, load_note, machine, stop_ray, write_doc

DOC_HEADING = "## Search (bench_hpo.py)"
FAMILY = "pix2pix"
METRIC = "val/mae_hu"
MODE = "min"
SLICE_PX = 32
# Pinned instead of searched: with ``residual`` true the generator starts as the identity, and
# after a few epochs every such trial sits within a few hundredths of a HU of the identity's
# error, so "reaching random search's best" among them is a coin flip, not a search result.
PINNED = {"residual": False}
# The ctray side's sampler: "tpe" is what run_tune builds; "gp" is measured beside it.
SAMPLERS = ("tpe", "gp")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What to measure.

    Attributes:
        seeds: one pair of searches (ctray, random) per seed.
        samples: trials per search (the same budget for both).
        epochs: epochs per trial (ASHA's ``max_t``).
        max_concurrent: trials at a time (``TuneSettings``' default).
        grace_period / reduction_factor: ASHA's settings in ``TuneSettings`` (None: its
            defaults, what ``ctray.tune`` runs with).
        sampler: the ctray side's Optuna sampler, one of ``SAMPLERS``.
        phantoms: phantom pairs in the data (a quarter, at least one, for validation).
        slices: axial slices per phantom.
        batch: slices per batch.
        quick: the smoke-test sizes were chosen.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    samples: int = 24
    epochs: int = 6
    max_concurrent: int = 2
    grace_period: int | None = None
    reduction_factor: int | None = None
    sampler: str = "tpe"
    phantoms: int = 3
    slices: int = 8
    batch: int = 4
    quick: bool = False


QUICK = Settings(seeds=(0,), samples=3, epochs=2, phantoms=2, slices=4, quick=True)


# --------------------------------------------------------------------------- cost to reach


@dataclass(kw_only=True)
class Search:
    """One search's results in the order Tune received them: (trial id, value) per epoch, and
    its trial ids in the order Tune started them (the sampler's order)."""

    name: str
    seed: int
    results: list[tuple[str, float]] = field(default_factory=list)
    started: list[str] = field(default_factory=list)

    @property
    def trial_epochs(self) -> int:
        return len(self.results)

    @property
    def trials(self) -> int:
        return len({t for t, _ in self.results})

    def best(self) -> float:
        values = [v for _, v in self.results if math.isfinite(v)]
        if not values:
            raise ValueError(f"{self.name} search (seed {self.seed}) reported no finite value")
        return min(values) if MODE == "min" else max(values)

    def epochs_of_first(self, trials: int) -> int:
        """Trial-epochs the first ``trials`` started trials ran (a random start's cost)."""
        first = set(self.started[:trials])
        return sum(t in first for t, _ in self.results)


def epochs_to_reach(values: Sequence[float], target: float, mode: str = MODE) -> int | None:
    """Trial-epochs reported when the running best first reaches ``target`` (None: never)."""
    for count, value in enumerate(values, start=1):
        if math.isfinite(value) and (value <= target if mode == "min" else value >= target):
            return count
    return None


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """One seed: the trial-epochs each search needed to reach random search's best."""

    seed: int
    target: float
    random: int
    ctray: int | None
    budget: int

    @property
    def ctray_cost(self) -> int:
        """What ``ctray`` is charged: its epochs to reach, or the whole budget if it never did."""
        return self.budget if self.ctray is None else self.ctray


def compare(ctray: Search, random: Search, budget: int) -> Comparison:
    target = random.best()
    reached_random = epochs_to_reach([v for _, v in random.results], target)
    assert reached_random is not None  # its own best is in its results
    return Comparison(
        seed=random.seed,
        target=target,
        random=reached_random,
        ctray=epochs_to_reach([v for _, v in ctray.results], target),
        budget=budget,
    )


def epochs_ratio(comparisons: Sequence[Comparison]) -> float:
    """ctray's trial-epochs over random search's, summed over the seeds."""
    return sum(c.ctray_cost for c in comparisons) / sum(c.random for c in comparisons)


def bootstrap_interval(
    comparisons: Sequence[Comparison], *, level: float = 0.9, draws: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """The ``level`` interval of :func:`epochs_ratio` over seeds drawn with replacement.

    Why: per-seed ratios of one search move between 0.1 and 1.1, so a handful of seeds gives
    a wide range; the interval says how far the headline could move with other seeds.
    """
    rng = random.Random(seed)
    ratios = sorted(
        epochs_ratio(rng.choices(comparisons, k=len(comparisons))) for _ in range(draws)
    )
    tail = (1 - level) / 2
    return ratios[int(tail * (draws - 1))], ratios[int((1 - tail) * (draws - 1))]


# --------------------------------------------------------------------------- objective


def build_data(root: Path, settings: Settings) -> dict[str, dict[str, torch.Tensor]]:
    """Phantom pix2pix pairs at ``SLICE_PX`` px, read back as in-memory tensors per split."""
    from ctray.data.build import BuildConfig
    from ctray.data.shards import column_numpy, read_split
    from ctray.families.pix2pix.data import build
    from ctray.registry import get_family

    columns = get_family(FAMILY).columns
    build(
        out=root,
        phantom=settings.phantoms,
        config=BuildConfig(patch_size=(SLICE_PX, SLICE_PX, 1)),
        options={"resize_to": SLICE_PX, "max_slices": settings.slices},
        progress=False,
    )
    out = {}
    for split in ("train", "val"):
        table = read_split(root, split, columns)
        out[split] = {c: torch.from_numpy(column_numpy(table[c]).copy()) for c in columns}
    return out


def _batches(data: dict[str, torch.Tensor], batch: int, order: torch.Tensor):
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        yield {k: v[idx] for k, v in data.items()}


def objective(
    config: dict[str, Any],
    *,
    base: dict[str, Any],
    data: dict[str, dict[str, torch.Tensor]],
    data_info: dict[str, Any],
    epochs: int,
    batch: int,
) -> None:
    """One trial: train the sampled configuration, report ``METRIC`` after every epoch."""
    from ray import tune

    from ctray.config import from_dict
    from ctray.registry import DataInfo, get_family
    from ctray.train.local import local_context
    from ctray.train.loop import Mean
    from ctray.train.state import seed_everything

    torch.set_num_threads(1)
    spec = get_family(FAMILY)
    stage = spec.stage(None)
    cfg = from_dict(spec.config_cls, {**base, **config}, where="trial config")
    seed_everything(0)
    ctx = local_context(spec, cfg, DataInfo.from_dict(data_info), num_epochs=epochs)
    train, val = data["train"], data["val"]
    rows = len(next(iter(train.values())))
    for epoch in range(epochs):
        ctx.epoch = epoch
        for name in stage.trains:
            ctx.models[name].train()
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(epoch))
        for b in _batches(train, batch, order):
            ctx.step = ctx.optimize.step
            stage.train_step(ctx, b)
            ctx.optimize.end_batch()
        for module in ctx.models.values():
            module.eval()
        mean = Mean()
        with torch.no_grad():
            for b in _batches(val, batch, torch.arange(len(next(iter(val.values()))))):
                for key, values in stage.eval_step(ctx, b).items():
                    mean.add(key, values)
        value = mean.result()[METRIC.removeprefix("val/")]
        tune.report({METRIC: value, "epochs_done": epoch + 1})


# --------------------------------------------------------------------------- searches


def searchers(name: str, seed: int, settings: Settings, base: dict[str, Any]) -> dict[str, Any]:
    """TuneConfig arguments of a search: ``ctray`` (as run_tune builds it) or ``random``."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from ctray.config import from_dict
    from ctray.registry import get_family
    from ctray.tune.runner import TuneSettings, asha_args
    from ctray.tune.study import StudySearch

    spec = get_family(FAMILY)
    asha = {"grace_period": settings.grace_period, "reduction_factor": settings.reduction_factor}
    tune_settings = TuneSettings(
        num_samples=settings.samples,
        epochs=settings.epochs,
        max_concurrent=settings.max_concurrent,
        seed=seed,
        **{k: v for k, v in asha.items() if v is not None},
    )
    if name == "ctray":
        from ray.tune.schedulers import ASHAScheduler

        args = asha_args(
            spec.stage(None), from_dict(spec.config_cls, base, where="base"), tune_settings
        )
        searcher = StudySearch(
            metric=METRIC,
            mode=MODE,
            seed=seed,
            time_attr=args["time_attr"],
            max_t=args["max_t"],
            num_samples=tune_settings.num_samples,
            sampler=gp_sampler(seed, settings.samples) if settings.sampler == "gp" else None,
        )
        scheduler = ASHAScheduler(**args)
    else:
        from ray.tune.schedulers import FIFOScheduler

        sampler = optuna.samplers.RandomSampler(seed=seed)
        searcher = OptunaSearch(metric=METRIC, mode=MODE, sampler=sampler)
        scheduler = FIFOScheduler()
    return {
        "search_alg": ConcurrencyLimiter(searcher, max_concurrent=tune_settings.max_concurrent),
        "scheduler": scheduler,
        "num_samples": tune_settings.num_samples,
        "metric": METRIC,
        "mode": MODE,
    }


def gp_sampler(seed: int, samples: int) -> Any:
    """Optuna's GPSampler with TPE's random start (the same seeded draws, as many of them).

    It models finished trials only (ASHA's stopped ones are PRUNED), so its start lasts until
    ``startup_trials(samples)`` trials have run to the end.
    """
    import optuna

    from ctray.tune.study import startup_trials

    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials(samples))


def search_space() -> Any:
    """The family's search space (``search_spaces/pix2pix.yaml``) with ``PINNED`` fixed."""
    import dataclasses

    from ctray.tune.search_space import load_search_space

    space = load_search_space(FAMILY)
    params = {k: v for k, v in space.params.items() if k not in PINNED}
    return dataclasses.replace(space, base={**space.base, **PINNED}, params=params)


def run_search(name: str, seed: int, settings: Settings, trainable: Any, root: Path) -> Search:
    """One Tune run; the results in arrival order come from a driver-side callback."""
    from ray import tune

    space = search_space()
    search = Search(name=name, seed=seed)

    class Arrivals(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            search.started.append(trial.trial_id)

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            search.results.append((trial.trial_id, float(result[METRIC])))

    tuner = tune.Tuner(
        trainable,
        param_space=space.tune_space(),
        tune_config=tune.TuneConfig(
            reuse_actors=True, **searchers(name, seed, settings, dict(space.base))
        ),
        run_config=tune.RunConfig(
            name=f"{name}-{seed}",
            storage_path=str(root / "tune"),
            verbose=0,
            callbacks=[Arrivals()],
        ),
    )
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error]
    if errors:
        raise RuntimeError(
            f"{name} search (seed {seed}): {len(errors)} trial(s) failed: {errors[0]}"
        )
    return search


# --------------------------------------------------------------------------- report


def table(comparisons: Sequence[Comparison], searches: dict[tuple[str, int], Search]) -> str:
    head = (
        "| seed | random's best mae_hu | random: trial-epochs to it | ctray: trial-epochs to it "
        "| ratio | ctray's best | trial-epochs run (ctray / random) |\n"
        "|---:|---:|---:|---:|---:|---:|---|"
    )
    rows = []
    for c in comparisons:
        mine, theirs = searches[("ctray", c.seed)], searches[("random", c.seed)]
        reached = str(c.ctray) if c.ctray is not None else f"never (charged {c.budget})"
        rows.append(
            f"| {c.seed} | {c.target:.2f} | {c.random} | {reached} | "
            f"{c.ctray_cost / c.random:.2f} | {mine.best():.2f} | "
            f"{mine.trial_epochs} / {theirs.trial_epochs} |"
        )
    return "\n".join([head, *rows])


def notes(
    comparisons: Sequence[Comparison],
    searches: dict[tuple[str, int], Search],
    settings: Settings,
    load: tuple[str, str],
) -> str:
    spent = [searches[("ctray", c.seed)].trial_epochs for c in comparisons]
    full = settings.samples * settings.epochs
    reached = sum(c.ctray is not None for c in comparisons)
    per_seed = [c.ctray_cost / c.random for c in comparisons]
    from ctray.tune.study import startup_trials

    startup = startup_trials(settings.samples)
    return "\n".join(
        [
            f"- ASHA: {asha_note(settings)}.",
            f"- ctray reached random search's best in {reached} of {len(comparisons)} seed(s); "
            f"per-seed ratios {', '.join(f'{r:.2f}' for r in per_seed)} (median "
            f"{statistics.median(per_seed):.2f}); 90 % bootstrap interval of the ratio over "
            "the seeds {:.2f}-{:.2f}.".format(*bootstrap_interval(comparisons)),
            f"- Whole searches: ctray ran {statistics.fmean(spent):.0f} trial-epochs on average "
            f"(ASHA stopped trials at its rungs), random search {full}.",
            f"- Sampler: {sampler_note(settings)}. " + start_note(settings, startup),
            start_cost_note(comparisons, searches, startup),
            f"- {load_note(*load)}; the counts above do not depend on speed (seeded trials), "
            "only the arrival order of concurrent trials does.",
        ]
    )


def start_cost_note(
    comparisons: Sequence[Comparison], searches: dict[tuple[str, int], Search], startup: int
) -> str:
    """What the first ``startup`` (random) trials cost against the 1/3 goal (why a small
    budget caps the ratio)."""
    start = statistics.fmean(
        searches[("ctray", c.seed)].epochs_of_first(startup) for c in comparisons
    )
    third = statistics.fmean(c.random for c in comparisons) / 3
    left = (
        f"leaves {third - start:.0f} trial-epochs after it"
        if third > start
        else "is spent before the random start ends"
    )
    return (
        f"- Random start: ctray's first {startup} trials (random draws) ran {start:.0f} "
        f"trial-epochs on average. Random search reached its best after "
        f"{3 * third:.0f} on average; a third of that {left}."
    )


def start_note(settings: Settings, startup: int) -> str:
    """How the ctray side's sampler starts (``startup`` random trials), and why the pair of
    searches is matched there."""
    common = (
        "with a `RandomSampler` of the same seed: those are the configurations random search "
        "draws too (checked with Optuna's `ask()` on this space), so the pair is matched "
    )
    if settings.sampler == "gp":
        return (
            f"It draws at random until {startup} trials have finished (it models finished "
            f"trials only, not ASHA's PRUNED ones) {common}until then."
        )
    return (
        f"TPE draws its first {startup} trials at random (`n_startup_trials` = "
        "`ctray.tune.study.startup_trials(num_samples)`; Optuna's default is 10) "
        f"{common}and up to trial {startup} differs only by ASHA's early stopping; TPE steers "
        f"the last {max(settings.samples - startup, 0)} of {settings.samples}."
    )


def sampler_note(settings: Settings) -> str:
    """The ctray side's sampler, in words."""
    if settings.sampler == "gp":
        return "Optuna `GPSampler` behind `StudySearch` (not ctray.tune's default, TPE)"
    return "Optuna TPE (ctray.tune's default)"


def asha_note(settings: Settings) -> str:
    """ASHA's settings of the run, in words."""
    from ctray.tune.runner import TuneSettings

    defaults = TuneSettings()
    grace = settings.grace_period or defaults.grace_period
    factor = settings.reduction_factor or defaults.reduction_factor
    changed = (grace, factor) != (defaults.grace_period, defaults.reduction_factor)
    return f"grace period {grace}, reduction factor {factor}" + (
        " (not ctray.tune's defaults)" if changed else " (ctray.tune's defaults)"
    )


def doc_section(
    settings: Settings, table_md: str, notes_md: str, result: str, seconds: float, load: tuple
) -> str:
    seeds = " ".join(map(str, settings.seeds))
    flags = {
        "--quick": settings.quick,
        f"--seeds {seeds}": settings.seeds != Settings().seeds and not settings.quick,
        f"--grace-period {settings.grace_period}": settings.grace_period,
        f"--reduction-factor {settings.reduction_factor}": settings.reduction_factor,
        f"--samples {settings.samples}": settings.samples != Settings().samples
        and not settings.quick,
        f"--sampler {settings.sampler}": settings.sampler != Settings().sampler,
    }
    command = " ".join(["python benchmarks/bench_hpo.py", *(f for f, on in flags.items() if on)])
    return f"""{DOC_HEADING}

Generated by `{command}` on {dt.date.today().isoformat()}; machine:
{machine("ray", "optuna", "torch")}. Total run {seconds:.0f}s; load average (1 min)
{load[0]} at start, {load[1]} at end.

Objective: {FAMILY} `debug` preset on {SLICE_PX} px axial slices of {settings.phantoms}
phantom pairs ({settings.slices} slices each), search space `search_spaces/{FAMILY}.yaml`
with {", ".join(f"`{k}={v}`" for k, v in PINNED.items())} pinned, metric `{METRIC}` after every
epoch; each trial trains in its Tune trial process (1 torch thread, seeded). Budget per search:
{settings.samples} trials of at most {settings.epochs} epochs, {settings.max_concurrent} at a time;
ASHA {asha_note(settings)}; sampler {sampler_note(settings)};
seeds {", ".join(map(str, settings.seeds))}.
`ctray` = `StudySearch` ({settings.sampler.upper()}) + `ASHAScheduler(**asha_args(...))` as
`run_tune` builds them;
`random` = Optuna `RandomSampler`, every trial to the end. Cost = trial-epochs reported (in
arrival order) until the running best reaches random search's best.

{table_md}

`{result}`

{notes_md}
"""


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (~1 minute idle)")
    parser.add_argument("--seeds", type=int, nargs="+", help="one search pair per seed")
    parser.add_argument("--samples", type=int, help="trials per search")
    parser.add_argument("--epochs", type=int, help="epochs per trial (ASHA's max_t)")
    parser.add_argument("--grace-period", type=int, help="ASHA grace period (TuneSettings)")
    parser.add_argument("--reduction-factor", type=int, help="ASHA reduction factor")
    parser.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default=Settings().sampler,
        help="the ctray side's Optuna sampler",
    )
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown to update")
    parser.add_argument("--no-doc", action="store_true", help="do not update the markdown")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else Settings()
    settings = Settings(
        seeds=tuple(args.seeds or base.seeds),
        samples=args.samples or base.samples,
        epochs=args.epochs or base.epochs,
        max_concurrent=base.max_concurrent,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        sampler=args.sampler,
        phantoms=base.phantoms,
        slices=base.slices,
        batch=base.batch,
        quick=base.quick,
    )
    if settings.samples < 2 or settings.epochs < 1:
        parser.error("need --samples >= 2 and --epochs >= 1")
    return settings, None if args.no_doc else args.doc


def start_ray() -> None:
    """A local session with more logical CPUs than cores, no worker logs on this terminal."""
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, logging_level="WARNING")


def main(argv: Sequence[str] | None = None) -> int:
    from ray import tune

    from ctray.data.shards import load_manifest
    from ctray.registry import DataInfo

    settings, doc = parse_args(argv)
    started = time.perf_counter()
    load_start = load_average()
    print(f"load average (1 min) at start: {load_start}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="ctray-bench-hpo-"))
    searches: dict[tuple[str, int], Search] = {}
    try:
        data = build_data(root / "shards", settings)
        info = DataInfo.from_manifest(load_manifest(root / "shards")).as_dict()
        print(f"data ready after {time.perf_counter() - started:.0f}s", flush=True)
        start_ray()
        trainable = tune.with_parameters(
            objective,
            base=dict(search_space().base),
            data=data,
            data_info=info,
            epochs=settings.epochs,
            batch=settings.batch,
        )
        for seed in settings.seeds:
            for name in ("ctray", "random"):
                start = time.perf_counter()
                search = run_search(name, seed, settings, trainable, root)
                searches[(name, seed)] = search
                print(
                    f"seed {seed} {name}: {search.trials} trials, {search.trial_epochs} "
                    f"trial-epochs, best {METRIC} {search.best():.2f} "
                    f"({time.perf_counter() - start:.0f}s)",
                    flush=True,
                )
    finally:
        stop_ray()
        shutil.rmtree(root, ignore_errors=True)

    budget = settings.samples * settings.epochs
    comparisons = [
        compare(searches[("ctray", s)], searches[("random", s)], budget) for s in settings.seeds
    ]
    result = f"RESULT hpo_epochs_ratio={epochs_ratio(comparisons):.2f}"
    load = (load_start, load_average())
    table_md = table(comparisons, searches)
    notes_md = notes(comparisons, searches, settings, load)
    print(f"load average (1 min) at end: {load[1]}")
    print()
    print(table_md)
    print()
    print(notes_md)
    if doc is not None:
        section = doc_section(
            settings, table_md, notes_md, result, time.perf_counter() - started, load
        )
        write_doc(doc, DOC_HEADING, section)
        print(f"\nwrote {doc}")
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
