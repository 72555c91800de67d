"""The lease on a job (service/leases.py) and the reaper (worker/lease.py), on a real migrated PostgreSQL.

Every test reads the rows back as an operator would: the job, its attempts, its epochs and checkpoints.
Each call is made in a fresh session, as the worker makes it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import select, text, update

import worker.lease as lease_module
from service import leases
from service.db import Database
from service.leases import Claim, LeaseLost
from service.models import Attempt, CheckpointRow, EpochRow, Job, utcnow
from service.settings import Settings
from worker.lease import Reaper

from .factories import add_job, epoch_record

LEASE = 60.0
MAX = 3


# Helpers: calls as a worker makes them, and the rows read back.


def claim(
    db: Database, job_id: str, worker: str = "w1", *, max_attempts: int = MAX, lease: float = LEASE
) -> Claim | None:
    with db.session() as session:
        return leases.claim(session, job_id=job_id, worker=worker, lease_seconds=lease, max_attempts=max_attempts)


def job_row(db: Database, job_id: str) -> dict[str, Any]:
    with db.session() as session:
        return dict(session.execute(select(Job.__table__).where(Job.id == job_id)).mappings().one())


def attempt_rows(db: Database, job_id: str) -> list[dict[str, Any]]:
    query = select(Attempt.__table__).where(Attempt.job_id == job_id).order_by(Attempt.attempt)
    with db.session() as session:
        return [dict(row) for row in session.execute(query).mappings()]


def epoch_rows(db: Database, job_id: str) -> list[dict[str, Any]]:
    query = select(EpochRow.__table__).where(EpochRow.job_id == job_id).order_by(EpochRow.epoch)
    with db.session() as session:
        return [dict(row) for row in session.execute(query).mappings()]


def checkpoint_rows(db: Database, job_id: str) -> list[dict[str, Any]]:
    query = select(CheckpointRow.__table__).where(CheckpointRow.job_id == job_id).order_by(CheckpointRow.name)
    with db.session() as session:
        return [dict(row) for row in session.execute(query).mappings()]


def snapshot(db: Database, job_id: str) -> dict[str, Any]:
    """Everything the database holds about the job: to show a refused call wrote nothing."""
    return {
        "job": job_row(db, job_id),
        "attempts": attempt_rows(db, job_id),
        "epochs": epoch_rows(db, job_id),
        "checkpoints": checkpoint_rows(db, job_id),
    }


def set_job(db: Database, job_id: str, **values: Any) -> None:
    with db.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def expire_lease(db: Database, job_id: str, *, ago: float = 5.0) -> datetime:
    """The lease ran out `ago` seconds ago (its worker stopped renewing it); returns the expiry."""
    expired_at = utcnow() - timedelta(seconds=ago)
    set_job(db, job_id, lease_expires_at=expired_at)
    return expired_at


def record(db: Database, job_id: str, attempt: int, epoch: int, *, val_loss: float = 1.0) -> bool:
    rec = epoch_record(epoch, val_loss=val_loss)
    with db.session() as session:
        return leases.record_epoch(
            session, job_id=job_id, attempt=attempt, record=rec, architecture={"epoch": epoch, "final": False}
        )


def history(*epochs: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(epoch_record(e, val_loss=2.0), {"epoch": e, "final": False}) for e in epochs]


def start_resume(db: Database, job_id: str, attempt: int, resumed_from: int, hist: list[Any]) -> int:
    with db.session() as session:
        return leases.start_resume(session, job_id=job_id, attempt=attempt, resumed_from=resumed_from, history=hist)


def checkpoint_item(name: str, epoch: int, sha: str = "a") -> dict[str, Any]:
    return {"name": name, "epoch": epoch, "kind": "epoch", "bytes": 100 + epoch, "sha256": sha * 64}


def sync(db: Database, job_id: str, attempt: int, items: list[dict[str, Any]]) -> None:
    with db.session() as session:
        leases.sync_checkpoints(session, job_id=job_id, attempt=attempt, items=items)


def heartbeat(db: Database, job_id: str, attempt: int, *, lease: float = LEASE) -> bool:
    with db.session() as session:
        return leases.heartbeat(session, job_id=job_id, attempt=attempt, lease_seconds=lease)


def expire(db: Database, job_id: str, *, now: datetime | None = None, max_attempts: int = MAX) -> str | None:
    with db.session() as session:
        return leases.expire(session, job_id=job_id, now=now or utcnow(), max_attempts=max_attempts)


def mark_unsent(db: Database, job_id: str) -> None:
    with db.session() as session:
        leases.mark_unsent(session, job_id=job_id)


def taken_over(db: Database) -> str:
    """A job whose attempt 1 (w1) recorded epoch 1 and a checkpoint, then lost its lease to attempt 2 (w2)."""
    job_id = add_job(db)
    assert claim(db, job_id, "w1") is not None
    assert record(db, job_id, 1, 1)
    sync(db, job_id, 1, [checkpoint_item("epoch-0001.pt", 1)])
    expire_lease(db, job_id)
    second = claim(db, job_id, "w2")
    assert second is not None and second.attempt == 2
    return job_id


class FakeSend:
    """The broker as the reaper sees it: records every job id it is given; `ok` says whether sending works."""

    def __init__(self, ok: bool = True) -> None:
        self.ok = ok
        self.ids: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, job_id: str) -> bool:
        with self._lock:
            self.ids.append(job_id)
        return self.ok


def reaper(
    db: Database, send: Callable[[str], bool], *, requeue_after: float = 300.0, max_attempts: int = MAX
) -> Reaper:
    """A reaper whose thread is never started: the tests call reap() themselves."""
    return Reaper(db, send, every=3600.0, requeue_after=requeue_after, max_attempts=max_attempts)


# claim


def test_claim_takes_a_queued_job(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    before = utcnow()
    got = claim(clean_db, job_id, "worker-a")
    after = utcnow()

    assert got is not None
    assert (got.job_id, got.attempt, got.epoch) == (job_id, 1, 0)
    assert got.spec == job_row(clean_db, job_id)["spec"]
    job = job_row(clean_db, job_id)
    assert job["status"] == "running"
    assert job["attempt"] == 1
    assert job["lease_owner"] == "worker-a"
    assert before <= job["heartbeat_at"] <= after
    assert job["lease_expires_at"] == job["heartbeat_at"] + timedelta(seconds=LEASE)
    assert job["started_at"] == job["heartbeat_at"]
    (attempt,) = attempt_rows(clean_db, job_id)
    assert attempt["attempt"] == 1
    assert attempt["worker"] == "worker-a"
    assert attempt["claimed_at"] == job["heartbeat_at"]
    assert attempt["outcome"] is None and attempt["ended_at"] is None and attempt["error"] is None
    assert attempt["resumed_from_epoch"] is None
    assert attempt["epochs_redone"] == 0


def test_a_second_claim_while_the_lease_is_live_gets_nothing_and_changes_nothing(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    assert claim(clean_db, job_id, "worker-a") is not None
    before = snapshot(clean_db, job_id)

    assert claim(clean_db, job_id, "worker-b") is None
    assert claim(clean_db, job_id, "worker-a") is None  # a duplicate message to the holder itself

    assert snapshot(clean_db, job_id) == before


def test_claim_takes_over_an_expired_lease(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    assert claim(clean_db, job_id, "worker-a") is not None
    assert record(clean_db, job_id, 1, 1)
    assert record(clean_db, job_id, 1, 2)
    first = job_row(clean_db, job_id)
    expired_at = expire_lease(clean_db, job_id)

    got = claim(clean_db, job_id, "worker-b")

    assert got is not None
    assert got.attempt == 2
    assert got.epoch == 2  # what attempt 1 recorded
    job = job_row(clean_db, job_id)
    assert (job["status"], job["attempt"], job["lease_owner"]) == ("running", 2, "worker-b")
    assert job["lease_expires_at"] > utcnow() + timedelta(seconds=LEASE - 10)
    assert job["started_at"] == first["started_at"]  # the job started with its first attempt
    assert job["finished_at"] is None
    lost, current = attempt_rows(clean_db, job_id)
    assert (lost["attempt"], lost["worker"], lost["outcome"]) == (1, "worker-a", "lost")
    assert lost["ended_at"] == expired_at
    assert "worker-a" in lost["error"]
    assert (current["attempt"], current["worker"], current["outcome"], current["ended_at"]) == (
        2,
        "worker-b",
        None,
        None,
    )


@pytest.mark.parametrize("status", ["cancelled", "succeeded", "failed"])
def test_claim_refuses_a_finished_job(clean_db: Database, status: str) -> None:
    job_id = add_job(clean_db, status=status)
    before = snapshot(clean_db, job_id)

    assert claim(clean_db, job_id) is None

    assert snapshot(clean_db, job_id) == before
    assert before["attempts"] == []


def test_claim_of_a_missing_job_gets_nothing(clean_db: Database) -> None:
    assert claim(clean_db, str(uuid.uuid4())) is None
    with clean_db.session() as session:
        assert session.scalars(select(Attempt)).all() == []


def test_claim_of_an_expired_lease_with_a_cancel_request_cancels_the_job(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    assert claim(clean_db, job_id, "worker-a") is not None
    set_job(clean_db, job_id, cancel_requested=True)
    expire_lease(clean_db, job_id)

    assert claim(clean_db, job_id, "worker-b") is None

    job = job_row(clean_db, job_id)
    assert (job["status"], job["stop_reason"], job["attempt"]) == ("cancelled", "cancelled", 1)
    assert job["lease_owner"] is None and job["finished_at"] is not None
    assert [a["outcome"] for a in attempt_rows(clean_db, job_id)] == ["lost"]


def test_claim_gives_up_a_job_whose_worker_was_lost_max_attempts_times(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    for n, worker in enumerate(["worker-a", "worker-b"], start=1):
        got = claim(clean_db, job_id, worker, max_attempts=2)
        assert got is not None and got.attempt == n
        expire_lease(clean_db, job_id)

    assert claim(clean_db, job_id, "worker-c", max_attempts=2) is None

    job = job_row(clean_db, job_id)
    assert (job["status"], job["attempt"]) == ("failed", 2)
    assert "max_attempts is 2" in job["error"]
    assert [a["outcome"] for a in attempt_rows(clean_db, job_id)] == ["lost", "lost"]


# fencing: a write of an attempt that no longer holds the job is refused and writes nothing

STALE_WRITES: dict[str, Callable[[Database, str], object]] = {
    "record_epoch": lambda db, job_id: record(db, job_id, 1, 2),
    "record_epoch_again": lambda db, job_id: record(db, job_id, 1, 1, val_loss=0.1),
    "start_resume": lambda db, job_id: start_resume(db, job_id, 1, 0, history(1, 2, 3)),
    "sync_checkpoints": lambda db, job_id: sync(db, job_id, 1, [checkpoint_item("epoch-0002.pt", 2)]),
    "sync_checkpoints_prune": lambda db, job_id: sync(db, job_id, 1, []),
    "finish": lambda db, job_id: _finish(db, job_id, 1, "succeeded"),
    "release": lambda db, job_id: _release(db, job_id, 1),
    "heartbeat": lambda db, job_id: heartbeat(db, job_id, 1),
}


def _finish(db: Database, job_id: str, attempt: int, status: str, **fields: Any) -> None:
    with db.session() as session:
        leases.finish(session, job_id=job_id, attempt=attempt, status=status, **fields)


def _release(db: Database, job_id: str, attempt: int, reason: str = "worker shutdown") -> None:
    with db.session() as session:
        leases.release(session, job_id=job_id, attempt=attempt, reason=reason)


@pytest.mark.parametrize("write", list(STALE_WRITES))
def test_a_write_of_a_replaced_attempt_is_refused_and_writes_nothing(clean_db: Database, write: str) -> None:
    job_id = taken_over(clean_db)
    before = snapshot(clean_db, job_id)

    with pytest.raises(LeaseLost):
        STALE_WRITES[write](clean_db, job_id)

    assert snapshot(clean_db, job_id) == before
    assert before["job"]["status"] == "running" and before["job"]["attempt"] == 2


def test_the_current_attempt_writes_after_a_take_over(clean_db: Database) -> None:
    job_id = taken_over(clean_db)

    assert heartbeat(clean_db, job_id, 2) is False
    assert record(clean_db, job_id, 2, 2)
    sync(clean_db, job_id, 2, [checkpoint_item("epoch-0001.pt", 1), checkpoint_item("epoch-0002.pt", 2)])
    _finish(clean_db, job_id, 2, "succeeded", stop_reason="epochs", architecture={"final": True})

    job = job_row(clean_db, job_id)
    assert (job["status"], job["stop_reason"], job["epoch"], job["architecture"]) == (
        "succeeded",
        "epochs",
        2,
        {"final": True},
    )
    assert job["lease_owner"] is None and job["lease_expires_at"] is None and job["finished_at"] is not None
    assert [(e["epoch"], e["attempt"]) for e in epoch_rows(clean_db, job_id)] == [(1, 1), (2, 2)]
    assert [c["name"] for c in checkpoint_rows(clean_db, job_id)] == ["epoch-0001.pt", "epoch-0002.pt"]
    attempts = attempt_rows(clean_db, job_id)
    assert [(a["attempt"], a["outcome"]) for a in attempts] == [(1, "lost"), (2, "succeeded")]
    assert attempts[1]["ended_at"] == job["finished_at"]


def test_a_finished_attempt_can_write_nothing_more(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    assert claim(clean_db, job_id) is not None
    _finish(clean_db, job_id, 1, "failed", error="boom")
    before = snapshot(clean_db, job_id)

    for write in (
        lambda: heartbeat(clean_db, job_id, 1),
        lambda: record(clean_db, job_id, 1, 1),
        lambda: _finish(clean_db, job_id, 1, "succeeded"),
        lambda: _release(clean_db, job_id, 1),
    ):
        with pytest.raises(LeaseLost):
            write()

    assert snapshot(clean_db, job_id) == before
    assert before["job"]["error"] == "boom"
    assert before["attempts"][0]["outcome"] == "failed" and before["attempts"][0]["error"] == "boom"


def test_release_gives_the_job_back_for_the_next_attempt(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    assert claim(clean_db, job_id, "worker-a") is not None
    assert record(clean_db, job_id, 1, 1)

    before = utcnow()
    _release(clean_db, job_id, 1, reason="worker shutdown")

    job = job_row(clean_db, job_id)
    assert (job["status"], job["lease_owner"], job["lease_expires_at"]) == ("queued", None, None)
    assert job["enqueued_at"] >= before  # sent by the releasing worker right after
    (released,) = attempt_rows(clean_db, job_id)
    assert (released["outcome"], released["error"]) == ("released", "worker shutdown")
    got = claim(clean_db, job_id, "worker-b")
    assert got is not None and (got.attempt, got.epoch) == (2, 1)
    assert [a["outcome"] for a in attempt_rows(clean_db, job_id)] == ["released", None]


# record_epoch


def test_record_epoch_writes_the_row_and_the_jobs_summary(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    assert claim(clean_db, job_id) is not None

    assert record(clean_db, job_id, 1, 1, val_loss=0.75) is True

    (row,) = epoch_rows(clean_db, job_id)
    assert (row["epoch"], row["attempt"]) == (1, 1)
    assert row["record"] == epoch_record(1, val_loss=0.75)
    job = job_row(clean_db, job_id)
    assert (job["epoch"], job["best_val_loss"], job["lr"]) == (1, 0.75, 0.01)
    assert job["architecture"] == {"epoch": 1, "final": False}


def test_the_same_epoch_recorded_again_is_not_written_twice(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    assert claim(clean_db, job_id) is not None
    assert record(clean_db, job_id, 1, 1, val_loss=0.75)
    assert record(clean_db, job_id, 1, 2, val_loss=0.5)
    before = snapshot(clean_db, job_id)

    assert record(clean_db, job_id, 1, 2, val_loss=0.25) is False
    assert record(clean_db, job_id, 1, 1, val_loss=0.25) is False

    assert snapshot(clean_db, job_id) == before
    assert [e["epoch"] for e in before["epochs"]] == [1, 2]
    assert before["epochs"][1]["record"]["val_loss"] == 0.5  # the record written the first time stands
    assert before["job"]["epoch"] == 2


def test_an_epoch_redone_after_a_resume_never_lowers_the_jobs_epoch(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    assert claim(clean_db, job_id) is not None
    for epoch in (1, 2, 3):
        assert record(clean_db, job_id, 1, epoch, val_loss=1.0 / epoch)
    expire_lease(clean_db, job_id)
    assert claim(clean_db, job_id, "w2") is not None
    assert start_resume(clean_db, job_id, 2, 1, history(1)) == 2

    assert record(clean_db, job_id, 2, 2, val_loss=9.0) is False
    assert record(clean_db, job_id, 2, 3, val_loss=9.0) is False

    job = job_row(clean_db, job_id)
    assert (job["epoch"], job["best_val_loss"]) == (3, pytest.approx(1.0 / 3))
    assert [(e["epoch"], e["attempt"]) for e in epoch_rows(clean_db, job_id)] == [(1, 1), (2, 1), (3, 1)]
    assert record(clean_db, job_id, 2, 4, val_loss=0.1) is True
    assert (job_row(clean_db, job_id)["epoch"], epoch_rows(clean_db, job_id)[-1]["attempt"]) == (4, 2)


def test_a_missing_lower_epoch_is_written_without_lowering_the_summary(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    assert claim(clean_db, job_id) is not None
    assert record(clean_db, job_id, 1, 1)
    assert record(clean_db, job_id, 1, 3, val_loss=0.3)

    assert record(clean_db, job_id, 1, 2, val_loss=0.9) is True

    assert [e["epoch"] for e in epoch_rows(clean_db, job_id)] == [1, 2, 3]
    job = job_row(clean_db, job_id)
    assert (job["epoch"], job["best_val_loss"], job["architecture"]) == (3, 0.3, {"epoch": 3, "final": False})


# start_resume


def test_start_resume_backfills_the_checkpoints_records_the_database_lacks(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    assert claim(clean_db, job_id) is not None
    assert record(clean_db, job_id, 1, 1, val_loss=0.5)
    assert record(clean_db, job_id, 1, 2, val_loss=0.5)
    expire_lease(clean_db, job_id)  # attempt 1 died after its checkpoint at epoch 4, before epoch rows 3 and 4
    assert claim(clean_db, job_id, "w2") is not None

    assert start_resume(clean_db, job_id, 2, 4, history(1, 2, 3, 4)) == 0

    rows = epoch_rows(clean_db, job_id)
    assert [(e["epoch"], e["attempt"]) for e in rows] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert rows[0]["record"]["val_loss"] == 0.5  # rows already there are kept as written
    assert rows[3]["record"] == epoch_record(4, val_loss=2.0)
    job = job_row(clean_db, job_id)
    assert (job["epoch"], job["best_val_loss"], job["epochs_redone"]) == (4, 2.0, 0)
    assert job["architecture"] == {"epoch": 4, "final": False}
    current = attempt_rows(clean_db, job_id)[1]
    assert (current["resumed_from_epoch"], current["epochs_redone"]) == (4, 0)


def test_start_resume_from_an_older_checkpoint_counts_the_epochs_redone(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    assert claim(clean_db, job_id) is not None
    for epoch in (1, 2, 3):
        assert record(clean_db, job_id, 1, epoch)
    expire_lease(clean_db, job_id)
    assert claim(clean_db, job_id, "w2") is not None

    assert start_resume(clean_db, job_id, 2, 1, history(1)) == 2

    job = job_row(clean_db, job_id)
    assert (job["epoch"], job["epochs_redone"]) == (3, 2)
    second = attempt_rows(clean_db, job_id)[1]
    assert (second["resumed_from_epoch"], second["epochs_redone"]) == (1, 2)

    expire_lease(clean_db, job_id)  # attempt 2 died too, before a newer checkpoint
    assert claim(clean_db, job_id, "w3") is not None
    assert start_resume(clean_db, job_id, 3, 1, history(1)) == 2

    assert job_row(clean_db, job_id)["epochs_redone"] == 4  # accumulated over the job's attempts
    attempts = attempt_rows(clean_db, job_id)
    assert [(a["resumed_from_epoch"], a["epochs_redone"]) for a in attempts] == [(None, 0), (1, 2), (1, 2)]
    assert len(epoch_rows(clean_db, job_id)) == 3


def test_start_resume_from_scratch(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    assert claim(clean_db, job_id) is not None

    assert start_resume(clean_db, job_id, 1, 0, []) == 0

    assert job_row(clean_db, job_id)["epochs_redone"] == 0
    (first,) = attempt_rows(clean_db, job_id)
    assert (first["resumed_from_epoch"], first["epochs_redone"]) == (0, 0)
    assert epoch_rows(clean_db, job_id) == []


# heartbeat


def test_heartbeat_extends_the_lease_and_returns_the_cancel_flag(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    assert claim(clean_db, job_id, lease=1.0) is not None
    claimed = job_row(clean_db, job_id)

    assert heartbeat(clean_db, job_id, 1, lease=120.0) is False

    renewed = job_row(clean_db, job_id)
    assert renewed["heartbeat_at"] >= claimed["heartbeat_at"]
    assert renewed["lease_expires_at"] == renewed["heartbeat_at"] + timedelta(seconds=120)
    assert renewed["lease_expires_at"] > claimed["lease_expires_at"] + timedelta(seconds=100)
    assert (renewed["status"], renewed["attempt"], renewed["lease_owner"]) == ("running", 1, "w1")

    set_job(clean_db, job_id, cancel_requested=True)
    assert heartbeat(clean_db, job_id, 1) is True
    assert job_row(clean_db, job_id)["status"] == "running"  # the worker stops the run; the heartbeat only tells


def test_sync_checkpoints_makes_the_rows_equal_the_manifest(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    assert claim(clean_db, job_id) is not None
    sync(clean_db, job_id, 1, [checkpoint_item("epoch-0001.pt", 1), checkpoint_item("best.pt", 1)])
    sync(clean_db, job_id, 1, [checkpoint_item("epoch-0002.pt", 2), checkpoint_item("best.pt", 2, sha="b")])

    rows = {c["name"]: c for c in checkpoint_rows(clean_db, job_id)}
    assert sorted(rows) == ["best.pt", "epoch-0002.pt"]
    assert (rows["best.pt"]["epoch"], rows["best.pt"]["sha256"]) == (2, "b" * 64)


# expire


def test_expire_cancels_a_job_whose_cancel_was_requested(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    assert claim(clean_db, job_id, "worker-a") is not None
    set_job(clean_db, job_id, cancel_requested=True)
    expired_at = expire_lease(clean_db, job_id)
    now = utcnow()

    assert expire(clean_db, job_id, now=now) == "cancelled"

    job = job_row(clean_db, job_id)
    assert (job["status"], job["stop_reason"], job["finished_at"]) == ("cancelled", "cancelled", now)
    assert job["lease_owner"] is None and job["lease_expires_at"] is None
    (lost,) = attempt_rows(clean_db, job_id)
    assert (lost["outcome"], lost["ended_at"]) == ("lost", expired_at)


def test_expire_fails_the_job_after_max_attempts_lost(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    statuses = []
    for worker in ("worker-a", "worker-b", "worker-c"):
        assert claim(clean_db, job_id, worker) is not None
        expire_lease(clean_db, job_id)
        statuses.append(expire(clean_db, job_id, max_attempts=3))

    assert statuses == ["queued", "queued", "failed"]
    job = job_row(clean_db, job_id)
    assert job["status"] == "failed" and job["finished_at"] is not None
    assert "max_attempts is 3" in job["error"] and "lost 3 times" in job["error"] and "worker-c" in job["error"]
    assert job["lease_owner"] is None and job["lease_expires_at"] is None
    assert [a["outcome"] for a in attempt_rows(clean_db, job_id)] == ["lost", "lost", "lost"]
    assert claim(clean_db, job_id, "worker-d") is None


def test_a_released_attempt_does_not_count_as_lost(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    assert claim(clean_db, job_id) is not None
    _release(clean_db, job_id, 1)
    assert claim(clean_db, job_id) is not None
    expire_lease(clean_db, job_id)

    assert expire(clean_db, job_id, max_attempts=2) == "queued"


def test_expire_requeues_the_job_unsent(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    set_job(clean_db, job_id, enqueued_at=utcnow())
    assert claim(clean_db, job_id, "worker-a") is not None
    expired_at = expire_lease(clean_db, job_id)

    assert expire(clean_db, job_id) == "queued"

    job = job_row(clean_db, job_id)
    assert (job["status"], job["enqueued_at"], job["lease_owner"], job["lease_expires_at"]) == (
        "queued",
        None,
        None,
        None,
    )
    assert job["finished_at"] is None and job["error"] is None
    (lost,) = attempt_rows(clean_db, job_id)
    assert (lost["outcome"], lost["ended_at"]) == ("lost", expired_at)
    assert "worker-a" in lost["error"]


def test_expire_leaves_a_live_lease_alone(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    assert claim(clean_db, job_id) is not None
    before = snapshot(clean_db, job_id)

    assert expire(clean_db, job_id) is None

    assert snapshot(clean_db, job_id) == before


@pytest.mark.parametrize("status", ["queued", "succeeded"])
def test_expire_leaves_a_job_without_a_lease_alone(clean_db: Database, status: str) -> None:
    job_id = add_job(clean_db, status=status)
    before = snapshot(clean_db, job_id)

    assert expire(clean_db, job_id) is None

    assert snapshot(clean_db, job_id) == before


# The reaper


def test_reap_requeues_expired_leases_and_sends_them(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    assert claim(clean_db, job_id, "worker-a") is not None
    expired_at = expire_lease(clean_db, job_id)
    live = add_job(clean_db)
    assert claim(clean_db, live, "worker-b") is not None
    send = FakeSend()

    before = utcnow()
    assert reaper(clean_db, send).reap() == [job_id]

    assert send.ids == [job_id]
    job = job_row(clean_db, job_id)
    assert job["status"] == "queued" and job["enqueued_at"] >= before
    (lost,) = attempt_rows(clean_db, job_id)
    assert (lost["outcome"], lost["ended_at"]) == ("lost", expired_at)
    assert job_row(clean_db, live)["status"] == "running"


def test_reap_fails_an_expired_job_at_max_attempts_and_sends_nothing(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    assert claim(clean_db, job_id) is not None
    expire_lease(clean_db, job_id)
    send = FakeSend()

    assert reaper(clean_db, send, max_attempts=1).reap() == []

    assert send.ids == []
    job = job_row(clean_db, job_id)
    assert job["status"] == "failed" and "max_attempts is 1" in job["error"]


def test_reap_sends_queued_jobs_never_sent(clean_db: Database) -> None:
    unsent = add_job(clean_db)
    sent_recently = add_job(clean_db)
    set_job(clean_db, sent_recently, enqueued_at=utcnow() - timedelta(seconds=10))
    running = add_job(clean_db)
    assert claim(clean_db, running) is not None
    finished = add_job(clean_db, status="succeeded")
    send = FakeSend()

    before = utcnow()
    assert reaper(clean_db, send, requeue_after=300).reap() == [unsent]

    assert send.ids == [unsent]
    assert job_row(clean_db, unsent)["enqueued_at"] >= before
    assert job_row(clean_db, finished)["enqueued_at"] is None


def test_reap_sends_again_a_job_sent_long_ago(clean_db: Database) -> None:
    stale, recent = add_job(clean_db), add_job(clean_db)
    set_job(clean_db, stale, enqueued_at=utcnow() - timedelta(seconds=600))
    recent_at = utcnow() - timedelta(seconds=200)
    set_job(clean_db, recent, enqueued_at=recent_at)
    send = FakeSend()

    before = utcnow()
    assert reaper(clean_db, send, requeue_after=300).reap() == [stale]

    assert send.ids == [stale]
    assert job_row(clean_db, stale)["enqueued_at"] >= before
    assert job_row(clean_db, recent)["enqueued_at"] == recent_at


def test_a_failed_send_is_retried_on_the_next_pass(clean_db: Database) -> None:
    job_id = add_job(clean_db)
    broker = FakeSend(ok=False)
    reap = reaper(clean_db, broker)

    assert reap.reap() == []
    assert broker.ids == [job_id]
    assert job_row(clean_db, job_id)["enqueued_at"] is None

    broker.ok = True
    assert reap.reap() == [job_id]
    assert broker.ids == [job_id, job_id]
    assert job_row(clean_db, job_id)["enqueued_at"] is not None
    assert reap.reap() == []  # sent: not again until requeue_after
    assert broker.ids == [job_id, job_id]


def test_two_reapers_in_the_same_round_send_each_job_once(clean_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    unsent = [add_job(clean_db) for _ in range(3)]
    expired = add_job(clean_db)
    assert claim(clean_db, expired) is not None
    expire_lease(clean_db, expired)
    now = utcnow()
    monkeypatch.setattr(lease_module, "utcnow", lambda: now)
    send = FakeSend()

    first = reaper(clean_db, send).reap()
    second = reaper(clean_db, send).reap()

    assert sorted(first) == sorted([*unsent, expired]) and second == []
    assert sorted(send.ids) == sorted([*unsent, expired])
    assert [a["outcome"] for a in attempt_rows(clean_db, expired)] == ["lost"]


def _lock_waiters(db: Database) -> int:
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    with db.engine.connect() as conn:
        return int(conn.execute(text(query)).scalar_one())


def test_concurrent_reapers_never_send_a_job_twice(clean_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both reapers read the same due jobs, then race for them: each job is taken by one only."""
    unsent = [add_job(clean_db) for _ in range(6)]
    expired = [add_job(clean_db) for _ in range(2)]
    for job_id in expired:
        assert claim(clean_db, job_id) is not None
        expire_lease(clean_db, job_id)
    now = utcnow()
    monkeypatch.setattr(lease_module, "utcnow", lambda: now)
    send = FakeSend()
    reapers = [reaper(clean_db, send), reaper(clean_db, send)]

    with ThreadPoolExecutor(2) as pool, clean_db.engine.connect() as locker:
        held = locker.begin()
        locker.execute(text("SELECT id FROM jobs FOR UPDATE"))  # both reapers queue up behind this lock
        passes = [pool.submit(r.reap) for r in reapers]
        deadline = time.monotonic() + 10
        while _lock_waiters(clean_db) < 2:
            assert time.monotonic() < deadline, "the reapers never both waited on the jobs' rows"
            assert not any(p.done() for p in passes), [p.result() for p in passes if p.done()]
            time.sleep(0.01)
        held.rollback()
        results = [p.result(timeout=10) for p in passes]

    everything = sorted([*unsent, *expired])
    assert sorted(results[0] + results[1]) == everything
    assert sorted(send.ids) == everything  # each exactly once
    for job_id in expired:
        assert [a["outcome"] for a in attempt_rows(clean_db, job_id)] == ["lost"]
        assert job_row(clean_db, job_id)["status"] == "queued"


