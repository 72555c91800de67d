"""The job routes on real PostgreSQL and Redis, in-process (no worker: what a worker does is set up in rows)."""

from __future__ import annotations

from datetime import datetime

from fastapi.testclient import TestClient

from service import leases
from service.app import create_app
from service.db import Database
from service.models import Job
from service.settings import Settings

from .factories import add_checkpoint, add_epochs, add_job, job_spec, row_counts


def test_post_job_stores_it_with_defaults_filled_and_points_to_it(client: TestClient, clean_db: Database) -> None:
    r = client.post("/jobs", json=job_spec(name="weather", scheduler={"type": "CosineAnnealingLR", "T_max": 3}))
    assert r.status_code == 201, r.text
    job = r.json()
    assert r.headers["location"] == f"/jobs/{job['id']}"
    assert job["status"] == "queued" and job["epoch"] == 0 and job["epochs"] == 3 and job["name"] == "weather"
    assert job["spec"]["scheduler"]["T_max"] == 3 and job["spec"]["scheduler"]["eta_min"] == 0.0
    assert job["spec"]["arch_optimizer"]["lr"] == 3e-3  # defaults filled in
    assert datetime.fromisoformat(job["created_at"]).utcoffset() is not None
    assert client.get(f"/jobs/{job['id']}").json() == job
    assert row_counts(clean_db)["jobs"] == 1


def test_idempotency_key_repeat_returns_the_first_job(client: TestClient, clean_db: Database) -> None:
    headers = {"Idempotency-Key": "abc-123"}
    first = client.post("/jobs", json=job_spec(), headers=headers)
    again = client.post("/jobs", json=job_spec(), headers=headers)
    assert first.status_code == 201 and again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = client.post("/jobs", json=job_spec(search={"epochs": 5}), headers=headers)
    assert other.status_code == 409 and "different request body" in other.json()["detail"]
    assert row_counts(clean_db)["jobs"] == 1
    assert (
        client.post("/jobs", json=job_spec(), headers={"Idempotency-Key": "other"}).json()["id"] != first.json()["id"]
    )


def test_list_jobs_newest_first_with_status_filter_and_cursor_pages(client: TestClient) -> None:
    ids = [client.post("/jobs", json=job_spec()).json()["id"] for _ in range(5)]
    client.post(f"/jobs/{ids[1]}/cancel")
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/jobs", params=params).json()
        assert len(page["items"]) <= 2
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    cancelled = client.get("/jobs", params={"status": "cancelled"}).json()["items"]
    assert [j["id"] for j in cancelled] == [ids[1]]
    assert client.get("/jobs", params={"status": "paused"}).status_code == 422
    bad = client.get("/jobs", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "cursor"]


def test_cancel_a_queued_job_finishes_it_at_once(client: TestClient) -> None:
    job_id = client.post("/jobs", json=job_spec()).json()["id"]
    r = client.post(f"/jobs/{job_id}/cancel")
    assert r.status_code == 202
    assert r.json()["status"] == "cancelled" and r.json()["finished_at"] is not None
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 202  # cancelling twice is harmless


