"""The job spec: one strict, frozen pydantic model shared by the API (validation) and the worker (search).

Torch-free on purpose: the API process imports this module and must never import torch.

Defaults are per task: a key left out of `model`, `search` or `optimizer` takes the value in
`TASK_DEFAULTS` / `OPTIMIZER_DEFAULTS` for the job's task, so `{"task": ..., "dataset": ...}` alone is a
sensible, quick search. Caps that keep one job from exhausting a worker live in `LIMITS`.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

PRIMITIVES: tuple[str, ...] = ("none", "tanh", "relu", "sigmoid", "identity")
Task = Literal["forecast", "language_model"]


@dataclass(frozen=True)
class Limits:
    """Upper bounds on one job's size; each keeps a single job from exhausting a worker."""

    epochs: int = 1000
    batch_size: int = 1024
    bptt: int = 400
    emsize: int = 1024
    nhid: int = 1024
    steps: int = 12
    window: int = 2000
    horizon: int = 256
    batches_per_epoch: int = 1_000_000
    eval_batches: int = 1_000_000
    warmup_epochs: int = 1000
    milestones: int = 100
    keep_last: int = 100
    name_length: int = 200


LIMITS = Limits()


@dataclass(frozen=True)
class BuiltinDataset:
    """A data set the service ships; `length`/`features` are known for series so specs can be checked."""

    name: str
    task: str
    description: str
    length: int | None = None
    features: int | None = None


# Series come from CSV files that the `vega_datasets` package ships for offline use; corpora are
# word-level text folders (train.txt, valid.txt, test.txt) found under the worker's data directory.
BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    d.name: d
    for d in (
        BuiltinDataset("ptb", "language_model", "Penn Treebank, word level (Mikolov et al.)"),
        BuiltinDataset("wikitext-2", "language_model", "WikiText-2, word level (Merity et al.)"),
        BuiltinDataset("seattle-temps", "forecast", "Seattle hourly temperature, 2010", length=8759, features=1),
        BuiltinDataset(
            "seattle-weather",
            "forecast",
            "Seattle daily weather 2012-2015: precipitation, temp_max, temp_min, wind",
            length=1461,
            features=4,
        ),
        BuiltinDataset(
            "stocks",
            "forecast",
            "Monthly closing prices of AAPL, AMZN, GOOG, IBM, MSFT where all five trade",
            length=68,
            features=5,
        ),
    )
}

# Chronological split of a series: the first TRAIN_FRACTION for the weights, the next
# VALID_FRACTION for alpha and validation; the rest is held out and never seen by the search.
TRAIN_FRACTION = 0.7
VALID_FRACTION = 0.15


def series_split_lengths(length: int) -> tuple[int, int]:
    """Rows of a series that go to the training and validation parts."""
    n_train = int(length * TRAIN_FRACTION)
    n_valid = int(length * VALID_FRACTION)
    return n_train, n_valid


TASK_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    # The paper's search cell (8 nodes) and its dropouts, at a size a CPU worker finishes quickly.
    "language_model": {
        "model": {
            "emsize": 128,
            "nhid": 128,
            "steps": 8,
            "dropout": 0.75,
            "dropouth": 0.25,
            "dropoutx": 0.75,
            "dropouti": 0.2,
            "dropoute": 0.0,
        },
        "search": {"epochs": 10, "batch_size": 64, "bptt": 35, "grad_clip": 0.25},
        "optimizer": {"type": "SGD"},
    },
    "forecast": {
        "model": {
            "emsize": 32,
            "nhid": 32,
            "steps": 8,
            "dropout": 0.1,
            "dropouth": 0.1,
            "dropoutx": 0.1,
            "dropouti": 0.0,
            "window": 24,
            "horizon": 1,
        },
        "search": {"epochs": 20, "batch_size": 64, "grad_clip": 1.0},
        "optimizer": {"type": "Adam"},
    },
}

