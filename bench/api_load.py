"""The API under load on loopback: request latency and throughput, and how many metric streams one process holds.

One uvicorn process serves the API as deployment runs it (`python -m uvicorn --factory service.app:create_app`),
on its own PostgreSQL database (or SQLite in a temporary folder) and a Redis queue that nobody consumes: no
worker runs, so this measures the API and its database, not the search. Jobs posted here stay queued. The load
generator (asyncio + httpx) runs in this process, on the same machine: it shares the cores with the API.

Phases, each printed as a Markdown table (paste it into docs/benchmarks.md):

1. `POST /jobs` with a tiny valid spec, from 1, 8 and 32 concurrent clients: latency percentiles, requests/s
   and every answer that is not 201.
2. `GET /jobs/{id}/metrics` on a finished job with 50 epoch rows: plain GETs, and GETs that send the ETag back
   in `If-None-Match` (the 304 path), at the same client levels.
3. `GET /jobs/{id}/metrics/stream`: K = 20, 50, 200, 500 streams over K/10 running jobs while a writer commits
   one epoch per job every 0.5 s (through `service.leases.record_epoch`, as the worker does) and then marks the
   jobs succeeded. A stream "held" if it got every epoch exactly once, in order, and the terminal status, and
   ended. Delivery latency is from the epoch row's commit to the event's arrival here. K escalates until a
   level loses something or its p99 latency exceeds --max-p99. Streams do not poll: one watcher in the API
   process reads (status, epoch) of every watched job with one query every DARTS_STREAM_POLL_SECONDS (the
   default is kept) and wakes only the streams whose job changed, which then read their new epochs. The
   database's load is measured, not computed: the "API DB tx/s" column is the transactions per second of the
   benchmark's database in pg_stat_database (xact_commit + xact_rollback, sampled when the writer starts and
   when it ends) less the writer's own, counted here. A session on a reused pooled connection is two
   transactions (the pool's pre-ping, then the work), for the API as for the writer. PostgreSQL publishes a
   backend's counters at most once a second, so the window's edges blur by about that much. The
   API's own PostgreSQL connections (and how many sit idle in a transaction) are sampled from
   pg_stat_activity.

The "cores" column is CPU seconds per wall second during the level, for the API process, this load generator,
PostgreSQL and Redis (all their processes), and everything else on the machine (from /proc/stat): "others"
well above 0 means other work shared the machine and the figures are disturbed.

    .venv/bin/python bench/api_load.py                                   # everything, about 2 minutes on 2 cores
    .venv/bin/python bench/api_load.py --clients 1,8 --requests 200 --streams 50 --database sqlite
    make bench-api

Needs PostgreSQL ($TEST_POSTGRES_URL, default postgres@127.0.0.1:5432/test; the script creates and drops its own
database) and Redis ($TEST_REDIS_URL, default 127.0.0.1:6379/0; its queue key is deleted at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import uvicorn
from httpx_sse import aconnect_sse
from sqlalchemy import create_engine, text

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/api_load.py` puts bench/, not the repository, on the path
    sys.path.insert(0, str(REPO))

from service import leases  # noqa: E402
from service.db import Database, upgrade_to_head  # noqa: E402
from service.models import EpochRow, Job, utcnow  # noqa: E402
from service.settings import Settings  # noqa: E402
from worker.search.spec import JobSpec, tiny_dict  # noqa: E402

PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TICKS = os.sysconf("SC_CLK_TCK")
PRIMITIVES = ("none", "tanh", "relu", "sigmoid", "identity")  # worker/search/cell.py
STEPS = 8  # the default cell: 36 edges, so an epoch record is about the size a real default search writes
STREAMS_PER_JOB = 10
EPOCH_INTERVAL = 0.5  # seconds between two epochs of one job while epochs flow
POLL_SECONDS = Settings.model_fields["stream_poll_seconds"].default
KEEPALIVE_SECONDS = Settings.model_fields["stream_keepalive_seconds"].default
BENCH_APP = "darts-bench"  # application_name of this script's own PostgreSQL connections
SERVER_PROCESSES = {"postgres", "redis-server"}
EXCEPTION_LINE = re.compile(r"^[ |]*((?:[a-z_]+\.)*[A-Z]\w*(?:Error|Exception)\b:? ?[^(\n]{0,120})", re.MULTILINE)


# Measuring: latencies and the CPU and memory of the processes.


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100); NaN for an empty list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def milliseconds(seconds: float, *, digits: int) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.{digits}f}"


def process_cpu_seconds(pid: int | str) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime, all threads


def machine_busy_seconds() -> float:
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / TICKS


def servers_cpu_seconds() -> dict[int, float]:
    """CPU seconds of each PostgreSQL and Redis process, by pid."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if text[text.index("(") + 1 : text.rindex(")")] in SERVER_PROCESSES:
            fields = text.rsplit(")", 1)[1].split()
            found[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / TICKS
    return found


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class CpuSnapshot:
    wall: float
    api: float
    client: float
    servers: dict[int, float]
    machine: float

    @classmethod
    def take(cls, api_pid: int) -> CpuSnapshot:
        return cls(
            time.monotonic(),
            process_cpu_seconds(api_pid),
            process_cpu_seconds("self"),
            servers_cpu_seconds(),
            machine_busy_seconds(),
        )


@dataclass
class Cores:
    """CPU seconds per wall second between two snapshots: the API, this load generator, PostgreSQL and Redis
    (all of their processes, also those serving others), and everything else on the machine."""

    api: float
    client: float
    servers: float
    others: float

    @classmethod
    def between(cls, a: CpuSnapshot, b: CpuSnapshot) -> Cores:
        wall = max(b.wall - a.wall, 1e-9)
        api, client = (b.api - a.api) / wall, (b.client - a.client) / wall
        # Per process, so that a backend exiting in between subtracts nothing (its last seconds are lost).
        servers = sum(seconds - a.servers.get(pid, 0.0) for pid, seconds in b.servers.items()) / wall
        return cls(api, client, servers, max(0.0, (b.machine - a.machine) / wall - api - client - servers))

    def cells(self) -> list[str]:
        return [f"{self.api:.2f} / {self.client:.2f} / {self.servers:.2f} / {self.others:.2f}"]


CORES_HEADING = "cores: API / client / PG+Redis / others"


# The environment: a database, a queue, and one API process.


@dataclass
class Backend:
    database_url: str  # the API's
    bench_url: str  # this script's (seeding, the epoch writer): PostgreSQL tells its connections apart
    description: str
    cleanup: Callable[[], None]
    api_connections: Callable[[], tuple[int, int]] | None = None  # the API's (open, idle in transaction)
    transactions: Callable[[], int] | None = None  # the database's transactions so far, everyone's


def postgres_backend() -> Backend:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"darts_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
        version = conn.execute(text("SHOW server_version")).scalar_one()

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    def api_connections() -> tuple[int, int]:
        query = text(
            "SELECT count(*), count(*) FILTER (WHERE state = 'idle in transaction') FROM pg_stat_activity "
            "WHERE datname = :name AND application_name <> :bench AND backend_type = 'client backend'"
        )
        with admin.connect() as conn:
            total, idle_in_transaction = conn.execute(query, {"name": name, "bench": BENCH_APP}).one()
        return int(total), int(idle_in_transaction)

    def transactions() -> int:
        query = text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :name")
        with admin.connect() as conn:  # the admin's own database: this query is not counted
            return int(conn.execute(query, {"name": name}).scalar_one())

    url = admin.url.set(database=name)
    bench_url = url.update_query_dict({"application_name": BENCH_APP})
    return Backend(
        url.render_as_string(hide_password=False),
        bench_url.render_as_string(hide_password=False),
        f"PostgreSQL {version.split()[0]} on loopback",
        drop,
        api_connections,
        transactions,
    )


def sqlite_backend(folder: Path) -> Backend:
    url = f"sqlite:///{folder / 'bench.sqlite3'}"
    return Backend(url, url, f"SQLite {sqlite3.sqlite_version} (WAL) in a temporary folder", lambda: None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Api:
    popen: subprocess.Popen[bytes]
    base_url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()

    def errors(self) -> Counter[str]:
        """The exceptions in the API's log (run at --log-level warning): their last line, counted."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        found = Counter(match.group(1).strip() for match in EXCEPTION_LINE.finditer(text))
        if not found and "Traceback" in text:
            found["a traceback (see the log: --api-log)"] += text.count("Traceback")
        return found


def start_api(env: dict[str, str], folder: Path) -> Api:
    """`python -m uvicorn --factory service.app:create_app`, as deployment runs it; DARTS_* only from `env`."""
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app"]
    args += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("DARTS_")}
    log = folder / "api.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            args, cwd=REPO, env=inherited | env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    api = Api(popen, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise SystemExit(f"the API exited at start:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(f"{api.base_url}/readyz", timeout=2).status_code == 200:
                return api
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    api.stop()
    raise SystemExit(f"the API did not become ready in 60 s:\n{log.read_text(errors='replace')}")


def delete_queue(queue: str) -> int:
    client = redis.Redis.from_url(REDIS_URL)
    keys = [queue, *client.keys(f"*{queue}*")]
    removed = int(client.delete(*keys))
    client.close()
    return removed


def raise_open_files_limit(needed: int) -> None:
    """Each stream is a socket here and one in the API (which inherits this limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


# Rows written straight to the database, shaped like the worker's.


def epoch_record(epoch: int, rng: random.Random) -> dict[str, Any]:
    edges = STEPS * (STEPS + 1) // 2
    alpha = []
    for _ in range(edges):
        weights = [rng.random() for _ in PRIMITIVES]
        alpha.append([w / sum(weights) for w in weights])
    genotype = {"recurrent": [[rng.choice(PRIMITIVES[1:]), i] for i in range(STEPS)], "concat": list(range(1, 9))}
    return {
        "epoch": epoch,
        "train_loss": rng.uniform(0.5, 2.0),
        "val_loss": rng.uniform(0.5, 2.0),
        "val_ppl": None,
        "lr": 0.01,
        "arch_lr": 0.003,
        "best_val_loss": rng.uniform(0.5, 2.0),
        "genotype": genotype,
        "alpha": alpha,
        "seconds": rng.uniform(1, 100),
        "samples_per_second": rng.uniform(100, 10000),
    }


def architecture(record: dict[str, Any], *, final: bool) -> dict[str, Any]:
    """What the worker stores on the job with each epoch (worker/runner.py)."""
    return {
        "genotype": record["genotype"],
        "alpha": record["alpha"],
        "primitives": list(PRIMITIVES),
        "epoch": record["epoch"],
        "final": final,
    }


def add_job(db: Database, *, status: str, epochs: int = 0) -> str:
    spec = JobSpec.tiny("forecast")
    job_id = str(uuid.uuid4())
    rng = random.Random(job_id)
    with db.session() as session:
        session.add(
            Job(
                id=job_id,
                owner="default",
                task=spec.task,
                status=status,
                spec=spec.model_dump(mode="json"),
                epochs=max(epochs, spec.search.epochs),
                epoch=epochs,
                attempt=1,
                cancel_requested=False,
                created_at=utcnow(),
            )
        )
        session.flush()
        for epoch in range(1, epochs + 1):
            session.add(EpochRow(job_id=job_id, epoch=epoch, record=epoch_record(epoch, rng), created_at=utcnow()))
        session.commit()
    return job_id


# Phases 1 and 2: request/response load at several client levels.


@dataclass
class Level:
    label: str
    clients: int
    requests: int
    expected: int
    latencies: list[float] = field(default_factory=list)  # seconds, sorted after the run
    answers: Counter[str] = field(default_factory=Counter)  # status codes and client-side errors
    wall: float = 0.0
    cores: Cores | None = None

    @property
    def unexpected(self) -> int:
        return sum(n for answer, n in self.answers.items() if answer != str(self.expected))

    def row(self) -> list[str]:
        ms = [milliseconds(percentile(self.latencies, q), digits=1) for q in (50, 90, 99, 100)]
        throughput = f"{len(self.latencies) / self.wall:.0f}" if self.wall else "-"
        bad = ", ".join(f"{n}x {a}" for a, n in sorted(self.answers.items()) if a != str(self.expected))
        assert self.cores is not None
        return [
            self.label,
            str(self.clients),
            str(self.requests),
            f"{self.unexpected}" + (f" ({bad})" if bad else ""),
            *ms,
            throughput,
            *self.cores.cells(),
        ]


Send = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


async def run_level(level: Level, base_url: str, api_pid: int, send: Send) -> Level:
    """`level.clients` loops share `level.requests` requests; each waits for its answer before the next."""
    remaining = level.requests
    limits = httpx.Limits(max_connections=level.clients, max_keepalive_connections=level.clients)

    async def one_client(client: httpx.AsyncClient) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            try:
                response = await send(client)
            except httpx.HTTPError as exc:
                level.answers[type(exc).__name__] += 1
                continue
            level.latencies.append(time.perf_counter() - started)
            level.answers[str(response.status_code)] += 1

    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as client:
        await asyncio.gather(*(send(client) for _ in range(min(level.clients, 4))))  # connections up, warm
        before = CpuSnapshot.take(api_pid)
        await asyncio.gather(*(one_client(client) for _ in range(level.clients)))
        after = CpuSnapshot.take(api_pid)
    level.wall = after.wall - before.wall
    level.cores = Cores.between(before, after)
    level.latencies.sort()
    return level


async def post_jobs(base_url: str, api_pid: int, clients: list[int], requests: int) -> list[Level]:
    spec = tiny_dict("forecast")

    async def send(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/jobs", json=spec)

    levels = []
    for n in clients:
        levels.append(await run_level(Level("POST /jobs", n, requests, 201), base_url, api_pid, send))
        print(f"  POST /jobs, {n} clients: done", flush=True)
    return levels


async def get_metrics(base_url: str, api_pid: int, job_id: str, clients: list[int], requests: int) -> list[Level]:
    path = f"/jobs/{job_id}/metrics"
    async with httpx.AsyncClient(base_url=base_url) as client:
        etag = (await client.get(path)).headers["ETag"]

    async def plain(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get(path)

    async def revalidate(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get(path, headers={"If-None-Match": etag})

    levels = []
    for n in clients:
        levels.append(await run_level(Level("GET metrics", n, requests, 200), base_url, api_pid, plain))
        levels.append(
            await run_level(Level("GET metrics, If-None-Match", n, requests, 304), base_url, api_pid, revalidate)
        )
        print(f"  GET metrics, {n} clients: done", flush=True)
    return levels


# Phase 3: many streams while epochs flow.


@dataclass
class Stream:
    job_id: str
    epochs: list[tuple[int, float]] = field(default_factory=list)  # (epoch, arrival), in arrival order
    statuses: list[str] = field(default_factory=list)
    established: bool = False
    ended: bool = False
    error: str | None = None

    def held(self, epochs: int) -> bool:
        received = [e for e, _ in self.epochs]
        wanted = ["running", "succeeded"]
        return self.ended and self.error is None and received == list(range(1, epochs + 1)) and self.statuses == wanted


async def follow(client: httpx.AsyncClient, stream: Stream) -> None:
    try:
        async with aconnect_sse(client, "GET", f"/jobs/{stream.job_id}/metrics/stream") as source:
            if source.response.status_code != 200:
                stream.error = f"HTTP {source.response.status_code}"
                return
            async for event in source.aiter_sse():
                if event.event == "epoch":
                    stream.epochs.append((int(event.id), time.monotonic()))
                elif event.event == "status":
                    stream.statuses.append(json.loads(event.data)["status"])
                    stream.established = True
        stream.ended = True
    except Exception as exc:  # a benchmark counts failures instead of stopping at the first one
        stream.error = f"{type(exc).__name__}: {exc}"[:200]


def epoch_schedule(job_ids: list[str], epochs: int, rng: random.Random) -> list[tuple[float, str, int]]:
    """(offset s, job, epoch): epoch n of each job at a random moment of the n-th EPOCH_INTERVAL. Random, so
    that the commits do not keep one fixed phase against the streams' polls (which would bias the latency)."""
    plan = [
        ((epoch - 1 + rng.random()) * EPOCH_INTERVAL, job_id, epoch)
        for epoch in range(1, epochs + 1)
        for job_id in job_ids
    ]
    return sorted(plan)


def write_epochs(db: Database, job_ids: list[str], epochs: int, commits: dict[tuple[str, int], float]) -> int:
    """One epoch per job every EPOCH_INTERVAL seconds (committed as the worker does), then every job succeeds.
    Returns the transactions PostgreSQL counts for it: two a session, the commit and the pool's pre-ping
    (`service/db.py` sets pool_pre_ping; the ping runs in a transaction of its own on a reused connection, and
    this one thread reuses the connection it seeded the jobs with)."""
    rngs = {job_id: random.Random(job_id) for job_id in job_ids}
    start = time.monotonic()
    for offset, job_id, epoch in epoch_schedule(job_ids, epochs, random.Random(len(job_ids))):
        time.sleep(max(0.0, start + offset - time.monotonic()))
        record = epoch_record(epoch, rngs[job_id])
        with db.session() as session:
            leases.record_epoch(
                session, job_id=job_id, attempt=1, record=record, architecture=architecture(record, final=False)
            )
        commits[(job_id, epoch)] = time.monotonic()
    time.sleep(max(0.0, start + (epochs + 1) * EPOCH_INTERVAL - time.monotonic()))
    for job_id in job_ids:
        with db.session() as session:
            leases.finish(session, job_id=job_id, attempt=1, status="succeeded", stop_reason="completed")
    return 2 * (len(commits) + len(job_ids))


@dataclass
class StreamLevel:
    streams: int
    jobs: int
    epochs: int
    established: int = 0
    held: int = 0
    delivered: int = 0
    latencies: list[float] = field(default_factory=list)
    connect_seconds: float = 0.0
    rss_before: float = 0.0
    rss_peak: float = 0.0
    connections_peak: tuple[int, int] | None = None  # the API's PostgreSQL connections: open, idle in transaction
    api_transactions: float | None = None  # per second while epochs flow, the writer's own commits taken out
    cores: Cores | None = None
    failures: Counter[str] = field(default_factory=Counter)

    @property
    def expected(self) -> int:
        return self.streams * self.epochs

    def ok(self, max_p99: float) -> bool:
        return self.held == self.streams and percentile(self.latencies, 99) <= max_p99

    def row(self) -> list[str]:
        assert self.cores is not None
        ms = [milliseconds(percentile(self.latencies, q), digits=0) for q in (50, 99, 100)]
        return [
            str(self.streams),
            str(self.jobs),
            "n/a" if self.api_transactions is None else f"{self.api_transactions:.0f}",
            f"{self.connect_seconds:.1f}",
            f"{self.established} / {self.streams}",
            f"{self.held} / {self.streams}",
            f"{self.delivered} / {self.expected}",
            *ms,
            f"{self.rss_before:.0f} → {self.rss_peak:.0f}",
            "{} ({})".format(*self.connections_peak) if self.connections_peak else "-",
            *self.cores.cells(),
        ]


async def sample_api(api: Api, backend: Backend, level: StreamLevel, stop: asyncio.Event) -> None:
    """The peaks of the API's RSS and of its database connections, every 0.25 s until `stop`."""
    while not stop.is_set():
        level.rss_peak = max(level.rss_peak, rss_mib(api.pid))
        if backend.api_connections is not None:
            now = await asyncio.to_thread(backend.api_connections)
            peak = level.connections_peak or now
            level.connections_peak = (max(peak[0], now[0]), max(peak[1], now[1]))
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


async def wait_established(streams: list[Stream], tasks: list[asyncio.Task[None]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(s.established or t.done() for s, t in zip(streams, tasks, strict=True)):
            return
        await asyncio.sleep(0.05)


async def run_streams(api: Api, backend: Backend, db: Database, k: int, seconds: float) -> StreamLevel:
    jobs = max(1, k // STREAMS_PER_JOB)
    level = StreamLevel(streams=k, jobs=jobs, epochs=max(1, round(seconds / EPOCH_INTERVAL)))
    job_ids = [add_job(db, status="running") for _ in range(jobs)]
    streams = [Stream(job_ids[i % jobs]) for i in range(k)]
    level.rss_before = level.rss_peak = rss_mib(api.pid)
    stop_sampling = asyncio.Event()
    sampler = asyncio.create_task(sample_api(api, backend, level, stop_sampling))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    timeout = httpx.Timeout(60, read=KEEPALIVE_SECONDS + 60)
    async with httpx.AsyncClient(base_url=api.base_url, limits=limits, timeout=timeout) as client:
        started = time.monotonic()
        tasks = [asyncio.create_task(follow(client, s)) for s in streams]
        await wait_established(streams, tasks, timeout=30 + k * 0.05)
        level.connect_seconds = time.monotonic() - started
        commits: dict[tuple[str, int], float] = {}
        count = backend.transactions or (lambda: 0)
        before, transactions = CpuSnapshot.take(api.pid), await asyncio.to_thread(count)
        written = await asyncio.to_thread(write_epochs, db, job_ids, level.epochs, commits)
        transactions = await asyncio.to_thread(count) - transactions - written
        if backend.transactions is not None:
            level.api_transactions = transactions / (time.monotonic() - before.wall)
        _done, pending = await asyncio.wait(tasks, timeout=30 + POLL_SECONDS * 4)
        after = CpuSnapshot.take(api.pid)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    stop_sampling.set()
    await sampler
    level.cores = Cores.between(before, after)
    tally_streams(level, streams, commits)
    return level


def tally_streams(level: StreamLevel, streams: list[Stream], commits: dict[tuple[str, int], float]) -> None:
    for stream in streams:
        level.established += stream.established
        level.delivered += len(stream.epochs)
        if stream.held(level.epochs):
            level.held += 1
        elif stream.error:
            level.failures[stream.error.split(":")[0]] += 1
        elif not stream.established:
            level.failures["never established"] += 1
        elif not stream.ended:
            level.failures["still open 30 s after the jobs finished"] += 1
        else:
            level.failures[f"ended with epochs missing, repeated or out of order (statuses {stream.statuses})"] += 1
        for epoch, arrival in stream.epochs:
            committed = commits.get((stream.job_id, epoch))
            if committed is not None:
                level.latencies.append(arrival - committed)
    level.latencies.sort()


async def streams_phase(
    api: Api, backend: Backend, db: Database, ks: list[int], seconds: float, max_p99: float
) -> list[StreamLevel]:
    levels = []
    for k in ks:
        level = await run_streams(api, backend, db, k, seconds)
        levels.append(level)
        p99 = percentile(level.latencies, 99)
        print(f"  {k} streams: {level.held} held, delivery p99 {p99 * 1000:.0f} ms", flush=True)
        if not level.ok(max_p99):
            print(f"  stopping: not every stream held, or p99 over {max_p99} s", flush=True)
            break
    return levels


# Output.


def table(headers: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(headers))]
    lines = [headers, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def server_modules() -> str:
    """uvloop and httptools, which uvicorn's defaults (--loop auto, --http auto) use when they are installed."""
    found = [
        f"{name} {importlib.metadata.version(name)}"
        for name in ("uvloop", "httptools")
        if importlib.util.find_spec(name)
    ]
    return f", {' and '.join(found)}" if found else ", asyncio loop and h11"


def machine_line(backend: Backend) -> str:
    cores = len(os.sched_getaffinity(0))
    return (
        f"Machine: {cpu_model()}, {cores} cores available, Linux {platform.release()}, "
        f"Python {platform.python_version()}, uvicorn {uvicorn.__version__} (one process{server_modules()}), "
        f"{backend.description}, Redis broker"
    )


def code_version() -> str:
    """The commit the API ran from, and whether service/ or worker/ had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "service", "worker"], cwd=REPO, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" with uncommitted changes in service/ or worker/" if dirty.stdout.strip() else "")


def report(
    backend: Backend,
    args: argparse.Namespace,
    posts: list[Level],
    metrics: list[Level],
    metrics_bytes: int,
    streams: list[StreamLevel],
    errors: Counter[str],
) -> None:
    print()
    print("```")
    print(machine_line(backend))
    print(f"Code: {code_version()}")
    print(f"Command: {shlex.join([Path(sys.executable).name, 'bench/api_load.py', *sys.argv[1:]])}")
    print(f"Settings: DARTS_STREAM_POLL_SECONDS={POLL_SECONDS}, DARTS_STREAM_KEEPALIVE_SECONDS={KEEPALIVE_SECONDS}")
    print("```")
    heads = ["request", "clients", "requests", "unexpected answers", "p50 ms", "p90 ms", "p99 ms", "max ms", "req/s"]
    heads += [CORES_HEADING]
    print(
        f"\n`POST /jobs` (tiny forecast spec; stored, then sent to the Redis queue), "
        f"{args.requests} requests a level:\n"
    )
    print(table(heads, [level.row() for level in posts], right_from=1))
    print(
        f"\n`GET /jobs/{{id}}/metrics` of a finished job with {args.epochs} epoch rows ({STEPS}-node cell; "
        f"the answer is {metrics_bytes / 1024:.0f} KiB), {args.requests} requests a level:\n"
    )
    print(table(heads, [level.row() for level in metrics], right_from=1))
    heads = ["streams", "jobs", "API DB tx/s", "connect s", "established", "held", "epochs delivered"]
    heads += ["delivery p50 ms", "p99 ms", "max ms", "API RSS MiB", "API DB connections (idle in tx)"]
    heads += [CORES_HEADING]
    print(
        f"\n`GET /jobs/{{id}}/metrics/stream`: {STREAMS_PER_JOB} streams a job, one epoch per job every "
        f"{EPOCH_INTERVAL} s for {args.seconds:.0f} s, then `succeeded`; one watcher polls every watched job every "
        f"{POLL_SECONDS} s and wakes the streams whose job changed; API DB tx/s is measured while epochs flow "
        "(pg_stat_database, less the writer's own):\n"
    )
    print(table(heads, [level.row() for level in streams], right_from=1))
    if any(level.failures for level in streams):
        print()
    for level in streams:
        for reason, n in level.failures.items():
            print(f"- {level.streams} streams: {n} {reason}")
    held = [lv.streams for lv in streams if lv.ok(args.max_p99)]
    print(f"\nLargest K held with every epoch delivered (p99 ≤ {args.max_p99} s): {max(held) if held else 'none'}")
    if errors:
        print(f"\nThe API logged {sum(errors.values())} exceptions:")
        for line, n in errors.most_common(10):
            print(f"- {n}x `{line}`")
    else:
        print("\nThe API logged no exceptions.")


# The run.


def parse_args() -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x.strip()]

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=ints, default=[1, 8, 32], help="concurrent client levels (1,8,32)")
    parser.add_argument("--requests", type=int, default=300, help="requests per level and request kind (300)")
    parser.add_argument("--streams", type=ints, default=[20, 50, 200, 500], help="stream levels K (20,50,200,500)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long epochs flow at each stream level (10)")
    parser.add_argument("--database", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--epochs", type=int, default=50, help="epoch rows of the job whose metrics are read (50)")
    parser.add_argument("--api-log", type=Path, help="copy the API's log (warnings and errors) to this file")
    parser.add_argument("--max-p99", type=float, default=3.0, help="stop escalating streams above this p99 (3 s)")
    return parser.parse_args()


@contextmanager
def environment(args: argparse.Namespace, folder: Path) -> Iterator[tuple[Api, Database, Backend]]:
    """A migrated database, a queue nobody consumes, and the API; all removed at the end."""
    backend = postgres_backend() if args.database == "postgres" else sqlite_backend(folder)
    queue = f"darts-bench-{uuid.uuid4().hex[:8]}"
    db: Database | None = None
    api: Api | None = None
    try:
        upgrade_to_head(backend.database_url)
        db = Database(backend.bench_url)
        env = {
            "DARTS_DATABASE_URL": backend.database_url,
            "DARTS_BROKER_URL": REDIS_URL,
            "DARTS_QUEUE": queue,
            "DARTS_ARTIFACTS_DIR": str(folder / "artifacts"),
            "PYTHONPATH": str(REPO),
        }
        api = start_api(env, folder)
        yield api, db, backend
    finally:
        if api is not None:
            api.stop()
            if args.api_log:
                shutil.copyfile(api.log, args.api_log)
        if db is not None:
            db.dispose()
        backend.cleanup()
        delete_queue(queue)


async def main_async(args: argparse.Namespace, api: Api, db: Database, backend: Backend) -> None:
    print("POST /jobs ...", flush=True)
    posts = await post_jobs(api.base_url, api.pid, args.clients, args.requests)
    print("GET metrics ...", flush=True)
    job_id = add_job(db, status="succeeded", epochs=args.epochs)
    metrics_bytes = len(httpx.get(f"{api.base_url}/jobs/{job_id}/metrics").content)
    metrics = await get_metrics(api.base_url, api.pid, job_id, args.clients, args.requests)
    print("streams ...", flush=True)
    streams = await streams_phase(api, backend, db, args.streams, args.seconds, args.max_p99)
    report(backend, args, posts, metrics, metrics_bytes, streams, api.errors())


def main() -> None:
    args = parse_args()
    raise_open_files_limit(2 * max(args.streams, default=0) + 1024)
    with tempfile.TemporaryDirectory(prefix="darts-bench-") as tmp, environment(args, Path(tmp)) as (api, db, backend):
        asyncio.run(main_async(args, api, db, backend))


if __name__ == "__main__":
    main()
