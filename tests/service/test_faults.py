"""Fault tests: real worker processes, the API, Redis and PostgreSQL on loopback, tiny CPU jobs, and faults
injected at random moments. After each scenario the invariants are checked in SQL (`faults.check_invariants`):
every accepted job ends, no (job, epoch) twice, never two live leases, at most one epoch redone per fault, and
the records equal an undisturbed run's. `make test` runs each scenario once; `make faults` repeats each one
(`--fault-repeats`) and prints the summary table of docs/reliability.md."""

from __future__ import annotations

import errno
import hashlib
import json
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse
from sqlalchemy import text

from service.db import Database
from service.queue import RUN_JOB, make_celery

from ..conftest import shared_data_dir
from .conftest import service_settings
from .faults import (
    FAULT_SETTINGS,
    ROWS,
    FaultStack,
    RedisServer,
    Row,
    check_invariants,
    fault_spec,
    postgres_restartable,
    restart_postgres,
    undisturbed_records,
)
from .processes import wait_for

pytestmark = pytest.mark.faults

RETRYING = "No space left on device; retrying"  # the worker's log line for a checkpoint write it retries


@pytest.fixture(scope="module")
def stack(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    root = tmp_path_factory.mktemp("faults")
    server = RedisServer(root / "redis")
    server.start()
    settings = service_settings(
        database_url=pg_url,
        broker_url=server.url,
        queue=f"darts-faults-{uuid.uuid4().hex[:6]}",
        artifacts_dir=root / "artifacts",
    ).model_copy(update=FAULT_SETTINGS)
    db = Database(pg_url)
    running = FaultStack(root, db, settings, server)
    try:
        running.start_api()
        yield running
    finally:
        running.stop_workers()
        if running.api is not None:
            running.api.stop()
        server.stop()
        db.dispose()


@pytest.fixture
def repeats(request: pytest.FixtureRequest) -> int:
    return int(request.config.getoption("--fault-repeats"))


@pytest.fixture
def row(request: pytest.FixtureRequest, stack: FaultStack) -> Iterator[Row]:
    name = request.node.name.removeprefix("test_")
    ROWS.setdefault(name, Row(name))
    yield ROWS[name]
    stack.stop_workers()


def settle(stack: FaultStack, row: Row, job_ids: list[str], recovery: float | None, **check: Any) -> None:
    """Wait for the jobs to end, check the invariants in SQL, and add this repetition to the summary row."""
    stack.wait_terminal(job_ids)
    figures = check_invariants(stack.db, job_ids, data_dir=shared_data_dir(), **check)
    row.repetitions += 1
    row.jobs += len(job_ids)
    row.lost += figures["lost"]
    row.duplicated += figures["duplicated"]
    row.redone += figures["redone"]
    if recovery is not None:
        row.recovery.append(recovery)


def dropped(stack: FaultStack, job_id: str) -> int:
    """How many messages for the job the workers dropped because they could not claim it."""
    return sum(p.output().count(f"job {job_id} is not claimable") for p in stack.workers)


def hit_mid_epoch(stack: FaultStack, job_id: str, rng: random.Random) -> int:
    """Wait until the job is a random 1-4 epochs in, then a random moment into the next epoch."""
    epoch = rng.randint(1, 4)
    stack.wait_epoch(job_id, epoch)
    time.sleep(rng.uniform(0.05, 0.35))
    return stack.epochs(job_id)


def test_kill_9_worker_child(stack: FaultStack, row: Row, repeats: int) -> None:
    """The pool child dies mid-epoch; Celery forks a new one, the lease expires, the reaper requeues."""
    for rep in range(repeats):
        rng = random.Random(f"child-{rep}")
        stack.start_workers(1)
        job_id = stack.submit(fault_spec(seed=rep))
        epoch = hit_mid_epoch(stack, job_id, rng)
        child = int(stack.job(job_id)["lease_owner"].rsplit("/", 1)[1])
        subprocess.run(["kill", "-9", str(child)], check=True)
        fault_at = time.monotonic()
        settle(stack, row, [job_id], stack.recovery(job_id, fault_at, epoch))
        assert stack.job(job_id)["attempt"] == 2
        stack.stop_workers()


def test_kill_9_worker_process_group(stack: FaultStack, row: Row, repeats: int) -> None:
    """The whole worker (main process and child) dies mid-epoch; a replacement worker resumes the job."""
    for rep in range(repeats):
        rng = random.Random(f"group-{rep}")
        stack.start_workers(1)
        job_id = stack.submit(fault_spec(seed=100 + rep))
        epoch = hit_mid_epoch(stack, job_id, rng)
        stack.worker_of(job_id).stop(signal.SIGKILL)
        fault_at = time.monotonic()
        stack.start_workers(1)  # as a supervisor (compose's restart policy) would
        settle(stack, row, [job_id], stack.recovery(job_id, fault_at, epoch))
        stack.stop_workers()


def test_a_job_that_keeps_killing_its_worker_fails(stack: FaultStack, row: Row, repeats: int) -> None:
    """Every worker that takes the job dies (as an out-of-memory kill would do it): after max_attempts lost
    leases the job ends failed with an error that says so, instead of being retried forever."""
    for rep in range(repeats):
        stack.start_workers(1, max_attempts=2)
        job_id = stack.submit(fault_spec(seed=1200 + rep))
        killed: set[str] = set()
        fault_at = 0.0
        while stack.job(job_id)["status"] not in ("failed", "succeeded", "cancelled"):
            owner = stack.job(job_id)["lease_owner"]
            if owner and owner not in killed and stack.epochs(job_id) >= 1:
                subprocess.run(["kill", "-9", owner.rsplit("/", 1)[1]], check=False)
                killed.add(owner)
                fault_at = fault_at or time.monotonic()
            assert len(killed) <= 2, f"job {job_id} was taken {len(killed) + 1} times"
            time.sleep(0.02)
        settle(stack, row, [job_id], time.monotonic() - fault_at, status="failed")
        job = stack.job(job_id)
        assert "lost 2 times (max_attempts is 2)" in job["error"], job["error"]
        assert [a["outcome"] for a in _attempts(stack.db, job_id)] == ["lost", "lost"]
        stack.stop_workers()


def test_redis_restarted_mid_run(stack: FaultStack, row: Row, repeats: int) -> None:
    """Redis crashes (losing every message) while one job runs and another waits: the running job goes on,
    the worker reconnects, and the reaper sends the waiting job again."""
    for rep in range(repeats):
        rng = random.Random(f"redis-{rep}")
        stack.start_workers(1)
        running = stack.submit(fault_spec(seed=200 + rep, epochs=6))
        waiting = stack.submit(fault_spec(seed=300 + rep, epochs=3))
        epoch = hit_mid_epoch(stack, running, rng)
        stack.redis.stop()
        fault_at = time.monotonic()
        time.sleep(rng.uniform(0.5, 1.5))
        stack.redis.start()
        settle(stack, row, [running, waiting], stack.recovery(running, fault_at, epoch))
        stack.stop_workers()


def test_redis_restarted_during_submissions(stack: FaultStack, row: Row, repeats: int) -> None:
    """Jobs posted while Redis is down are stored (201) and sent by the reaper once it is back."""
    for rep in range(repeats):
        rng = random.Random(f"submit-{rep}")
        stack.start_workers(2)
        job_ids: list[str] = []
        codes: list[int] = []
        with stack.client() as http:
            for i in range(6):
                if i == 2:
                    stack.redis.stop()
                    fault_at = time.monotonic()
                if i == 4:
                    stack.redis.start()
                r = http.post("/jobs", json=fault_spec(seed=400 + 10 * rep + i, epochs=2))
                codes.append(r.status_code)
                if r.status_code == 201:
                    job_ids.append(r.json()["id"])
                time.sleep(rng.uniform(0.1, 0.4))
        assert codes == [201] * 6, codes  # stored even when the broker was down
        assert stack.api is not None and "could not enqueue job" in stack.api.output()
        stack.wait_terminal(job_ids)
        settle(stack, row, job_ids, time.monotonic() - fault_at, faults_per_job=0)
        stack.stop_workers()


def test_postgres_restarted_mid_run(stack: FaultStack, row: Row, repeats: int) -> None:
    """PostgreSQL restarts (immediate mode) mid-run: the worker's writes wait for it and the job goes on;
    the API answers 503, never 500, while it is down, and recovers by itself."""
    reason = postgres_restartable()
    if reason:
        pytest.fail(reason)
    for rep in range(repeats):
        rng = random.Random(f"pg-{rep}")
        stack.start_workers(1)
        job_id = stack.submit(fault_spec(seed=500 + rep))
        epoch = hit_mid_epoch(stack, job_id, rng)
        poller = Poller(stack, f"/jobs/{job_id}")
        fault_at = time.monotonic()
        restart_postgres()
        recovery = stack.recovery(job_id, fault_at, epoch)
        settle(stack, row, [job_id], recovery)
        codes = poller.stop()
        assert set(codes) <= {200, 503}, sorted(set(codes))  # never a 500, never a hung request
        assert 503 in codes and codes[-1] == 200, codes
        stack.stop_workers()


class Poller:
    """GETs `path` every 50 ms on its own thread and keeps each status code (0: no answer)."""

    def __init__(self, stack: FaultStack, path: str) -> None:
        self.stack, self.path, self.codes = stack, path, list[int]()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        with self.stack.client() as http:
            while not self._stop.is_set():
                try:
                    self.codes.append(http.get(self.path, timeout=10).status_code)
                except httpx.HTTPError:
                    self.codes.append(0)
                time.sleep(0.05)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join()
        return self.codes


def test_same_job_delivered_twice(stack: FaultStack, row: Row, repeats: int) -> None:
    """Extra messages for a job, on purpose, to two workers: one claims it, the others drop their message."""
    celery = make_celery(stack.settings)
    for rep in range(repeats):
        stack.start_workers(2)
        job_id = stack.submit(fault_spec(seed=600 + rep, epochs=4))
        for _ in range(3):
            celery.send_task(RUN_JOB, args=[job_id])
        stack.wait_epoch(job_id, 1)
        celery.send_task(RUN_JOB, args=[job_id])  # and once more while it runs
        settle(stack, row, [job_id], None, faults_per_job=0)
        assert stack.job(job_id)["attempt"] == 1
        wait_for(lambda j=job_id: dropped(stack, j) >= 4, timeout=30, what="the four extra messages to be dropped")
        time.sleep(0.5)
        assert dropped(stack, job_id) == 4
        stack.stop_workers()


def test_visibility_timeout_shorter_than_a_job(stack: FaultStack, row: Row, repeats: int) -> None:
    """Redis hands the running job's message to the other worker after 1 s; the lease makes it a no-op."""
    for rep in range(repeats):
        stack.start_workers(2, visibility_timeout_seconds=1.0)
        job_id = stack.submit(fault_spec(seed=700 + rep))
        settle(stack, row, [job_id], None, faults_per_job=0)
        assert stack.job(job_id)["attempt"] == 1
        assert dropped(stack, job_id) >= 1, "Redis never delivered the running job's message again"
        stack.stop_workers()


def test_api_restarted_while_streaming(stack: FaultStack, row: Row, repeats: int) -> None:
    """The API dies under a client following the stream; the client reconnects with Last-Event-ID to the
    restarted API and sees every epoch once, in order."""
    for rep in range(repeats):
        rng = random.Random(f"api-{rep}")
        stack.start_workers(1)
        job_id = stack.submit(fault_spec(seed=800 + rep))
        seen: list[int] = []
        statuses: list[str] = []
        last_id: str | None = None
        kill_after = rng.randint(1, 4)
        fault_at = 0.0
        reconnects = 0
        while not statuses or statuses[-1] not in ("succeeded", "failed", "cancelled"):
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with (
                    stack.client() as http,
                    connect_sse(http, "GET", f"/jobs/{job_id}/metrics/stream", headers=headers) as source,
                ):
                    for sse in source.iter_sse():
                        if sse.event == "epoch":
                            seen.append(int(sse.id))
                            last_id = sse.id
                            if len(seen) == kill_after and reconnects == 0:
                                assert stack.api is not None
                                stack.api.stop(signal.SIGKILL)
                                fault_at = time.monotonic()
                                stack.start_api()
                        elif sse.event == "status":
                            statuses.append(json.loads(sse.data)["status"])
            except (httpx.HTTPError, ConnectionError):
                pass
            reconnects += 1
            assert reconnects < 20, "the stream never completed"
        recovery = time.monotonic() - fault_at
        assert seen == list(range(1, 9)), seen
        settle(stack, row, [job_id], recovery, faults_per_job=0)
        stack.stop_workers()


@pytest.fixture
def small_disk(stack: FaultStack) -> Iterator[Path]:
    """The jobs' artifacts folder on an 8 MiB tmpfs, to be filled on purpose."""
    folder = stack.settings.jobs_dir
    folder.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True)
    if made.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the full-disk test: {made.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Fill the file system under `folder` to the last byte."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * (4 << 10)):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_disk_full_for_a_moment_while_writing_a_checkpoint(
    stack: FaultStack, row: Row, repeats: int, small_disk: Path
) -> None:
    """The disk fills up as a checkpoint is written and is freed within the retry window: the write is
    retried and the job goes on unharmed."""
    for rep in range(repeats):
        rng = random.Random(f"disk-{rep}")
        stack.start_workers(1)
        job_id = stack.submit(fault_spec(seed=900 + rep, epochs=5))
        epoch = hit_mid_epoch(stack, job_id, rng)
        filler = fill(small_disk)
        fault_at = time.monotonic()
        wait_for(lambda: RETRYING in stack.workers[0].output(), timeout=30, what="a checkpoint write to fail")
        filler.unlink()  # within io_retry_seconds (3 s) of the failure
        settle(stack, row, [job_id], stack.recovery(job_id, fault_at, epoch), faults_per_job=0)
        stack.stop_workers()


