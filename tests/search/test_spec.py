"""The job spec: per-task defaults, one clear error per invalid field, API.md's examples, torch fidelity.

Everything here is torch-free except `test_scheduler_keys_are_torch_arguments`.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from worker.search import spec as specmod
from worker.search.spec import LIMITS, OPTIMIZER_DEFAULTS, TASK_DEFAULTS, JobSpec

REPO = Path(__file__).resolve().parents[2]
DROP = object()  # an override value that removes the key
F, LM = "forecast", "language_model"
MINIMAL = {F: {"task": F, "dataset": {"builtin": "stocks"}}, LM: {"task": LM, "dataset": {"builtin": "ptb"}}}


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` into a copy of `base`; a dict with a "type" replaces, DROP removes."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is DROP:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and "type" not in value:
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def make(task: str = F, /, **overrides: Any) -> dict[str, Any]:
    """A valid tiny spec dict for `task` with `overrides` applied."""
    return merge(specmod.tiny_dict(task), overrides)  # type: ignore[arg-type]


def errors(data: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """(loc, msg) of every validation error; [] when `data` validates."""
    try:
        JobSpec.model_validate(data)
    except ValidationError as exc:
        return [(tuple(e["loc"]), e["msg"]) for e in exc.errors()]
    return []


def scheduler_models() -> dict[str, type]:
    """Scheduler type name -> its spec model, read from the SchedulerSpec union."""
    union = typing.get_args(specmod.SchedulerSpec)[0]
    return {typing.get_args(m.model_fields["type"].annotation)[0]: m for m in typing.get_args(union)}


# ---------------------------------------------------------------------------------------------- defaults


@pytest.mark.parametrize("task", [F, LM])
def test_task_and_dataset_alone_fill_documented_defaults(task: str) -> None:
    spec = JobSpec.model_validate(MINIMAL[task])
    for section in ("model", "search"):
        for key, value in TASK_DEFAULTS[task][section].items():
            assert getattr(getattr(spec, section), key) == value, (section, key)
    kind = TASK_DEFAULTS[task]["optimizer"]["type"]
    assert spec.optimizer.type == kind
    for key, value in OPTIMIZER_DEFAULTS[task][kind].items():
        assert getattr(spec.optimizer, key) == value, key
    assert spec.search.order == "first"
    assert spec.search.seed == 0
    assert spec.search.xi == "follow_lr"
    assert spec.scheduler is None
    assert spec.name is None
    assert (spec.arch_optimizer.lr, spec.arch_optimizer.weight_decay) == (3e-3, 1e-3)
    assert spec.arch_optimizer.betas == (0.5, 0.999)
    assert spec.early_stopping is not None
    assert (spec.early_stopping.patience, spec.early_stopping.min_delta) == (10, 0.0)
    assert (spec.checkpoint.every_epochs, spec.checkpoint.keep_last, spec.checkpoint.keep_best) == (1, 2, True)


def test_per_task_values() -> None:
    f, lm = JobSpec.model_validate(MINIMAL[F]), JobSpec.model_validate(MINIMAL[LM])
    assert (f.model.emsize, f.model.window, f.model.horizon, f.model.dropoute) == (32, 24, 1, None)
    assert (f.search.epochs, f.search.grad_clip, f.search.bptt) == (20, 1.0, None)
    assert (f.optimizer.type, f.optimizer.lr, f.optimizer.weight_decay) == ("Adam", 3e-3, 0.0)
    assert (lm.model.emsize, lm.model.nhid, lm.model.steps, lm.model.dropoute) == (128, 128, 8, 0.0)
    assert (lm.model.window, lm.model.horizon) == (None, None)
    assert (lm.search.epochs, lm.search.bptt, lm.search.grad_clip) == (10, 35, 0.25)
    assert lm.optimizer.type == "SGD"
    assert (lm.optimizer.lr, lm.optimizer.weight_decay, lm.optimizer.momentum) == (20.0, 5e-7, 0.0)


@pytest.mark.parametrize(("task", "kind"), [(t, k) for t in OPTIMIZER_DEFAULTS for k in OPTIMIZER_DEFAULTS[t]])
def test_optimizer_type_alone_takes_that_optimizers_task_defaults(task: str, kind: str) -> None:
    spec = JobSpec.model_validate({**MINIMAL[task], "optimizer": {"type": kind}})
    assert spec.optimizer.type == kind
    for key, value in OPTIMIZER_DEFAULTS[task][kind].items():
        assert getattr(spec.optimizer, key) == value, key
    if kind != "SGD":  # torch's own defaults differ between Adam and AdamW
        assert spec.optimizer.weight_decay == (0.0 if kind == "Adam" else 0.01)


def test_partial_sections_keep_the_other_defaults() -> None:
    spec = JobSpec.model_validate({**MINIMAL[F], "model": {"nhid": 64}, "search": {"order": "second"}})
    assert (spec.model.nhid, spec.model.emsize, spec.model.window) == (64, 32, 24)
    assert (spec.search.order, spec.search.epochs) == ("second", 20)


def test_spec_is_frozen() -> None:
    spec = JobSpec.model_validate(MINIMAL[F])
    with pytest.raises(ValidationError, match="frozen"):
        spec.task = "language_model"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        spec.model.emsize = 64  # type: ignore[misc]


ROUND_TRIP = {
    "forecast-defaults": MINIMAL[F],
    "lm-defaults": MINIMAL[LM],
    "forecast-tiny": make(F),
    "lm-tiny": make(LM),
    "scheduler-xi-float": make(
        F,
        name="run 1",
        search={"order": "second", "xi": 0.01},
        optimizer={"type": "AdamW", "lr": 1e-2, "betas": [0.8, 0.99]},
        scheduler={"type": "MultiStepLR", "milestones": [1, 2], "gamma": 0.5},
        early_stopping=None,
    ),
    "onecycle-sgd": make(
        LM,
        optimizer={"type": "SGD", "lr": 1.0, "momentum": 0.9},
        scheduler={"type": "OneCycleLR", "max_lr": 2.0, "interval": "step"},
    ),
}


@pytest.mark.parametrize("data", ROUND_TRIP.values(), ids=ROUND_TRIP.keys())
def test_round_trip(data: dict[str, Any]) -> None:
    spec = JobSpec.model_validate(data)
    assert JobSpec.model_validate(spec.model_dump()) == spec
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec
    assert JobSpec.model_validate(json.loads(json.dumps(spec.model_dump(mode="json")))) == spec


# ------------------------------------------------------------------------------------------ invalid input


def case(task: str, overrides: dict[str, Any], loc: tuple[Any, ...], msg: str, *, id: str, marks: Any = ()) -> Any:
    return pytest.param(task, overrides, loc, msg, id=id, marks=marks)


STEP, COS = {"type": "StepLR", "step_size": 1}, {"type": "CosineAnnealingLR", "T_max": 5}
SGD0 = {"type": "SGD", "lr": 0.1, "momentum": 0.0}
SGD9 = {"type": "SGD", "lr": 0.1, "momentum": 0.9}
EXTRA, GT0, GE0, LT1 = "Extra inputs are not permitted", "greater than 0", "greater than or equal to 0", "less than 1"

SIZE_FIELDS = [  # (task, section, field, message at 0)
    (F, "model", "emsize", GT0),
    (F, "model", "nhid", GT0),
    (F, "model", "steps", GT0),
    (F, "search", "epochs", GT0),
    (F, "search", "batch_size", "greater than"),  # the cell's batch norm may need 2 or more
    (LM, "search", "bptt", "greater than or equal to 2"),
    (F, "model", "window", "greater than or equal to 2"),
    (F, "model", "horizon", "greater than or equal to 1"),
]
SIZE_CASES = [
    case(task, {section: {key: 0}}, (section, key), at_zero, id=f"{key}-0")
    for task, section, key, at_zero in SIZE_FIELDS
] + [
    case(
        task,
        {section: {key: getattr(LIMITS, key) + 1}},
        (section, key),
        f"less than or equal to {getattr(LIMITS, key)}",
        id=f"{key}-over-cap",
    )
    for task, section, key, _ in SIZE_FIELDS
]

INVALID = [
    # structure and unknown keys
    case(F, {"bogus": 1}, ("bogus",), EXTRA, id="unknown-top-level"),
    case(F, {"model": {"bogus": 1}}, ("model", "bogus"), EXTRA, id="unknown-model-key"),
    case(F, {"search": {"bogus": 1}}, ("search", "bogus"), EXTRA, id="unknown-search-key"),
    case(F, {"optimizer": {"bogus": 1}}, ("optimizer", "Adam", "bogus"), EXTRA, id="unknown-optimizer-key"),
    case(F, {"scheduler": {**STEP, "bogus": 1}}, ("scheduler", "StepLR", "bogus"), EXTRA, id="unknown-sched-key"),
    case(F, {"dataset": {"bogus": 1}}, ("dataset", "bogus"), EXTRA, id="unknown-dataset-key"),
    case(F, {"arch_optimizer": {"momentum": 0.9}}, ("arch_optimizer", "momentum"), EXTRA, id="unknown-arch-key"),
    case(F, {"early_stopping": {"mode": "max"}}, ("early_stopping", "mode"), EXTRA, id="unknown-es-key"),
    case(F, {"checkpoint": {"every": 1}}, ("checkpoint", "every"), EXTRA, id="unknown-checkpoint-key"),
    # task and dataset
    case(F, {"task": DROP}, ("task",), "Field required", id="task-missing"),
    case(F, {"task": "classify"}, ("task",), "'forecast' or 'language_model'", id="task-unknown"),
    case(F, {"dataset": {"builtin": None}}, ("dataset",), "exactly one of 'builtin', 'id' or 'path'", id="ds-none"),
    case(F, {"dataset": {"id": "abc"}}, ("dataset",), "exactly one of 'builtin', 'id' or 'path'", id="ds-two"),
    case(F, {"dataset": {"builtin": "nope"}}, ("dataset",), "unknown built-in dataset 'nope'", id="ds-unknown"),
    case(F, {"dataset": {"builtin": "ptb"}}, ("dataset", "builtin"), "for language_model jobs, not fore", id="ds-F"),
    case(LM, {"dataset": {"builtin": "stocks"}}, ("dataset", "builtin"), "for forecast jobs, not lang", id="ds-LM"),
    case(
        F,
        {"dataset": {"builtin": "stocks"}, "model": {"window": 47, "horizon": 1}},
        ("model", "window"),
        "window + horizon (48) leaves fewer than two training windows in the 47 training rows",
        id="window-horizon-too-large",
    ),
    case(
        F,
        {"dataset": {"builtin": "stocks"}, "model": {"horizon": 11}},
        ("model", "horizon"),
        "horizon (11) leaves fewer than two validation windows",
        id="horizon-over-valid",
    ),
    case(
        F,
        {"dataset": {"builtin": "stocks"}, "model": {"window": 46, "horizon": 1}},
        ("model", "window"),
        "training rows of 'stocks'",
        id="one-training-window",
    ),
    case(
        F,
        {"dataset": {"builtin": "stocks"}, "model": {"horizon": 10}},
        ("model", "horizon"),
        "validation rows of 'stocks'",
        id="one-validation-window",
    ),
    # task-specific model / search fields
    case(LM, {"model": {"emsize": 16}}, ("model", "emsize"), "emsize (16) must equal nhid (8)", id="lm-emsize-nhid"),
    case(LM, {"model": {"window": 6}}, ("model", "window"), "window applies to forecast jobs only", id="lm-window"),
    case(LM, {"model": {"horizon": 1}}, ("model", "horizon"), "horizon applies to forecast jobs only", id="lm-horizon"),
    case(F, {"model": {"window": None}}, ("model", "window"), "window is required for forecast", id="F-no-window"),
    case(F, {"model": {"dropoute": 0.1}}, ("model", "dropoute"), "applies to language_model jobs", id="F-dropoute"),
    case(F, {"search": {"bptt": 5}}, ("search", "bptt"), "bptt applies to language_model jobs only", id="F-bptt"),
    case(LM, {"search": {"bptt": None}}, ("search", "bptt"), "bptt is required for language_model", id="lm-no-bptt"),
    *SIZE_CASES,
    case(F, {"model": {"dropout": 1.0}}, ("model", "dropout"), LT1, id="dropout-1"),
    case(F, {"model": {"dropouth": -0.1}}, ("model", "dropouth"), GE0, id="dropouth-negative"),
    case(F, {"search": {"grad_clip": 0}}, ("search", "grad_clip"), GT0, id="grad-clip-0"),
    case(F, {"search": {"seed": -1}}, ("search", "seed"), GE0, id="seed-negative"),
    case(F, {"search": {"xi": -1.0}}, ("search", "xi"), "xi must be", id="xi-negative"),
    case(F, {"search": {"xi": "lr"}}, ("search", "xi"), "follow_lr", id="xi-wrong-string"),
    case(F, {"search": {"order": "third"}}, ("search", "order"), "'first' or 'second'", id="order-third"),
    # optimizer
    case(F, {"optimizer": {"type": "RMSprop"}}, ("optimizer",), "expected tags: 'SGD', 'Adam', 'AdamW'", id="opt-type"),
    case(F, {"optimizer": {"lr": 0}}, ("optimizer", "Adam", "lr"), GT0, id="adam-lr-0"),
    case(LM, {"optimizer": {"lr": 0}}, ("optimizer", "SGD", "lr"), GT0, id="sgd-lr-0"),
    case(F, {"optimizer": {**SGD0, "nesterov": True}}, ("optimizer", "SGD"), "nesterov needs momentum > 0", id="nest"),
    case(F, {"optimizer": {"betas": [0.9, 1.0]}}, ("optimizer", "Adam", "betas", 1), LT1, id="adam-beta2-1"),
    case(F, {"optimizer": {"betas": [-0.1, 0.9]}}, ("optimizer", "Adam", "betas", 0), GE0, id="adam-beta1-neg"),
    case(LM, {"optimizer": {"betas": [0.9, 0.999]}}, ("optimizer", "SGD", "betas"), EXTRA, id="sgd-betas"),
    case(F, {"arch_optimizer": {"lr": 0}}, ("arch_optimizer", "lr"), GT0, id="arch-lr-0"),
    # scheduler: fields
    case(F, {"scheduler": {"type": "CosineLR"}}, ("scheduler",), "expected tags: 'StepLR'", id="sched-type"),
    case(F, {"scheduler": {**COS, "T_max": 0}}, ("scheduler", "CosineAnnealingLR", "T_max"), GT0, id="T_max-0"),
    case(
        F,
        {"scheduler": {"type": "CosineAnnealingWarmRestarts", "T_0": 0}},
        ("scheduler", "CosineAnnealingWarmRestarts", "T_0"),
        GT0,
        id="T_0-0",
    ),
    case(F, {"scheduler": {**STEP, "step_size": 0}}, ("scheduler", "StepLR", "step_size"), GT0, id="step_size-0"),
    *[
        case(F, {"scheduler": {**extra, "type": kind, "gamma": gamma}}, ("scheduler", kind, "gamma"), msg, id=id_)
        for kind, extra in (
            ("StepLR", {"step_size": 1}),
            ("ExponentialLR", {}),
            ("MultiStepLR", {"milestones": [1]}),
        )
        for gamma, msg, id_ in ((0, GT0, f"{kind}-gamma-0"), (1.5, "less than or equal to 1", f"{kind}-gamma-1.5"))
    ],
    case(
        F,
        {"scheduler": {"type": "OneCycleLR", "max_lr": 0.1, "interval": "step", "total_steps": 100}},
        ("scheduler", "OneCycleLR", "total_steps"),
        EXTRA,
        id="onecycle-total-steps",
    ),
    # scheduler: checks against the rest of the spec
    case(
        F,
        {"scheduler": {"type": "MultiStepLR", "milestones": [2, 1]}},
        ("scheduler", "milestones"),
        "positive and strictly increasing, got [2, 1]",
        id="milestones-decreasing",
    ),
    case(
        F,
        {"scheduler": {"type": "MultiStepLR", "milestones": [1, 1]}},
        ("scheduler", "milestones"),
        "strictly increasing",
        id="milestones-repeated",
    ),
    case(
        F,
        {"scheduler": {"type": "MultiStepLR", "milestones": [3]}},
        ("scheduler", "milestones"),
        "within the schedule's 3 epochs",
        id="milestones-beyond-epochs",
    ),
    case(
        F,
        {"scheduler": {"type": "MultiStepLR", "milestones": [2], "warmup_epochs": 1}},
        ("scheduler", "milestones"),
        "within the schedule's 2 epochs (search.epochs minus warmup_epochs)",
        id="milestones-beyond-warmup",
    ),
    *[
        case(
            F,
            {"scheduler": {"type": kind, key: 5, "eta_min": 1e-2}},
            ("scheduler", "eta_min"),
            "eta_min (0.01) must be below the optimizer's lr (0.01)",
            id=f"{kind}-eta_min",
        )
        for kind, key in (("CosineAnnealingLR", "T_max"), ("CosineAnnealingWarmRestarts", "T_0"))
    ],
    case(
        F,
        {"scheduler": {"type": "ReduceLROnPlateau", "min_lr": 0.02}},
        ("scheduler", "min_lr"),
        "min_lr (0.02) must be below the optimizer's lr (0.01)",
        id="plateau-min_lr",
    ),
    case(
        F,
        {"scheduler": {"type": "ReduceLROnPlateau", "interval": "step"}},
        ("scheduler", "interval"),
        "use interval 'epoch'",
        id="plateau-step",
    ),
    case(
        F,
        {"scheduler": {"type": "OneCycleLR", "max_lr": 0.1}},
        ("scheduler", "interval"),
        "OneCycleLR is a per-step schedule over the whole run: use interval 'step'",
        id="onecycle-epoch",
    ),
    case(
        F,
        {"scheduler": {"type": "OneCycleLR", "max_lr": 0.1, "interval": "step", "warmup_epochs": 1}},
        ("scheduler", "warmup_epochs"),
        "warmup_epochs must be 0",
        id="onecycle-warmup",
    ),
    case(
        F,
        {"scheduler": {"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.01}},
        ("scheduler", "base_lr"),
        "base_lr (0.01) must be below max_lr (0.01)",
        id="cyclic-base-max",
    ),
    case(
        F,
        {"scheduler": {"type": "CyclicLR", "base_lr": 0.001, "max_lr": 0.01, "warmup_epochs": 1}},
        ("scheduler", "warmup_epochs"),
        "warmup_epochs must be 0",
        id="cyclic-warmup",
    ),
    case(
        F,
        {"optimizer": SGD0, "scheduler": {"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1}},
        ("scheduler", "cycle_momentum"),
        "CyclicLR with cycle_momentum needs an optimizer with momentum",
        id="cyclic-no-momentum",
    ),
    case(
        LM,  # the language model's default SGD has no momentum
        {"scheduler": {"type": "OneCycleLR", "max_lr": 2.0, "interval": "step"}},
        ("scheduler", "cycle_momentum"),
        "OneCycleLR with cycle_momentum needs an optimizer with momentum",
        id="onecycle-no-momentum",
    ),
    case(
        F,
        {"optimizer": SGD9, "scheduler": {"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1, "base_momentum": 0.9}},
        ("scheduler", "base_momentum"),
        "base_momentum (0.9) must be below max_momentum (0.9)",
        id="cyclic-momenta",
    ),
    case(
        F,
        {"scheduler": {**STEP, "warmup_epochs": 3}},
        ("scheduler", "warmup_epochs"),
        "warmup_epochs (3) must be below search.epochs (3)",
        id="warmup-ge-epochs",
    ),
    # early stopping, checkpoints, name
    case(F, {"early_stopping": {"patience": -1}}, ("early_stopping", "patience"), GE0, id="patience-negative"),
    case(F, {"early_stopping": {"min_delta": -0.1}}, ("early_stopping", "min_delta"), GE0, id="min-delta-negative"),
    case(F, {"checkpoint": {"every_epochs": 0}}, ("checkpoint", "every_epochs"), GT0, id="every-epochs-0"),
    case(F, {"checkpoint": {"keep_last": 0}}, ("checkpoint", "keep_last"), GT0, id="keep-last-0"),
    case(F, {"name": "x" * (LIMITS.name_length + 1)}, ("name",), "at most 200 characters", id="name-too-long"),
    case(F, {"name": "a\nb"}, ("name",), "printable text", id="name-control-character"),
    case(F, {"dataset": {"id": "a\x00b"}}, ("dataset", "id"), "printable text", id="dataset-id-nul"),
    case(F, {"early_stopping": {"min_delta": float("inf")}}, ("early_stopping", "min_delta"), "finite", id="inf"),
    case(F, {"search": {"grad_clip": float("nan")}}, ("search", "grad_clip"), "finite", id="nan"),
]


@pytest.mark.parametrize(("task", "overrides", "loc", "msg"), INVALID)
def test_invalid_field_gets_one_clear_error(
    task: str, overrides: dict[str, Any], loc: tuple[Any, ...], msg: str
) -> None:
    assert not errors(make(task)), "the base spec must be valid"
    found = errors(make(task, **overrides))
    assert any(e_loc == loc and msg in e_msg for e_loc, e_msg in found), found
    assert len(found) == 1, found


@pytest.mark.parametrize(("window", "horizon"), [(45, 1), (6, 9)])
def test_largest_series_windows_that_fit_validate(window: int, horizon: int) -> None:
    # stocks: 68 rows, 47 for training and 10 for validation; each part keeps two windows here
    assert not errors(make(F, dataset={"builtin": "stocks"}, model={"window": window, "horizon": horizon}))


@pytest.mark.parametrize("task", [None, "classify"])
def test_bad_task_is_not_buried_under_missing_sections(task: str | None) -> None:
    data = {"dataset": {"builtin": "stocks"}} | ({"task": task} if task else {})
    found = errors(data)
    assert [loc for loc, _ in found] == [("task",)], found


def test_missing_dataset_is_reported() -> None:
    assert errors({"task": F}) == [(("dataset",), "Field required")]


def test_unknown_scheduler_type_lists_every_valid_name() -> None:
    [(loc, msg)] = errors(make(F, scheduler={"type": "CosineLR"}))
    assert loc == ("scheduler",)
    for name in specmod.SCHEDULER_TYPES:
        assert f"'{name}'" in msg


def test_unknown_builtin_lists_the_builtins() -> None:
    [(_, msg)] = errors(make(F, dataset={"builtin": "nope"}))
    for name in specmod.BUILTIN_DATASETS:
        assert name in msg


# -------------------------------------------------------------------------------------- valid schedulers

API_SCHEDULERS = {  # API.md's list, plus what each example needs from the rest of the spec
    "cosine": ({"type": "CosineAnnealingLR", "T_max": 50, "eta_min": 0.0001}, {}),
    "exponential": ({"type": "ExponentialLR", "gamma": 0.95}, {}),
    "step": ({"type": "StepLR", "step_size": 10, "gamma": 0.5}, {}),
    "multistep": ({"type": "MultiStepLR", "milestones": [20, 40], "gamma": 0.1}, {"search": {"epochs": 50}}),
    "plateau": (
        {
            "type": "ReduceLROnPlateau",
            "mode": "min",
            "factor": 0.5,
            "patience": 3,
            "threshold": 0.0001,
            "cooldown": 0,
            "min_lr": 0,
        },
        {},
    ),
    "warm-restarts": ({"type": "CosineAnnealingWarmRestarts", "T_0": 10, "T_mult": 2, "eta_min": 0}, {}),
    "onecycle": (
        {"type": "OneCycleLR", "max_lr": 0.05, "interval": "step"},
        {"optimizer": {"type": "SGD", "lr": 0.005, "momentum": 0.9}},
    ),
    "constant": ({"type": "ConstantLR", "factor": 0.5, "total_iters": 4}, {}),
    "linear": ({"type": "LinearLR", "start_factor": 0.25, "end_factor": 1.0, "total_iters": 5}, {}),
    "cyclic": (  # cycles Adam's beta1 (the language model's default SGD has no momentum to cycle)
        {"type": "CyclicLR", "base_lr": 1e-4, "max_lr": 1e-3, "interval": "step"},
        {"optimizer": {"type": "Adam"}},
    ),
    "polynomial": ({"type": "PolynomialLR", "total_iters": 10, "power": 2.0}, {}),
    "step-interval-warmup": ({"type": "CosineAnnealingLR", "T_max": 500, "interval": "step", "warmup_epochs": 2}, {}),
    "warmup": ({"type": "StepLR", "step_size": 5, "warmup_epochs": 3, "warmup_start_factor": 0.01}, {}),
}


@pytest.mark.parametrize("task", [F, LM])
@pytest.mark.parametrize(("scheduler", "extra"), API_SCHEDULERS.values(), ids=API_SCHEDULERS.keys())
def test_api_scheduler_examples_validate(task: str, scheduler: dict[str, Any], extra: dict[str, Any]) -> None:
    data = merge(MINIMAL[task], {**extra, "scheduler": scheduler})
    assert not errors(data), errors(data)
    dumped = JobSpec.model_validate(data).model_dump()["scheduler"]
    assert {k: dumped[k] for k in scheduler} == scheduler


@pytest.mark.parametrize("task", [F, LM])
def test_null_scheduler_is_a_constant_rate(task: str) -> None:
    assert JobSpec.model_validate({**MINIMAL[task], "scheduler": None}).scheduler is None


def test_scheduler_own_keys_default() -> None:
    sched = JobSpec.model_validate(make(F, scheduler=STEP)).scheduler
    assert sched is not None
    assert (sched.interval, sched.warmup_epochs, sched.warmup_start_factor) == ("epoch", 0, 0.1)


# ------------------------------------------------------------------------------------ scheduler fidelity


def test_scheduler_types_match_the_union() -> None:
    assert set(scheduler_models()) == set(specmod.SCHEDULER_TYPES)
    for model in scheduler_models().values():
        assert set(model.model_fields) >= specmod.SCHEDULER_OWN_KEYS


@pytest.mark.parametrize("name", specmod.SCHEDULER_TYPES)
def test_scheduler_keys_are_torch_arguments(name: str) -> None:
    import inspect

    torch = pytest.importorskip("torch")
    cls = getattr(torch.optim.lr_scheduler, name)
    params = set(inspect.signature(cls.__init__).parameters)
    keys = set(scheduler_models()[name].model_fields) - specmod.SCHEDULER_OWN_KEYS
    assert keys <= params, keys - params


# ------------------------------------------------------------------------------------------- torch-free


def test_spec_module_does_not_import_torch() -> None:
    code = "import sys, worker.search.spec; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ------------------------------------------------------------------------------------------------- tiny


@pytest.mark.parametrize("task", [F, LM])
def test_tiny_validates(task: str) -> None:
    spec = JobSpec.tiny(task)  # type: ignore[arg-type]
    assert spec.task == task
    assert spec == JobSpec.model_validate(specmod.tiny_dict(task))  # type: ignore[arg-type]
    assert spec.search.epochs <= 3 and spec.model.nhid <= 8


@pytest.mark.parametrize("task", [F, LM])
def test_tiny_overrides_deep_merge(task: str) -> None:
    base, spec = JobSpec.tiny(task), JobSpec.tiny(task, search={"epochs": 5})  # type: ignore[arg-type]
    assert spec.search.epochs == 5
    assert spec.search.model_dump(exclude={"epochs"}) == base.search.model_dump(exclude={"epochs"})
    assert spec.model == base.model and spec.optimizer == base.optimizer
