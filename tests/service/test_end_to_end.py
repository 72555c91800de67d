"""End to end: a real Celery worker process and a uvicorn API on real PostgreSQL and Redis, driven over HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch
from httpx_sse import connect_sse

from .conftest import service_settings
from .factories import job_spec
from .processes import Stack, free_port, settings_env, start_api, start_worker, wait_for

TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def stack(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("e2e")
    queue = f"darts-e2e-{uuid.uuid4().hex[:8]}"
    settings = service_settings(
        database_url=pg_url, broker_url=redis_url, queue=queue, artifacts_dir=root / "artifacts"
    )
    env = settings_env(settings)
    port = free_port()
    running = Stack(f"http://127.0.0.1:{port}")
    try:
        running.procs.append(start_worker(env, cwd=root, logs=root / "logs", queue=queue))
        running.procs.append(start_api(env, cwd=root, logs=root / "logs", port=port))
        yield running
    finally:
        running.stop()
        redis.Redis.from_url(redis_url).delete(queue)


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base_url, timeout=30) as client:
        yield client


def submit(http: httpx.Client, spec: dict[str, Any]) -> str:
    r = http.post("/jobs", json=spec)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def wait_finished(http: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        job = http.get(f"/jobs/{job_id}").json()
        return job if job["status"] in TERMINAL else None

    job: dict[str, Any] = wait_for(finished, timeout=timeout, what=f"job {job_id} to finish", every=0.1)
    return job


def stream_events(
    http: httpx.Client, job_id: str, *, headers: dict[str, str] | None = None, stop_after_epochs: int | None = None
) -> list[tuple[str, str, dict[str, Any] | None]]:
    """(event, id, data) of a job's stream until it ends (or after `stop_after_epochs` epoch events)."""
    events: list[tuple[str, str, dict[str, Any] | None]] = []
    with connect_sse(http, "GET", f"/jobs/{job_id}/metrics/stream", headers=headers or {}) as source:
        assert source.response.status_code == 200
        for sse in source.iter_sse():
            events.append((sse.event, sse.id, json.loads(sse.data) if sse.data else None))
            if stop_after_epochs and sum(e[0] == "epoch" for e in events) >= stop_after_epochs:
                break
    return events


def poll_until_finished(http: httpx.Client, job_id: str) -> tuple[list[int], int]:
    """Poll metrics with `after` and the ETag, as a client would, until the job ended and nothing is left:
    the epochs seen, and how many polls were answered 304."""
    seen: list[int] = []
    after, etag, not_modified = 0, "", 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = http.get(f"/jobs/{job_id}/metrics", params={"after": after, "limit": 4}, headers={"If-None-Match": etag})
        if r.status_code == 304:
            not_modified += 1
        else:
            page, etag = r.json(), r.headers["etag"]
            seen += [item["epoch"] for item in page["items"]]
            after = page["next_after"]
            if page["status"] in TERMINAL and not page["items"]:
                return seen, not_modified
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish; polled {seen}")


