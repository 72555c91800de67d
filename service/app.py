"""The FastAPI app: `uvicorn --factory service.app:create_app`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from . import jobs
from .db import Database, prepare
from .limits import BodyLimit
from .queue import make_celery
from .routes import datasets, health
from .routes import jobs as job_routes
from .settings import Settings, get_settings
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

        JOBS.count = count
        yield
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

    @app.exception_handler(OperationalError)
    async def database_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", exc.orig)
        return JSONResponse(
            {"detail": "the database is unavailable; try again shortly"}, status_code=503, headers={"Retry-After": "5"}
        )

    upload_cap = settings.max_upload_bytes + 64 * 1024  # room for the multipart envelope
    app.add_middleware(BodyLimit, default=settings.max_body_bytes, limits={("POST", "/datasets"): upload_cap})
    app.add_middleware(RequestMetrics)
    return app
