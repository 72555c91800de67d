"""Real PostgreSQL and Redis on loopback: each test session gets its own database and queue.

Where a server is unreachable these tests skip, except under REQUIRE_SERVICES=1 (CI), where that fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from service.app import create_app
from service.db import Database, upgrade_to_head
from service.settings import Settings

from ..conftest import shared_data_dir

PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
TABLES = ("checkpoints", "epochs", "jobs", "datasets")


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} unreachable ({type(exc).__name__}: {exc})"
    if os.environ.get("REQUIRE_SERVICES"):
        pytest.fail(f"{message}; REQUIRE_SERVICES is set, so this is an error, not a skip")
    pytest.skip(message)


@pytest.fixture(scope="session")
def empty_pg() -> Iterator[Callable[[], str]]:
    """Makes empty PostgreSQL databases (no schema), all dropped at the end of the session."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)  # outlives PG restarts
    made: list[str] = []

    def make() -> str:
        name = f"darts_test_{uuid.uuid4().hex[:10]}"
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        except Exception as exc:
            _unavailable("PostgreSQL", exc)
        made.append(name)
        return admin.url.set(database=name).render_as_string(hide_password=False)

    yield make
    with admin.connect() as conn:
        for name in made:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def pg_url(empty_pg: Callable[[], str]) -> str:
    """A PostgreSQL database for this test session, migrated to head by Alembic."""
    url = empty_pg()
    upgrade_to_head(url)
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:
        _unavailable("Redis", exc)
    return REDIS_URL


@pytest.fixture(scope="session")
def queue_name() -> Iterator[str]:
    name = f"darts-test-{uuid.uuid4().hex[:8]}"
    yield name
    try:
        client = redis.Redis.from_url(REDIS_URL)
        client.delete(name, *client.keys(f"{name}*"))
    except Exception:
        pass


@pytest.fixture(scope="session")
def db(pg_url: str) -> Iterator[Database]:
    database = Database(pg_url)
    yield database
    database.dispose()


@pytest.fixture
def clean_db(db: Database) -> Database:
    """The session's database with every table emptied before the test."""
    with db.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
    return db


def service_settings(*, database_url: str, broker_url: str, queue: str, artifacts_dir: Path) -> Settings:
    """The service's settings for tests: real servers, and short intervals so that streams and cancels are quick."""
    return Settings(
        database_url=database_url,
        broker_url=broker_url,
        queue=queue,
        artifacts_dir=artifacts_dir,
        data_dir=shared_data_dir(),
        stream_poll_seconds=0.05,
        stream_keepalive_seconds=0.5,
        cancel_poll_seconds=0.0,
    )


@pytest.fixture
def settings(pg_url: str, redis_url: str, queue_name: str, tmp_path: Path) -> Settings:
    return service_settings(
        database_url=pg_url, broker_url=redis_url, queue=queue_name, artifacts_dir=tmp_path / "artifacts"
    )


@pytest.fixture
def client(settings: Settings, clean_db: Database) -> Iterator[TestClient]:
    """The app in-process on PostgreSQL and Redis (no worker consumes its queue: jobs stay queued)."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client