def test_disk_stays_full_while_writing_a_checkpoint(
    stack: FaultStack, row: Row, repeats: int, small_disk: Path
) -> None:
    """The disk fills up for good: the job fails with a clear error, never `succeeded`, and every checkpoint
    it still lists downloads whole."""
    for rep in range(repeats):
        stack.start_workers(1)
        job_id = stack.submit(fault_spec(seed=950 + rep, epochs=5))
        stack.wait_epoch(job_id, 2)
        filler = fill(small_disk)
        fault_at = time.monotonic()
        try:
            stack.wait_terminal([job_id])
        finally:
            filler.unlink()
        settle(stack, row, [job_id], time.monotonic() - fault_at, faults_per_job=0, status="failed")
        error = stack.job(job_id)["error"]
        assert "No space left on device" in error and "intact" in error, error
        with stack.client() as http:
            listed = http.get(f"/jobs/{job_id}/checkpoints").json()["items"]
            assert any(c["kind"] == "epoch" for c in listed)
            for item in listed:  # every checkpoint still listed is whole
                blob = http.get(f"/jobs/{job_id}/checkpoints/{item['name']}").content
                assert len(blob) == item["bytes"]
                assert hashlib.sha256(blob).hexdigest() == item["sha256"]
        stack.stop_workers()


