"""The Celery app's configuration (shared by the API's producer and the worker) and the enqueue call."""

from __future__ import annotations

import logging

from celery import Celery

from .settings import Settings

log = logging.getLogger(__name__)

RUN_JOB = "darts.run_job"  # the one task: its only argument is a job id


def make_celery(settings: Settings) -> Celery:
    """One configuration for both ends: acks after the task, one message at a time, JSON only."""
    app = Celery("darts", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=settings.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.enqueue_timeout_seconds,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return app


def enqueue_job(app: Celery, job_id: str) -> bool:
    """Send "job X has work" after its row is committed; False (logged) when the broker cannot take it."""
    try:
        app.send_task(
            RUN_JOB,
            args=[job_id],
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
        )
    except Exception:
        log.exception("could not enqueue job %s; it stays queued in the database", job_id)
        return False
    return True
