"""Starting and stopping the Serve application (used by `ctray serve`, the tests and benchmarks)."""

from __future__ import annotations

import logging
import sys
import time

from ctray.serve.catalog import discover
from ctray.serve.config import ServeConfig

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

    discover(config.models)  # a missing folder or bad model.json fails before Ray starts
    init_ray(address)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(
        build_app(config),
        name=config.app_name,
        route_prefix=config.route_prefix,
        blocking=False,
    )
    return config.url


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
    auth = "bearer token required" if config.token else "no token (open)"
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
