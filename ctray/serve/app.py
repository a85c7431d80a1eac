"""The Ray Serve application: one FastAPI ingress deployment hosting every model in a folder.

Request path: auth -> model lookup -> conditioning -> admission (a slot in the replica's queue)
-> body (size-limited, its bytes reserved as they arrive) -> NIfTI header (the decode's memory
reserved before any voxel is read) -> validation -> the model's working grid (reserved) ->
the adaptive batcher -> inference -> encoding. Everything a client can get wrong is refused in
the ingress, so only well-formed volumes reach the model; a full queue or memory budget is a 503
with Retry-After, never an unbounded wait (ctray.serve.admission). Inference runs on one worker
thread per replica: the event loop keeps accepting, validating and encoding requests (and
answering /healthz) while the model computes.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures (e.g.
# `request: Request`) at runtime, and Serve ships the class by value, without this module's
# globals, so string annotations could not be resolved inside a replica.
import asyncio
import logging
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ctray import __version__
from ctray.data.nifti import Volume
from ctray.inference import predict_views, predict_volumes
from ctray.modeldir import LoadedModel, load_model
from ctray.serve.admission import (
    Admission,
    Ticket,
    decode_bytes,
    inference_bytes,
    views_bytes,
)
from ctray.serve.batching import AdaptiveBatcher
from ctray.serve.catalog import describe, discover, model_bytes
from ctray.serve.config import ServeConfig
from ctray.serve.errors import ApiError
from ctray.serve.handling import (
    check_content_length,
    check_output_size,
    check_token,
    check_working_size,
    decode_volume,
    encode_volume,
    parse_conditioning,
    parse_views,
    read_body,
)

log = logging.getLogger("ctray.serve")

app = FastAPI(
    title="ctray",
    version=__version__,
    description="3D CT image-to-image models: NIfTI in, NIfTI out on the input's grid.",
)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    detail = f"{exc.detail}: {request.method} {request.url.path}; see GET /docs for the routes"
    return JSONResponse({"error": code, "detail": detail}, status_code=exc.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": "invalid_request", "detail": str(exc)}, status_code=422)


@app.exception_handler(ClientDisconnect)
async def _disconnected(request: Request, exc: ClientDisconnect) -> JSONResponse:
    """The client left mid-upload: nobody reads this answer, and it is not a server error."""
    log.info("client disconnected during %s %s", request.method, request.url.path)
    err = ApiError("invalid_request", "the client left before the request body was complete")
    return JSONResponse(err.body(), status_code=err.status)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug, not the client's fault: still a JSON answer (the traceback goes to the log)."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    detail = f"unexpected server error ({type(exc).__name__}); see the server log"
    return JSONResponse({"error": "internal_error", "detail": detail}, status_code=500)


@dataclass(frozen=True, kw_only=True, eq=False)
class _Item:
    """One validated request waiting for the model."""

    model: str
    volume: Volume | None
    condition: dict[str, Any]
    views: list[np.ndarray] | None = None


@dataclass(frozen=True, kw_only=True, eq=False)
class _Outcome:
    """A prediction or the reason it failed (a batch's results are passed through, so one
    failed request does not raise for the others)."""

    volume: Volume | None = None
    error: str | None = None
    client_error: bool = False
    batch_size: int = 1
    seconds: float = 0.0


# Helpers live above the class: Serve pickles the class by value when it is decorated, so
# names defined below it would be missing inside a replica.
def _device(config: ServeConfig) -> torch.device:
    if config.num_gpus_per_replica > 0:
        if not torch.cuda.is_available():
            raise RuntimeError("num_gpus_per_replica > 0 but this replica sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def _memory() -> dict[str, int | None]:
    """This process's resident memory now and at its peak (bytes; None where unknown)."""
    rss = None
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rss_bytes": rss, "peak_rss_bytes": peak * (1 if sys.platform == "darwin" else 1024)}


