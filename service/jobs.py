"""Every SQL query of the jobs domain: the API's reads and writes and the worker's progress reports."""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime

from sqlalchemy import Text, and_, cast, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker.search.spec import JobSpec

from .models import TERMINAL, Attempt, CheckpointRow, EpochRow, Job, utcnow
from .streams import JobState, Records


class NotFound(LookupError):
    """Answered as 404: missing, or belongs to another owner (the two are indistinguishable)."""


class Conflict(RuntimeError):
    """Answered as 409: the request does not fit the job's state."""


class BadCursor(ValueError):
    """A `cursor` this service did not hand out."""


def create_job(
    session: Session,
    *,
    owner: str,
    spec: JobSpec,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> tuple[Job, bool]:
    """Store a queued job (committed); with an idempotency key, a repeat returns the first job and False."""
    if idempotency_key is not None:
        first = _by_idempotency_key(session, owner, idempotency_key, request_hash)
        if first is not None:
            return first, False
    job = Job(
        id=str(uuid.uuid4()),
        owner=owner,
        name=spec.name,
        task=spec.task,
        status="queued",
        spec=spec.model_dump(mode="json"),
        epochs=spec.search.epochs,
        epoch=0,
        attempt=0,
        cancel_requested=False,
        enqueued_at=utcnow(),  # sent right after the commit; set back to NULL if that fails
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        created_at=utcnow(),
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:  # the same key raced in from another request: theirs is the first job
        session.rollback()
        if idempotency_key is None:
            raise
        first = _by_idempotency_key(session, owner, idempotency_key, request_hash)
        if first is None:
            raise
        return first, False
    return job, True


def _by_idempotency_key(session: Session, owner: str, key: str, request_hash: str | None) -> Job | None:
    job = session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))
    if job is not None and job.request_hash != request_hash:
        raise Conflict("this Idempotency-Key was already used with a different request body")
    return job


def get_job(session: Session, *, owner: str, job_id: str) -> Job:
    # PostgreSQL text cannot hold NUL (the query would fail); no id has one.
    job = None if "\x00" in job_id else session.scalar(select(Job).where(Job.id == job_id, Job.owner == owner))
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, job_id = raw.split("|", 1)
        if "\x00" in job_id:
            raise ValueError("NUL in a cursor")
        return datetime.fromisoformat(created), job_id
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise BadCursor("cursor is not one this service handed out; start again without it") from None


def list_jobs(
    session: Session, *, owner: str, status: str | None, limit: int, cursor: str | None
) -> tuple[Sequence[Job], str | None]:
    """The owner's jobs, newest first, `limit` a page; the cursor continues after the last one."""
    query = select(Job).where(Job.owner == owner)
    if status is not None:
        query = query.where(Job.status == status)
    if cursor is not None:
        created, job_id = decode_cursor(cursor)
        query = query.where(or_(Job.created_at < created, (Job.created_at == created) & (Job.id < job_id)))
    rows = session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).all()
    if len(rows) > limit:
        return rows[:limit], encode_cursor(rows[limit - 1])
    return rows, None


def request_cancel(session: Session, *, owner: str, job_id: str) -> Job:
    """A queued job is cancelled at once (it will never start); a running one is flagged for its worker."""
    job = get_job(session, owner=owner, job_id=job_id)
    now = utcnow()
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(status="cancelled", stop_reason="cancelled", finished_at=now, cancel_requested=True)
    )
    if done.rowcount == 0:  # type: ignore[attr-defined]
        session.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(cancel_requested=True))
    session.commit()
    session.refresh(job)
    if job.status in ("succeeded", "failed"):
        raise Conflict(f"job {job_id} has already finished ({job.status}); there is nothing to cancel")
    return job


def delete_job(session: Session, *, owner: str, job_id: str) -> None:
    """Remove a finished job's rows (epochs and checkpoints cascade); the caller removes its files."""
    job = get_job(session, owner=owner, job_id=job_id)
    gone = session.execute(delete(Job).where(Job.id == job_id, Job.status.in_(TERMINAL)))
    if gone.rowcount == 0:  # type: ignore[attr-defined]
        session.rollback()
        raise Conflict(f"job {job_id} is {job.status}; cancel it and wait until it has stopped before deleting it")
    session.commit()


def epoch_texts(session: Session, *, job_id: str, after: int, upto: int, limit: int) -> Records:
    """(epoch, record as stored JSON text) for after < epoch <= upto, oldest first: no decoding, no re-encoding."""
    query = (
        select(EpochRow.epoch, cast(EpochRow.record, Text))
        .where(EpochRow.job_id == job_id, EpochRow.epoch > after, EpochRow.epoch <= upto)
        .order_by(EpochRow.epoch)
        .limit(limit)
    )
    return [(int(epoch), str(text)) for epoch, text in session.execute(query)]


def watch_read(session: Session, *, known: Mapping[str, int]) -> dict[str, tuple[JobState, Records]]:
    """For the stream watcher: each job's state, and its epochs (as JSON text) after `known[job]` up to the
    state's epoch; nothing for a job whose `known` is -1 (not read before). Two queries for all the jobs."""
    rows = session.execute(
        select(Job.id, Job.status, Job.epoch, Job.stop_reason, Job.error).where(Job.id.in_(list(known)))
    )
    states = {job_id: JobState(status, epoch, stop_reason, error) for job_id, status, epoch, stop_reason, error in rows}
    wanted = [(j, known[j], s.epoch) for j, s in states.items() if 0 <= known[j] < s.epoch]
    found: dict[str, tuple[JobState, Records]] = {j: (s, []) for j, s in states.items()}
    if wanted:
        query = (
            select(EpochRow.job_id, EpochRow.epoch, cast(EpochRow.record, Text))
            .where(
                or_(*(and_(EpochRow.job_id == j, EpochRow.epoch > lo, EpochRow.epoch <= hi) for j, lo, hi in wanted))
            )
            .order_by(EpochRow.job_id, EpochRow.epoch)
        )
        for job_id, epoch, text in session.execute(query):
            found[job_id][1].append((int(epoch), str(text)))
    return found


def stream_read(session: Session, *, job_id: str, after: int, limit: int) -> tuple[JobState | None, Records]:
    """A stream's own read: the job's state, then its epochs after `after` up to the job's own count (so a
    terminal status read here comes with every epoch written before it); (None, []) once it is gone."""
    job = session.get(Job, job_id)
    if job is None:
        return None, []
    state = JobState(job.status, job.epoch, job.stop_reason, job.error)
    return state, epoch_texts(session, job_id=job_id, after=after, upto=job.epoch, limit=limit)


def list_checkpoints(session: Session, *, job_id: str) -> Sequence[CheckpointRow]:
    query = select(CheckpointRow).where(CheckpointRow.job_id == job_id)
    return session.scalars(query.order_by(CheckpointRow.epoch, CheckpointRow.kind)).all()


def list_attempts(session: Session, *, job_id: str) -> Sequence[Attempt]:
    return session.scalars(select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.attempt)).all()


def get_checkpoint(session: Session, *, job_id: str, name: str) -> CheckpointRow:
    row = None if "\x00" in name else session.get(CheckpointRow, (job_id, name))
    if row is None:
        raise NotFound(f"job {job_id} has no checkpoint {name!r}; GET /jobs/{job_id}/checkpoints lists them")
    return row


def count_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    return {status: int(n) for status, n in rows}
