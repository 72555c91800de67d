"""Every SQL query of the worker's side of a job: the lease, fenced progress writes, and the reaper.

The database owns a job; a broker message only says "job X has work". A worker claims the job with a
conditional update that takes a lease (owner, `attempt` + 1, expiry) only if the job is queued or its lease
has expired, and renews the lease by heartbeat. Every write of a run names its attempt and is refused
(`LeaseLost`) once that attempt is no longer the job's current one and running: a worker that lost its lease
(paused, partitioned, or simply slow to notice) can never overwrite the work of the attempt that replaced it.
Times are the workers' UTC clocks: keep them synchronised (NTP), well within `lease_seconds`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from .models import Attempt, CheckpointRow, EpochRow, Job, utcnow


class LeaseLost(RuntimeError):
    """This attempt no longer holds the job: its writes are refused and it must stop without writing."""


@dataclass(frozen=True)
class Claim:
    """What a worker learns when it takes a job: which attempt it is and what is already recorded."""

    job_id: str
    attempt: int
    spec: dict[str, Any]
    epoch: int  # epochs recorded by earlier attempts


def claim(session: Session, *, job_id: str, worker: str, lease_seconds: float, max_attempts: int) -> Claim | None:
    """Take the job if it is queued or its lease has expired (committed); None when someone else holds it,
    or it is finished, cancelled or gone: the message that woke the worker is then simply dropped."""
    now = utcnow()
    if session.scalar(select(Job.status).where(Job.id == job_id, _expired(now))) is not None:
        expire(session, job_id=job_id, now=now, max_attempts=max_attempts)
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(
            status="running",
            attempt=Job.attempt + 1,
            lease_owner=worker,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            heartbeat_at=now,
            started_at=func.coalesce(Job.started_at, now),
        )
        .returning(Job.attempt, Job.spec, Job.epoch)
    ).one_or_none()
    if row is None:
        session.rollback()
        return None
    attempt, spec, epoch = row
    session.add(Attempt(job_id=job_id, attempt=attempt, worker=worker, claimed_at=now, epochs_redone=0))
    session.commit()
    return Claim(job_id, int(attempt), dict(spec), int(epoch))


def _held(job_id: str, attempt: int) -> Any:
    return (Job.id == job_id) & (Job.attempt == attempt) & (Job.status == "running")


def _expired(now: datetime) -> Any:
    # A running job without a lease (running when the leases' migration came) is as good as expired.
    return (Job.status == "running") & (Job.lease_expires_at.is_(None) | (Job.lease_expires_at < now))


def heartbeat(session: Session, *, job_id: str, attempt: int, lease_seconds: float) -> bool:
    """Renew the lease (committed); returns the job's cancel flag. Raises LeaseLost if it is not ours."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(_held(job_id, attempt))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds), heartbeat_at=now)
        .returning(Job.cancel_requested)
    ).one_or_none()
    session.commit()
    if row is None:
        raise LeaseLost(f"job {job_id}: attempt {attempt} no longer holds the lease")
    return bool(row[0])


def _fence(session: Session, job_id: str, attempt: int) -> Job:
    """Lock the job's row for this transaction if `attempt` still holds it; LeaseLost otherwise."""
    job = session.scalar(select(Job).where(_held(job_id, attempt)).with_for_update())
    if job is None:
        session.rollback()
        raise LeaseLost(f"job {job_id}: attempt {attempt} no longer holds the lease; its write is refused")
    return job


