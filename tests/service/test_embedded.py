"""The embedded default (`make up`): SQLite and Kombu's SQL transport, no PostgreSQL or Redis, one command."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import httpx

from ..conftest import shared_data_dir
from .factories import job_spec
from .processes import Proc, free_port, service_env, spawn, wait_for, wait_until_up


def test_make_up_runs_a_job_on_sqlite_and_the_sql_broker_then_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    env = service_env(data_dir=shared_data_dir())  # no database or broker URL: the embedded defaults
    args = [sys.executable, "-m", "service.run", "--port", str(port)]
    launcher = spawn("up", args, env=env, cwd=tmp_path, logs=tmp_path / "logs")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base, launcher)
        assert "sqlite" in launcher.output() and "sqla+sqlite" in launcher.output()
        with httpx.Client(base_url=base, timeout=30) as http:
            assert http.get("/readyz").json() == {"status": "ready", "database": "ok", "broker": "ok"}
            spec = job_spec(scheduler={"type": "ExponentialLR", "gamma": 0.5})
            job_id = http.post("/jobs", json=spec).json()["id"]
            lines: list[str] = []  # the job's event stream, followed live until it ends
            with http.stream("GET", f"/jobs/{job_id}/metrics/stream", timeout=120) as r:
                lines += [line for line in r.iter_lines() if line.startswith(("id:", "event: status"))]
            assert [line for line in lines if line.startswith("id:")] == ["id: 1", "id: 2", "id: 3"]
            assert lines[-1] == "event: status"

            job = http.get(f"/jobs/{job_id}").json()
            assert job["status"] == "succeeded", job["error"]
            lrs = [r["lr"] for r in http.get(f"/jobs/{job_id}/metrics").json()["items"]]
            assert lrs == [0.01, 0.005, 0.0025]
            assert http.get(f"/jobs/{job_id}/architecture").json()["final"] is True
            listed = http.get(f"/jobs/{job_id}/checkpoints").json()["items"]
            newest = max((c for c in listed if c["kind"] == "epoch"), key=lambda c: c["epoch"])
            blob = http.get(f"/jobs/{job_id}/checkpoints/{newest['name']}").content
            assert hashlib.sha256(blob).hexdigest() == newest["sha256"]
        assert (tmp_path / "var" / "darts.sqlite3").is_file() and (tmp_path / "var" / "broker.sqlite3").is_file()
    finally:
        os.killpg(launcher.popen.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends to the foreground group
        code = launcher.popen.wait(timeout=60)
    assert code == 0, launcher.output()[-3000:]
    assert "Traceback" not in launcher.output()
    try:
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
        raise AssertionError("the API still answers after Ctrl-C")
    except httpx.ConnectError:
        pass


def test_ctrl_c_during_a_job_gives_it_back_and_the_next_make_up_finishes_it(tmp_path: Path) -> None:
    env = service_env(data_dir=shared_data_dir())
    spec = job_spec(search={"epochs": 12, "batches_per_epoch": 24})

    def make_up() -> tuple[Proc, str]:
        port = free_port()
        launcher = spawn(
            "up",
            [sys.executable, "-m", "service.run", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            logs=tmp_path / f"logs-{port}",
        )
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base, launcher)
        return launcher, base

    launcher, base = make_up()
    try:
        job_id = httpx.post(f"{base}/jobs", json=spec, timeout=30).json()["id"]
        wait_for(lambda: httpx.get(f"{base}/jobs/{job_id}").json()["epoch"] >= 2, timeout=120, what="two epochs")
    finally:
        os.killpg(launcher.popen.pid, signal.SIGINT)
        started = time.monotonic()
        code = launcher.popen.wait(timeout=60)
    assert code == 0 and time.monotonic() - started < 20, launcher.output()[-3000:]  # one step, not the job

    launcher, base = make_up()
    try:
        job = httpx.get(f"{base}/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running") and job["epoch"] >= 2
        wait_for(
            lambda: httpx.get(f"{base}/jobs/{job_id}").json()["status"] == "succeeded",
            timeout=120,
            what="the job to finish after the restart",
        )
        attempts = httpx.get(f"{base}/jobs/{job_id}/attempts").json()["items"]
        assert [a["outcome"] for a in attempts] == ["released", "succeeded"]
        assert attempts[1]["resumed_from_epoch"] >= 2
        epochs = [r["epoch"] for r in httpx.get(f"{base}/jobs/{job_id}/metrics", params={"limit": 100}).json()["items"]]
        assert epochs == list(range(1, 13))
    finally:
        os.killpg(launcher.popen.pid, signal.SIGINT)
        launcher.popen.wait(timeout=60)
