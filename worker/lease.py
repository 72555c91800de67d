"""A worker's side of the lease: the heartbeat that renews it, the reaper that takes back expired ones, and
database writes that ride out a database restart."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from service import leases
from service.db import Database
from service.leases import LeaseLost
from service.models import utcnow

log = logging.getLogger(__name__)

T = TypeVar("T")


def retrying(db: Database, write: Callable[[Session], T], *, seconds: float, what: str) -> T:
    """Run `write` in a fresh session, again with backoff while the database is unreachable, for up to
    `seconds`; LeaseLost and every other error are not retried."""
    deadline = time.monotonic() + seconds
    pause = 0.2
    while True:
        try:
            with db.session() as session:
                return write(session)
        except (OperationalError, DBAPIError) as exc:
            if not _is_connection_error(exc) or time.monotonic() + pause > deadline:
                raise
            log.warning("%s: database unreachable (%s); retrying in %.1f s", what, type(exc.orig).__name__, pause)
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def _is_connection_error(exc: DBAPIError) -> bool:
    return isinstance(exc, OperationalError) or exc.connection_invalidated


class Heartbeat:
    """Renews a job's lease every `every` seconds on its own thread, and notes a cancel request and the loss
    of the lease (another worker took the job after this one failed to renew in time)."""

    def __init__(self, db: Database, *, job_id: str, attempt: int, lease_seconds: float, every: float) -> None:
        self.db, self.job_id, self.attempt = db, job_id, attempt
        self.lease_seconds, self.every = lease_seconds, every
        self.lost = threading.Event()
        self.cancel_requested = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id[:8]}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop renewing (before the attempt's last write, which ends the lease itself)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                with self.db.session() as session:
                    flag = leases.heartbeat(
                        session, job_id=self.job_id, attempt=self.attempt, lease_seconds=self.lease_seconds
                    )
                self.cancel_requested = self.cancel_requested or flag
            except LeaseLost:
                log.warning("job %s: attempt %d lost its lease; stopping without writing", self.job_id, self.attempt)
                self.lost.set()
                return
            except Exception as exc:  # the database is down: keep trying; the next write will tell
                log.warning("job %s: heartbeat failed (%s: %s)", self.job_id, type(exc).__name__, exc)


class Reaper:
    """Every `every` seconds: end expired leases (requeue, cancel, or fail after max_attempts) and send the
    queued jobs whose message was never sent or may have been lost. Safe with many reapers: each job is
    taken by one conditional update."""

    def __init__(
        self,
        db: Database,
        send: Callable[[str], bool],
        *,
        every: float,
        requeue_after: float,
        max_attempts: int,
    ) -> None:
        self.db, self.send = db, send
        self.every, self.requeue_after, self.max_attempts = every, requeue_after, max_attempts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.reap()
            except Exception as exc:  # database or broker down: try again next time
                log.warning("reaper: %s: %s", type(exc).__name__, exc)

    def reap(self) -> list[str]:
        """One pass; returns the ids of the jobs it sent."""
        now = utcnow()
        with self.db.session() as session:
            for job_id in leases.expired_jobs(session, now=now):
                status = leases.expire(session, job_id=job_id, now=now, max_attempts=self.max_attempts)
                if status is not None:
                    log.warning("reaper: job %s lost its worker (lease expired); now %s", job_id, status)
            due = leases.take_unsent(session, now=now, requeue_after=self.requeue_after)
        sent = []
        for job_id in due:
            if self.send(job_id):
                sent.append(job_id)
            else:
                with self.db.session() as session:
                    leases.mark_unsent(session, job_id=job_id)
        if sent:
            log.info("reaper: sent %d queued job(s): %s", len(sent), ", ".join(sent))
        return sent
