"""The engine stays pure PyTorch: no web, queue or database layer, and no global state."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..conftest import REPO

ENGINE = REPO / "worker" / "search"


def test_engine_imports_no_service_or_queue_layer() -> None:
    code = (
        "import sys, worker.search.engine, worker.search.cli\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "{'fastapi', 'starlette', 'celery', 'kombu', 'sqlalchemy', 'redis', 'pandas', 'service'}]\n"
        "print(','.join(bad))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == ""


def test_engine_reads_no_environment_and_never_calls_cuda_directly() -> None:
    for path in ENGINE.glob("*.py"):
        text = path.read_text()
        assert ".cuda()" not in text, path
        if path.name != "cli.py":  # the command line is the one place that may read the environment
            assert "os.environ" not in text and "getenv" not in text, path


def test_checkpoints_are_written_through_one_atomic_helper() -> None:
    users = [p.name for p in Path(ENGINE).glob("*.py") if "torch.save(" in p.read_text()]
    assert users == ["checkpoint.py"]
