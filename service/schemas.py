"""What the API answers: the response models of API.md (requests are validated by the engine's JobSpec)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

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
    attempt: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


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
