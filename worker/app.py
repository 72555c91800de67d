"""The Celery worker: `celery -A worker.app worker --concurrency 1` (one process per GPU).

Prefork: the main process consumes messages; its pool child runs the job, renews the lease and runs the
reaper. SIGTERM (or Ctrl-C) asks the child, through a flag in shared memory, to stop at the next step
boundary and give the job back, so the warm shutdown takes one step instead of the rest of the search.
"""

from __future__ import annotations

import logging
import multiprocessing
from typing import Any

from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_shutting_down

from service.db import Database, SchemaOutdated, prepare
from service.queue import enqueue_job, make_celery
from service.settings import get_settings

from .lease import Reaper

log = logging.getLogger(__name__)

settings = get_settings()
app = make_celery(settings)
app.conf.include = ["worker.tasks"]

# Made before the pool forks, so the main process and its children share it; set once, never cleared.
_shutting_down = multiprocessing.RawValue("b", 0)

_db: Database | None = None
_reaper: Reaper | None = None


def database() -> Database:
    """This process' database handle (made after the fork: connections never cross processes)."""
    global _db
    if _db is None:
        _db = Database(settings.database_url)
    return _db


def shutting_down() -> bool:
    return bool(_shutting_down.value)


def send(job_id: str) -> bool:
    return enqueue_job(app, job_id)


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


@worker_shutting_down.connect
def _ask_jobs_to_stop(**_: Any) -> None:
    _shutting_down.value = 1  # runs in a signal handler: a store to shared memory, nothing more


@worker_process_init.connect
def _start_child(**_: Any) -> None:
    global _db, _reaper
    _db = None
    _reaper = Reaper(
        database(),
        send,
        every=settings.reaper_seconds,
        requeue_after=settings.requeue_after_seconds,
        max_attempts=settings.max_attempts,
    )
    _reaper.start()


@worker_process_shutdown.connect
def _stop_child(**_: Any) -> None:
    if _reaper is not None:
        _reaper.stop()
