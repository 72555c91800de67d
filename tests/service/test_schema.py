"""The schema comes from Alembic only: models and migrations agree, migrations reverse, old schemas are refused."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, inspect

from service.app import create_app
from service.db import SchemaOutdated, alembic_config, upgrade_to_head
from service.models import Base
from service.settings import Settings

from .processes import service_env, spawn, wait_for


def test_the_migrations_make_exactly_the_models_schema(pg_url: str) -> None:
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_migrations_downgrade_to_nothing_and_upgrade_again(empty_pg: Callable[[], str]) -> None:
    url = empty_pg()
    upgrade_to_head(url)
    engine = create_engine(url)
    assert set(inspect(engine).get_table_names()) >= {"jobs", "epochs", "checkpoints", "datasets"}
    command.downgrade(alembic_config(url), "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade_to_head(url)
    assert "jobs" in inspect(engine).get_table_names()
    engine.dispose()


def test_the_api_refuses_an_unmigrated_database_unless_told_to_migrate(
    empty_pg: Callable[[], str], settings: Settings
) -> None:
    url = empty_pg()
    with (
        pytest.raises(SchemaOutdated, match="alembic upgrade head"),
        TestClient(create_app(settings.model_copy(update={"database_url": url}))),
    ):
        pass
    migrating = settings.model_copy(update={"database_url": url, "auto_migrate": True})
    with TestClient(create_app(migrating)) as client:
        assert client.get("/jobs").json() == {"items": [], "next_cursor": None}


def test_the_worker_refuses_an_unmigrated_database(empty_pg: Callable[[], str], redis_url: str, tmp_path: Path) -> None:
    env = service_env(database_url=empty_pg(), broker_url=redis_url, queue="darts-refused")
    args = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--concurrency", "1", "--loglevel", "INFO"]
    worker = spawn("worker", args, env=env, cwd=tmp_path, logs=tmp_path)
    try:
        wait_for(lambda: worker.popen.poll() is not None, timeout=60, what="the worker to refuse")
    finally:
        worker.stop()
    assert worker.popen.returncode != 0
    assert "alembic upgrade head" in worker.output()
