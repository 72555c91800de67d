"""The FastAPI app: `uvicorn --factory service.app:create_app`."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from . import jobs
from .db import Database, prepare
from .limits import BodyLimit
from .queue import make_celery
from .routes import datasets, health
from .routes import jobs as job_routes
from .settings import Settings, get_settings
from .streams import JobState, JobWatcher, Records
from .telemetry import JOBS, RequestMetrics

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.database_url)
        prepare(db, auto_migrate=settings.auto_migrate)  # refuses to serve an old schema
        app.state.db = db
        app.state.celery = make_celery(settings)

        def count() -> dict[str, int]:
            with db.session() as session:
                return jobs.count_by_status(session)

        def watch_read(known: Mapping[str, int]) -> dict[str, tuple[JobState, Records]]:
            with db.session() as session:
                return jobs.watch_read(session, known=known)

        JOBS.count = count
        app.state.watcher = JobWatcher(watch_read, interval=settings.stream_poll_seconds)
        yield
        await app.state.watcher.close()
        JOBS.count = None
        db.dispose()

    app = FastAPI(
        title="DARTS recurrent-cell search",
        version="0.1.0",
        description="Runs DARTS architecture searches for recurrent cells as managed jobs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.include_router(job_routes.router)
    app.include_router(datasets.router)
    app.include_router(health.router)

    @app.exception_handler(jobs.NotFound)
    async def not_found(_: Request, exc: jobs.NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(jobs.Conflict)
    async def conflict(_: Request, exc: jobs.Conflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    async def database_unavailable(_: Request, exc: Exception) -> JSONResponse:
        # Unreachable (OperationalError) or every pooled connection busy (TimeoutError): try again, not a 500.
        log.warning("database unavailable: %s", exc)
        return JSONResponse(
            {"detail": "the database is unavailable; try again shortly"}, status_code=503, headers={"Retry-After": "5"}
        )

    app.add_exception_handler(OperationalError, database_unavailable)
    app.add_exception_handler(PoolTimeout, database_unavailable)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own shape, but Python's JSON parser reads NaN and Infinity, which a JSON answer cannot
        # echo back (json.dumps would raise and the client would get a 500): such inputs come back as text.
        errors = [_readable(e) for e in exc.errors()]
        return JSONResponse({"detail": _json_safe(jsonable_encoder(errors))}, status_code=422)

    upload_cap = settings.max_upload_bytes + 64 * 1024  # room for the multipart envelope
    app.add_middleware(BodyLimit, default=settings.max_body_bytes, limits={("POST", "/datasets"): upload_cap})
    app.add_middleware(RequestMetrics)
    return app


def _readable(error: Any) -> Any:
    """Messages that speak pydantic's or Python's language (tags, discriminators, class names), said in words."""
    if not isinstance(error, dict):
        return error
    ctx = error.get("ctx") or {}
    if "Expected UploadFile" in str(error.get("msg")):
        msg = "must be a file: a multipart part with a filename, not a plain form field"
        return {"type": "value_error", "loc": error.get("loc"), "msg": msg, "input": error.get("input")}
    if error.get("type") == "union_tag_invalid":  # e.g. scheduler {"type": "LambdaLR"}
        msg = f"unknown {ctx.get('discriminator')} {ctx.get('tag')!r}; choose one of: {ctx.get('expected_tags')}"
        return {**error, "msg": msg}
    if error.get("type") == "union_tag_not_found":
        return {**error, "msg": f"needs a {ctx.get('discriminator')} key that says which kind this is"}
    if error.get("type") == "value_error":  # pydantic prefixes a validator's own sentence with "Value error, "
        return {**error, "msg": str(error.get("msg", "")).removeprefix("Value error, ")}
    return error


def _json_safe(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by its text ('nan', 'inf', '-inf')."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
