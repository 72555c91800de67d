"""Dataset routes: the built-in sets and the caller's uploads."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Form, HTTPException, Response, UploadFile

from worker.search.datafiles import DataError

from .. import datasets
from ..deps import OwnerDep, SessionDep, SettingsDep, invalid, require_content_type, require_printable
from ..models import Dataset
from ..schemas import DatasetList, DatasetRead

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.get("", response_model=DatasetList, summary="Built-in datasets and the caller's uploads")
def list_datasets(session: SessionDep, owner: OwnerDep) -> dict[str, object]:
    return {"builtin": datasets.builtin(), "uploads": datasets.list_uploads(session, owner=owner)}


@router.post(
    "",
    status_code=201,
    response_model=DatasetRead,
    dependencies=[Depends(require_content_type("multipart/form-data"))],
    summary="Upload a CSV series (forecast) or a plain-text corpus (language_model)",
)
def upload_dataset(
    file: UploadFile,
    task: Annotated[Literal["forecast", "language_model"], Form()],
    response: Response,
    session: SessionDep,
    owner: OwnerDep,
    settings: SettingsDep,
    name: Annotated[str | None, Form(min_length=1, max_length=200)] = None,
) -> Dataset:
    require_printable(name, ("body", "name"))
    label = name or (file.filename or "").replace("\x00", "")[:200] or "upload"  # the name column holds 200
    # The body cap leaves room for the multipart envelope, so the file itself may still be too large.
    payload = file.file.read(settings.max_upload_bytes + 1)
    if len(payload) > settings.max_upload_bytes:
        raise HTTPException(413, f"the file is larger than {settings.max_upload_bytes} bytes, the most accepted")
    try:
        row = datasets.store_upload(
            session, owner=owner, task=task, name=label, payload=payload, uploads_dir=settings.uploads_dir
        )
    except DataError as exc:
        raise invalid((("body", "file"), str(exc), label)) from None
    response.headers["Location"] = f"/datasets/{row.id}"
    return row


@router.get("/{dataset_id}", response_model=DatasetRead)
def get_dataset(dataset_id: str, session: SessionDep, owner: OwnerDep) -> Dataset:
    return datasets.get_upload(session, owner=owner, dataset_id=dataset_id)
