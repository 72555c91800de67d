"""What the API answers: the response models of API.md (requests are validated by the engine's JobSpec)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class Read(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class JobRead(Read):
    id: str
    name: str | None
    task: str
    status: Status
    stop_reason: str | None
    spec: dict[str, Any]
    epoch: int
    epochs: int
    best_val_loss: float | None
    lr: float | None
    error: str | None
    attempt: int = Field(description="how many times a worker has taken the job (from 1 once it has started)")
    epochs_redone: int = Field(description="finished epochs run again because a resume started before them")
    lease_owner: str | None = Field(description="the worker running the job (host/pid), while it runs")
    lease_expires_at: datetime | None = Field(description="when the job goes back to the queue if its worker stops")
    heartbeat_at: datetime | None = Field(description="when its worker last renewed the lease")
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class AttemptRead(Read):
    attempt: int
    worker: str
    claimed_at: datetime
    ended_at: datetime | None
    outcome: str | None = Field(
        description="succeeded, failed, cancelled; released (worker shutdown); lost (lease expired); null: running"
    )
    resumed_from_epoch: int | None = Field(description="the checkpoint's epoch it continued from; 0: from scratch")
    epochs_redone: int
    error: str | None


class AttemptList(BaseModel):
    items: list[AttemptRead]


class JobList(BaseModel):
    items: list[JobRead]
    next_cursor: str | None


class MetricsPage(BaseModel):
    job_id: str
    status: Status
    items: list[dict[str, Any]]
    next_after: int


class Architecture(BaseModel):
    genotype: dict[str, Any]
    alpha: list[list[float]]
    primitives: list[str]
    epoch: int
    final: bool


class CheckpointRead(Read):
    name: str
    epoch: int
    kind: str
    bytes: int
    sha256: str
    created_at: datetime


class CheckpointList(BaseModel):
    items: list[CheckpointRead]


class BuiltinDatasetRead(BaseModel):
    name: str
    task: str
    description: str
    length: int | None
    features: int | None


class DatasetRead(Read):
    id: str
    name: str
    task: str
    bytes: int
    sha256: str
    summary: dict[str, Any]
    created_at: datetime


class DatasetList(BaseModel):
    builtin: list[BuiltinDatasetRead]
    uploads: list[DatasetRead]


class Problem(BaseModel):
    detail: str