# mark_unsent


def test_mark_unsent_only_touches_queued_jobs(clean_db: Database) -> None:
    sent_at = utcnow() - timedelta(seconds=5)
    queued, running, done = add_job(clean_db), add_job(clean_db), add_job(clean_db, status="succeeded")
    for job_id in (queued, running, done):
        set_job(clean_db, job_id, enqueued_at=sent_at)
    assert claim(clean_db, running) is not None

    for job_id in (queued, running, done):
        mark_unsent(clean_db, job_id)

    assert job_row(clean_db, queued)["enqueued_at"] is None
    assert job_row(clean_db, running)["enqueued_at"] == sent_at
    assert job_row(clean_db, done)["enqueued_at"] == sent_at


def test_a_running_job_without_a_lease_is_taken_back_by_the_reaper(clean_db: Database) -> None:
    job_id = add_job(clean_db, status="running")  # as a pre-0002 worker left it: running, no lease
    assert job_row(clean_db, job_id)["lease_expires_at"] is None
    send = FakeSend()

    assert reaper(clean_db, send).reap() == [job_id]
    assert job_row(clean_db, job_id)["status"] == "queued"


def test_a_heartbeat_too_slow_for_its_lease_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="at most half of DARTS_LEASE_SECONDS"):
        Settings(lease_seconds=10, heartbeat_seconds=6)
    assert Settings(lease_seconds=10, heartbeat_seconds=5).heartbeat_seconds == 5
