"""The fault suite's machinery: a private Redis to restart, the shared PostgreSQL to restart, workers to kill,
tiny CPU jobs with an undisturbed reference run, and the invariants checked in SQL after every scenario."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import text

from service.db import Database
from service.settings import Settings
from worker.search.data import load_dataset
from worker.search.engine import TIMING_FIELDS, run_search
from worker.search.spec import JobSpec

from .factories import job_spec
from .processes import Proc, free_port, settings_env, spawn, start_api, wait_for

TERMINAL = ("succeeded", "failed", "cancelled")

# Short leases and quick reapers so that a lost worker is noticed in seconds, not minutes.
FAULT_SETTINGS: dict[str, Any] = {
    "lease_seconds": 2.0,
    "heartbeat_seconds": 0.25,
    "reaper_seconds": 0.5,
    "requeue_after_seconds": 4.0,
    "max_attempts": 5,
    "db_retry_seconds": 60.0,
    "io_retry_seconds": 3.0,
    "cancel_poll_seconds": 0.2,
}


def fault_spec(seed: int, epochs: int = 8) -> dict[str, Any]:
    """A forecast search of about half a second an epoch on a CPU: long enough to be hit mid-epoch."""
    return job_spec(
        model={"emsize": 16, "nhid": 16, "steps": 4},
        search={"epochs": epochs, "batches_per_epoch": 24, "seed": seed},
        checkpoint={"every_epochs": 1, "keep_last": 3},
    )


def undisturbed_records(spec: dict[str, Any], data_dir: Path) -> tuple[tuple[str, ...], ...]:
    """The epoch records of a run of `spec` in this process, start to end (timing fields left out)."""
    job = JobSpec.model_validate(spec)
    data = load_dataset(job.dataset, job.task, data_dir=data_dir, uploads_dir=data_dir)
    return tuple(_comparable(json.loads(json.dumps(r))) for r in run_search(job, data=data).records)


@cache
def _reference(spec_json: str, data_dir: str) -> tuple[tuple[str, ...], ...]:
    return undisturbed_records(json.loads(spec_json), Path(data_dir))


def _comparable(record: dict[str, Any]) -> tuple[str, ...]:
    return tuple(json.dumps(record[k], sort_keys=True) for k in sorted(record) if k not in TIMING_FIELDS)


def reference_records(spec: dict[str, Any], data_dir: Path) -> tuple[tuple[str, ...], ...]:
    """The epoch records of an undisturbed run of the same spec and seed (timing fields left out), once per spec."""
    return _reference(JobSpec.model_validate(spec).model_dump_json(), str(data_dir))


class RedisServer:
    """A Redis of the suite's own on a free loopback port (nothing on disk), so restarting it disturbs no one."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        log = (self.folder / "redis.log").open("ab")
        self.proc = subprocess.Popen([*args, "--dir", str(self.folder)], stdout=log, stderr=log)
        wait_for(self.ping, timeout=10, what="the suite's Redis")

    def ping(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        """As a crash: SIGKILL, every message it held is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def restart_postgres() -> None:
    """`pg_ctlcluster <version> main restart -m immediate`: every connection is cut, nothing is flushed."""
    versions = sorted(os.listdir("/etc/postgresql"))
    cluster = [versions[-1], "main"]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", *cluster, "restart", "-m", "immediate"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    wait_for(
        lambda: subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1"], check=False).returncode == 0,
        timeout=60,
        what="PostgreSQL after its restart",
    )


def postgres_restartable() -> str | None:
    """Why PostgreSQL cannot be restarted here, or None."""
    if shutil.which("pg_ctlcluster") is None or not Path("/etc/postgresql").is_dir():
        return "pg_ctlcluster is not available"
    if os.geteuid() != 0:
        return "restarting PostgreSQL needs root"
    return None


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


@dataclass
class Row:
    """One line of the summary table."""

    scenario: str
    repetitions: int = 0
    jobs: int = 0
    lost: int = 0
    duplicated: int = 0
    redone: int = 0
    recovery: list[float] = field(default_factory=list)

    def cells(self) -> list[str]:
        rec = f"{statistics.median(self.recovery):.1f} / {max(self.recovery):.1f}" if self.recovery else "-"
        counts = (self.repetitions, self.jobs, self.lost, self.duplicated, self.redone)
        return [self.scenario, *map(str, counts), rec]


ROWS: dict[str, Row] = {}  # filled by the scenarios, printed at the end of the session

HEADER = ["scenario", "repetitions", "jobs", "lost", "duplicated", "epochs redone", "recovery s (median / max)"]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


class FaultStack:
    """The service as deployed, on the suite's Redis and the test PostgreSQL: one API, workers on demand."""

    def __init__(self, root: Path, db: Database, settings: Settings, redis_server: RedisServer) -> None:
        self.root, self.db, self.settings, self.redis = root, db, settings, redis_server
        self.env = settings_env(settings)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api: Proc | None = None
        self.workers: list[Proc] = []
        self.logs = root / "logs"

    # processes

    def start_api(self) -> None:
        self.api = start_api(self.env, cwd=self.root, logs=self.logs, port=self.port)

    def start_workers(self, n: int, **overrides: Any) -> list[Proc]:
        env = self.env | {f"DARTS_{k.upper()}": str(v) for k, v in overrides.items()}
        started = []
        for _ in range(n):
            name = f"worker-{uuid.uuid4().hex[:6]}"
            args = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--concurrency", "1"]
            args += ["--loglevel", "INFO", "--queues", self.settings.queue, "--hostname", f"{name}@%h"]
            args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
            started.append(spawn(name, args, env=env, cwd=self.root, logs=self.logs))
        for proc in started:
            wait_for(lambda p=proc: " ready." in p.output() or p.popen.poll() is not None, timeout=90, what=proc.name)
            assert proc.popen.poll() is None, proc.output()[-3000:]
        self.workers += started
        return started

    def stop_workers(self) -> None:
        for proc in self.workers:
            proc.stop(signal.SIGKILL)
        self.workers.clear()

    def worker_of(self, job_id: str) -> Proc:
        """The worker process whose child holds the job's lease."""
        owner = self.job(job_id)["lease_owner"]
        assert owner, f"job {job_id} has no lease"
        pid = int(owner.rsplit("/", 1)[1])
        for proc in self.workers:
            if proc.popen.poll() is None and pid in children(proc.popen.pid):
                return proc
        raise AssertionError(f"no live worker has pid {pid}")

    # the API and the database

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30)

    def submit(self, spec: dict[str, Any]) -> str:
        with self.client() as http:
            r = http.post("/jobs", json=spec)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        with self.db.engine.connect() as conn:
            row = conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).mappings().one()
        return dict(row)

    def epochs(self, job_id: str) -> int:
        return int(self.job(job_id)["epoch"])

    def wait_epoch(self, job_id: str, epoch: int, timeout: float = 120) -> None:
        wait_for(lambda: self.epochs(job_id) >= epoch, timeout=timeout, what=f"epoch {epoch} of {job_id}", every=0.02)

    def wait_terminal(self, job_ids: list[str], timeout: float = 180) -> None:
        def done() -> bool:
            return all(self.job(j)["status"] in TERMINAL for j in job_ids)

        try:
            wait_for(done, timeout=timeout, what="every job to finish", every=0.1)
        except AssertionError:
            states = {j: (self.job(j)["status"], self.job(j)["epoch"]) for j in job_ids}
            logs = "\n".join(f"--- {p.name}\n{p.output()[-2500:]}" for p in self.workers)
            raise AssertionError(f"jobs not finished: {states}\n{logs}") from None

    def recovery(self, job_id: str, fault_at: float, epoch_at_fault: int, timeout: float = 120) -> float:
        """Seconds from the fault until the job records its next epoch (or ends)."""
        wait_for(
            lambda: self.epochs(job_id) > epoch_at_fault or self.job(job_id)["status"] in TERMINAL,
            timeout=timeout,
            what=f"job {job_id} to progress after the fault",
            every=0.02,
        )
        return time.monotonic() - fault_at


