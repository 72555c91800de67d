"""Real service processes for end-to-end tests: a uvicorn API and a Celery worker, as deployment runs them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from service.settings import Settings

from ..conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], *, timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        return self.popen.returncode


def spawn(name: str, args: list[str], *, env: dict[str, str], cwd: Path, logs: Path) -> Proc:
    """Start a process in its own group; its DARTS_* settings come from `env` only, never from the caller's."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("DARTS_")}
    with log.open("wb") as out:
        popen = subprocess.Popen(
            args, cwd=cwd, env=inherited | env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Proc(name, popen, log)


def service_env(**settings: Any) -> dict[str, str]:
    """Environment variables that give a service process these settings (DARTS_<NAME>)."""
    env = {f"DARTS_{k.upper()}": str(v) for k, v in settings.items()}
    env["PYTHONPATH"] = str(REPO)
    return env


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment of a service process with exactly these settings."""
    return service_env(**settings.model_dump())


def start_worker(env: dict[str, str], *, cwd: Path, logs: Path, queue: str) -> Proc:
    args = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--concurrency", "1", "--loglevel", "INFO"]
    args += ["--queues", queue, "--hostname", f"{queue}@%h", "--without-gossip", "--without-mingle"]
    proc = spawn("worker", args, env=env, cwd=cwd, logs=logs)
    wait_for(lambda: " ready." in proc.output() or proc.popen.poll() is not None, timeout=60, what="the worker")
    assert proc.popen.poll() is None, proc.output()
    return proc


def start_api(env: dict[str, str], *, cwd: Path, logs: Path, port: int) -> Proc:
    args = [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--port", str(port)]
    proc = spawn("api", args, env=env, cwd=cwd, logs=logs)
    wait_until_up(f"http://127.0.0.1:{port}", proc)
    return proc


def wait_until_up(base_url: str, proc: Proc, timeout: float = 60) -> None:
    def up() -> bool:
        assert proc.popen.poll() is None, proc.output()
        try:
            return httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=timeout, what=f"{proc.name} at {base_url}", every=0.2)


@dataclass
class Stack:
    base_url: str
    procs: list[Proc] = field(default_factory=list)

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()
