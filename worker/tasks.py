"""The one task: take a job id, run the job (see `worker.runner`)."""

from __future__ import annotations

from service.queue import RUN_JOB

from .app import app, database, settings
from .runner import execute_job


@app.task(name=RUN_JOB)
def run_job(job_id: str) -> str:
    return execute_job(job_id, db=database(), settings=settings)
