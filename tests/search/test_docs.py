"""docs/spec.md documents every field of the spec and every scheduler type."""

from __future__ import annotations

from pydantic import BaseModel

from worker.search import spec

from ..conftest import REPO

SECTIONS: list[type[BaseModel]] = [
    spec.JobSpec,
    spec.DatasetRef,
    spec.ModelSpec,
    spec.SearchSpec,
    spec.SGDSpec,
    spec.AdamSpec,
    spec.ArchOptimizerSpec,
    spec.EarlyStoppingSpec,
    spec.CheckpointSpec,
]


def test_every_field_and_scheduler_type_is_documented() -> None:
    text = (REPO / "docs" / "spec.md").read_text()
    missing = [f"{m.__name__}.{f}" for m in SECTIONS for f in m.model_fields if f"`{f}`" not in text]
    missing += [t for t in spec.SCHEDULER_TYPES if f"`{t}`" not in text]
    missing += [k for k in spec.SCHEDULER_OWN_KEYS if f"`{k}`" not in text]
    assert not missing
