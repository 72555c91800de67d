"""Bad input: every malformed or out-of-range request gets a 4xx with a message a person understands
(422 in FastAPI's shape, 404, 413, 415), never a 500, and leaves the database and the upload folder as they were.

Positive controls beside each group make sure these tests would fail if the app rejected everything.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.db import Database
from service.settings import Settings

from .conftest import service_settings
from .factories import add_job, job_spec, row_counts

# Signs of a message written for a programmer instead of a user.
UNREADABLE = (
    "Value error, ",
    "Traceback",
    'File "',
    "<class",
    "object at 0x",
    "pydantic.",
    "fastapi.",
    "sqlalchemy",
    "psycopg",
)


def assert_readable(msg: object) -> None:
    assert isinstance(msg, str) and msg.strip(), msg
    assert not any(sign in msg for sign in UNREADABLE), msg


def assert_422(r: Any, loc: list[Any] | None = None, fragment: str | None = None) -> list[dict[str, Any]]:
    """FastAPI's validation shape; `loc` must be the loc of one of the errors, `fragment` part of its msg."""
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail, detail
    for error in detail:
        assert {"loc", "msg", "type"} <= error.keys(), error
        assert isinstance(error["loc"], list) and isinstance(error["type"], str), error
        assert_readable(error["msg"])
    if loc is not None:
        matching = [e for e in detail if e["loc"] == loc]
        assert matching, f"no error at {loc}: {detail}"
        if fragment is not None:
            assert any(fragment in e["msg"] for e in matching), detail
    return detail


def assert_plain_4xx(r: Any, status: int, fragment: str = "") -> None:
    """A non-validation refusal: `{"detail": "<a sentence>"}`."""
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert_readable(detail)
    assert fragment in detail, detail


def spec(task: str = "forecast", *, dataset: Any = None, drop: tuple[str, ...] = (), **sections: Any) -> Any:
    """`job_spec` with `dataset` replaced (not merged) and the `drop` keys left out."""
    body = job_spec(task, **sections)
    if dataset is not None:
        body["dataset"] = dataset
    for key in drop:
        del body[key]
    return body


def post_json(client: TestClient, body: Any, **headers: str) -> Any:
    # Not `json=`: httpx refuses NaN and Infinity, which Python's JSON parser (and so FastAPI) accepts.
    return client.post("/jobs", content=json.dumps(body), headers={"Content-Type": "application/json", **headers})


