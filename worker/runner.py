"""Running one job: claim its row, run the engine, and report every epoch and checkpoint to the database."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from typing import Any

import torch

from service import jobs
from service.db import Database
from service.settings import Settings
from worker.search.checkpoint import CheckpointInfo
from worker.search.data import load_dataset
from worker.search.datafiles import DataError
from worker.search.engine import SearchDiverged, run_search
from worker.search.spec import PRIMITIVES, JobSpec

log = logging.getLogger(__name__)


def resolve_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such numbers are recorded as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def architecture(genotype: dict[str, Any], alpha: list[list[float]], epoch: int, *, final: bool) -> dict[str, Any]:
    return {"genotype": genotype, "alpha": alpha, "primitives": list(PRIMITIVES), "epoch": epoch, "final": final}


class DbReporter:
    """The engine's callbacks, writing to the job's rows; cancel is read at most every `poll_seconds`."""

    def __init__(self, db: Database, job_id: str, *, poll_seconds: float) -> None:
        self.db = db
        self.job_id = job_id
        self.poll_seconds = poll_seconds
        self._checked = -math.inf
        self._cancel = False

    def on_epoch(self, record: Any) -> None:
        clean = _finite(dict(record))
        arch = architecture(clean["genotype"], clean["alpha"], clean["epoch"], final=False)
        with self.db.session() as session:
            jobs.record_epoch(session, job_id=self.job_id, record=clean, architecture=arch)

    def on_checkpoint(self, items: list[CheckpointInfo]) -> None:
        with self.db.session() as session:
            jobs.sync_checkpoints(session, job_id=self.job_id, items=[asdict(i) for i in items])

    def should_stop(self) -> bool:
        now = time.monotonic()
        if not self._cancel and now - self._checked >= self.poll_seconds:
            self._checked = now
            with self.db.session() as session:
                self._cancel = jobs.is_cancel_requested(session, job_id=self.job_id)
        return self._cancel


def execute_job(job_id: str, *, db: Database, settings: Settings) -> str:
    """Run a queued job to its end; returns what happened (for the worker's log)."""
    with db.session() as session:
        job = jobs.claim_job(session, job_id=job_id)
        if job is None:
            log.info("job %s is not queued (cancelled, taken or deleted); message dropped", job_id)
            return "skipped"
        spec = JobSpec.model_validate(job.spec)
    log.info(
        "job %s: attempt %d, %s on %s, %d epochs", job_id, job.attempt, spec.task, spec.dataset, spec.search.epochs
    )
    reporter = DbReporter(db, job_id, poll_seconds=settings.cancel_poll_seconds)
    try:
        data = load_dataset(spec.dataset, spec.task, data_dir=settings.data_dir, uploads_dir=settings.uploads_dir)
        result = run_search(
            spec,
            data=data,
            device=resolve_device(settings.device),
            on_epoch=reporter.on_epoch,
            should_stop=reporter.should_stop,
            checkpoint_dir=settings.jobs_dir / job_id / "checkpoints",
            on_checkpoint=reporter.on_checkpoint,
        )
    except (DataError, SearchDiverged) as exc:
        return _fail(db, job_id, str(exc))
    except Exception as exc:
        log.exception("job %s failed", job_id)
        return _fail(db, job_id, f"{type(exc).__name__}: {exc}")
    status = "cancelled" if result.stop_reason == "cancelled" else "succeeded"
    final = architecture(result.genotype, _finite(result.alpha), len(result.records), final=True)
    with db.session() as session:
        jobs.finish_job(session, job_id=job_id, status=status, stop_reason=result.stop_reason, architecture=final)
    log.info("job %s: %s (%s) after %d epochs", job_id, status, result.stop_reason, len(result.records))
    return status


def _fail(db: Database, job_id: str, error: str) -> str:
    with db.session() as session:
        jobs.finish_job(session, job_id=job_id, status="failed", error=error)
    return "failed"
