"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.app import create_app
from service.db import Database
from service.settings import Settings

from .factories import add_job, job_spec


def test_healthz_and_readyz_with_database_and_broker_up(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready", "database": "ok", "broker": "ok"}


def test_readyz_is_503_and_names_the_broker_when_it_is_unreachable(settings: Settings, clean_db: Database) -> None:
    unreachable = settings.model_copy(update={"broker_url": "redis://127.0.0.1:9/0"})
    with TestClient(create_app(unreachable)) as client:
        r = client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["database"] == "ok" and r.json()["broker"].startswith("unreachable")
        assert client.get("/healthz").status_code == 200  # alive, just not ready


def test_prometheus_metrics_count_requests_by_route_and_jobs_by_status(client: TestClient, clean_db: Database) -> None:
    client.post("/jobs", json=job_spec())
    add_job(clean_db, status="running")
    client.get("/jobs/nope")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    lines = r.text.splitlines()
    assert 'darts_jobs{status="queued"} 1.0' in lines and 'darts_jobs{status="running"} 1.0' in lines
    assert any(
        line.startswith('darts_http_requests_total{method="GET",route="/jobs/{job_id}",status="404"}') for line in lines
    )
    assert any(line.startswith('darts_http_request_seconds_count{method="POST",route="/jobs"}') for line in lines)
    assert "darts_open_streams 0.0" in lines


def test_openapi_documents_every_route_of_the_contract(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in [
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/cancel",
        "/jobs/{job_id}/metrics",
        "/jobs/{job_id}/metrics/stream",
        "/jobs/{job_id}/architecture",
        "/jobs/{job_id}/checkpoints",
        "/jobs/{job_id}/checkpoints/{name}",
        "/datasets",
        "/healthz",
        "/readyz",
        "/metrics",
    ]:
        assert path in paths, path
    assert "Idempotency-Key" in str(paths["/jobs"]["post"]["parameters"])


def test_an_unreachable_database_is_a_503_with_retry_after_not_a_500(client: TestClient) -> None:
    app = client.app
    real = app.state.db  # type: ignore[attr-defined]
    app.state.db = Database("postgresql+psycopg://postgres@127.0.0.1:9/nowhere?connect_timeout=2")  # type: ignore[attr-defined]
    try:
        for method, path in [("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/jobs/x/metrics")]:
            r = client.request(method, path, json=job_spec() if method == "POST" else None)
            assert r.status_code == 503, (method, path, r.text)
            assert r.headers["retry-after"] == "5" and "database is unavailable" in r.json()["detail"]
        assert client.get("/readyz").json()["database"].startswith("unreachable")
    finally:
        app.state.db.dispose()  # type: ignore[attr-defined]
        app.state.db = real  # type: ignore[attr-defined]
    assert client.get("/jobs").status_code == 200  # and back once it is there again
