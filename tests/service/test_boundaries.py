"""The API process stays torch-free, and nothing but Alembic makes the schema."""

from __future__ import annotations

import os
import subprocess
import sys

from ..conftest import REPO


def test_the_api_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "from service.app import create_app\n"
        "app = create_app()\n"
        "app.openapi()\n"
        "import service.run, service.jobs, service.datasets\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'worker'} and 'search' not in m))\n"
        "print('torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    modules, torch_loaded = done.stdout.strip().splitlines()
    assert torch_loaded == "False"
    assert modules == "['worker']"  # only the torch-free spec/datafiles of worker.search, none of the worker


def test_no_create_all_outside_migrations() -> None:
    for folder in ("service", "worker"):
        for path in (REPO / folder).rglob("*.py"):
            assert "create_all(" not in path.read_text(), path
