"""Connecting to Ray: a local session sized for small machines, or an existing cluster."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def configure_data() -> None:
    """Ray Data settings for shard streaming (measured in benchmarks/bench_data.py).

    Ray 2.60's v2 Parquet datasource starts a pool of footer-reading actors on every
    execution; on small machines that costs 13-30 s per epoch against 1-2 s of reading, so
    ctray uses the v1 reader. Progress bars are off: the train loop prints its own progress.
    """
    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = False
    ctx.enable_progress_bars = False


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Start (or join) Ray once per process.

    A local session gets more *logical* CPUs than the machine has cores (at least 8): Ray
    Train worker groups, Tune trial drivers and Ray Data tasks each reserve CPU slots, and
    on a 2-core machine they would otherwise wait for resources forever.
    """
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            cpus = num_cpus or max(8, 4 * (os.cpu_count() or 1))
            # The dashboard (bound to 127.0.0.1) serves the state API that Ray Train's
            # PlacementGroupCleaner needs: without it, every finished or stopped trial leaks
            # its worker group's placement group and later trials wait for CPUs forever.
            ray.init(
                num_cpus=cpus,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                log_to_driver=True,
            )
    configure_data()
    log.info("Ray resources: %s", ray.cluster_resources())
