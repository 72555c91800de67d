"""`python -m worker.search run`: files in --out, clean stop, resume, and bad specs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..conftest import REPO
from .factories import tiny_series, without_timing, write_series_csv


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "worker.search", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def write_spec(folder: Path, **extra: Any) -> Path:
    write_series_csv(folder / "series.csv", tiny_series())
    spec = {
        "task": "forecast",
        "dataset": {"path": "series.csv"},  # relative to the spec file
        "model": {"emsize": 8, "nhid": 8, "steps": 3, "window": 6},
        "search": {"epochs": 3, "batch_size": 8, "batches_per_epoch": 3, "eval_batches": 2},
        "early_stopping": None,
    } | extra
    path = folder / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_metrics_architecture_and_checkpoints(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    out = tmp_path / "out"
    done = cli("run", spec, "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    assert [r["epoch"] for r in metrics(out)] == [1, 2, 3]
    arch = json.loads((out / "architecture.json").read_text())
    assert arch["final"] is True and arch["epoch"] == 3
    assert arch["primitives"] == ["none", "tanh", "relu", "sigmoid", "identity"]
    assert json.loads(done.stdout) == arch["genotype"] == metrics(out)[-1]["genotype"]
    assert json.loads((out / "spec.json").read_text())["optimizer"]["type"] == "Adam"  # defaults filled in
    torch.load(out / "checkpoints" / "epoch-0003.pt", weights_only=True)


def test_stop_after_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, model={"emsize": 8, "nhid": 8, "steps": 3, "window": 6, "dropout": 0.2})
    full, split = tmp_path / "full", tmp_path / "split"
    assert cli("run", spec, "--out", full, "--quiet").returncode == 0
    stopped = cli("run", spec, "--out", split, "--quiet", "--stop-after", "1")
    assert stopped.returncode == 0, stopped.stderr
    assert [r["epoch"] for r in metrics(split)] == [1]
    assert "stopped after epoch 1; continue with --resume" in stopped.stderr
    assert json.loads((split / "architecture.json").read_text())["final"] is False
    resumed = cli("run", spec, "--out", split, "--quiet", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 1" in resumed.stderr
    assert without_timing(metrics(split)) == without_timing(metrics(full))


def test_a_bad_spec_prints_each_error_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            {
                "task": "forecast",
                "dataset": {"builtin": "seattle-weather"},
                "scheduler": {"type": "CosineAnnealingLR", "T_max": 0},
                "search": {"epochs": 0},
            }
        )
    )
    done = cli("run", path, "--out", tmp_path / "out")
    assert done.returncode == 2
    assert "search.epochs: Input should be greater than 0" in done.stderr
    assert "scheduler.CosineAnnealingLR.T_max: Input should be greater than 0" in done.stderr
    assert not (tmp_path / "out").exists(), "nothing is written for a spec that does not validate"
    path.write_text("{not json")
    assert cli("run", path, "--out", tmp_path / "out").returncode == 2


def test_resume_with_a_different_spec_is_refused(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    out = tmp_path / "out"
    assert cli("run", spec, "--out", out, "--quiet", "--stop-after", "1").returncode == 0
    other = write_spec(tmp_path, name="changed")
    refused = cli("run", other, "--out", out, "--quiet", "--resume")
    assert refused.returncode == 2 and "different spec" in refused.stderr
