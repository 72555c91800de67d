"""Plain factory functions: job specs for requests, and rows made directly for tests that need no worker."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from service.db import Database
from service.models import CheckpointRow, Dataset, EpochRow, Job, utcnow
from worker.search.spec import PRIMITIVES, JobSpec, tiny_dict


def job_spec(task: str = "forecast", **sections: Any) -> dict[str, Any]:
    """A tiny, valid job spec as a client would post it; `sections` extend top-level sections key by key,
    except `dataset` and a section with a new `type`, which replace the old one."""
    spec = tiny_dict(task)  # type: ignore[arg-type]
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict) and "type" not in value and key != "dataset":
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def epoch_record(epoch: int, *, val_loss: float = 1.0) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "train_loss": 1.5,
        "val_loss": val_loss,
        "val_ppl": None,
        "lr": 0.01,
        "arch_lr": 0.003,
        "best_val_loss": val_loss,
        "genotype": {"recurrent": [["tanh", 0], ["relu", 1], ["sigmoid", 0]], "concat": [1, 2, 3]},
        "alpha": [[0.2] * 5 for _ in range(6)],
        "seconds": 0.1,
        "samples_per_second": 100.0,
    }


def add_job(db: Database, *, status: str = "queued", owner: str = "default", epochs_done: int = 0) -> str:
    """A job row (and `epochs_done` epoch rows) written straight to the database."""
    spec = JobSpec.tiny("forecast")
    job_id = str(uuid.uuid4())
    with db.session() as session:
        session.add(
            Job(
                id=job_id,
                owner=owner,
                task=spec.task,
                status=status,
                spec=spec.model_dump(mode="json"),
                epochs=spec.search.epochs,
                epoch=0,
                attempt=0,
                cancel_requested=False,
                created_at=utcnow(),
            )
        )
        session.commit()
    add_epochs(db, job_id, range(1, epochs_done + 1))
    return job_id


def add_epochs(db: Database, job_id: str, epochs: range) -> None:
    """Epoch records as the worker leaves them: the rows, and the job's summary of the last one."""
    with db.session() as session:
        job = session.get_one(Job, job_id)
        for epoch in epochs:
            record = epoch_record(epoch)
            arch = {"genotype": record["genotype"], "alpha": record["alpha"], "primitives": list(PRIMITIVES)}
            arch |= {"epoch": epoch, "final": False}
            session.add(EpochRow(job_id=job_id, epoch=epoch, attempt=job.attempt, record=record, created_at=utcnow()))
            job.epoch, job.best_val_loss, job.lr, job.architecture = epoch, record["best_val_loss"], record["lr"], arch
        session.commit()


def add_checkpoint(db: Database, jobs_dir: Path, job_id: str, name: str, payload: bytes, *, epoch: int = 1) -> str:
    """A checkpoint file where the worker would write it, and its row; returns its sha256."""
    folder = jobs_dir / job_id / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    with db.session() as session:
        session.add(
            CheckpointRow(
                job_id=job_id,
                name=name,
                epoch=epoch,
                kind="epoch",
                bytes=len(payload),
                sha256=digest,
                created_at=utcnow(),
            )
        )
        session.commit()
    return digest


def row_counts(db: Database) -> dict[str, int]:
    """How many rows each table holds: to show a rejected request changed nothing."""
    with db.session() as session:
        return {
            model.__tablename__: session.scalar(select(func.count()).select_from(model)) or 0
            for model in (Job, EpochRow, CheckpointRow, Dataset)
        }
