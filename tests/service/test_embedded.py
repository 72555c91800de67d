"""The embedded default (`make up`): SQLite and Kombu's SQL transport, no PostgreSQL or Redis, one command."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from pathlib import Path

import httpx

from ..conftest import shared_data_dir
from .factories import job_spec
from .processes import free_port, service_env, spawn, wait_until_up


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
