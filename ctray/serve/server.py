"""Starting and stopping the Serve application (used by `ctray serve`, the tests and benchmarks)."""

from __future__ import annotations

import logging
import sys
import time

from ctray.config import ConfigError
from ctray.serve.catalog import discover, model_bytes
from ctray.serve.config import MB, ServeConfig

log = logging.getLogger(__name__)


def start(config: ServeConfig, *, address: str | None = None) -> str:
    """Deploy ``config`` (joining Ray at ``address``, or a local session) and return its URL.

    HTTP host/port are set by ``serve.start``; they apply when this call starts Serve. A Serve
    instance that is already running keeps its own (Ray logs a warning), so on a shared cluster
    pick the port when Serve is first started.
    """
    from ray import serve

    from ctray.serve.app import build_app
    from ctray.session import init_ray

    # a missing folder or bad model.json fails before Ray starts
    reserve = config.replica_memory_bytes(model_bytes(discover(config.models).values()))
    init_ray(address)
    check_memory(reserve, largest_node_memory())
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(
        build_app(config),
        name=config.app_name,
        route_prefix=config.route_prefix,
        blocking=False,
    )
    return config.url


def largest_node_memory() -> int:
    """The most ``memory`` resource any live node of the Ray cluster offers (bytes)."""
    import ray

    return max(
        (int(n["Resources"].get("memory", 0)) for n in ray.nodes() if n.get("Alive")), default=0
    )


def check_memory(reserve: int, available: int) -> None:
    """Refuse a replica no node can hold (Serve would wait for it forever) with the way out."""
    if reserve > available:
        raise ConfigError(
            f"a replica reserves {reserve / MB:,.0f} MiB (--memory-budget-mb plus the runtime "
            f"and the models), but the largest Ray node offers {available / MB:,.0f} MiB; "
            "lower --memory-budget-mb, or use a node with more memory"
        )


def stop(config: ServeConfig, *, shutdown: bool = True) -> None:
    """Delete the application; with ``shutdown`` also stop Serve (its proxy and controller)."""
    from ray import serve

    try:
        serve.delete(config.app_name)
    finally:
        if shutdown:
            serve.shutdown()


def serve_forever(config: ServeConfig, *, address: str | None = None) -> int:
    """Deploy, print the URL, and keep serving until Ctrl-C; returns a process exit code."""
    try:
        url = start(config, address=address)
    except RuntimeError as err:  # a replica could not start (its traceback is in the log above)
        print(f"error: could not deploy {config.models}: {err}", file=sys.stderr)
        stop(config, shutdown=address is None)
        return 1
    if config.token:
        auth = "bearer token required"
    elif config.insecure:
        auth = f"NO TOKEN, --insecure: anyone who can reach {config.host} can use the models"
    else:
        auth = "no token: loopback only"
    print(f"ctray serve: models from {config.models} at {url}  ({auth}; Ctrl-C to stop)")
    print(f"  try: curl -sS {url}/healthz", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping ...", file=sys.stderr)
    finally:
        stop(config, shutdown=address is None)
    return 0
