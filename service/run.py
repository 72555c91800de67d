"""`make up`: migrate, then run the API and one Celery worker together until Ctrl-C.

With no DARTS_* settings this is the embedded default: SQLite for the database and Kombu's SQLAlchemy
transport for the broker, both under ./var, so a bare machine runs real jobs with no other server.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from types import FrameType

from .db import upgrade_to_head
from .settings import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.run", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    settings = get_settings()

    upgrade_to_head(settings.database_url)
    worker_args = ["worker.app", "worker", "--concurrency", "1", "--loglevel", "INFO", "--queues", settings.queue]
    # The worker gets its own process group: Ctrl-C reaches only this launcher, which asks the worker for a warm
    # shutdown with SIGTERM (its running job stops at the next step and goes back to the queue). Celery would
    # answer a SIGINT of its own with exit status 1, and a second one with a cold shutdown.
    worker_cmd = [sys.executable, "-m", "celery", "-A", *worker_args, "--hostname", "embedded@%h"]
    worker = subprocess.Popen(worker_cmd, process_group=0)
    api_args = ["service.app:create_app", "--host", args.host, "--port", str(args.port)]
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", *api_args])
    children = [api, worker]
    print(
        f"\nDARTS search service on http://{args.host}:{args.port}  (API docs: /docs)\n"
        f"  database: {settings.database_url}\n  broker:   {settings.broker_url}\n"
        f"  artifacts: {settings.artifacts_dir}\nCtrl-C stops both the API and the worker.\n",
        flush=True,
    )

    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal closed
        signal.signal(signum, stop)
    while not stopping and all(c.poll() is None for c in children):
        time.sleep(0.2)
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    clean = all(c.returncode in (0, -signal.SIGTERM) for c in children)
    return 0 if stopping and clean else 1


if __name__ == "__main__":
    sys.exit(main())
