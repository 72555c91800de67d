"""Job routes: each parses, calls one function of `service.jobs`, and answers."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import FileResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from worker.search.spec import JobSpec

from .. import datasets, jobs, leases
from ..deps import (
    CeleryDep,
    DbDep,
    OwnerDep,
    SessionDep,
    SettingsDep,
    WatcherDep,
    invalid,
    require_content_type,
    require_printable,
)
from ..models import Job
from ..queue import enqueue_job
from ..schemas import (
    Architecture,
    AttemptList,
    AttemptRead,
    CheckpointList,
    CheckpointRead,
    JobList,
    JobRead,
    MetricsPage,
    Status,
)
from ..streams import STREAM_PAGE, JobState, Records, follow

router = APIRouter(prefix="/jobs", tags=["jobs"])

MAX_EPOCH = 2**31 - 1  # epochs are a PostgreSQL INTEGER: a larger `after` would fail the query

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200)]


@router.post(
    "",
    status_code=201,
    response_model=JobRead,
    dependencies=[Depends(require_content_type("application/json"))],
    summary="Validate, store and enqueue a search",
)
def create_job(
    spec: JobSpec,
    response: Response,
    session: SessionDep,
    owner: OwnerDep,
    celery: CeleryDep,
    idempotency_key: IdempotencyKey = None,
) -> Job:
    require_printable(idempotency_key, ("header", "Idempotency-Key"))
    problems = datasets.reference_errors(session, owner=owner, spec=spec)
    if problems:
        raise invalid(*((("body", *loc), msg, value) for loc, msg, value in problems))
    digest = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()
    job, created = jobs.create_job(
        session, owner=owner, spec=spec, idempotency_key=idempotency_key, request_hash=digest
    )
    if created and not enqueue_job(celery, job.id):
        leases.mark_unsent(session, job_id=job.id)  # stored all the same: the workers' reaper sends it
    else:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/jobs/{job.id}"
    return job


@router.get("", response_model=JobList, summary="The caller's jobs, newest first")
def list_jobs(
    session: SessionDep,
    owner: OwnerDep,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> dict[str, Any]:
    try:
        items, next_cursor = jobs.list_jobs(session, owner=owner, status=status, limit=limit, cursor=cursor)
    except jobs.BadCursor as exc:
        raise invalid((("query", "cursor"), str(exc), cursor)) from None
    return {"items": items, "next_cursor": next_cursor}


@router.get("/{job_id}", response_model=JobRead)
def get_job(job_id: str, session: SessionDep, owner: OwnerDep) -> Job:
    return jobs.get_job(session, owner=owner, job_id=job_id)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobRead, summary="Stop at the next step boundary")
def cancel_job(job_id: str, session: SessionDep, owner: OwnerDep) -> Job:
    return jobs.request_cancel(session, owner=owner, job_id=job_id)


@router.delete("/{job_id}", status_code=204, summary="Delete a finished job and its files")
def delete_job(job_id: str, session: SessionDep, owner: OwnerDep, settings: SettingsDep) -> Response:
    jobs.delete_job(session, owner=owner, job_id=job_id)
    datasets.remove_path(settings.jobs_dir / job_id)
    return Response(status_code=204)


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return "*" in tags or etag in tags


@router.get("/{job_id}/metrics", response_model=MetricsPage, summary="Epoch records after `after`, oldest first")
def get_metrics(
    job_id: str,
    session: SessionDep,
    owner: OwnerDep,
    after: Annotated[int, Query(ge=0, le=MAX_EPOCH)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> Response:
    job = jobs.get_job(session, owner=owner, job_id=job_id)
    # Epoch records never change once written and the job's `epoch` moves with each one (same transaction),
    # so the page is fixed by these values: the ETag is known, and a 304 answered, before any record is read.
    upto = min(job.epoch, after + limit)
    etag = '"' + hashlib.sha256(f"{job.id}|{job.status}|{after}|{upto}".encode()).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    rows = jobs.epoch_texts(session, job_id=job_id, after=after, upto=upto, limit=limit)
    head = json.dumps({"job_id": job.id, "status": job.status})[:-1]
    next_after = rows[-1][0] if rows else after
    body = f'{head}, "items": [{", ".join(text for _, text in rows)}], "next_after": {next_after}}}'
    return Response(body, media_type="application/json", headers=headers)


def _owned_job(job_id: str, db: DbDep, owner: OwnerDep) -> Job:
    """The job, read in a session of its own: a stream must not hold a pooled connection while it is open."""
    with db.session() as session:
        return jobs.get_job(session, owner=owner, job_id=job_id)


def _resume_point(
    after: Annotated[int | None, Query(ge=0, le=MAX_EPOCH)] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
) -> int:
    """A dependency, so that a bad Last-Event-ID is a 422 before the stream starts, not an error inside it."""
    if last_event_id is None:
        return after or 0
    value = last_event_id.strip()
    if not (value.isascii() and value.isdigit()) or int(value) > MAX_EPOCH:
        raise invalid((("header", "Last-Event-ID"), "Last-Event-ID must be the epoch number of an event", value))
    return int(value)


@router.get(
    "/{job_id}/metrics/stream",
    response_class=EventSourceResponse,
    summary="Server-Sent Events: `epoch` per finished epoch (id = epoch), `status` per status change",
)
async def stream_metrics(
    db: DbDep,
    watcher: WatcherDep,
    settings: SettingsDep,
    job: Annotated[Job, Depends(_owned_job)],
    resume_after: Annotated[int, Depends(_resume_point)],
) -> AsyncIterator[ServerSentEvent]:
    # `job` and `resume_after` are resolved before the stream starts: a missing job is a plain 404.
    job_id = job.id

    def read(after: int) -> tuple[JobState | None, Records]:
        with db.session() as session:
            return jobs.stream_read(session, job_id=job_id, after=after, limit=STREAM_PAGE)

    events = follow(job_id, resume_after, watcher=watcher, read=read, keepalive=settings.stream_keepalive_seconds)
    async for event in events:
        yield event


@router.get(
    "/{job_id}/architecture",
    response_model=Architecture,
    summary="The derived cell now (while running) or final",
    responses={404: {"description": "no such job, or no epoch has finished yet"}},
)
def get_architecture(job_id: str, session: SessionDep, owner: OwnerDep) -> dict[str, Any]:
    job = jobs.get_job(session, owner=owner, job_id=job_id)
    if job.architecture is None:
        raise jobs.NotFound(f"job {job_id} has no architecture yet: it is {job.status} and no epoch has finished")
    return job.architecture


@router.get("/{job_id}/attempts", response_model=AttemptList, summary="Each time a worker took the job, oldest first")
def list_attempts(job_id: str, session: SessionDep, owner: OwnerDep) -> dict[str, Any]:
    jobs.get_job(session, owner=owner, job_id=job_id)
    return {"items": [AttemptRead.model_validate(r) for r in jobs.list_attempts(session, job_id=job_id)]}


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(job_id: str, session: SessionDep, owner: OwnerDep) -> dict[str, Any]:
    jobs.get_job(session, owner=owner, job_id=job_id)
    return {"items": [CheckpointRead.model_validate(r) for r in jobs.list_checkpoints(session, job_id=job_id)]}


@router.get(
    "/{job_id}/checkpoints/{name:path}",
    response_class=FileResponse,
    summary="Download a checkpoint (loads with torch.load(..., weights_only=True))",
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_checkpoint(job_id: str, name: str, session: SessionDep, owner: OwnerDep, settings: SettingsDep) -> Any:
    jobs.get_job(session, owner=owner, job_id=job_id)
    # The name only selects a row; the file's path is built from the row, never from the request.
    row = jobs.get_checkpoint(session, job_id=job_id, name=name)
    folder = (settings.jobs_dir / job_id / "checkpoints").resolve()
    path = (folder / row.name).resolve()
    if path.parent != folder or not path.is_file():
        raise jobs.NotFound(f"the file of checkpoint {row.name!r} is gone (pruned or deleted)")
    return FileResponse(
        Path(path),
        media_type="application/octet-stream",
        filename=row.name,
        headers={"X-Checkpoint-SHA256": row.sha256},
    )