OPTIMIZER_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    # SGD at lr 20 with weight decay 5e-7 is the paper's setting for the language model search.
    "language_model": {
        "SGD": {"lr": 20.0, "weight_decay": 5e-7},
        "Adam": {"lr": 2e-3},
        "AdamW": {"lr": 2e-3},
    },
    "forecast": {
        "SGD": {"lr": 0.05, "momentum": 0.9},
        "Adam": {"lr": 3e-3},
        "AdamW": {"lr": 3e-3},
    },
}


class Strict(BaseModel):
    # NaN and Infinity parse as JSON numbers in Python but are never a sensible setting (nor storable as JSON).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def printable(value: str | None) -> str | None:
    """The rule for free text a user names things with (also used by the service for headers and form fields)."""
    if value is not None and not value.isprintable():
        raise ValueError("must be printable text: no NUL, newline or other control characters")
    return value


PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
Gamma = Annotated[float, Field(gt=0.0, le=1.0)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class DatasetRef(Strict):
    """Exactly one of: a built-in data set, an uploaded one (service), or a local path (CLI only)."""

    builtin: str | None = None
    id: str | None = Field(default=None, min_length=1, max_length=100)
    path: str | None = Field(default=None, min_length=1, max_length=4096)

    _printable_id = field_validator("id")(printable)

    @model_validator(mode="after")
    def _exactly_one(self) -> DatasetRef:
        given = [k for k in ("builtin", "id", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("dataset needs exactly one of 'builtin', 'id' or 'path'")
        if self.builtin is not None and self.builtin not in BUILTIN_DATASETS:
            names = ", ".join(sorted(BUILTIN_DATASETS))
            raise ValueError(f"unknown built-in dataset {self.builtin!r}; choose one of: {names}")
        return self


class ModelSpec(Strict):
    """The search cell and its wrapper. `window`/`horizon` are forecast-only, `dropoute` LM-only."""

    emsize: int = Field(gt=0, le=LIMITS.emsize, description="embedding / input projection size")
    nhid: int = Field(gt=0, le=LIMITS.nhid, description="hidden state size of the cell")
    steps: int = Field(gt=0, le=LIMITS.steps, description="intermediate nodes of the cell (8 in the paper)")
    dropout: Fraction = Field(description="locked dropout on the cell's output")
    dropouth: Fraction = Field(description="variational dropout on the hidden state inside the cell")
    dropoutx: Fraction = Field(description="variational dropout on the cell's input")
    dropouti: Fraction = Field(description="locked dropout on the embedding / input projection")
    dropoute: Fraction | None = Field(default=None, description="word dropout on the embedding (LM)")
    window: int | None = Field(default=None, ge=2, le=LIMITS.window, description="input steps (forecast)")
    horizon: int | None = Field(default=None, ge=1, le=LIMITS.horizon, description="steps ahead (forecast)")


class SearchSpec(Strict):
    """The bilevel search: epochs, batching, DARTS order and the virtual step's xi."""

    epochs: int = Field(gt=0, le=LIMITS.epochs)
    batch_size: int = Field(ge=2, le=LIMITS.batch_size, description="the cell's batch norm needs 2 or more")
    bptt: int | None = Field(default=None, ge=2, le=LIMITS.bptt, description="sequence length (LM)")
    order: Literal["first", "second"] = "first"
    grad_clip: float = Field(gt=0.0, le=1e4, description="max norm of the weights' gradient")
    seed: int = Field(default=0, ge=0, lt=2**31)
    xi: Literal["follow_lr"] | float = Field(
        default="follow_lr",
        description="step size of the second-order virtual step; 'follow_lr' uses the weights' current lr",
    )
    batches_per_epoch: int | None = Field(
        default=None, gt=0, le=LIMITS.batches_per_epoch, description="cap on training batches per epoch"
    )
    eval_batches: int | None = Field(
        default=None, gt=0, le=LIMITS.eval_batches, description="cap on validation batches per evaluation"
    )

    @field_validator("xi", mode="before")
    @classmethod
    def _xi(cls, value: Any) -> Any:
        ok = value == "follow_lr" or (
            isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1e3
        )
        if not ok:
            raise ValueError("xi must be 'follow_lr' or a number from 0 to 1000")
        return value


class SGDSpec(Strict):
    type: Literal["SGD"]
    lr: float = Field(gt=0.0, le=1e3)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    dampening: float = Field(default=0.0, ge=0.0, le=1.0)
    nesterov: bool = False

    @model_validator(mode="after")
    def _nesterov(self) -> SGDSpec:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening 0")
        return self


class AdamSpec(Strict):
    type: Literal["Adam", "AdamW"]
    lr: float = Field(gt=0.0, le=1e3)
    weight_decay: float = Field(ge=0.0, le=1.0, description="default: 0 for Adam, 0.01 for AdamW")
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0.0, le=1.0)
    amsgrad: bool = False

    @model_validator(mode="before")
    @classmethod
    def _default_decay(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("weight_decay") is None:  # torch's defaults differ by class
            data = {**data, "weight_decay": 0.01 if data.get("type") == "AdamW" else 0.0}
        return data


OptimizerSpec = Annotated[SGDSpec | AdamSpec, Field(discriminator="type")]


class ArchOptimizerSpec(Strict):
    """Adam on alpha at a fixed rate: no scheduler ever changes it."""

    lr: float = Field(default=3e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(default=1e-3, ge=0.0, le=1.0)
    betas: tuple[Beta, Beta] = (0.5, 0.999)


class _Sched(Strict):
    interval: Literal["epoch", "step"] = Field(
        default="epoch", description="step the schedule once per epoch or once per weight update"
    )
    warmup_epochs: int = Field(default=0, ge=0, le=LIMITS.warmup_epochs)
    warmup_start_factor: float = Field(default=0.1, gt=0.0, le=1.0)


class StepLRSpec(_Sched):
    type: Literal["StepLR"]
    step_size: int = Field(gt=0)
    gamma: Gamma = 0.1


class MultiStepLRSpec(_Sched):
    type: Literal["MultiStepLR"]
    milestones: list[int] = Field(min_length=1, max_length=LIMITS.milestones)
    gamma: Gamma = 0.1


class ConstantLRSpec(_Sched):
    type: Literal["ConstantLR"]
    factor: float = Field(default=1.0 / 3, gt=0.0, le=1.0)
    total_iters: int = Field(default=5, ge=0)


class LinearLRSpec(_Sched):
    type: Literal["LinearLR"]
    start_factor: float = Field(default=1.0 / 3, gt=0.0, le=1.0)
    end_factor: float = Field(default=1.0, ge=0.0, le=1.0)
    total_iters: int = Field(default=5, ge=0)


class ExponentialLRSpec(_Sched):
    type: Literal["ExponentialLR"]
    gamma: Gamma


class PolynomialLRSpec(_Sched):
    type: Literal["PolynomialLR"]
    total_iters: int = Field(default=5, ge=0)
    power: float = Field(default=1.0, ge=0.0, le=100.0)


class CosineAnnealingLRSpec(_Sched):
    type: Literal["CosineAnnealingLR"]
    T_max: int = Field(gt=0)
    eta_min: float = Field(default=0.0, ge=0.0)


class CosineAnnealingWarmRestartsSpec(_Sched):
    type: Literal["CosineAnnealingWarmRestarts"]
    T_0: int = Field(gt=0)
    T_mult: int = Field(default=1, ge=1)
    eta_min: float = Field(default=0.0, ge=0.0)


class CyclicLRSpec(_Sched):
    type: Literal["CyclicLR"]
    base_lr: float = Field(gt=0.0)
    max_lr: float = Field(gt=0.0)
    step_size_up: int = Field(default=2000, gt=0)
    step_size_down: int | None = Field(default=None, gt=0)
    mode: Literal["triangular", "triangular2", "exp_range"] = "triangular"
    gamma: Gamma = 1.0
    cycle_momentum: bool = True
    base_momentum: Beta = 0.8
    max_momentum: Beta = 0.9


class OneCycleLRSpec(_Sched):
    """OneCycleLR's length is the whole run's weight steps: `total_steps` is filled in by the engine."""

    type: Literal["OneCycleLR"]
    max_lr: float = Field(gt=0.0)
    pct_start: float = Field(default=0.3, gt=0.0, lt=1.0)
    anneal_strategy: Literal["cos", "linear"] = "cos"
    cycle_momentum: bool = True
    base_momentum: Beta = 0.85
    max_momentum: Beta = 0.95
    div_factor: float = Field(default=25.0, gt=0.0)
    final_div_factor: float = Field(default=1e4, gt=0.0)
    three_phase: bool = False


class ReduceLROnPlateauSpec(_Sched):
    type: Literal["ReduceLROnPlateau"]
    mode: Literal["min", "max"] = "min"
    factor: float = Field(default=0.1, gt=0.0, lt=1.0)
    patience: int = Field(default=10, ge=0)
    threshold: float = Field(default=1e-4, ge=0.0)
    threshold_mode: Literal["rel", "abs"] = "rel"
    cooldown: int = Field(default=0, ge=0)
    min_lr: float = Field(default=0.0, ge=0.0)
    eps: float = Field(default=1e-8, ge=0.0)


SchedulerSpec = Annotated[
    StepLRSpec
    | MultiStepLRSpec
    | ConstantLRSpec
    | LinearLRSpec
    | ExponentialLRSpec
    | PolynomialLRSpec
    | CosineAnnealingLRSpec
    | CosineAnnealingWarmRestartsSpec
    | CyclicLRSpec
    | OneCycleLRSpec
    | ReduceLROnPlateauSpec,
    Field(discriminator="type"),
]
SCHEDULER_TYPES: tuple[str, ...] = (
    "StepLR",
    "MultiStepLR",
    "ConstantLR",
    "LinearLR",
    "ExponentialLR",
    "PolynomialLR",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "CyclicLR",
    "OneCycleLR",
    "ReduceLROnPlateau",
)
# Keys of a scheduler spec that are ours, not arguments of the torch class.
SCHEDULER_OWN_KEYS = frozenset({"type", "interval", "warmup_epochs", "warmup_start_factor"})


class EarlyStoppingSpec(Strict):
    """Stop once the validation loss has not improved by more than `min_delta` for `patience` epochs."""

    patience: int = Field(default=10, ge=0, le=LIMITS.epochs)
    min_delta: float = Field(default=0.0, ge=0.0)


class CheckpointSpec(Strict):
    """Write a checkpoint every `every_epochs` (and at the end); keep the newest `keep_last` plus the best."""

    every_epochs: int = Field(default=1, gt=0, le=LIMITS.epochs)
    keep_last: int = Field(default=2, gt=0, le=LIMITS.keep_last)
    keep_best: bool = True


class JobSpec(Strict):
    """A DARTS recurrent-cell search: what to search on, how big, and how to optimise it."""

    name: str | None = Field(default=None, max_length=LIMITS.name_length)
    task: Task
    dataset: DatasetRef
    model: ModelSpec
    search: SearchSpec
    optimizer: OptimizerSpec
    scheduler: SchedulerSpec | None = None
    arch_optimizer: ArchOptimizerSpec = ArchOptimizerSpec()
    early_stopping: EarlyStoppingSpec | None = EarlyStoppingSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()

    _printable_name = field_validator("name")(printable)

    @model_validator(mode="before")
    @classmethod
    def _fill_task_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        task = data.get("task")
        if task not in TASK_DEFAULTS:
            # Field validation reports the missing or unknown task; fill the sections from one
            # task's defaults so that error is not buried under "Field required" for each of them.
            task = "forecast"
        for section in ("model", "search"):
            given = data.get(section, {})
            if isinstance(given, dict):
                data[section] = {**TASK_DEFAULTS[task][section], **given}
        given = data.get("optimizer", {})
        if isinstance(given, dict):
            kind = given.get("type", TASK_DEFAULTS[task]["optimizer"]["type"])
            data["optimizer"] = {**OPTIMIZER_DEFAULTS[task].get(kind, {}), "type": kind, **given}
        return data

    @model_validator(mode="after")
    def _check_together(self) -> JobSpec:
        errors = list(_cross_field_errors(self))
        if errors:
            details = [
                InitErrorDetails(type=PydanticCustomError("value_error", msg), loc=loc, input=value)
                for loc, msg, value in errors
            ]
            raise ValidationError.from_exception_data(type(self).__name__, details)
        return self

    @classmethod
    def tiny(cls, task: Task = "forecast", **overrides: Any) -> JobSpec:
        """A spec that searches in about a second on a CPU: for tests and dry runs."""
        return cls.model_validate(_merge(tiny_dict(task), overrides))


def tiny_dict(task: Task = "forecast") -> dict[str, Any]:
    """The plain-dict form of `JobSpec.tiny`, for tests that tweak it before validation."""
    model: dict[str, Any] = {"emsize": 8, "nhid": 8, "steps": 3, "dropout": 0.0, "dropouth": 0.0}
    model |= {"dropoutx": 0.0, "dropouti": 0.0}
    search: dict[str, Any] = {"epochs": 3, "batch_size": 4, "batches_per_epoch": 4, "eval_batches": 2}
    if task == "language_model":
        return {
            "task": task,
            "dataset": {"builtin": "ptb"},
            "model": model | {"dropoute": 0.0},
            "search": search | {"bptt": 5},
            "optimizer": {"type": "SGD", "lr": 1.0},
        }
    return {
        "task": task,
        "dataset": {"builtin": "seattle-weather"},
        "model": model | {"window": 6, "horizon": 1},
        "search": search,
        "optimizer": {"type": "Adam", "lr": 1e-2},
    }


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Override sections key by key; a new `dataset`, or a section with a new `type`, replaces the old one."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        keep = isinstance(value, dict) and isinstance(out.get(key), dict) and "type" not in value
        out[key] = {**out[key], **value} if keep and key != "dataset" else value
    return out


def _cross_field_errors(spec: JobSpec) -> Any:
    """Checks that need more than one field; yields (loc, message, input)."""
    lm = spec.task == "language_model"
    m, s = spec.model, spec.search
    for key, value in (("window", m.window), ("horizon", m.horizon)):
        if lm and value is not None:
            yield ("model", key), f"{key} applies to forecast jobs only", value
        if not lm and value is None:
            yield ("model", key), f"{key} is required for forecast jobs", value
    if not lm and m.dropoute is not None:
        yield ("model", "dropoute"), "dropoute (embedding word dropout) applies to language_model jobs only", m.dropoute
    if lm and m.emsize != m.nhid:
        msg = f"language_model ties the decoder to the embedding, so emsize ({m.emsize}) must equal nhid ({m.nhid})"
        yield ("model", "emsize"), msg, m.emsize
    if not lm and s.bptt is not None:
        yield ("search", "bptt"), "bptt applies to language_model jobs only; forecast reads model.window steps", s.bptt
    if lm and s.bptt is None:
        yield ("search", "bptt"), "bptt is required for language_model jobs", s.bptt

    builtin = BUILTIN_DATASETS.get(spec.dataset.builtin or "")
    if builtin is not None:
        if builtin.task != spec.task:
            msg = f"built-in dataset {builtin.name!r} is for {builtin.task} jobs, not {spec.task}"
            yield ("dataset", "builtin"), msg, builtin.name
        elif builtin.length is not None and m.window is not None and m.horizon is not None:
            yield from series_fit_errors(builtin.length, repr(builtin.name), window=m.window, horizon=m.horizon)

    yield from _scheduler_errors(spec)


def series_fit_errors(rows: int, name: str, *, window: int, horizon: int) -> Any:
    """(loc, msg, value) for a window and horizon that leave fewer than two training or validation windows
    in a series of `rows` rows (a batch of one cannot be batch-normalised). The service checks uploads by it."""
    n_train, n_valid = series_split_lengths(rows)
    if horizon + 1 > n_valid:
        msg = f"horizon ({horizon}) leaves fewer than two validation windows in the {n_valid} validation rows of {name}"
        yield ("model", "horizon"), msg, horizon
    if window + horizon + 1 > n_train:
        msg = (
            f"window + horizon ({window + horizon}) leaves fewer than two training windows in "
            f"the {n_train} training rows of {name}"
        )
        yield ("model", "window"), msg, window


def _scheduler_errors(spec: JobSpec) -> Any:
    sched = spec.scheduler
    if sched is None:
        return
    lr = spec.optimizer.lr
    loc = ("scheduler",)
    if sched.warmup_epochs >= spec.search.epochs:
        msg = f"warmup_epochs ({sched.warmup_epochs}) must be below search.epochs ({spec.search.epochs})"
        yield (*loc, "warmup_epochs"), msg, sched.warmup_epochs
    if isinstance(sched, (CosineAnnealingLRSpec, CosineAnnealingWarmRestartsSpec)) and sched.eta_min >= lr:
        msg = f"eta_min ({sched.eta_min}) must be below the optimizer's lr ({lr})"
        yield (*loc, "eta_min"), msg, sched.eta_min
    if isinstance(sched, ReduceLROnPlateauSpec):
        if sched.min_lr >= lr:
            yield (*loc, "min_lr"), f"min_lr ({sched.min_lr}) must be below the optimizer's lr ({lr})", sched.min_lr
        if sched.interval != "epoch":
            msg = "ReduceLROnPlateau steps on the validation loss, which exists once per epoch: use interval 'epoch'"
            yield (*loc, "interval"), msg, sched.interval
    if isinstance(sched, OneCycleLRSpec):
        if sched.interval != "step":
            msg = "OneCycleLR is a per-step schedule over the whole run: use interval 'step'"
            yield (*loc, "interval"), msg, sched.interval
        if sched.warmup_epochs:
            msg = "OneCycleLR warms up by itself (pct_start); warmup_epochs must be 0"
            yield (*loc, "warmup_epochs"), msg, sched.warmup_epochs
    if isinstance(sched, CyclicLRSpec):
        if sched.base_lr >= sched.max_lr:
            yield (*loc, "base_lr"), f"base_lr ({sched.base_lr}) must be below max_lr ({sched.max_lr})", sched.base_lr
        if sched.warmup_epochs:
            yield (*loc, "warmup_epochs"), "CyclicLR sets its own rate from the start; warmup_epochs must be 0", 0
    if isinstance(sched, (CyclicLRSpec, OneCycleLRSpec)) and sched.cycle_momentum:
        opt = spec.optimizer
        if isinstance(opt, SGDSpec) and opt.momentum == 0:
            msg = f"{sched.type} with cycle_momentum needs an optimizer with momentum; set optimizer.momentum > 0"
            yield (*loc, "cycle_momentum"), msg, True
        if sched.base_momentum >= sched.max_momentum:
            msg = f"base_momentum ({sched.base_momentum}) must be below max_momentum ({sched.max_momentum})"
            yield (*loc, "base_momentum"), msg, sched.base_momentum
    if isinstance(sched, MultiStepLRSpec):
        ms = sched.milestones
        if any(b <= a for a, b in itertools.pairwise(ms)) or ms[0] <= 0:
            yield (*loc, "milestones"), f"milestones must be positive and strictly increasing, got {ms}", ms
        elif sched.interval == "epoch":
            span = spec.search.epochs - sched.warmup_epochs
            if ms[-1] >= span:
                msg = (
                    f"milestones must lie within the schedule's {span} epochs (search.epochs minus "
                    f"warmup_epochs); {ms[-1]} would never take effect"
                )
                yield (*loc, "milestones"), msg, ms