def uploads(settings: Settings) -> list[str]:
    folder = settings.uploads_dir
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def api(pg_url: str, redis_url: str, queue_name: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One app for the many rejections (an app per test would triple this file's time); tests that count rows
    from zero use the `client` fixture instead."""
    artifacts = tmp_path_factory.mktemp("artifacts")
    settings = service_settings(database_url=pg_url, broker_url=redis_url, queue=queue_name, artifacts_dir=artifacts)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def job(db: Database) -> str:
    """A finished job with two epochs, so that streams end."""
    return add_job(db, status="succeeded", epochs_done=2)


@pytest.fixture
def unchanged(db: Database, api: TestClient) -> Iterator[None]:
    """The test's requests leave every table and the upload folder as they found them."""
    settings = api.app.state.settings  # type: ignore[attr-defined]
    before, files = row_counts(db), uploads(settings)
    yield
    assert row_counts(db) == before
    assert uploads(settings) == files


NAN, INF = float("nan"), float("inf")
STEP = {"type": "StepLR", "step_size": 1}
COSINE = {"type": "CosineAnnealingLR", "T_max": 3}


def case(case_id: str, body: Any, *loc: str | int, msg: str | None = None, marks: Any = ()) -> Any:
    """A bad request body, the loc of its error after "body", and a fragment of that error's msg."""
    return pytest.param(body, ["body", *loc], msg, id=case_id, marks=marks)


SPEC_CASES = [
    # task
    case("task-unknown", spec(task="regression"), "task", msg="'forecast' or 'language_model'"),
    case("task-missing", spec(drop=("task",)), "task", msg="Field required"),
    case("task-int", {**spec(), "task": 3}, "task"),
    # dataset
    case("ds-unknown-builtin", spec(dataset={"builtin": "nope"}), "dataset", msg="unknown built-in dataset 'nope'"),
    case("ds-builtin-and-id", spec(dataset={"builtin": "stocks", "id": "x"}), "dataset", msg="exactly one of"),
    case("ds-empty", spec(dataset={}), "dataset", msg="exactly one of"),
    case("ds-null-builtin", spec(dataset={"builtin": None}), "dataset", msg="exactly one of"),
    case(
        "ds-path", spec(dataset={"path": "/etc/passwd"}), "dataset", "path", msg="upload the file with POST /datasets"
    ),
    case("ds-unknown-id", spec(dataset={"id": str(uuid.uuid4())}), "dataset", "id", msg="no uploaded dataset"),
    case("ds-id-nul", spec(dataset={"id": "a\x00b"}), "dataset", "id", msg="NUL"),
    case("ds-id-long", spec(dataset={"id": "x" * 101}), "dataset", "id", msg="at most 100"),
    case(
        "ds-builtin-other-task",
        spec(dataset={"builtin": "ptb"}),
        "dataset",
        "builtin",
        msg="is for language_model jobs",
    ),
    case("ds-string", spec(dataset="stocks"), "dataset"),
    # model
    case("model-emsize-negative", spec(model={"emsize": -1}), "model", "emsize", msg="greater than 0"),
    case("model-nhid-zero", spec(model={"nhid": 0}), "model", "nhid", msg="greater than 0"),
    case("model-steps-huge", spec(model={"steps": 10**12}), "model", "steps", msg="less than or equal to 12"),
    case("model-emsize-1e30", spec(model={"emsize": 10**30}), "model", "emsize"),
    case("model-dropout-above-1", spec(model={"dropout": 1.5}), "model", "dropout", msg="less than 1"),
    case("model-dropouth-negative", spec(model={"dropouth": -0.1}), "model", "dropouth"),
    case("model-window-1", spec(model={"window": 1}), "model", "window"),
    case("model-horizon-0", spec(model={"horizon": 0}), "model", "horizon"),
    case(
        "model-window-too-long-for-data",
        spec(dataset={"builtin": "stocks"}, model={"window": 200}),
        "model",
        "window",
        msg="training windows",
    ),
    case(
        "model-window-for-lm", spec("language_model", model={"window": 5}), "model", "window", msg="forecast jobs only"
    ),
    case("model-lm-untied", spec("language_model", model={"emsize": 16}), "model", "emsize", msg="must equal nhid"),
    case("model-emsize-string", spec(model={"emsize": "big"}), "model", "emsize"),
    # search
    case("search-epochs-0", spec(search={"epochs": 0}), "search", "epochs", msg="greater than 0"),
    case("search-epochs-huge", spec(search={"epochs": 10**6}), "search", "epochs"),
    case("search-batch-1", spec(search={"batch_size": 1}), "search", "batch_size", msg="greater than or equal to 2"),
    case("search-order-third", spec(search={"order": "third"}), "search", "order", msg="'first' or 'second'"),
    case("search-xi-negative", spec(search={"xi": -1}), "search", "xi", msg="xi must be 'follow_lr' or a number"),
    case("search-xi-string", spec(search={"xi": "fast"}), "search", "xi", msg="xi must be 'follow_lr' or a number"),
    case("search-grad-clip-0", spec(search={"grad_clip": 0}), "search", "grad_clip"),
    case("search-seed-negative", spec(search={"seed": -1}), "search", "seed"),
    case("search-bptt-for-forecast", spec(search={"bptt": 10}), "search", "bptt", msg="language_model jobs only"),
    # optimizer (a discriminated union: pydantic puts the chosen type in the loc)
    case(
        "opt-unknown-type",
        spec(optimizer={"type": "RMSprop", "lr": 0.1}),
        "optimizer",
        msg="choose one of: 'SGD', 'Adam', 'AdamW'",
    ),
    case("opt-lr-0", spec(optimizer={"lr": 0}), "optimizer", "Adam", "lr", msg="greater than 0"),
    case("opt-lr-negative", spec(optimizer={"type": "SGD", "lr": -1}), "optimizer", "SGD", "lr", msg="greater than 0"),
    case("opt-beta-above-1", spec(optimizer={"betas": [0.9, 1.5]}), "optimizer", "Adam", "betas", 1, msg="less than 1"),
    case("opt-three-betas", spec(optimizer={"betas": [0.9, 0.9, 0.9]}), "optimizer", "Adam", "betas"),
    case(
        "opt-momentum-for-adam", spec(optimizer={"momentum": 0.9}), "optimizer", "Adam", "momentum", msg="Extra inputs"
    ),
    case(
        "opt-nesterov-no-momentum",
        spec(optimizer={"type": "SGD", "lr": 0.1, "momentum": 0, "nesterov": True}),
        "optimizer",
        "SGD",
        msg="nesterov needs momentum",
    ),
    # scheduler
    case(
        "sched-LambdaLR",
        spec(scheduler={"type": "LambdaLR"}),
        "scheduler",
        msg="unknown 'type' 'LambdaLR'; choose one of: 'StepLR'",
    ),
    case("sched-Nope", spec(scheduler={"type": "Nope"}), "scheduler", msg="'Nope'"),
    case("sched-no-type", spec(scheduler={"T_max": 3}), "scheduler", msg="needs a 'type' key"),
    case(
        "sched-T_max-0",
        spec(scheduler={**COSINE, "T_max": 0}),
        "scheduler",
        "CosineAnnealingLR",
        "T_max",
        msg="greater than 0",
    ),
    case(
        "sched-gamma-0",
        spec(scheduler={"type": "ExponentialLR", "gamma": 0}),
        "scheduler",
        "ExponentialLR",
        "gamma",
        msg="greater than 0",
    ),
    case("sched-gamma-negative", spec(scheduler={**STEP, "gamma": -1}), "scheduler", "StepLR", "gamma"),
    case("sched-gamma-above-1", spec(scheduler={**STEP, "gamma": 1.5}), "scheduler", "StepLR", "gamma"),
    case(
        "sched-milestones-decreasing",
        spec(search={"epochs": 10}, scheduler={"type": "MultiStepLR", "milestones": [5, 3]}),
        "scheduler",
        "milestones",
        msg="strictly increasing",
    ),
    case(
        "sched-milestone-past-end",
        spec(scheduler={"type": "MultiStepLR", "milestones": [1, 50]}),
        "scheduler",
        "milestones",
        msg="never take effect",
    ),
    case(
        "sched-unknown-argument", spec(scheduler={**STEP, "foo": 1}), "scheduler", "StepLR", "foo", msg="Extra inputs"
    ),
    case(
        "sched-interval-hour",
        spec(scheduler={**STEP, "interval": "hour"}),
        "scheduler",
        "StepLR",
        "interval",
        msg="'epoch' or 'step'",
    ),
    case(
        "sched-warmup-negative", spec(scheduler={**STEP, "warmup_epochs": -1}), "scheduler", "StepLR", "warmup_epochs"
    ),
    case(
        "sched-warmup-whole-run",
        spec(scheduler={**STEP, "warmup_epochs": 3}),
        "scheduler",
        "warmup_epochs",
        msg="below search.epochs",
    ),
    case(
        "sched-eta_min-above-lr",
        spec(scheduler={**COSINE, "eta_min": 1.0}),
        "scheduler",
        "eta_min",
        msg="below the optimizer's lr",
    ),
    case(
        "sched-plateau-per-step",
        spec(scheduler={"type": "ReduceLROnPlateau", "interval": "step"}),
        "scheduler",
        "interval",
        msg="use interval 'epoch'",
    ),
    case("sched-string", spec(scheduler="cosine"), "scheduler"),
    # arch_optimizer
    case("arch-lr-0", spec(arch_optimizer={"lr": 0}), "arch_optimizer", "lr", msg="greater than 0"),
    case("arch-beta-1", spec(arch_optimizer={"betas": [1, 0.9]}), "arch_optimizer", "betas", 0),
    case("arch-decay-negative", spec(arch_optimizer={"weight_decay": -1}), "arch_optimizer", "weight_decay"),
    case("arch-type", spec(arch_optimizer={"type": "SGD"}), "arch_optimizer", "type", msg="Extra inputs"),
    # early_stopping
    case("es-patience-negative", spec(early_stopping={"patience": -1}), "early_stopping", "patience"),
    case("es-min-delta-negative", spec(early_stopping={"min_delta": -1}), "early_stopping", "min_delta"),
    case("es-string", spec(early_stopping="yes"), "early_stopping"),
    # checkpoint
    case("ckpt-every-0", spec(checkpoint={"every_epochs": 0}), "checkpoint", "every_epochs"),
    case("ckpt-keep-0", spec(checkpoint={"keep_last": 0}), "checkpoint", "keep_last"),
    case("ckpt-keep-huge", spec(checkpoint={"keep_last": 10**4}), "checkpoint", "keep_last"),
    case("ckpt-keep-best-string", spec(checkpoint={"keep_best": "maybe"}), "checkpoint", "keep_best"),
    # unknown fields, wrong types
    case("unknown-top-level", spec(colour="red"), "colour", msg="Extra inputs"),
    case("unknown-in-model", spec(model={"layers": 3}), "model", "layers", msg="Extra inputs"),
    case("unknown-in-search", spec(search={"lr": 0.1}), "search", "lr", msg="Extra inputs"),
    case("model-string", spec(model="big"), "model", msg="valid dictionary"),
    case("model-list", spec(model=[1, 2]), "model", msg="valid dictionary"),
    case("search-null", spec(search=None), "search"),
    case("name-int", spec(name=5), "name", msg="valid string"),
    case("name-long", spec(name="x" * 201), "name", msg="at most 200"),
    case("name-nul", spec(name="a\x00b"), "name", msg="NUL"),
    # NaN and Infinity: Python's JSON parser reads them, PostgreSQL's JSON cannot store them
    case("nan-epochs", spec(search={"epochs": NAN}), "search", "epochs", msg="finite number"),
    case("inf-lr", spec(optimizer={"lr": INF}), "optimizer", "Adam", "lr"),
    case("inf-min-delta", spec(early_stopping={"min_delta": INF}), "early_stopping", "min_delta", msg="finite number"),
    case("nan-min-delta", spec(early_stopping={"min_delta": NAN}), "early_stopping", "min_delta"),
    case(
        "inf-threshold",
        spec(scheduler={"type": "ReduceLROnPlateau", "threshold": INF}),
        "scheduler",
        "ReduceLROnPlateau",
        "threshold",
        msg="finite number",
    ),
]


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(("body", "loc", "fragment"), SPEC_CASES)
def test_post_job_with_a_bad_field_is_422_at_that_field(
    api: TestClient, body: Any, loc: list[Any], fragment: str | None
) -> None:
    assert_422(post_json(api, body), loc, fragment)


def test_nan_and_infinity_are_echoed_as_text(api: TestClient) -> None:
    error = assert_422(post_json(api, spec(early_stopping={"min_delta": INF})))[0]
    assert error["input"] == "inf"
    error = assert_422(post_json(api, spec(search={"epochs": NAN})))[0]
    assert error["input"] == "nan"


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    ("raw", "loc", "fragment"),
    [
        case("list", b"[]", msg="valid dictionary"),
        case("list-of-spec", json.dumps([job_spec()]).encode(), msg="valid dictionary"),
        case("null", b"null", msg="valid dictionary"),
        case("string", b'"hello"', msg="valid dictionary"),
        case("number", b"3", msg="valid dictionary"),
        case("empty-object", b"{}", "dataset", msg="Field required"),
        case("invalid-json", b"{not json", 1, msg="JSON decode error"),
        pytest.param(b'{"task": "forecast",', None, "JSON decode error", id="truncated-json"),
        case("empty-body", b"", msg="Field required"),
    ],
)
def test_post_job_body_that_is_not_a_spec_is_422(api: TestClient, raw: bytes, loc: list[Any], fragment: str) -> None:
    r = api.post("/jobs", content=raw, headers={"Content-Type": "application/json"})
    detail = assert_422(r, loc)
    assert any(fragment in e["msg"] for e in detail), detail


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested-too-deep"),
        pytest.param(b'{"task": "\xff\xfe"}', id="not-utf8"),
        pytest.param(b'{"search": {"seed": ' + b"9" * 5000 + b"}}", id="number-with-5000-digits"),
    ],
)
def test_post_job_body_the_json_parser_chokes_on_is_400(api: TestClient, raw: bytes) -> None:
    r = api.post("/jobs", content=raw, headers={"Content-Type": "application/json"})
    assert_plain_4xx(r, 400, "body")


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml", None],
)
def test_post_job_without_a_json_content_type_is_415(api: TestClient, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    r = api.post("/jobs", content=json.dumps(job_spec()).encode(), headers=headers)
    assert_plain_4xx(r, 415, "application/json")
    assert r.request.headers.get("content-type") == content_type


@pytest.mark.usefixtures("unchanged")
def test_post_job_over_the_body_cap_is_413_announced_or_streamed(api: TestClient) -> None:
    cap = api.app.state.settings.max_body_bytes  # type: ignore[attr-defined]
    big = json.dumps(job_spec(name="x" * (cap + 1))).encode()
    r = api.post("/jobs", content=big, headers={"Content-Type": "application/json"})
    assert r.request.headers["content-length"] == str(len(big))
    assert_plain_4xx(r, 413, f"at most {cap} bytes")

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    r = api.post("/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers  # chunked: the cap is found while reading
    assert_plain_4xx(r, 413, f"at most {cap} bytes")


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(("key", "fragment"), [("k" * 201, "at most 200"), ("", "at least 1"), ("a\x00b", "NUL")])
def test_post_job_with_a_bad_idempotency_key_is_422(api: TestClient, key: str, fragment: str) -> None:
    assert_422(post_json(api, job_spec(), **{"Idempotency-Key": key}), ["header", "Idempotency-Key"], fragment)


def test_post_job_positive_controls(client: TestClient, clean_db: Database) -> None:
    """What the cases above spoil is accepted as it stands."""
    assert post_json(client, job_spec()).status_code == 201
    r = client.post(
        "/jobs",
        content=json.dumps(job_spec("language_model")),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 201, r.text
    full = spec(
        name="all sections",
        scheduler={"type": "MultiStepLR", "milestones": [1, 2], "gamma": 0.5, "warmup_epochs": 0},
        arch_optimizer={"lr": 1e-3, "betas": [0.5, 0.999]},
        early_stopping={"patience": 0, "min_delta": 0.0},
        checkpoint={"every_epochs": 1, "keep_last": 1},
        search={"xi": 0.01, "order": "second"},
    )
    assert post_json(client, full, **{"Idempotency-Key": "k" * 200}).status_code == 201
    assert row_counts(clean_db)["jobs"] == 3


def test_post_job_naming_an_upload_of_the_other_task_is_422(client: TestClient, clean_db: Database) -> None:
    upload = client.post("/datasets", files={"file": ("s.csv", CSV)}, data={"task": "forecast"})
    assert upload.status_code == 201, upload.text
    dataset_id = upload.json()["id"]
    r = post_json(client, spec("language_model", dataset={"id": dataset_id}))
    assert_422(r, ["body", "dataset", "id"], "uploaded for task 'forecast', not 'language_model'")
    assert row_counts(clean_db)["jobs"] == 0
    assert post_json(client, spec(dataset={"id": dataset_id})).status_code == 201  # the right task is accepted


# GET /jobs, its metrics and stream


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    ("params", "loc", "fragment"),
    [
        ({"limit": 0}, ["query", "limit"], "greater than or equal to 1"),
        ({"limit": 101}, ["query", "limit"], "less than or equal to 100"),
        ({"limit": "x"}, ["query", "limit"], "valid integer"),
        ({"status": "paused"}, ["query", "status"], "'queued'"),
        ({"cursor": "!!!"}, ["query", "cursor"], "start again without it"),
        ({"cursor": "YWJj"}, ["query", "cursor"], "start again without it"),  # base64 of "abc"
        ({"cursor": "MjAyMC0wMS0wMXxhAGI"}, ["query", "cursor"], "start again without it"),  # NUL in the id part
        ({"cursor": "x" * 501}, ["query", "cursor"], "at most 500"),
    ],
    ids=["limit-0", "limit-101", "limit-x", "status-unknown", "cursor-junk", "cursor-abc", "cursor-nul", "cursor-long"],
)
def test_list_jobs_with_bad_query_is_422(
    api: TestClient, params: dict[str, Any], loc: list[str], fragment: str
) -> None:
    assert_422(api.get("/jobs", params=params), loc, fragment)


@pytest.mark.parametrize(
    ("query", "loc", "fragment"),
    [
        ("after=-1", ["query", "after"], "greater than or equal to 0"),
        ("after=x", ["query", "after"], "valid integer"),
        ("after=99999999999999999999", ["query", "after"], "less than or equal to"),
        ("limit=0", ["query", "limit"], "greater than or equal to 1"),
        ("limit=10000", ["query", "limit"], "less than or equal to"),
        ("limit=1.5", ["query", "limit"], "valid integer"),
    ],
)
def test_metrics_with_bad_query_is_422(
    api: TestClient, job: str, unchanged: None, query: str, loc: list[str], fragment: str
) -> None:
    assert_422(api.get(f"/jobs/{job}/metrics?{query}"), loc, fragment)


@pytest.mark.parametrize(
    ("headers", "query", "loc"),
    [
        ({"Last-Event-ID": "abc"}, "", ["header", "Last-Event-ID"]),
        ({"Last-Event-ID": "-1"}, "", ["header", "Last-Event-ID"]),
        ({"Last-Event-ID": "1.5"}, "", ["header", "Last-Event-ID"]),
        ({"Last-Event-ID": "99999999999"}, "", ["header", "Last-Event-ID"]),  # beyond any epoch the database holds
        ({"Last-Event-ID": "9" * 21}, "", ["header", "Last-Event-ID"]),
        ({}, "?after=-1", ["query", "after"]),
        ({}, "?after=x", ["query", "after"]),
    ],
    ids=["lei-abc", "lei-negative", "lei-float", "lei-huge", "lei-long", "after-negative", "after-x"],
)
def test_stream_with_bad_resume_point_is_422_before_it_starts(
    api: TestClient, job: str, unchanged: None, headers: dict[str, str], query: str, loc: list[str]
) -> None:
    r = api.get(f"/jobs/{job}/metrics/stream{query}", headers=headers)
    assert_422(r, loc)
    assert r.headers["content-type"].startswith("application/json")


def test_list_metrics_and_stream_positive_controls(client: TestClient, clean_db: Database) -> None:
    job_id = add_job(clean_db, status="succeeded", epochs_done=2)
    r = client.get("/jobs", params={"limit": 100, "status": "succeeded"})
    assert r.status_code == 200 and [j["id"] for j in r.json()["items"]] == [job_id]
    r = client.get(f"/jobs/{job_id}/metrics?after=0&limit=1000")
    assert r.status_code == 200 and [i["epoch"] for i in r.json()["items"]] == [1, 2]
    r = client.get(f"/jobs/{job_id}/metrics/stream", headers={"Last-Event-ID": "1"})
    assert r.status_code == 200 and "id: 2" in r.text and "id: 1\n" not in r.text


ODD_IDS = [str(uuid.uuid4()), "x" * 300, "x" * 5000, "%00", "%C3%A9t%C3%A9", "\U0001f600", "%FF", "a%20b", "1'; DROP--"]
JOB_PATHS = [
    ("GET", ""),
    ("GET", "/metrics"),
    ("GET", "/metrics/stream"),
    ("GET", "/architecture"),
    ("GET", "/checkpoints"),
    ("GET", "/checkpoints/epoch-1.pt"),
    ("GET", "/plots/losses.png"),
    ("POST", "/cancel"),
    ("DELETE", ""),
]


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    "job_id", ODD_IDS, ids=["uuid", "x300", "x5000", "nul", "unicode", "emoji", "bad-utf8", "space", "sql"]
)
def test_unknown_job_ids_are_404_everywhere(api: TestClient, job_id: str) -> None:
    for method, path in JOB_PATHS:
        r = api.request(method, f"/jobs/{job_id}{path}")
        assert r.status_code == 404, (method, path, r.text)
        assert_readable(r.json()["detail"])
    assert api.get(f"/datasets/{job_id}").status_code == 404


def test_unknown_checkpoint_names_of_a_real_job_are_404(api: TestClient, job: str, unchanged: None) -> None:
    for name in ["nope.pt", "%00", "x" * 300, "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"]:
        r = api.get(f"/jobs/{job}/checkpoints/{name}")
        assert r.status_code == 404, (name, r.text)
        assert_readable(r.json()["detail"])


# POST /datasets

CSV = b"t,v\n" + b"".join(b"%d,%.1f\n" % (i, i / 2) for i in range(30))
CORPUS = b"the cat sat on the mat and then it ran away\n" * 30


def form(payload: bytes | None, task: str | None = "forecast", **fields: str) -> dict[str, Any]:
    """Multipart arguments for `client.post`: the file part (if any) and the text fields."""
    data = {"task": task, **fields} if task is not None else fields
    files = {"file": ("data.csv", payload)} if payload is not None else {"other": ("other.bin", b"x")}
    return {"files": files, "data": data}


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    ("kwargs", "loc", "fragment"),
    [
        case("task-unknown", form(CSV, task="regression"), "task", msg="'forecast' or 'language_model'"),
        case("task-missing", form(CSV, task=None), "task", msg="Field required"),
        case("file-missing", form(None), "file", msg="Field required"),
        case(
            "file-as-text-field",
            {"data": {"task": "forecast", "file": "t,v"}, "files": {"x": ("x", b"x")}},
            "file",
            msg="must be a file",
        ),
        case("name-long", form(CSV, name="n" * 201), "name", msg="at most 200"),
        case("name-nul", form(CSV, name="a\x00b"), "name", msg="NUL"),
        case("csv-no-numeric-column", form(b"a,b\n" + b"x,y\n" * 30), "file", msg="no column holds only numbers"),
        case("csv-ragged", form(CSV + b"1,2,3\n"), "file", msg="different number of fields"),
        case("csv-nan", form(CSV + b"99,nan\n"), "file", msg="finite"),
        case("csv-inf", form(CSV + b"99,inf\n"), "file", msg="finite"),
        case("csv-overflows-float32", form(CSV + b"99,1e300\n"), "file", msg="float32"),
        case("csv-too-few-rows", form(b"t,v\n1,2\n2,3\n"), "file", msg="at least 20"),
        case("csv-header-only", form(b"t,v\n"), "file", msg="header row"),
        case("csv-empty", form(b""), "file", msg="header row"),
        case("csv-not-utf8", form(CSV + b"\xff\xfe,1\n"), "file", msg="not UTF-8"),
        case("csv-nul-in-header", form(b"t,v\x00\n" + CSV[4:]), "file", msg="NUL"),
        case("csv-binary-junk", form(bytes(range(256)) * 20), "file", msg="NUL"),
        case("csv-is-a-corpus", form(CORPUS), "file", msg="no column holds only numbers"),
        case(
            "csv-too-wide",
            form(b",".join(b"c%d" % i for i in range(300)) + b"\n" + (b"1," * 299 + b"1\n") * 25),
            "file",
            msg="at most 256",
        ),
        case("text-too-small", form(b"hello world\n", task="language_model"), "file", msg="a corpus needs at least"),
        case("text-not-utf8", form(CORPUS + b"\xff", task="language_model"), "file", msg="not UTF-8"),
        case("text-binary-junk", form(bytes(range(256)) * 20, task="language_model"), "file", msg="NUL"),
    ],
)
def test_upload_of_bad_data_is_422_and_stores_nothing(
    api: TestClient, kwargs: dict[str, Any], loc: list[str], fragment: str
) -> None:
    assert_422(api.post("/datasets", **kwargs), loc, fragment)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    ("kwargs", "status", "fragment"),
    [
        pytest.param({"json": {"task": "forecast", "file": "t,v\n1,2"}}, 415, "multipart/form-data", id="json"),
        pytest.param(
            {"content": CSV, "headers": {"Content-Type": "text/csv"}}, 415, "multipart/form-data", id="csv-body"
        ),
        pytest.param({"data": {"task": "forecast", "file": "t,v"}}, 415, "multipart/form-data", id="form-urlencoded"),
        pytest.param({"content": CSV}, 415, "multipart/form-data", id="no-content-type"),
        pytest.param(
            {"content": b"junk", "headers": {"Content-Type": "multipart/form-data"}},
            400,
            "boundary",
            id="multipart-without-boundary",
        ),
        pytest.param(
            {"content": b"junk", "headers": {"Content-Type": "multipart/form-data; boundary=xyz"}},
            400,
            "multipart",
            id="multipart-junk",
        ),
    ],
)
def test_upload_that_is_not_multipart_is_refused(
    api: TestClient, kwargs: dict[str, Any], status: int, fragment: str
) -> None:
    assert_plain_4xx(api.post("/datasets", **kwargs), status, fragment)


