"""Admission control: how many predict requests a replica holds, and how much memory they use.

A replica admits at most ``max_requests`` predict requests at once, and reserves the bytes they
hold within ``max_bytes``. Bytes are reserved *before* they are allocated, from what is known
first: the declared body size, then each chunk as it streams in, then the NIfTI header's voxel
count (decoding), then the model's working grid (inference). A request that does not fit now is
answered 503 with ``Retry-After``; one that could never fit, 413 (retrying cannot help).
Requests are refused, never queued without bound: memory stays within the budget whatever is
uploaded, and the replica keeps answering.

No Ray here: the replica calls it from its event loop and from decoding threads (hence the lock).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from nibabel import orientations as nio

from ctray.registry import DataInfo
from ctray.serve.errors import ApiError

MB = 1 << 20
# Bytes per voxel, from the peak resident memory (VmHWM) around decode_volume and
# predict_volumes on the phase-GAN debug model, rounded up (docs/serving.md, "Memory").
# Decoding: the decompressed file, the array nibabel reads and its float32 copy.
DECODE_BYTES_PER_VOXEL = 16
# Inference, per voxel of the request's own grid (input, or the finer output grid): float32
# copies, reorientation, and the float coordinate grid of resampling back onto it.
GRID_BYTES_PER_VOXEL = 64
# Inference, per voxel of the model's working grid (the input resampled to the model's
# spacing): the resampled, windowed and tensor copies, the stitched output and its weights.
WORK_BYTES_PER_VOXEL = 48
# Bounds of the Retry-After estimate (seconds).
RETRY_AFTER_RANGE = (1, 60)


def decode_bytes(shape: Sequence[int]) -> int:
    """Memory to decode a NIfTI whose header claims ``shape``."""
    return DECODE_BYTES_PER_VOXEL * math.prod(int(n) for n in shape)


def working_voxels(data: DataInfo, shape: Sequence[int], affine: np.ndarray) -> int:
    """Voxels of the grid the model computes on: the volume resampled to the model's spacing
    (each voxel axis matched to the RAS axis it becomes), or for a 2D slice model each axial
    slice resized to the patch. A few large voxels can make a huge grid: 100^3 voxels of
    100 mm are 1250^3 at 8 mm."""
    if data.resize_inplane:
        return int(data.patch_size[0]) * int(data.patch_size[1]) * max(int(n) for n in shape)
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ras_axis = nio.io_orientation(affine)[:, 0]
    voxels = 1
    for n, s, axis in zip(shape, spacing, ras_axis, strict=True):
        target = data.spacing[int(axis)] if np.isfinite(axis) else max(data.spacing)
        voxels *= max(1, math.ceil(int(n) * float(s) / float(target)))
    return voxels


def inference_bytes(data: DataInfo, shape: Sequence[int], affine: np.ndarray) -> int:
    """Memory to predict one decoded volume of ``shape`` (input and output included)."""
    scale = math.prod(int(s) for s in data.output_scale)
    grid = math.prod(int(n) for n in shape) * max(1, scale)
    work = working_voxels(data, shape, affine) * (1 + scale)
    return GRID_BYTES_PER_VOXEL * grid + WORK_BYTES_PER_VOXEL * work


def views_bytes(views: Sequence[np.ndarray], out_shape: Sequence[int]) -> int:
    """Memory to predict a CT from decoded X-ray views: the views (and their normalised
    copies) plus the output grid."""
    pixels = sum(int(v.size) for v in views)
    return 2 * 4 * pixels + GRID_BYTES_PER_VOXEL * math.prod(int(n) for n in out_shape)


class Admission:
    """The requests a replica has admitted and the bytes they reserved (see the module doc)."""

    def __init__(self, *, max_requests: int, max_bytes: int) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._tickets: set[Ticket] = set()
        self._bytes = 0
        self._seconds: float | None = None  # moving average of admitted requests' durations

    def enter(self) -> Ticket:
        """Admit one request (use as ``with admission.enter() as ticket``); 503 when full."""
        with self._lock:
            if len(self._tickets) >= self.max_requests:
                raise self._busy(
                    f"{len(self._tickets)} of {self.max_requests} predict requests are already "
                    "admitted on this replica (queue full)"
                )
            ticket = Ticket(self)
            self._tickets.add(ticket)
            return ticket

    def arriving(self) -> int:
        """Admitted requests still being received or decoded: about to want the model."""
        with self._lock:
            return sum(1 for t in self._tickets if t.stage == "arriving")

    def retry_after_s(self) -> int:
        """When to try again: about one admitted request's duration, within RETRY_AFTER_RANGE."""
        lo, hi = RETRY_AFTER_RANGE
        return min(hi, max(lo, math.ceil(self._seconds or lo)))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": len(self._tickets),
                "max_requests": self.max_requests,
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "retry_after_s": self.retry_after_s(),
            }

    def _busy(self, why: str) -> ApiError:
        seconds = self.retry_after_s()
        return ApiError(
            "overloaded", f"server busy: {why}; retry after {seconds} s", retry_after_s=seconds
        )

    def _resize(self, ticket: Ticket, part: str, nbytes: int, what: str) -> None:
        with self._lock:
            held = ticket.parts.get(part, 0)
            grow = nbytes - held
            total = sum(ticket.parts.values()) + grow
            if grow > 0 and total > self.max_bytes:
                code = "body_too_large" if part == "body" else "volume_too_large"
                raise ApiError(
                    code,
                    f"{what} needs {_mib(total)} of working memory, more than this server "
                    f"admits for all requests together ({_mib(self.max_bytes)}); send a smaller "
                    "(cropped or downsampled) volume, or raise --memory-budget-mb",
                )
            if grow > 0 and self._bytes + grow > self.max_bytes:
                raise self._busy(
                    f"{what} needs {_mib(total)} of working memory and "
                    f"{_mib(self.max_bytes - self._bytes + held)} of the replica's "
                    f"{_mib(self.max_bytes)} are free"
                )
            ticket.parts[part] = nbytes
            self._bytes += grow

    def _leave(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket not in self._tickets:
                return
            self._tickets.discard(ticket)
            self._bytes -= sum(ticket.parts.values())
            ticket.parts.clear()
            seconds = time.monotonic() - ticket.started
            previous = seconds if self._seconds is None else self._seconds
            self._seconds = 0.8 * previous + 0.2 * seconds


class Ticket:
    """One admitted request: the bytes it holds, by part (body, decode, inference)."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.parts: dict[str, int] = {}
        self.stage = "arriving"
        self.started = time.monotonic()

    def hold(self, part: str, nbytes: int, *, what: str) -> None:
        """Set ``part``'s reservation to ``nbytes`` (growing or shrinking it); ``what`` names
        the request in the error: 503 if the budget has no room now, 413 if it never will."""
        self._admission._resize(self, part, max(0, int(nbytes)), what)

    def queued(self) -> None:
        """The request now waits for (or runs on) the model: it no longer counts as arriving."""
        self.stage = "queued"

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self._admission._leave(self)


def _mib(nbytes: int) -> str:
    return f"{nbytes / MB:,.0f} MiB"
