"""Running one job: claim its lease, resume from its newest verified checkpoint, run the engine, and report
every epoch and checkpoint to the database under that lease."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service import leases
from service.db import Database
from service.leases import Claim, LeaseLost
from service.settings import Settings
from worker.search.checkpoint import CheckpointInfo, CheckpointWriteError, load_checkpoint, sha256_file
from worker.search.data import load_dataset
from worker.search.datafiles import DataError
from worker.search.engine import SearchDiverged, run_search
from worker.search.spec import PRIMITIVES, JobSpec

from .lease import Heartbeat, retrying

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


def _record_and_architecture(record: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    clean = _finite(dict(record))
    return clean, architecture(clean["genotype"], clean["alpha"], clean["epoch"], final=False)


class DbReporter:
    """The engine's callbacks, writing to the job's rows under this attempt's lease. `should_stop` answers
    True for a cancel (read at most every `poll_seconds`) or a worker shutdown, and raises LeaseLost once
    the heartbeat has seen the lease go to another attempt."""

    def __init__(
        self,
        db: Database,
        claim: Claim,
        heartbeat: Heartbeat,
        *,
        poll_seconds: float,
        retry_seconds: float,
        shutting_down: Callable[[], bool],
    ) -> None:
        self.db, self.claim, self.heartbeat = db, claim, heartbeat
        self.poll_seconds, self.retry_seconds = poll_seconds, retry_seconds
        self.shutting_down = shutting_down
        self._checked = -math.inf
        self.cancel = False
        self.shutdown = False

    def _still_held(self) -> None:
        if self.heartbeat.lost.is_set():
            raise LeaseLost(f"job {self.claim.job_id}: attempt {self.claim.attempt} lost its lease")

    def write(self, what: str, write: Callable[[Session], Any]) -> Any:
        self._still_held()
        return retrying(self.db, write, seconds=self.retry_seconds, what=f"job {self.claim.job_id}: {what}")

    def on_epoch(self, record: Any) -> None:
        clean, arch = _record_and_architecture(record)
        c = self.claim
        self.write(
            f"epoch {clean['epoch']}",
            lambda s: leases.record_epoch(s, job_id=c.job_id, attempt=c.attempt, record=clean, architecture=arch),
        )

    def on_checkpoint(self, items: list[CheckpointInfo]) -> None:
        rows, c = [asdict(i) for i in items], self.claim
        self.write("checkpoints", lambda s: leases.sync_checkpoints(s, job_id=c.job_id, attempt=c.attempt, items=rows))

    def should_stop(self) -> bool:
        self._still_held()
        if self.shutting_down():
            self.shutdown = True
        now = time.monotonic()
        if not self.cancel and now - self._checked >= self.poll_seconds:
            self._checked = now
            try:
                with self.db.session() as session:
                    self.cancel = leases.is_cancel_requested(session, job_id=self.claim.job_id)
            except Exception as exc:  # the database is down: read it next time
                log.warning("job %s: cannot read the cancel flag (%s)", self.claim.job_id, type(exc).__name__)
        self.cancel = self.cancel or self.heartbeat.cancel_requested
        return self.cancel or self.shutdown


def resume_point(
    db: Database, job_id: str, folder: Path, device: str, *, retry_seconds: float = 0.0
) -> tuple[int, dict[str, Any] | None]:
    """The newest recorded resumable checkpoint whose file matches its sha256 and loads: (epoch, state);
    (0, None) to start from scratch. A missing, truncated or corrupted file is skipped for the one before."""
    rows = retrying(
        db,
        lambda s: [(r.name, r.epoch, r.sha256) for r in leases.resumable_checkpoints(s, job_id=job_id)],
        seconds=retry_seconds,
        what=f"job {job_id}: checkpoints",
    )
    for name, epoch, digest in rows:
        path = folder / name
        try:
            if sha256_file(path) != digest:
                log.warning("job %s: checkpoint %s does not match its sha256; trying the one before", job_id, name)
                continue
            state = load_checkpoint(path, device)
        except Exception as exc:
            log.warning("job %s: checkpoint %s unusable (%s); trying the one before", job_id, name, exc)
            continue
        if int(state["epoch"]) == epoch:
            return epoch, state
    return 0, None


def execute_job(
    job_id: str,
    *,
    db: Database,
    settings: Settings,
    worker: str,
    shutting_down: Callable[[], bool] = lambda: False,
    send: Callable[[str], bool] = lambda _job_id: False,
) -> str:
    """Run a job under a lease, to its end or until this worker shuts down; returns what happened (for the
    worker's log). `send` puts a released job back on the queue."""
    claim = retrying(
        db,
        lambda s: leases.claim(
            s, job_id=job_id, worker=worker, lease_seconds=settings.lease_seconds, max_attempts=settings.max_attempts
        ),
        seconds=settings.db_retry_seconds,
        what=f"job {job_id}: claim",
    )
    if claim is None:
        log.info("job %s is not claimable (running elsewhere, finished or gone); message dropped", job_id)
        return "skipped"
    spec = JobSpec.model_validate(claim.spec)
    device = resolve_device(settings.device)
    folder = settings.jobs_dir / job_id / "checkpoints"
    heartbeat = Heartbeat(
        db, job_id=job_id, attempt=claim.attempt, lease_seconds=settings.lease_seconds, every=settings.heartbeat_seconds
    )
    with heartbeat:
        reporter = DbReporter(
            db,
            claim,
            heartbeat,
            poll_seconds=settings.cancel_poll_seconds,
            retry_seconds=settings.db_retry_seconds,
            shutting_down=shutting_down,
        )
        try:
            return _run(claim, spec, reporter, settings, device, folder, send)
        except LeaseLost as exc:
            log.warning("%s; attempt %d stops here", exc, claim.attempt)
            return "lease lost"
        except OperationalError as exc:
            # The database stayed out of reach longer than db_retry_seconds: nothing can be recorded, so the
            # attempt ends here without a status; its lease expires and the reaper gives the job to a worker.
            log.error("job %s: attempt %d abandoned, the database is unreachable (%s)", job_id, claim.attempt, exc)
            return "abandoned"


def _run(
    claim: Claim,
    spec: JobSpec,
    reporter: DbReporter,
    settings: Settings,
    device: str,
    folder: Path,
    send: Callable[[str], bool],
) -> str:
    job_id, attempt = claim.job_id, claim.attempt
    try:
        resumed_from, state = resume_point(reporter.db, job_id, folder, device, retry_seconds=settings.db_retry_seconds)
        history = [_record_and_architecture(r) for r in (json.loads(state["history"]) if state else [])]
        redone = reporter.write(
            "resume",
            lambda s: leases.start_resume(
                s, job_id=job_id, attempt=attempt, resumed_from=resumed_from, history=history
            ),
        )
        log.info(
            "job %s: attempt %d, %s on %s, %d epochs; resuming after epoch %d (%d recorded, %d to redo)",
            *(job_id, attempt, spec.task, spec.dataset, spec.search.epochs, resumed_from, claim.epoch, redone),
        )
        data = load_dataset(spec.dataset, spec.task, data_dir=settings.data_dir, uploads_dir=settings.uploads_dir)
        result = run_search(
            spec,
            data=data,
            device=device,
            on_epoch=reporter.on_epoch,
            should_stop=reporter.should_stop,
            resume_from=state,
            checkpoint_dir=folder,
            on_checkpoint=reporter.on_checkpoint,
            checkpoint_retry_seconds=settings.io_retry_seconds,
        )
    except (LeaseLost, OperationalError):
        raise
    except (DataError, SearchDiverged, CheckpointWriteError) as exc:
        return _finish(reporter, "failed", error=str(exc))
    except Exception as exc:
        log.exception("job %s failed", job_id)
        return _finish(reporter, "failed", error=f"{type(exc).__name__}: {exc}")
    reporter.heartbeat.stop()  # the last write below ends the lease
    if result.stop_reason == "cancelled" and not reporter.cancel:  # stopped by this worker's shutdown
        reporter.write("release", lambda s: leases.release(s, job_id=job_id, attempt=attempt, reason="worker shutdown"))
        if not send(job_id):
            reporter.write("release", lambda s: leases.mark_unsent(s, job_id=job_id))
        log.info("job %s: released at epoch %d for another worker (shutdown)", job_id, len(result.records))
        return "released"
    status = "cancelled" if result.stop_reason == "cancelled" else "succeeded"
    final = architecture(result.genotype, _finite(result.alpha), len(result.records), final=True)
    _finish(reporter, status, stop_reason=result.stop_reason, architecture=final)
    log.info("job %s: %s (%s) after %d epochs", job_id, status, result.stop_reason, len(result.records))
    return status


def _finish(reporter: DbReporter, status: str, **fields: Any) -> str:
    reporter.heartbeat.stop()
    c = reporter.claim
    reporter.write(status, lambda s: leases.finish(s, job_id=c.job_id, attempt=c.attempt, status=status, **fields))
    return status