def test_a_job_runs_to_the_end_and_every_view_of_its_epochs_agrees(stack: Stack, http: httpx.Client) -> None:
    spec = job_spec(
        search={"epochs": 6, "batches_per_epoch": 6},
        scheduler={"type": "CosineAnnealingLR", "T_max": 6, "eta_min": 0.0001},
    )
    job_id = submit(http, spec)
    # One client streams while another polls, both during the run.
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=stack.base_url, timeout=30) as streamer:
        streaming = pool.submit(stream_events, streamer, job_id)
        polled, not_modified = poll_until_finished(http, job_id)
        events = streaming.result(timeout=120)

    statuses = [data["status"] for event, _, data in events if event == "status" and data]
    assert statuses[-1] == "succeeded" and "running" in statuses
    order = ["queued", "running", "succeeded"]
    assert [order.index(s) for s in statuses] == sorted(order.index(s) for s in statuses)
    assert len(set(statuses)) == len(statuses)  # each change told once
    streamed = [int(i) for event, i, _ in events if event == "epoch"]
    assert streamed == [1, 2, 3, 4, 5, 6]
    assert events[-1][0] == "status"  # the stream ends after the terminal status
    assert polled == streamed
    assert not_modified > 0  # polls that found nothing new were answered 304

    job = http.get(f"/jobs/{job_id}").json()
    assert (job["status"], job["stop_reason"], job["epoch"], job["attempt"]) == ("succeeded", "completed", 6, 1)
    records = http.get(f"/jobs/{job_id}/metrics").json()["items"]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0]["lr"] == spec["optimizer"]["lr"] and records[-1]["lr"] < records[0]["lr"]  # the schedule
    assert {r["arch_lr"] for r in records} == {3e-3}  # alpha's rate never scheduled
    assert job["best_val_loss"] == min(r["val_loss"] for r in records)

    arch = http.get(f"/jobs/{job_id}/architecture").json()
    assert arch["final"] is True and arch["epoch"] == 6
    assert arch["genotype"] == records[-1]["genotype"] and arch["alpha"] == records[-1]["alpha"]
    assert len(arch["genotype"]["recurrent"]) == spec["model"]["steps"]
    assert arch["primitives"] == ["none", "tanh", "relu", "sigmoid", "identity"]

    listed = http.get(f"/jobs/{job_id}/checkpoints").json()["items"]
    assert {c["name"] for c in listed} >= {"epoch-0006.pt", "best.pt"}
    newest = next(c for c in listed if c["name"] == "epoch-0006.pt")
    r = http.get(f"/jobs/{job_id}/checkpoints/epoch-0006.pt")
    assert r.status_code == 200 and len(r.content) == newest["bytes"]
    assert hashlib.sha256(r.content).hexdigest() == newest["sha256"]
    state = torch.load(io.BytesIO(r.content), weights_only=True)
    assert state["epoch"] == 6


def test_a_stream_reconnected_with_last_event_id_misses_and_repeats_nothing(http: httpx.Client) -> None:
    job_id = submit(http, job_spec(search={"epochs": 8, "batches_per_epoch": 6}))
    first = stream_events(http, job_id, stop_after_epochs=3)
    seen = [int(i) for event, i, _ in first if event == "epoch"]
    assert seen == [1, 2, 3]
    rest = stream_events(http, job_id, headers={"Last-Event-ID": str(seen[-1])})
    seen += [int(i) for event, i, _ in rest if event == "epoch"]
    assert seen == list(range(1, 9))
    assert rest[-1][2] is not None and rest[-1][2]["status"] == "succeeded"
    tail = stream_events(http, job_id, headers={"Last-Event-ID": "8"})  # a finished job: status, then the end
    assert [event for event, _, _ in tail] == ["status"]


def test_cancel_stops_a_running_job_at_a_step_and_a_queued_one_before_it_starts(http: httpx.Client) -> None:
    long = job_spec(search={"epochs": 500, "batches_per_epoch": 20})
    running = submit(http, long)
    queued = submit(http, long)
    wait_for(lambda: http.get(f"/jobs/{running}").json()["epoch"] >= 1, timeout=60, what="a first epoch")
    assert http.get(f"/jobs/{queued}").json()["status"] == "queued"  # one job at a time per worker

    # A quiet stream (the queued job) says its status once, then sends keep-alive comments.
    lines: list[str] = []
    with http.stream("GET", f"/jobs/{queued}/metrics/stream") as r:
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith(":"):
                break
    assert lines[0] == "event: status" and json.loads(lines[1].removeprefix("data: "))["status"] == "queued"
    assert lines[-1] == ": keep-alive"

    assert http.post(f"/jobs/{queued}/cancel").json()["status"] == "cancelled"
    assert http.post(f"/jobs/{running}/cancel").status_code == 202
    job = wait_finished(http, running, timeout=30)
    assert job["status"] == "cancelled" and job["stop_reason"] == "cancelled"
    assert job["epoch"] < 500
    records = http.get(f"/jobs/{running}/metrics", params={"limit": 1000}).json()["items"]
    assert [r["epoch"] for r in records] == list(range(1, job["epoch"] + 1))
    kept = http.get(f"/jobs/{running}/checkpoints").json()["items"]
    assert kept and max(c["epoch"] for c in kept) >= 1  # checkpoints survive the cancel

    # The queued job's message is still delivered to the now idle worker, which drops it.
    never = http.get(f"/jobs/{queued}").json()
    assert never["status"] == "cancelled" and never["started_at"] is None and never["epoch"] == 0
    follow = submit(http, job_spec())  # the worker is free again: a new job runs
    assert wait_finished(http, follow)["status"] == "succeeded"
    assert http.get(f"/jobs/{queued}").json()["started_at"] is None


