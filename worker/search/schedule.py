"""The two optimizers of DARTS and the weights' learning-rate schedule.

The schedule is built on the weights' optimizer only. Alpha's Adam is created here too, from its own
spec, and nothing in this module (or anywhere else) gives a scheduler access to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler

from .spec import SCHEDULER_OWN_KEYS, AdamSpec, ArchOptimizerSpec, OneCycleLRSpec, ReduceLROnPlateauSpec, SGDSpec

SchedulerSpec = Any  # one of spec.py's scheduler models


def build_weight_optimizer(spec: SGDSpec | AdamSpec, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW over the network's weights, with the spec's own options."""
    options = spec.model_dump(exclude={"type"})
    if isinstance(spec, AdamSpec):
        options["betas"] = tuple(options["betas"])
    cls = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}[spec.type]
    optimizer: torch.optim.Optimizer = cls(list(params), **options)
    return optimizer


def build_arch_optimizer(spec: ArchOptimizerSpec, params: Iterable[nn.Parameter]) -> torch.optim.Adam:
    """Adam on alpha at a fixed learning rate (no schedule ever touches it)."""
    betas = (spec.betas[0], spec.betas[1])
    return torch.optim.Adam(list(params), lr=spec.lr, betas=betas, weight_decay=spec.weight_decay)


def check_disjoint(
    weight_optimizer: torch.optim.Optimizer, arch_optimizer: torch.optim.Optimizer, alpha: list[nn.Parameter]
) -> None:
    """Alpha belongs to the architecture optimizer alone, and the weights to the weights' optimizer alone."""
    weight_ids = {id(p) for group in weight_optimizer.param_groups for p in group["params"]}
    arch_ids = {id(p) for group in arch_optimizer.param_groups for p in group["params"]}
    if weight_ids & arch_ids:
        raise RuntimeError("a parameter is in both the weights' and the architecture optimizer")
    if arch_ids != {id(p) for p in alpha}:
        raise RuntimeError("the architecture optimizer must hold alpha and nothing else")


def scheduler_kwargs(spec: SchedulerSpec, *, total_steps: int) -> dict[str, Any]:
    """The torch class's own arguments, taken from the spec; OneCycleLR gets the run's length."""
    kwargs = spec.model_dump(exclude=set(SCHEDULER_OWN_KEYS))
    if isinstance(spec, OneCycleLRSpec):
        kwargs["total_steps"] = total_steps
    return kwargs


class WeightSchedule:
    """Steps the weights' scheduler once per epoch (after validation) or once per weight update.

    `warmup_epochs` puts a linear warm-up in front of the schedule exactly as `SequentialLR` would;
    ReduceLROnPlateau, which `SequentialLR` cannot drive, gets the same warm-up by hand.
    """

    def __init__(
        self, spec: SchedulerSpec | None, optimizer: torch.optim.Optimizer, *, epochs: int, steps_per_epoch: int
    ) -> None:
        self.spec = spec
        self.per_step = spec is not None and spec.interval == "step"
        self.plateau = isinstance(spec, ReduceLROnPlateauSpec)
        self.scheduler: Any = None
        self.warmup: Any = None
        self.warmup_steps = 0
        self.count = 0  # scheduler steps taken (what a warm-up hand-over counts)
        if spec is None:
            return
        unit = steps_per_epoch if self.per_step else 1
        self.warmup_steps = spec.warmup_epochs * unit
        if self.warmup_steps:
            self.warmup = lr_scheduler.LinearLR(
                optimizer, start_factor=spec.warmup_start_factor, end_factor=1.0, total_iters=self.warmup_steps
            )
        cls = getattr(lr_scheduler, spec.type)
        main = cls(optimizer, **scheduler_kwargs(spec, total_steps=epochs * unit))
        if self.warmup is not None and not self.plateau:
            self.scheduler = lr_scheduler.SequentialLR(optimizer, [self.warmup, main], milestones=[self.warmup_steps])
        else:
            self.scheduler = main

    def after_step(self) -> None:
        """Called after each weight update."""
        if self.per_step:
            self._step(None)

    def after_epoch(self, val_loss: float) -> None:
        """Called after each epoch's validation."""
        if self.scheduler is not None and not self.per_step:
            self._step(val_loss)

    def _step(self, val_loss: float | None) -> None:
        if self.plateau:
            if self.count < self.warmup_steps:
                self.warmup.step()
            else:
                self.scheduler.step(val_loss)
        else:
            self.scheduler.step()
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"count": self.count}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.plateau and self.warmup is not None:
            state["warmup"] = self.warmup.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if "warmup" in state:
            self.warmup.load_state_dict(state["warmup"])
