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
        broker_connection_max_retries=None,  # a worker waits out a broker restart, however long
        broker_connection_timeout=settings.enqueue_timeout_seconds,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # Redis delivers an unacknowledged message again after this; the lease makes that harmless. Workers
        # look for such messages every quarter of it (between 1 and 10 s), not Kombu's default 100 s.
        visibility = settings.visibility_timeout_seconds
        app.conf.broker_transport_options = {
            "visibility_timeout": visibility,
            "unacked_restore_interval": min(10.0, max(1.0, visibility / 4)),
            "unacked_restore_throttle": 1,
        }
    return app


def enqueue_job(app: Celery, job_id: str) -> bool:
    """Send "job X has work" after its row is committed, retrying with backoff for about two seconds; False
    (logged) when the broker cannot take it: the job stays queued and the workers' reaper sends it later."""
    try:
        app.send_task(
            RUN_JOB,
            args=[job_id],
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
        )
    except Exception:
        log.warning("could not enqueue job %s; it stays queued and the reaper will send it", job_id, exc_info=True)
        return False
    return True