def test_cancel_a_running_job_flags_it_and_a_finished_one_is_a_conflict(client: TestClient, clean_db: Database) -> None:
    running = add_job(clean_db, status="running")
    r = client.post(f"/jobs/{running}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "running" and r.json()["cancel_requested"] is True
    done = add_job(clean_db, status="succeeded")
    r = client.post(f"/jobs/{done}/cancel")
    assert r.status_code == 409 and "already finished" in r.json()["detail"]


def test_delete_refuses_an_active_job_and_removes_a_finished_one_with_its_files(
    client: TestClient, clean_db: Database, settings: Settings
) -> None:
    running = add_job(clean_db, status="running", epochs_done=1)
    assert client.delete(f"/jobs/{running}").status_code == 409
    done = add_job(clean_db, status="succeeded", epochs_done=2)
    add_checkpoint(clean_db, settings.jobs_dir, done, "epoch-0002.pt", b"x" * 10, epoch=2)
    before = row_counts(clean_db)
    assert client.delete(f"/jobs/{done}").status_code == 204
    after = row_counts(clean_db)
    assert (before["jobs"] - after["jobs"], before["epochs"] - after["epochs"]) == (1, 2)
    assert after["checkpoints"] == 0 and not (settings.jobs_dir / done).exists()
    assert client.get(f"/jobs/{done}").status_code == 404
    assert client.get(f"/jobs/{running}").json()["status"] == "running"


def test_metrics_pages_after_n_and_answers_304_when_nothing_is_new(client: TestClient, clean_db: Database) -> None:
    job_id = add_job(clean_db, status="running", epochs_done=3)
    r = client.get(f"/jobs/{job_id}/metrics", params={"after": 1})
    page = r.json()
    assert [i["epoch"] for i in page["items"]] == [2, 3] and page["next_after"] == 3
    assert page["job_id"] == job_id and page["status"] == "running"
    etag = r.headers["etag"]
    again = client.get(f"/jobs/{job_id}/metrics", params={"after": 1}, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    empty = client.get(f"/jobs/{job_id}/metrics", params={"after": 3}).json()
    assert empty["items"] == [] and empty["next_after"] == 3
    add_epochs(clean_db, job_id, range(4, 5))
    fresh = client.get(f"/jobs/{job_id}/metrics", params={"after": 1}, headers={"If-None-Match": etag})
    assert fresh.status_code == 200 and fresh.headers["etag"] != etag
    limited = client.get(f"/jobs/{job_id}/metrics", params={"after": 0, "limit": 2}).json()
    assert [i["epoch"] for i in limited["items"]] == [1, 2] and limited["next_after"] == 2


def test_checkpoint_list_and_download_by_name_only(client: TestClient, clean_db: Database, settings: Settings) -> None:
    job_id = add_job(clean_db, status="succeeded", epochs_done=1)
    digest = add_checkpoint(clean_db, settings.jobs_dir, job_id, "epoch-0001.pt", b"payload")
    items = client.get(f"/jobs/{job_id}/checkpoints").json()["items"]
    assert [(i["name"], i["sha256"], i["bytes"]) for i in items] == [("epoch-0001.pt", digest, 7)]
    r = client.get(f"/jobs/{job_id}/checkpoints/epoch-0001.pt")
    assert r.status_code == 200 and r.content == b"payload"
    assert r.headers["content-type"] == "application/octet-stream"
    secret = settings.artifacts_dir / "secret.txt"
    secret.write_text("not for clients")
    for name in ("..%2F..%2Fsecret.txt", "../../secret.txt", "%2Fetc%2Fpasswd", str(secret), "best.pt", "nope"):
        r = client.get(f"/jobs/{job_id}/checkpoints/{name}")
        assert r.status_code == 404, name
        assert "not for clients" not in r.text


def test_architecture_is_404_until_an_epoch_has_finished(client: TestClient, clean_db: Database) -> None:
    job_id = add_job(clean_db, status="queued")
    r = client.get(f"/jobs/{job_id}/architecture")
    assert r.status_code == 404 and "no architecture yet" in r.json()["detail"]


def test_unknown_job_is_404_on_every_route(client: TestClient) -> None:
    missing = "00000000-0000-0000-0000-000000000000"
    for method, path in [
        ("GET", ""),
        ("POST", "/cancel"),
        ("DELETE", ""),
        ("GET", "/metrics"),
        ("GET", "/metrics/stream"),
        ("GET", "/architecture"),
        ("GET", "/checkpoints"),
        ("GET", "/checkpoints/best.pt"),
        ("GET", "/attempts"),
    ]:
        r = client.request(method, f"/jobs/{missing}{path}")
        assert r.status_code == 404, (method, path)
        assert missing in r.json()["detail"]


def test_a_job_shows_its_lease_and_each_attempt(client: TestClient, clean_db: Database) -> None:
    job_id = client.post("/jobs", json=job_spec()).json()["id"]
    assert client.get(f"/jobs/{job_id}/attempts").json() == {"items": []}
    with clean_db.session() as session:  # as a worker takes it
        leases.claim(session, job_id=job_id, worker="gpu-3@host/4242", lease_seconds=60, max_attempts=3)
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "running" and job["attempt"] == 1 and job["epochs_redone"] == 0
    assert job["lease_owner"] == "gpu-3@host/4242"
    expires, beat = datetime.fromisoformat(job["lease_expires_at"]), datetime.fromisoformat(job["heartbeat_at"])
    assert (expires - beat).total_seconds() == 60
    [attempt] = client.get(f"/jobs/{job_id}/attempts").json()["items"]
    assert attempt["attempt"] == 1 and attempt["worker"] == "gpu-3@host/4242" and attempt["outcome"] is None
    with clean_db.session() as session:
        leases.finish(session, job_id=job_id, attempt=1, status="succeeded", stop_reason="completed")
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["lease_owner"] is None and job["lease_expires_at"] is None
    [attempt] = client.get(f"/jobs/{job_id}/attempts").json()["items"]
    assert attempt["outcome"] == "succeeded" and attempt["ended_at"] is not None


def test_a_job_posted_while_the_broker_is_down_is_stored_for_the_reaper(settings: Settings, clean_db: Database) -> None:
    unreachable = settings.model_copy(update={"broker_url": "redis://127.0.0.1:9/0"})
    with TestClient(create_app(unreachable)) as client:
        r = client.post("/jobs", json=job_spec())
    assert r.status_code == 201, r.text
    with clean_db.session() as session:
        job = session.get_one(Job, r.json()["id"])
        assert job.status == "queued" and job.enqueued_at is None  # what the reaper sends first