def test_corrupted_checkpoint_before_a_resume(stack: FaultStack, row: Row, repeats: int) -> None:
    """The worker dies, then its newest checkpoint is truncated or has a bit flipped: the resume verifies
    the sha256, falls back to the checkpoint before, and redoes exactly one epoch."""
    for rep in range(repeats):
        rng = random.Random(f"corrupt-{rep}")
        stack.start_workers(1)
        job_id = stack.submit(fault_spec(seed=1000 + rep))
        stack.wait_epoch(job_id, rng.randint(2, 4))
        stack.worker_of(job_id).stop(signal.SIGKILL)
        fault_at = time.monotonic()
        epoch = stack.epochs(job_id)
        folder = stack.settings.jobs_dir / job_id / "checkpoints"
        newest = folder / f"epoch-{epoch:04d}.pt"
        blob = bytearray(newest.read_bytes())
        if rep % 2 == 0:
            newest.write_bytes(blob[: len(blob) // 2])
        else:
            blob[len(blob) // 2] ^= 0x10
            newest.write_bytes(bytes(blob))
        stack.start_workers(1)
        settle(stack, row, [job_id], stack.recovery(job_id, fault_at, epoch))
        assert stack.job(job_id)["epochs_redone"] == 1
        stack.stop_workers()


def test_sigterm_to_a_worker_mid_run(stack: FaultStack, row: Row, repeats: int) -> None:
    """SIGTERM: the worker stops at the next step, gives the job back and exits; the other worker resumes it
    at once (no lease to wait out)."""
    for rep in range(repeats):
        rng = random.Random(f"term-{rep}")
        stack.start_workers(2)
        job_id = stack.submit(fault_spec(seed=1100 + rep))
        epoch = hit_mid_epoch(stack, job_id, rng)
        worker = stack.worker_of(job_id)
        worker.popen.send_signal(signal.SIGTERM)  # the main process only, as `docker stop` does
        fault_at = time.monotonic()
        assert worker.popen.wait(timeout=30) == 0, worker.output()[-3000:]
        settle(stack, row, [job_id], stack.recovery(job_id, fault_at, epoch), faults_per_job=0)
        attempts = _attempts(stack.db, job_id)
        assert [a["outcome"] for a in attempts] == ["released", "succeeded"], attempts
        stack.stop_workers()


def _attempts(db: Database, job_id: str) -> list[dict[str, Any]]:
    with db.engine.connect() as conn:
        query = text("SELECT * FROM attempts WHERE job_id = :id ORDER BY attempt")
        return [dict(r) for r in conn.execute(query, {"id": job_id}).mappings()]


def test_reference_runs_are_reproducible() -> None:
    """The suite's yardstick: two undisturbed runs of one spec give the same records, and another seed does not."""
    data = shared_data_dir()
    first = undisturbed_records(fault_spec(seed=1, epochs=2), data)
    assert len(first) == 2
    assert undisturbed_records(fault_spec(seed=1, epochs=2), data) == first
    assert undisturbed_records(fault_spec(seed=2, epochs=2), data) != first
