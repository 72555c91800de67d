"""Settings from the environment (prefix DARTS_); the defaults run everything embedded under ./var."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DARTS_", extra="ignore")

    database_url: str = Field(
        default="sqlite:///var/darts.sqlite3", description="SQLAlchemy URL; PostgreSQL in deployment"
    )
    broker_url: str = Field(
        default="sqla+sqlite:///var/broker.sqlite3",
        description="Celery broker; Redis in deployment, Kombu's SQLAlchemy transport embedded",
    )
    queue: str = Field(default="darts", description="the Celery queue jobs are sent to")
    artifacts_dir: Path = Field(default=Path("var/artifacts"), description="checkpoints and uploads")
    data_dir: Path = Field(default=REPO.parent / "shared" / "data", description="built-in corpora (ptb/, wikitext-2/)")
    device: str = Field(default="auto", description="'auto' (cuda when present, else cpu), 'cpu', 'cuda', 'cuda:1'")
    auto_migrate: bool = Field(default=False, description="run `alembic upgrade head` at start instead of refusing")

    max_body_bytes: int = Field(default=1 << 20, gt=0, description="largest JSON body accepted (413 beyond)")
    max_upload_bytes: int = Field(default=64 << 20, gt=0, description="largest dataset upload (413 beyond)")

    stream_poll_seconds: float = Field(
        default=0.5, gt=0, description="how often the API reads the state of jobs being streamed"
    )
    stream_keepalive_seconds: float = Field(default=10.0, gt=0, description="comment line after this much quiet")
    cancel_poll_seconds: float = Field(default=0.5, ge=0, description="how often a running job reads its cancel flag")
    enqueue_timeout_seconds: float = Field(default=5.0, gt=0, description="give up sending to the broker after this")

    # Leases: the database owns a running job; its worker renews the lease, the reaper takes back expired ones.
    lease_seconds: float = Field(default=60.0, gt=0, description="a running job's lease; renewed by its heartbeat")
    heartbeat_seconds: float = Field(default=10.0, gt=0, description="how often a worker renews its job's lease")
    reaper_seconds: float = Field(
        default=15.0, gt=0, description="how often each worker looks for expired leases and unsent jobs"
    )
    requeue_after_seconds: float = Field(
        default=300.0,
        gt=0,
        description="a queued job whose message was sent this long ago is sent again (a broker may lose messages)",
    )
    max_attempts: int = Field(default=3, gt=0, description="a job whose worker is lost this many times ends as failed")
    db_retry_seconds: float = Field(
        default=60.0, ge=0, description="how long a worker retries a database write before it gives up its job"
    )
    io_retry_seconds: float = Field(
        default=30.0, ge=0, description="how long a worker retries a failed checkpoint write (full disk, I/O error)"
    )
    visibility_timeout_seconds: float = Field(
        default=3600.0, gt=0, description="Redis: an unacknowledged message is delivered again after this"
    )

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Settings:
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError(
                f"DARTS_HEARTBEAT_SECONDS ({self.heartbeat_seconds:g}) must be at most half of DARTS_LEASE_SECONDS "
                f"({self.lease_seconds:g}): a lease must survive a missed heartbeat"
            )
        return self

    @property
    def jobs_dir(self) -> Path:
        return self.artifacts_dir / "jobs"

    @property
    def uploads_dir(self) -> Path:
        return self.artifacts_dir / "datasets"


@lru_cache
def get_settings() -> Settings:
    return Settings()
