"""Built-in and uploaded datasets: an upload is parsed and checked before anything is stored."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.search.datafiles import DataError, parse_series_csv
from worker.search.spec import BUILTIN_DATASETS, JobSpec, series_fit_errors

from .jobs import NotFound
from .models import Dataset, utcnow

VALID_FRACTION = 0.1  # of a plain-text corpus' lines, taken from its end for alpha and validation
MIN_CORPUS_LINES = 10
MIN_CORPUS_TOKENS = 100


def builtin() -> list[dict[str, Any]]:
    return [
        {"name": d.name, "task": d.task, "description": d.description, "length": d.length, "features": d.features}
        for d in BUILTIN_DATASETS.values()
    ]


def list_uploads(session: Session, *, owner: str) -> Sequence[Dataset]:
    query = select(Dataset).where(Dataset.owner == owner).order_by(Dataset.created_at.desc())
    return session.scalars(query).all()


def get_upload(session: Session, *, owner: str, dataset_id: str) -> Dataset:
    # PostgreSQL text cannot hold NUL (the query would fail); no id has one.
    query = select(Dataset).where(Dataset.id == dataset_id, Dataset.owner == owner)
    found = None if "\x00" in dataset_id else session.scalar(query)
    if found is None:
        raise NotFound(f"no dataset {dataset_id}")
    return found


def reference_errors(session: Session, *, owner: str, spec: JobSpec) -> list[tuple[tuple[str, ...], str, Any]]:
    """(loc, msg, input) for what the API cannot run of a spec's `dataset`: a local path, an id that is not one
    of the caller's uploads or is of the other task, a forecast window that does not fit the upload's rows."""
    ref = spec.dataset
    if ref.path is not None:
        msg = "a path is for the command line only; upload the file with POST /datasets and pass its id"
        return [(("dataset", "path"), msg, ref.path)]
    if ref.id is None:
        return []
    try:
        found = get_upload(session, owner=owner, dataset_id=ref.id)
    except NotFound:
        return [(("dataset", "id"), "no uploaded dataset has this id", ref.id)]
    if found.task != spec.task:
        return [
            (("dataset", "id"), f"dataset {found.id} was uploaded for task {found.task!r}, not {spec.task!r}", ref.id)
        ]
    window, horizon = spec.model.window, spec.model.horizon
    if window is None or horizon is None:
        return []
    return list(
        series_fit_errors(int(found.summary["rows"]), f"dataset {found.name!r}", window=window, horizon=horizon)
    )


def _decode(payload: bytes, name: str, *, kind: str) -> str:
    if b"\x00" in payload:  # not text (and a NUL could not be stored in the database's JSON or text)
        raise DataError(f"{name}: holds NUL bytes; {kind}")
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text (byte {exc.start} cannot be decoded)") from None


def check_series(payload: bytes, name: str) -> dict[str, Any]:
    series = parse_series_csv(_decode(payload, name, kind="a forecast dataset is CSV text"), name=name)
    rows = len(series.values)
    if rows < 20:
        raise DataError(f"{name}: {rows} data rows; a forecast search needs at least 20")
    return {"format": "csv", "rows": rows, "columns": series.columns}


def split_corpus(payload: bytes, name: str) -> tuple[list[str], list[str], dict[str, Any]]:
    """Lines of a plain-text corpus; the last tenth (at least one line) becomes the validation split."""
    text = _decode(payload, name, kind="a language_model dataset is plain text")
    lines = [line for line in text.splitlines() if line.strip()]
    tokens = sum(len(line.split()) for line in lines)
    if len(lines) < MIN_CORPUS_LINES or tokens < MIN_CORPUS_TOKENS:
        raise DataError(
            f"{name}: {len(lines)} non-empty lines and {tokens} tokens; "
            f"a corpus needs at least {MIN_CORPUS_LINES} lines and {MIN_CORPUS_TOKENS} tokens"
        )
    n_valid = max(1, round(len(lines) * VALID_FRACTION))
    train, valid = lines[:-n_valid], lines[-n_valid:]
    vocab = len({w for line in train for w in line.split()})
    summary = {"format": "text", "lines": len(lines), "tokens": tokens, "vocabulary": vocab, "valid_lines": n_valid}
    return train, valid, summary


def store_upload(session: Session, *, owner: str, task: str, name: str, payload: bytes, uploads_dir: Path) -> Dataset:
    """Check the upload, write it where the worker's `load_dataset` finds it, then record it."""
    dataset_id = str(uuid.uuid4())
    target = uploads_dir / dataset_id
    staging = uploads_dir / f".{dataset_id}.partial"
    uploads_dir.mkdir(parents=True, exist_ok=True)
    if task == "forecast":
        summary = check_series(payload, name)
        staging.write_bytes(payload)
    else:
        train, valid, summary = split_corpus(payload, name)
        staging.mkdir()
        (staging / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
        (staging / "valid.txt").write_text("\n".join(valid) + "\n", encoding="utf-8")
    staging.rename(target)
    row = Dataset(
        id=dataset_id,
        owner=owner,
        name=name,
        task=task,
        bytes=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
        summary=summary,
        created_at=utcnow(),
    )
    session.add(row)
    try:
        session.commit()
    except Exception:
        session.rollback()
        remove_path(target)
        raise
    return row


def remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
