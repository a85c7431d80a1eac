"""ServeConfig: everything `ctray serve` can be told, validated before Ray is touched.

Kept free of Ray and torch imports so the CLI can reject a bad flag in milliseconds.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctray.config import ConfigError

MB = 1 << 20
# About a 512 x 512 x 600 CT: a bigger upload is almost always a mistake, and every voxel costs
# several float32 copies inside a replica.
# Environment variable holding the bearer token, so it stays out of shell history and `ps`.
TOKEN_ENV = "CTRAY_SERVE_TOKEN"
DEFAULT_MAX_VOXELS = 160_000_000


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """How to host a folder of exported models.

    Attributes:
        models: folder searched (recursively) for exported model directories.
        host/port: where the HTTP proxy listens; 127.0.0.1 keeps it off the network.
        token: bearer token required on every route but /healthz (None = open).
        max_body_mb: largest accepted upload (413 beyond it).
        max_voxels: largest volume a NIfTI header may claim (413 beyond it, before allocating).
        replicas: replicas of the deployment; with ``max_replicas`` > replicas, the minimum of
            an autoscaling range instead.
        num_cpus_per_replica / num_gpus_per_replica: Ray resources per replica; a replica with
            a GPU runs the models on cuda, and uses that many torch threads on a CPU.
        max_batch_size / batch_wait_ms: Serve dynamic batching of concurrent requests.
        batching: False runs each request on its own (still one inference at a time).
        max_ongoing_requests: requests a replica holds at once (queued + running).
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
    max_body_mb: float = 256.0
    max_voxels: int = DEFAULT_MAX_VOXELS
    replicas: int = 1
    max_replicas: int | None = None
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    max_batch_size: int = 4
    batch_wait_ms: float = 20.0
    batching: bool = True
    max_ongoing_requests: int = 16
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
            (
                self.max_ongoing_requests >= 1,
                f"max_ongoing_requests must be >= 1, got {self.max_ongoing_requests}",
            ),
            (0 <= self.overlap < 1, f"overlap must be in [0, 1), got {self.overlap}"),
            (self.sw_batch_size >= 1, f"sw_batch_size must be >= 1, got {self.sw_batch_size}"),
            (self.route_prefix.startswith("/"), "route_prefix must start with '/'"),
            (self.token is None or len(self.token) >= 8, "token must have at least 8 characters"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"serve config: {message}")

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

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options`` (replicas, resources, queue size)."""
        options: dict[str, Any] = {
            "name": "CtrayModels",
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {
                "num_cpus": self.num_cpus_per_replica,
                "num_gpus": self.num_gpus_per_replica,
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
