"""Engine, sessions and the schema check: Alembic makes the schema, the app only checks it is at head."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from .settings import REPO

MIGRATIONS = REPO / "migrations"


class SchemaOutdated(RuntimeError):
    """The database is not at the code's migration head; the message says what to run."""


def make_engine(url: str) -> Engine:
    """An engine for PostgreSQL or SQLite; SQLite gets WAL and a busy timeout so API and worker share it."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=10, max_overflow=20
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


class Database:
    """One engine and its session factory; the app and the worker each hold one."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade_to_head(url: str) -> None:
    """`alembic upgrade head` on this database."""
    command.upgrade(alembic_config(url), "head")


def check_schema(engine: Engine, *, url: str) -> None:
    """Refuse to run against a database that is not at the migration head."""
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if current != head:
        raise SchemaOutdated(
            f"the database schema is at revision {current or 'none (empty database)'} but this code needs {head}: "
            "run `alembic upgrade head` (or set DARTS_AUTO_MIGRATE=1)"
        )


def prepare(db: Database, *, auto_migrate: bool) -> None:
    """Migrate (when asked to) and check the schema before serving or working."""
    if auto_migrate:
        upgrade_to_head(db.url)
    check_schema(db.engine, url=db.url)
