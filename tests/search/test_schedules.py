"""The learning rate each epoch records is what torch's own scheduler gives, stepped alone; alpha's is constant."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler

from worker.search.engine import Search, run_search
from worker.search.spec import SCHEDULER_OWN_KEYS, JobSpec

from .factories import forecast_spec, tiny_series

EPOCHS, STEPS = 6, 3
SGD = {"type": "SGD", "lr": 0.01, "momentum": 0.9}

SCHEDULES: list[dict[str, Any]] = [
    {"type": "StepLR", "step_size": 2, "gamma": 0.5},
    {"type": "MultiStepLR", "milestones": [2, 4], "gamma": 0.1},
    {"type": "ConstantLR", "factor": 0.5, "total_iters": 3},
    {"type": "LinearLR", "start_factor": 0.25, "total_iters": 4},
    {"type": "ExponentialLR", "gamma": 0.8},
    {"type": "PolynomialLR", "total_iters": 4, "power": 2.0},
    {"type": "CosineAnnealingLR", "T_max": 4, "eta_min": 0.001},
    {"type": "CosineAnnealingWarmRestarts", "T_0": 2, "T_mult": 2, "eta_min": 0.0005},
    {"type": "CyclicLR", "base_lr": 0.001, "max_lr": 0.02, "step_size_up": 2},
    {"type": "CosineAnnealingLR", "T_max": 4, "warmup_epochs": 2},
    {"type": "StepLR", "step_size": 2, "gamma": 0.5, "warmup_epochs": 1, "warmup_start_factor": 0.25},
]
CASES = [
    *(
        pytest.param(s | {"interval": i}, id=f"{s['type']}-{i}{'-warmup' if 'warmup_epochs' in s else ''}")
        for s in SCHEDULES
        for i in ("epoch", "step")
    ),
    pytest.param({"type": "OneCycleLR", "max_lr": 0.05, "interval": "step"}, id="OneCycleLR-step"),
    pytest.param({"type": "ReduceLROnPlateau", "factor": 0.5, "patience": 0, "threshold": 0.05}, id="Plateau-epoch"),
    pytest.param(
        {"type": "ReduceLROnPlateau", "factor": 0.5, "patience": 0, "threshold": 0.05, "warmup_epochs": 2},
        id="Plateau-epoch-warmup",
    ),
    pytest.param(None, id="constant"),
]


def reference_lrs(spec: JobSpec, val_losses: list[float]) -> list[float]:
    """Per epoch, the lr at its first weight update, from torch's scheduler on a lone optimizer."""
    param = torch.nn.Parameter(torch.zeros(1))
    options = spec.optimizer.model_dump(exclude={"type"})
    optimizer = torch.optim.SGD([param], **options)
    sched_spec = spec.scheduler
    if sched_spec is None:
        return [spec.optimizer.lr] * len(val_losses)
    per_step = sched_spec.interval == "step"
    unit = STEPS if per_step else 1
    kwargs = sched_spec.model_dump(exclude=set(SCHEDULER_OWN_KEYS))
    if sched_spec.type == "OneCycleLR":
        kwargs["total_steps"] = EPOCHS * STEPS
    warm = sched_spec.warmup_epochs * unit
    plateau = sched_spec.type == "ReduceLROnPlateau"
    warmup = lr_scheduler.LinearLR(optimizer, sched_spec.warmup_start_factor, 1.0, warm) if warm else None
    main = getattr(lr_scheduler, sched_spec.type)(optimizer, **kwargs)
    scheduler: Any = main
    if warmup is not None and not plateau:
        scheduler = lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[warm])
    lrs, taken = [], 0
    for val_loss in val_losses:
        lrs.append(optimizer.param_groups[0]["lr"])
        for _ in range(STEPS if per_step else 1):
            optimizer.step()
            if plateau and taken < warm:
                warmup.step()  # type: ignore[union-attr]
            elif plateau:
                scheduler.step(val_loss)
            else:
                scheduler.step()
            taken += 1
    return lrs


@pytest.mark.parametrize("scheduler", CASES)
def test_recorded_lr_is_torchs_schedule_and_alpha_lr_never_moves(
    scheduler: dict[str, Any] | None, tmp_path: Path
) -> None:
    spec = forecast_spec(
        optimizer=SGD,
        scheduler=scheduler,
        early_stopping=None,
        search={"epochs": EPOCHS, "batches_per_epoch": STEPS},
    )
    records = run_search(spec, data=tiny_series(), checkpoint_dir=tmp_path).records
    assert len(records) == EPOCHS
    expected = reference_lrs(spec, [r["val_loss"] for r in records])
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-12, abs=0)
    assert [r["arch_lr"] for r in records] == [spec.arch_optimizer.lr] * EPOCHS
    if scheduler is not None and scheduler["type"] != "ConstantLR":
        assert len(set(r["lr"] for r in records)) > 1, "the schedule must actually move the weights' lr"
    # Every checkpoint, scheduler state included, loads with weights_only=True.
    for path in tmp_path.glob("*.pt"):
        torch.load(path, weights_only=True)


def test_no_scheduler_is_ever_attached_to_alpha() -> None:
    """Schedulers mark their optimizer's groups with `initial_lr`; alpha's Adam never has one."""
    spec = forecast_spec(optimizer=SGD, scheduler={"type": "ExponentialLR", "gamma": 0.5, "warmup_epochs": 1})
    search = Search(spec, tiny_series(), torch.device("cpu"))
    assert "initial_lr" in search.weight_optimizer.param_groups[0]
    assert all("initial_lr" not in g for g in search.arch_optimizer.param_groups)
    before = search.arch_optimizer.param_groups[0]["lr"]
    for _ in range(3):
        search.weight_optimizer.step()
        search.schedule.after_epoch(1.0)
        search.schedule.after_step()
    assert search.arch_optimizer.param_groups[0]["lr"] == before


def test_plateau_reduces_only_on_a_plateau_of_the_validation_loss() -> None:
    """Driven by the recorded losses: with patience 0 and a demanding threshold the lr halves after an
    epoch that did not improve enough, and stays after one that did."""
    spec = forecast_spec(
        optimizer=SGD,
        scheduler={"type": "ReduceLROnPlateau", "factor": 0.5, "patience": 0, "threshold": 0.05},
        early_stopping=None,
        search={"epochs": EPOCHS, "batches_per_epoch": STEPS},
    )
    records = run_search(spec, data=tiny_series()).records
    best = float("inf")
    for before, after in itertools.pairwise(records):
        improved = before["val_loss"] < best * (1 - 0.05)
        best = min(best, before["val_loss"]) if improved else best
        assert after["lr"] == pytest.approx(before["lr"] * (1.0 if improved else 0.5), rel=1e-12)