@serve.deployment
@serve.ingress(app)
class CtrayModels:
    """Every exported model below ``config.models``, loaded once per replica."""

    def __init__(self, config: ServeConfig, token_digest: bytes | None = None) -> None:
        self.config = config
        self.token_digest = token_digest
        self.device = _device(config)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(config.num_cpus_per_replica)))
        paths = discover(config.models)
        self.models: dict[str, LoadedModel] = {
            name: load_model(path, device=self.device) for name, path in paths.items()
        }
        self.catalog = [
            describe(
                name,
                m.meta,
                views=m.spec.views.describe(m.config, m.data) if m.spec.views else None,
            )
            for name, m in self.models.items()
        ]
        # One inference at a time per replica: a model is not shared between threads, and a
        # CPU gains nothing from two forward passes fighting over the same cores.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctray-infer")
        self.admission = Admission(
            max_requests=config.max_queue, max_bytes=config.memory_budget_bytes
        )
        self.batcher: AdaptiveBatcher[_Item, _Outcome] = AdaptiveBatcher(
            self._infer,
            max_batch_size=config.max_batch_size if config.batching else 1,
            wait_s=config.batch_wait_ms / 1000 if config.batching else 0.0,
            arriving=self.admission.arriving,
        )
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (not expected, but harmless)
            self.replica = f"pid-{os.getpid()}"
        log.info("ctray replica %s: %s on %s", self.replica, ", ".join(self.models), self.device)

    # ----------------------------------------------------------------------------- routes

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "models": len(self.models), "replica": self.replica}

    @app.get("/v1/status")
    async def status(self, request: Request) -> dict[str, Any]:
        """What this replica holds: admitted requests and bytes, and its own memory."""
        check_token(request.headers.get("authorization"), self.token_digest)
        return {
            "replica": self.replica,
            "pid": os.getpid(),
            **_memory(),
            "admission": self.admission.snapshot(),
        }

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> list[dict[str, Any]]:
        check_token(request.headers.get("authorization"), self.token_digest)
        return self.catalog

    @app.get("/v1/models/{name}")
    async def get_model(self, name: str, request: Request) -> dict[str, Any]:
        check_token(request.headers.get("authorization"), self.token_digest)
        self._model(name)
        return next(m for m in self.catalog if m["name"] == name)

    @app.post("/v1/models/{name}/predict")
    async def predict(self, name: str, request: Request) -> Response:
        cfg = self.config
        check_token(request.headers.get("authorization"), self.token_digest)
        model = self._model(name)
        condition = parse_conditioning(model.spec, request.query_params.multi_items())
        declared = check_content_length(request.headers, cfg.max_body_bytes) or 0
        with self.admission.enter() as ticket:
            ticket.hold("body", declared, what="the upload")
            body = await read_body(
                request.stream(),
                cfg.max_body_bytes,
                on_progress=lambda n: ticket.hold("body", max(n, declared), what="the upload"),
            )
            item = await self._prepare(name, model, body, request, condition, ticket)
            del body
            ticket.hold("body", 0, what="the upload")
            ticket.queued()
            outcome = await self.batcher.submit(item)
            if outcome.volume is None:
                if outcome.client_error:
                    raise ApiError("invalid_view", outcome.error or "unusable views")
                raise ApiError("internal_error", f"model {name!r} failed: {outcome.error}")
            out = outcome.volume
            data = await asyncio.to_thread(encode_volume, out.array, out.affine)
        return Response(
            content=data,
            media_type="application/gzip",
            headers={
                "X-Ctray-Model": name,
                "X-Ctray-Batch-Size": str(outcome.batch_size),
                "X-Ctray-Inference-Ms": f"{outcome.seconds * 1000:.1f}",
                "Content-Disposition": f'attachment; filename="{name}.nii.gz"',
            },
        )

    # ----------------------------------------------------------------------------- model work

    def _model(self, name: str) -> LoadedModel:
        if name not in self.models:
            raise ApiError(
                "unknown_model",
                f"no model {name!r}; available: {', '.join(sorted(self.models))}",
            )
        return self.models[name]

    async def _prepare(
        self,
        name: str,
        model: LoadedModel,
        body: bytes,
        request: Request,
        condition: dict[str, Any],
        ticket: Ticket,
    ) -> _Item:
        """Decode and check the upload, reserving its memory at each step (see the module doc)."""
        cfg = self.config
        if model.spec.views is not None:
            views = await parse_views(
                body,
                request.headers.get("content-type"),
                max_views=cfg.max_views,
                max_pixels=cfg.max_view_pixels,
            )
            _, shape = model.spec.views.output_grid(model.config, model.data)
            ticket.hold("inference", views_bytes(views, shape), what="these views")
            return _Item(model=name, volume=None, views=views, condition=condition)

        def on_header(shape: tuple[int, int, int]) -> None:
            what = f"the {'x'.join(map(str, shape))} volume"
            ticket.hold("decode", decode_bytes(shape), what=what)

        volume = await asyncio.to_thread(
            decode_volume, body, max_voxels=cfg.max_voxels, label="upload", on_header=on_header
        )
        check_output_size(model.data.output_scale, volume.shape, cfg.max_voxels)
        check_working_size(model.data, volume.shape, volume.affine, cfg.max_voxels)
        ticket.hold("decode", 0, what="the upload")
        ticket.hold(
            "inference",
            inference_bytes(model.data, volume.shape, volume.affine),
            what=f"the {'x'.join(map(str, volume.shape))} volume",
        )
        return _Item(model=name, volume=volume, condition=condition)

    async def _infer(self, items: list[_Item]) -> list[_Outcome]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._run, items)

    def _run(self, items: list[_Item]) -> list[_Outcome]:
        """Predict a list of requests; a failure costs only the requests it belongs to."""
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.model, []).append(i)
        outcomes: list[_Outcome] = [_Outcome(error="not run")] * len(items)
        for name, indices in groups.items():
            group = [items[i] for i in indices]
            results = self._predict(name, group)
            if results is None and len(group) > 1:  # isolate the request that broke the batch
                results = [(self._predict(name, [it]) or [None])[0] for it in group]
            for i, result in zip(indices, results or [None] * len(group), strict=True):
                outcomes[i] = result or _Outcome(error="prediction failed; see the server log")
        return outcomes

    def _predict(self, name: str, group: list[_Item]) -> list[_Outcome] | None:
        start = time.perf_counter()
        model = self.models[name]
        try:
            if model.spec.views is not None:
                volumes = predict_views(
                    model, [it.views for it in group], [it.condition for it in group]
                )
            else:
                volumes = predict_volumes(
                    model,
                    [it.volume for it in group],
                    [it.condition for it in group],
                    overlap=self.config.overlap,
                    sw_batch_size=self.config.sw_batch_size * len(group),
                )
        except Exception as err:
            if isinstance(err, ValueError) and model.spec.views is not None:
                # the family's prepare refused the views: what the client sent is unusable
                log.info("prediction with %s refused: %s", name, err)
                return [_Outcome(error=str(err), client_error=True) for _ in group]
            log.exception("prediction with %s failed for a batch of %d", name, len(group))
            return None
        seconds = time.perf_counter() - start
        return [_Outcome(volume=v, batch_size=len(group), seconds=seconds) for v in volumes]


def build_app(config: ServeConfig) -> serve.Application:
    """The bound application for ``serve.run``; the token reaches replicas only as a digest,
    and each replica reserves the memory its limits allow (config.replica_memory_bytes)."""
    # fail in the caller, with a readable message, not in a replica
    paths = discover(config.models)
    options = config.deployment_options(model_bytes=model_bytes(paths.values()))
    public = replace(config, token=None)
    return CtrayModels.options(**options).bind(public, config.token_digest())
