"""The one task: take a job id, run the job under a lease (see `worker.runner`)."""

from __future__ import annotations

import os
from typing import Any

from celery.exceptions import Reject

from service.queue import RUN_JOB

from .app import app, database, send, settings, shutting_down
from .runner import execute_job


@app.task(name=RUN_JOB, bind=True)
def run_job(self: Any, job_id: str) -> str:
    if shutting_down():  # a message that reached a worker on its way out: back to the queue, unclaimed
        raise Reject("the worker is shutting down", requeue=True)
    worker = f"{self.request.hostname or 'worker'}/{os.getpid()}"
    return execute_job(job_id, db=database(), settings=settings, worker=worker, shutting_down=shutting_down, send=send)