def is_cancel_requested(session: Session, *, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def _add_epoch(session: Session, job: Job, attempt: int, record: dict[str, Any], arch: dict[str, Any]) -> bool:
    epoch = int(record["epoch"])
    if session.scalar(select(EpochRow.id).where(EpochRow.job_id == job.id, EpochRow.epoch == epoch)) is not None:
        return False  # an epoch redone after a resume: the record written the first time stands
    session.add(EpochRow(job_id=job.id, epoch=epoch, attempt=attempt, record=record, created_at=utcnow()))
    if epoch > job.epoch:
        job.epoch, job.best_val_loss, job.lr, job.architecture = epoch, record["best_val_loss"], record["lr"], arch
    return True


def record_epoch(
    session: Session, *, job_id: str, attempt: int, record: dict[str, Any], architecture: dict[str, Any]
) -> bool:
    """The epoch's row and the job's summary of it, in one fenced transaction; False when it was already
    recorded (an epoch run again after a resume is never written twice)."""
    job = _fence(session, job_id, attempt)
    added = _add_epoch(session, job, attempt, record, architecture)
    session.commit()
    return added


def start_resume(
    session: Session,
    *,
    job_id: str,
    attempt: int,
    resumed_from: int,
    history: Sequence[tuple[dict[str, Any], dict[str, Any]]],
) -> int:
    """Note where this attempt resumes (0: from scratch) and write the checkpoint's records that the database
    lacks (an attempt can die between its checkpoint and its epoch row). Returns the epochs to be redone:
    those recorded beyond the checkpoint, which the search now runs again."""
    job = _fence(session, job_id, attempt)
    for record, arch in history:
        _add_epoch(session, job, attempt, record, arch)
    noted = session.get_one(Attempt, (job_id, attempt))
    if noted.resumed_from_epoch is not None:  # a retried call whose first commit did land
        session.commit()
        return noted.epochs_redone
    redone = max(0, job.epoch - resumed_from)
    job.epochs_redone += redone
    session.execute(
        update(Attempt)
        .where(Attempt.job_id == job_id, Attempt.attempt == attempt)
        .values(resumed_from_epoch=resumed_from, epochs_redone=redone)
    )
    session.commit()
    return redone


def resumable_checkpoints(session: Session, *, job_id: str) -> Sequence[CheckpointRow]:
    """The job's resumable checkpoints as recorded, newest first (the "best" one is not a point to resume)."""
    query = select(CheckpointRow).where(CheckpointRow.job_id == job_id, CheckpointRow.kind == "epoch")
    return session.scalars(query.order_by(CheckpointRow.epoch.desc())).all()


def sync_checkpoints(session: Session, *, job_id: str, attempt: int, items: Sequence[dict[str, Any]]) -> None:
    """Make the job's checkpoint rows equal the engine's manifest (new and rewritten files in, pruned out)."""
    _fence(session, job_id, attempt)
    names = [i["name"] for i in items]
    session.execute(delete(CheckpointRow).where(CheckpointRow.job_id == job_id, CheckpointRow.name.not_in(names)))
    existing = {row.name: row for row in session.scalars(select(CheckpointRow).where(CheckpointRow.job_id == job_id))}
    for item in items:
        row = existing.get(item["name"])
        if row is None:
            session.add(CheckpointRow(job_id=job_id, created_at=utcnow(), **item))
        elif row.sha256 != item["sha256"] or row.epoch != item["epoch"]:
            row.epoch, row.kind, row.bytes, row.sha256 = item["epoch"], item["kind"], item["bytes"], item["sha256"]
            row.created_at = utcnow()
    session.commit()


def _end_attempt(
    session: Session, job_id: str, attempt: int, outcome: str, ended_at: datetime, error: str | None
) -> None:
    session.execute(
        update(Attempt)
        .where(Attempt.job_id == job_id, Attempt.attempt == attempt)
        .values(outcome=outcome, ended_at=ended_at, error=error)
    )


def finish(
    session: Session,
    *,
    job_id: str,
    attempt: int,
    status: str,
    stop_reason: str | None = None,
    error: str | None = None,
    architecture: dict[str, Any] | None = None,
) -> None:
    """End the job (succeeded, failed or cancelled) and its lease, if this attempt still holds it."""
    done = session.execute(select(Job.status, Job.attempt).where(Job.id == job_id)).one_or_none()
    if done is not None and tuple(done) == (status, attempt):  # a retried call whose first commit did land
        return
    job = _fence(session, job_id, attempt)
    now = utcnow()
    job.status, job.stop_reason, job.error, job.finished_at = status, stop_reason, error, now
    job.lease_owner = job.lease_expires_at = None
    if architecture is not None:
        job.architecture = architecture
    _end_attempt(session, job_id, attempt, status, now, error)
    session.commit()


def release(session: Session, *, job_id: str, attempt: int, reason: str) -> None:
    """Give the job back (graceful shutdown): queued again at once, for any worker to resume."""
    job = _fence(session, job_id, attempt)
    now = utcnow()
    job.status, job.enqueued_at = "queued", now
    job.lease_owner = job.lease_expires_at = None
    _end_attempt(session, job_id, attempt, "released", now, reason)
    session.commit()


# The reaper's side: expired leases, and queued jobs whose message may be missing.


def expire(session: Session, *, job_id: str, now: datetime, max_attempts: int) -> str | None:
    """End an expired lease (committed): the job is queued again, cancelled if a cancel was asked for, or
    failed once its worker has been lost `max_attempts` times. Returns the new status; None if the lease
    was not expired after all (renewed, or taken by another reaper first)."""
    job = session.scalar(select(Job).where(Job.id == job_id, _expired(now)).with_for_update())
    if job is None:
        session.rollback()
        return None
    expired_at, owner = job.lease_expires_at or now, job.lease_owner
    _end_attempt(session, job_id, job.attempt, "lost", expired_at, f"lease expired ({owner} stopped renewing it)")
    session.flush()
    lost = session.scalar(
        select(func.count()).select_from(Attempt).where(Attempt.job_id == job_id, Attempt.outcome == "lost")
    )
    job.lease_owner = job.lease_expires_at = None
    if job.cancel_requested:
        job.status, job.stop_reason, job.finished_at = "cancelled", "cancelled", now
    elif (lost or 0) >= max_attempts:
        job.status, job.finished_at = "failed", now
        job.error = (
            f"the worker running this job was lost {lost} times (max_attempts is {max_attempts}); the last, "
            f"{owner}, stopped renewing its lease at {expired_at.isoformat()}. A job whose worker keeps dying "
            "(out of memory, killed, a crash in native code) is given up instead of being retried forever."
        )
    else:
        job.status, job.enqueued_at = "queued", None  # to be sent by the reaper
    status = job.status
    session.commit()
    return status


def expired_jobs(session: Session, *, now: datetime, limit: int = 100) -> list[str]:
    query = select(Job.id).where(_expired(now)).order_by(Job.lease_expires_at).limit(limit)
    return list(session.scalars(query))


def take_unsent(session: Session, *, now: datetime, requeue_after: float, limit: int = 100) -> list[str]:
    """Queued jobs whose message was never sent (the broker was down) or was sent `requeue_after` seconds
    ago (a broker without persistence loses messages when it restarts): marked as sent now, committed, and
    returned for sending. A job taken by another reaper in between is left out."""
    stale = now - timedelta(seconds=requeue_after)
    due = (Job.enqueued_at.is_(None)) | (Job.enqueued_at < stale)
    rows = session.execute(
        select(Job.id, Job.enqueued_at).where(Job.status == "queued", due).order_by(Job.created_at).limit(limit)
    ).all()
    taken = []
    for job_id, sent in rows:
        done = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "queued", Job.enqueued_at.is_not_distinct_from(sent))
            .values(enqueued_at=now)
        )
        if done.rowcount:  # type: ignore[attr-defined]
            taken.append(job_id)
    session.commit()
    return taken


def mark_unsent(session: Session, *, job_id: str) -> None:
    """The message could not be sent: the reaper sends it once the broker is back."""
    session.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(enqueued_at=None))
    session.commit()
