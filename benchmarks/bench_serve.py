"""Serving benchmark: closed-loop HTTP load against `ctray serve` vs the same model in process.

Starts a local Ray session and one Serve instance on 127.0.0.1 with two applications hosting
the same small phase-GAN (debug preset, untrained weights: the cost is the same as a trained
one): ``/batched`` (adaptive batching) and ``/unbatched`` (one request per forward pass). Then:

1. latency with 1 client, each app, interleaved with ``predict_volumes`` called in this process
   on the same volume with the same torch thread count as a replica (the Serve overhead; the
   batched app must not wait for a batch that never comes);
2. K closed-loop clients (threads, one httpx connection each, default 8), a fixed number of
   requests each (and a time bound), per app, in rounds interleaved with in-process
   ``predict_volumes`` calls on batches of the size the batched app formed: requests/s.

The last line is ``RESULT batched_overhead_p50_1client=<x> serve_vs_inprocess_8clients=<y>``:
x = batched app p50 / in-process p50 at 1 client (goal <= 1.15), y = batched app requests/s at
K clients / in-process volumes/s at the same batch size (goal >= 0.95).

    python benchmarks/bench_serve.py                 # ~3-5 minutes on 2 cores
    python benchmarks/bench_serve.py --clients 16 --requests 8 --patch 32

Ray's workers, hence the replicas, run at nice +15 by default: on a machine shared with other
busy programs they get much less CPU than this process (measured at load average 15-50: the
replica's inference 17-62 % slower than in process; within noise with niceness 0). The
benchmark therefore starts Ray with ``RAY_worker_niceness=0`` unless told otherwise.

The server's soak (16 clients, mixed valid and fuzzed uploads, 2 minutes) is a test:
``pytest tests/integration/test_serve_fuzz_e2e.py -m slow -k soak -s``.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np


@dataclass(frozen=True, kw_only=True)
class Load:
    """One measured phase: latencies (s) of successful requests, wall time, errors, and per
    request the batch it ran in and that batch's inference time in the replica (s)."""

    latencies: list[float]
    wall_s: float
    errors: int
    batch_sizes: list[int]
    inference_s: list[float]

    def merge(self, other: Load) -> Load:
        return Load(
            latencies=self.latencies + other.latencies,
            wall_s=self.wall_s + other.wall_s,
            errors=self.errors + other.errors,
            batch_sizes=self.batch_sizes + other.batch_sizes,
            inference_s=self.inference_s + other.inference_s,
        )

    @property
    def work_s(self) -> float:
        """Seconds the replica's model computed (each batch once: its requests share it)."""
        return sum(t / b for t, b in zip(self.inference_s, self.batch_sizes, strict=True))

    @property
    def busy(self) -> float:
        """Fraction of the wall time the replica's model was computing."""
        return self.work_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def per_volume_s(self) -> float:
        """The replica's mean inference seconds per volume over the batches it ran."""
        return self.work_s / len(self.inference_s) if self.inference_s else float("nan")

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s > 0 else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def export_untrained(out: Path, *, family: str, preset: str, patch: int, spacing: float) -> Path:
    """A model directory with freshly initialised weights of a family preset (no training)."""
    import torch

    from ctray.config import from_dict, to_dict
    from ctray.modeldir import export_model
    from ctray.registry import DataInfo, get_family

    spec = get_family(family)
    cfg = from_dict(spec.config_cls, spec.preset(preset))
    window = {"lo": -1000.0, "hi": 1000.0}
    info = DataInfo(patch_size=(patch,) * 3, spacing=(spacing,) * 3, window=window)
    torch.manual_seed(0)
    models = spec.build_models(cfg, info)
    return export_model(
        out,
        spec=spec,
        family_config=to_dict(cfg),
        data={"patch_size": [patch] * 3, "spacing": [spacing] * 3, "window": window},
        state={k: m.state_dict() for k, m in models.items()},
        metrics={},
        source={"benchmark": "bench_serve.py", "preset": preset},
    )


def closed_loop(
    url: str, body: bytes, *, clients: int, requests: int, max_seconds: float, timeout: float
) -> Load:
    """K threads, each sending its next request as soon as the previous one is answered."""
    deadline = time.perf_counter() + max_seconds
    lock = threading.Lock()
    latencies: list[float] = []
    batch_sizes: list[int] = []
    inference_s: list[float] = []
    errors = [0]
    start_gate = threading.Barrier(clients)

    def worker(_: int) -> None:
        with httpx.Client(timeout=timeout) as http:
            start_gate.wait()
            for _ in range(requests):
                if time.perf_counter() > deadline:
                    return
                t = time.perf_counter()
                try:
                    r = http.post(url, content=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                dt = time.perf_counter() - t
                with lock:
                    if ok:
                        latencies.append(dt)
                        batch_sizes.append(int(r.headers["x-ctray-batch-size"]))
                        inference_s.append(float(r.headers["x-ctray-inference-ms"]) / 1e3)
                    else:
                        errors[0] += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(worker, range(clients)))
    return Load(
        latencies=latencies,
        wall_s=time.perf_counter() - t0,
        errors=errors[0],
        batch_sizes=batch_sizes,
        inference_s=inference_s,
    )


