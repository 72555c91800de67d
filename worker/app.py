"""The Celery worker: `celery -A worker.app worker --concurrency 1` (one process per GPU)."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_init, worker_process_init

from service.db import Database, SchemaOutdated, prepare
from service.queue import make_celery
from service.settings import get_settings

log = logging.getLogger(__name__)

settings = get_settings()
app = make_celery(settings)
app.conf.include = ["worker.tasks"]

_db: Database | None = None


def database() -> Database:
    """This process' database handle (made after the fork: connections never cross processes)."""
    global _db
    if _db is None:
        _db = Database(settings.database_url)
    return _db


@worker_init.connect
def _check_schema(**_: Any) -> None:
    db = Database(settings.database_url)
    try:
        prepare(db, auto_migrate=settings.auto_migrate)
    except SchemaOutdated as exc:
        # Celery logs and swallows exceptions from signal handlers; SystemExit does stop the worker.
        raise SystemExit(f"worker refuses to start: {exc}") from None
    finally:
        db.dispose()


@worker_process_init.connect
def _fresh_database(**_: Any) -> None:
    global _db
    _db = None