def multipart(payload: bytes, boundary: str = "b0undary") -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="task"\r\n\r\nforecast\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.csv"\r\n'
            f"Content-Type: text/csv\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )


def test_upload_over_the_cap_is_413_and_stores_nothing(settings: Settings, clean_db: Database) -> None:
    small = settings.model_copy(update={"max_upload_bytes": 1000})
    with TestClient(create_app(small)) as client:
        before = row_counts(clean_db)
        over_file_cap = CSV + b"".join(b"%d,1.0\n" % i for i in range(200))  # over 1000, under the envelope
        assert 1000 < len(over_file_cap) < 64 * 1024
        assert_plain_4xx(client.post("/datasets", **form(over_file_cap)), 413, "1000 bytes")
        huge = multipart(CSV * 3000)  # about 0.7 MB: over the body cap with its envelope
        headers = {"Content-Type": "multipart/form-data; boundary=b0undary"}
        r = client.post("/datasets", content=huge, headers=headers)
        assert r.request.headers["content-length"] == str(len(huge))
        assert_plain_4xx(r, 413, "too large")
        r = client.post(
            "/datasets", content=iter([huge[i : i + 65536] for i in range(0, len(huge), 65536)]), headers=headers
        )
        assert "content-length" not in r.request.headers
        assert_plain_4xx(r, 413, "too large")
        assert row_counts(clean_db) == before and uploads(small) == []
        # Under the cap is fine: the positive control for this app.
        r = client.post("/datasets", **form(CSV))
        assert r.status_code == 201 and len(CSV) < 1000, r.text
        assert uploads(small) == [r.json()["id"]]


def test_upload_positive_controls(client: TestClient, clean_db: Database, settings: Settings) -> None:
    csv = client.post("/datasets", **form(CSV, name="series"))
    assert csv.status_code == 201, csv.text
    assert csv.json()["summary"]["rows"] == 30 and csv.json()["name"] == "series"
    text = client.post("/datasets", **form(CORPUS, task="language_model"))
    assert text.status_code == 201, text.text
    assert row_counts(clean_db)["datasets"] == 2
    assert uploads(settings) == sorted([csv.json()["id"], text.json()["id"]])