class DirectRunner:
    """``predict_volumes`` in this process, as a replica runs it (same settings and threads)."""

    def __init__(self, model_dir: Path, volume: Any, phase: str, *, threads: int) -> None:
        import torch

        from ctray.modeldir import load_model

        torch.set_num_threads(threads)
        self.model = load_model(model_dir)
        self.volume = volume
        self.cond = self.model.spec.parse_conditioning({"target_phase": phase})
        self.batch(1)  # warm-up

    def batch(self, size: int) -> float:
        """Seconds for one call on ``size`` copies of the volume (a replica's batch)."""
        from ctray.inference import predict_volumes

        t = time.perf_counter()
        predict_volumes(
            self.model, [self.volume] * size, [self.cond] * size, sw_batch_size=4 * size
        )
        return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="per client, per app and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved load rounds")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="per load round")
    ap.add_argument("--single", type=int, default=10, help="1-client requests per app")
    ap.add_argument("--size", type=int, default=64, help="volume edge in voxels")
    ap.add_argument("--patch", type=int, default=16, choices=(16, 32))
    ap.add_argument("--spacing", type=float, default=8.0, help="model (and volume) spacing, mm")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--batch-wait-ms", type=float, default=20.0, help="see docs/serving.md")
    ap.add_argument("--replica-cpus", type=float, default=1.0, help="= torch threads per replica")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument(
        "--worker-niceness",
        type=int,
        default=0,
        help="RAY_worker_niceness of the local Ray session (see the module docstring)",
    )
    args = ap.parse_args(argv)
    # Ray starts its workers (the replicas, the proxy) at nice +15 by default; on a machine
    # shared with other busy programs they then get a fraction of the CPU the in-process
    # reference gets, which measures the OS scheduler, not Serve. 0: the same priority.
    os.environ["RAY_worker_niceness"] = str(args.worker_niceness)  # noqa: SIM112 (Ray's spelling)

    from ray import serve

    from ctray.data.nifti import nifti_bytes
    from ctray.data.phantom import PhantomConfig, make_phantom
    from ctray.serve.config import ServeConfig
    from ctray.serve.server import start, stop

    load_at_start = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    model_dir = export_untrained(
        tmp / "models" / "bench",
        family="phase_gan",
        preset="debug",
        patch=args.patch,
        spacing=args.spacing,
    )
    volume, _ = make_phantom(
        0, config=PhantomConfig(shape=(args.size,) * 3, spacing=(args.spacing,) * 3)
    )
    body = nifti_bytes(volume.array, volume.affine)
    port = _free_port()
    common = dict(
        models=tmp / "models",
        port=port,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        num_cpus_per_replica=args.replica_cpus,
        max_queue=max(16, 2 * args.clients),
        memory_budget_mb=2048,
    )
    apps = {
        "batched": ServeConfig(**common, app_name="bench-batched", route_prefix="/batched"),
        "unbatched": ServeConfig(
            **common, batching=False, app_name="bench-unbatched", route_prefix="/unbatched"
        ),
    }
    t0 = time.perf_counter()
    urls = {name: start(cfg) for name, cfg in apps.items()}
    print(f"Serve up in {time.perf_counter() - t0:.0f} s on 127.0.0.1:{port}", flush=True)
    predict = {
        name: f"{url}/v1/models/bench/predict?target_phase=venous" for name, url in urls.items()
    }
    try:
        for url in predict.values():  # warm-up: first requests load code paths and caches
            closed_loop(url, body, clients=1, requests=2, max_seconds=60, timeout=args.timeout)
        # 1 client: direct / unbatched / batched requests interleaved, so that the load other
        # processes put on the machine hits all three alike
        direct_run = DirectRunner(model_dir, volume, "venous", threads=int(args.replica_cpus))
        direct: list[float] = []
        single_lat: dict[str, list[float]] = {name: [] for name in urls}
        single_inf: dict[str, list[float]] = {name: [] for name in urls}
        with httpx.Client(timeout=args.timeout) as http:
            for _ in range(args.single):
                direct.append(direct_run.batch(1))
                for name, url in predict.items():
                    t = time.perf_counter()
                    r = http.post(url, content=body)
                    r.raise_for_status()
                    single_lat[name].append(time.perf_counter() - t)
                    single_inf[name].append(float(r.headers["x-ctray-inference-ms"]) / 1e3)
        single = {
            name: Load(
                latencies=lat,
                wall_s=sum(lat),
                errors=0,
                batch_sizes=[1] * len(lat),
                inference_s=single_inf[name],
            )
            for name, lat in single_lat.items()
        }
        # K clients: rounds alternate unbatched / batched / in-process for the same reason; the
        # in-process batches have the size the batched app formed in that round
        loaded: dict[str, Load] = {}
        inproc_s = 0.0
        inproc_volumes = 0
        inproc_sizes: set[int] = set()
        for _ in range(args.rounds):
            for name in ("unbatched", "batched"):
                load = closed_loop(
                    predict[name],
                    body,
                    clients=args.clients,
                    requests=args.requests,
                    max_seconds=args.max_seconds,
                    timeout=args.timeout,
                )
                loaded[name] = load if name not in loaded else loaded[name].merge(load)
            size = round(float(np.mean(load.batch_sizes))) if load.batch_sizes else 1
            inproc_sizes.add(size)
            for _ in range(max(1, len(load.latencies) // size)):
                inproc_s += direct_run.batch(size)
                inproc_volumes += size
    finally:
        for cfg in apps.values():
            stop(cfg, shutdown=False)
        serve.shutdown()
    direct_p50 = statistics.median(direct)
    windows = _windows(args.size, args.patch)
    sizes = loaded["batched"].batch_sizes
    inproc_rps = inproc_volumes / inproc_s
    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load avg (1 min) "
        f"{load_at_start:.1f} at start, {os.getloadavg()[0]:.1f} at the end; volume "
        f"{args.size}^3 at {args.spacing:g} mm, patch {args.patch}^3 ({windows} windows/request), "
        f"torch threads/replica {int(args.replica_cpus)}, max_batch_size {args.max_batch_size}, "
        f"batch_wait {args.batch_wait_ms:g} ms"
    )
    header = f"{'setting':40s} {'n':>4s} {'err':>4s} {'req/s':>7s} {'p50 ms':>8s} {'p95 ms':>8s}"
    print(header)
    print("-" * len(header))
    print(
        f"{'in-process predict_volumes, 1 volume':40s} {len(direct):4d} {0:4d} "
        f"{1 / direct_p50:7.2f} {direct_p50 * 1e3:8.0f} {np.percentile(direct, 95) * 1e3:8.0f}"
    )
    print(
        f"{'in-process, batches of the served size':40s} {inproc_volumes:4d} {0:4d} "
        f"{inproc_rps:7.2f} {'-':>8s} {'-':>8s}"
    )
    for label, load in (
        ("serve unbatched, 1 client", single["unbatched"]),
        ("serve batched, 1 client", single["batched"]),
        (f"serve unbatched, {args.clients} clients", loaded["unbatched"]),
        (f"serve batched, {args.clients} clients", loaded["batched"]),
    ):
        print(
            f"{label:40s} {len(load.latencies):4d} {load.errors:4d} {load.rps:7.2f} "
            f"{load.pct(50) * 1e3:8.0f} {load.pct(95) * 1e3:8.0f}"
        )
    print(f"batch sizes seen under load (batched app): mean {np.mean(sizes):.2f}, max {max(sizes)}")
    print(
        f"inference inside the replica, 1 client: p50 "
        f"{statistics.median(single['batched'].inference_s) * 1e3:.0f} ms (in-process "
        f"{direct_p50 * 1e3:.0f} ms); model busy under load: batched "
        f"{loaded['batched'].busy:.0%}, unbatched {loaded['unbatched'].busy:.0%} of the wall time"
    )
    print(
        f"inference per volume under load: in the batched replica "
        f"{loaded['batched'].per_volume_s * 1e3:.0f} ms, in process at batch size(s) "
        f"{', '.join(map(str, sorted(inproc_sizes)))} {inproc_s / inproc_volumes * 1e3:.0f} ms"
    )
    overhead_u = single["unbatched"].pct(50) / direct_p50
    overhead_b = single["batched"].pct(50) / direct_p50
    print(f"1-client p50 / in-process p50: unbatched {overhead_u:.3f}, batched {overhead_b:.3f}")
    print(
        f"{args.clients}-client req/s / in-process volumes/s: batched "
        f"{loaded['batched'].rps / inproc_rps:.3f}, unbatched "
        f"{loaded['unbatched'].rps / inproc_rps:.3f}"
    )
    print(
        f"RESULT batched_overhead_p50_1client={overhead_b:.3f} "
        f"serve_vs_inprocess_{args.clients}clients={loaded['batched'].rps / inproc_rps:.3f}"
    )
    return 0


def _windows(size: int, patch: int, overlap: float = 0.25) -> int:
    step = max(1, int(patch * (1 - overlap)))
    per_axis = 1 if size <= patch else -(-(size - patch) // step) + 1
    return per_axis**3


if __name__ == "__main__":
    raise SystemExit(main())
