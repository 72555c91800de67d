"""FastAPI dependencies: the app's database, settings and queue, a session per request, the caller."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from celery import Celery
from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.orm import Session

from worker.search.spec import printable

from .auth import current_owner
from .db import Database
from .settings import Settings
from .streams import JobWatcher


def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_celery(request: Request) -> Celery:
    celery: Celery = request.app.state.celery
    return celery


def get_watcher(request: Request) -> JobWatcher:
    watcher: JobWatcher = request.app.state.watcher
    return watcher


def get_session(db: Annotated[Database, Depends(get_db)]) -> Iterator[Session]:
    with db.session() as session:
        yield session


DbDep = Annotated[Database, Depends(get_db)]
SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
OwnerDep = Annotated[str, Depends(current_owner)]
WatcherDep = Annotated[JobWatcher, Depends(get_watcher)]


def require_content_type(*accepted: str):  # type: ignore[no-untyped-def]
    """A dependency answering 415 unless the body's Content-Type is one of `accepted`."""

    def check(request: Request) -> None:
        given = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if given not in accepted:
            shown = given or "none"
            raise HTTPException(415, f"Content-Type must be {' or '.join(accepted)} (got {shown})")

    return check


Problem = tuple[tuple[str | int, ...], str, Any]  # (loc, msg, the input) of one invalid part of a request


def invalid(*problems: Problem) -> RequestValidationError:
    """A 422 in FastAPI's own shape for problems found after FastAPI's validation."""
    return RequestValidationError(
        [{"type": "value_error", "loc": loc, "msg": msg, "input": v} for loc, msg, v in problems]
    )


def require_printable(value: str | None, loc: tuple[str | int, ...]) -> None:
    """422 unless `value` is printable text: the spec's rule for names, applied to headers and form fields."""
    try:
        printable(value)
    except ValueError as exc:
        raise invalid((loc, str(exc), value)) from None