def test_an_uploaded_series_is_searched_and_a_bad_one_fails_the_job_not_the_worker(
    http: httpx.Client, tmp_path: Path
) -> None:
    rows = "\n".join(f"{i},{(i * 7) % 13 / 3:.3f},{(i * 5) % 11:.1f}" for i in range(300))
    r = http.post("/datasets", files={"file": ("mine.csv", f"t,a,b\n{rows}\n", "text/csv")}, data={"task": "forecast"})
    assert r.status_code == 201, r.text
    dataset = r.json()
    assert dataset["summary"]["rows"] == 300 and dataset["summary"]["columns"] == ["t", "a", "b"]
    assert dataset["id"] in [d["id"] for d in http.get("/datasets").json()["uploads"]]
    job = wait_finished(http, submit(http, job_spec(dataset={"id": dataset["id"]})))
    assert job["status"] == "succeeded", job["error"]

    too_long = http.post("/jobs", json=job_spec(dataset={"id": dataset["id"]}, model={"window": 400}))
    assert too_long.status_code == 422  # checked against the upload's rows before anything runs
    assert too_long.json()["detail"][0]["loc"] == ["body", "model", "window"]

    # What only the data can tell fails the job, with the reason, and the worker carries on.
    words = "\n".join(" ".join(f"w{(i * 7 + j) % 50}" for j in range(12)) for i in range(40))
    corpus = http.post(
        "/datasets", files={"file": ("c.txt", words, "text/plain")}, data={"task": "language_model"}
    ).json()
    too_big = job_spec("language_model", dataset={"id": corpus["id"]}, search={"batch_size": 512})
    failed = wait_finished(http, submit(http, too_big))
    assert failed["status"] == "failed" and "batch_size" in failed["error"] and "Traceback" not in failed["error"]
    assert wait_finished(http, submit(http, job_spec()))["status"] == "succeeded"  # the worker lives on


def test_more_streams_than_database_connections_all_see_every_epoch(stack: Stack, http: httpx.Client) -> None:
    """Open streams hold no pooled connection (the pool has 30): 60 streams of one job all get everything,
    and plain requests keep being answered meanwhile."""
    job_id = submit(http, job_spec(search={"epochs": 4, "batches_per_epoch": 30}))

    async def follow(client: httpx.AsyncClient) -> list[str]:
        seen: list[str] = []
        async with client.stream("GET", f"/jobs/{job_id}/metrics/stream") as r:
            async for line in r.aiter_lines():
                if line.startswith(("id: ", 'data: {"status": "succeeded')):
                    seen.append(line)
        return seen

    async def crowd() -> tuple[list[list[str]], int]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=60, limits=limits) as client:
            streams = [asyncio.create_task(follow(client)) for _ in range(60)]
            await asyncio.sleep(1.0)
            status = (await client.get(f"/jobs/{job_id}")).status_code  # answered while 60 streams are open
            return await asyncio.gather(*streams), status

    results, status = asyncio.run(crowd())
    assert status == 200
    expected = ["id: 1", "id: 2", "id: 3", "id: 4"]
    for seen in results:
        assert seen[:-1] == expected and seen[-1].startswith('data: {"status": "succeeded')