def check_invariants(
    db: Database,
    job_ids: list[str],
    *,
    data_dir: Path,
    faults_per_job: int = 1,
    status: str = "succeeded",
) -> dict[str, int]:
    """The suite's invariants, read back in SQL. Counts what the summary table shows (lost: jobs that did not
    end as expected; duplicated: epochs written twice or by an attempt that did not hold the lease, and
    attempts whose leases overlapped; redone: epochs run again), then fails on any broken invariant."""
    figures = {"lost": 0, "duplicated": 0, "redone": 0}
    problems: list[str] = []
    with db.engine.connect() as conn:
        for job_id in job_ids:
            job = conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).mappings().one()
            if job["status"] != status:
                figures["lost"] += 1
                problems.append(f"job {job_id} is {job['status']} ({job['error']}), expected {status}")
            if job["lease_owner"] is not None or job["lease_expires_at"] is not None:
                problems.append(f"job {job_id} still holds a lease")
            twice = conn.execute(
                text("SELECT epoch FROM epochs WHERE job_id = :id GROUP BY epoch HAVING count(*) > 1"), {"id": job_id}
            ).all()
            figures["duplicated"] += len(twice)
            epochs = [
                dict(r)
                for r in conn.execute(
                    text("SELECT epoch, attempt, created_at, record FROM epochs WHERE job_id = :id ORDER BY epoch"),
                    {"id": job_id},
                ).mappings()
            ]
            if [e["epoch"] for e in epochs] != list(range(1, job["epoch"] + 1)):
                problems.append(f"job {job_id}: epochs {[e['epoch'] for e in epochs]} for a job at {job['epoch']}")
            attempts = [
                dict(r)
                for r in conn.execute(
                    text("SELECT * FROM attempts WHERE job_id = :id ORDER BY attempt"), {"id": job_id}
                ).mappings()
            ]
            if [a["attempt"] for a in attempts] != list(range(1, job["attempt"] + 1)):
                problems.append(f"job {job_id}: attempts {[a['attempt'] for a in attempts]}, job says {job['attempt']}")
            if not all(a["ended_at"] is not None and a["outcome"] for a in attempts):
                problems.append(f"job {job_id}: an attempt never ended: {attempts}")
            for before, after in itertools.pairwise(attempts):  # never two live leases at once
                if before["ended_at"] is None or after["claimed_at"] < before["ended_at"]:
                    figures["duplicated"] += 1
                    problems.append(f"job {job_id}: attempts {before['attempt']} and {after['attempt']} overlap")
            spans = {a["attempt"]: (a["claimed_at"], a["ended_at"] or a["claimed_at"]) for a in attempts}
            for e in epochs:  # fencing: every epoch was written by the attempt that held the lease then
                start, end = spans.get(e["attempt"], (None, None))
                if start is None or end is None or not start <= e["created_at"] <= end:
                    figures["duplicated"] += 1
                    problems.append(f"job {job_id}: epoch {e['epoch']} written outside attempt {e['attempt']}'s lease")
            figures["redone"] += int(job["epochs_redone"])
            if job["epochs_redone"] > faults_per_job:
                problems.append(f"job {job_id}: {job['epochs_redone']} epochs redone for {faults_per_job} fault(s)")
            if status == "succeeded" and job["status"] == status:
                want = reference_records(job["spec"], data_dir)
                got = tuple(_comparable(e["record"]) for e in epochs)
                if got != want:
                    problems.append(f"job {job_id}: its records differ from an undisturbed run's")
    assert not problems, "\n".join(problems)
    return figures
