"""ServeConfig: everything `ctray serve` can be told, validated before Ray is touched.

Kept free of Ray and torch imports so the CLI can reject a bad flag in milliseconds.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctray.config import ConfigError

MB = 1 << 20
# Environment variable holding the bearer token, so it stays out of shell history and `ps`.
TOKEN_ENV = "CTRAY_SERVE_TOKEN"
# About a 512 x 512 x 600 CT: a bigger upload is almost always a mistake.
DEFAULT_MAX_VOXELS = 160_000_000
# What a replica holds besides admitted requests: Python, torch, MONAI, Ray and FastAPI
# (measured: about 550 MiB resident for an idle replica), plus the models' weights on top.
REPLICA_BASE_MB = 1024
# Requests beyond the admission queue still reach the replica (and get a quick 503) as long as
# Serve's own per-replica limit is higher; this is the room left for that and for /healthz.
ONGOING_HEADROOM = 16


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """How to host a folder of exported models.

    Attributes:
        models: folder searched (recursively) for exported model directories.
        host/port: where the HTTP proxy listens; 127.0.0.1 keeps it off the network.
        token: bearer token required on every route but /healthz (None = open, which only a
            loopback ``host`` allows unless ``insecure``).
        insecure: allow listening on a non-loopback address without a token (refused
            otherwise: anyone on the network could use the models).
        max_body_mb: largest accepted upload (413 beyond it).
        max_voxels: largest volume a NIfTI header may claim (413 beyond it, before allocating).
        replicas: replicas of the deployment; with ``max_replicas`` > replicas, the minimum of
            an autoscaling range instead.
        num_cpus_per_replica / num_gpus_per_replica: Ray resources per replica; a replica with
            a GPU runs the models on cuda, and uses that many torch threads on a CPU.
        max_batch_size: most requests that share one forward pass (adaptive batching: what
            is queued when the model becomes free goes together; a lone request goes at once).
        batch_wait_ms: longest a free model waits for requests that are already being
            received or decoded by the replica (never for requests that have not arrived).
        batching: False runs each request on its own (still one inference at a time).
        max_queue: predict requests a replica admits at once (receiving, decoding, queued,
            running); more get 503 with Retry-After.
        memory_budget_mb: working memory a replica admits at once for predict requests
            (bodies, decoded volumes, inference copies, estimated per voxel before they are
            allocated); a request that does not fit now gets 503, one that never fits 413.
            The replica reserves this plus its base from Ray (``ray_actor_options["memory"]``).
        overlap / sw_batch_size: sliding-window settings per request (a batch of n requests
            runs n * sw_batch_size windows per forward pass).
        max_views / max_view_pixels: limits of a multipart upload of X-ray views (files per
            request, pixels per view, checked before decoding).
        app_name / route_prefix: the Serve application's name and URL prefix.
    """

    models: Path
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = field(default=None, repr=False)
    insecure: bool = False
    max_body_mb: float = 256.0
    max_voxels: int = DEFAULT_MAX_VOXELS
    replicas: int = 1
    max_replicas: int | None = None
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    max_batch_size: int = 4
    batch_wait_ms: float = 20.0
    batching: bool = True
    max_queue: int = 8
    memory_budget_mb: float = 4096.0
    overlap: float = 0.25
    sw_batch_size: int = 4
    max_views: int = 16
    max_view_pixels: int = 16_000_000
    app_name: str = "ctray"
    route_prefix: str = "/"

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", Path(self.models))
        checks = [
            (1 <= self.port <= 65535, f"port must be 1..65535, got {self.port}"),
            (self.max_body_mb > 0, f"max_body_mb must be > 0, got {self.max_body_mb}"),
            (self.max_voxels >= 8, f"max_voxels must be >= 8, got {self.max_voxels}"),
            (self.replicas >= 1, f"replicas must be >= 1, got {self.replicas}"),
            (
                self.max_replicas is None or self.max_replicas >= self.replicas,
                f"max_replicas ({self.max_replicas}) must be >= replicas ({self.replicas})",
            ),
            (self.num_cpus_per_replica > 0, "num_cpus_per_replica must be > 0"),
            (self.num_gpus_per_replica >= 0, "num_gpus_per_replica must be >= 0"),
            (self.max_batch_size >= 1, f"max_batch_size must be >= 1, got {self.max_batch_size}"),
            (self.batch_wait_ms >= 0, f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}"),
            (self.max_queue >= 1, f"max_queue must be >= 1, got {self.max_queue}"),
            (
                self.memory_budget_mb >= 1,
                f"memory_budget_mb must be >= 1, got {self.memory_budget_mb}",
            ),
            (0 <= self.overlap < 1, f"overlap must be in [0, 1), got {self.overlap}"),
            (self.sw_batch_size >= 1, f"sw_batch_size must be >= 1, got {self.sw_batch_size}"),
            (self.route_prefix.startswith("/"), "route_prefix must start with '/'"),
            (self.token is None or len(self.token) >= 8, "token must have at least 8 characters"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"serve config: {message}")
        if self.token is None and not self.insecure and not is_loopback(self.host):
            raise ConfigError(
                f"serve config: refusing to listen on {self.host} without a token: anyone who "
                f"can reach this machine could use the models. Set ${TOKEN_ENV} (or --token), "
                "or pass --insecure to serve without one on purpose"
            )

    @property
    def memory_budget_bytes(self) -> int:
        return math.ceil(self.memory_budget_mb * MB)

    def replica_memory_bytes(self, model_bytes: int) -> int:
        """Memory a replica reserves from Ray: its admission budget, base and model weights."""
        return self.memory_budget_bytes + REPLICA_BASE_MB * MB + int(model_bytes)

    @property
    def max_body_bytes(self) -> int:
        return math.ceil(self.max_body_mb * MB)

    @property
    def url(self) -> str:
        prefix = "" if self.route_prefix == "/" else self.route_prefix.rstrip("/")
        return f"http://{self.host}:{self.port}{prefix}"

    def token_digest(self) -> bytes | None:
        """SHA-256 of the token: replicas keep only this, so the secret is not in Serve state."""
        return None if self.token is None else hashlib.sha256(self.token.encode()).digest()

    def deployment_options(self, model_bytes: int = 0) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options`` (replicas, resources, queue size);
        ``model_bytes``: the weights every replica loads."""
        options: dict[str, Any] = {
            "name": "CtrayModels",
            "max_ongoing_requests": self.max_queue + ONGOING_HEADROOM,
            "ray_actor_options": {
                "num_cpus": self.num_cpus_per_replica,
                "num_gpus": self.num_gpus_per_replica,
                "memory": self.replica_memory_bytes(model_bytes),
            },
        }
        if self.max_replicas is not None and self.max_replicas > self.replicas:
            options["autoscaling_config"] = {
                "min_replicas": self.replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": max(2, self.max_batch_size),
            }
        else:
            options["num_replicas"] = self.replicas
        return options


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (127.0.0.0/8, ::1,
    localhost); any other name may resolve to a public interface, so it counts as public."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def token_from(given: str | None) -> str | None:
    """The bearer token: ``given`` (a --token flag), else ``$CTRAY_SERVE_TOKEN``, else None."""
    return given or os.environ.get(TOKEN_ENV) or None
