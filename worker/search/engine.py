"""`run_search`: the DARTS bilevel search loop, with checkpoints, resume, early stopping and cancellation."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .architect import Architect
from .checkpoint import FORMAT_VERSION, CheckpointInfo, CheckpointStore, load_checkpoint
from .data import Corpus, DataError, LMBatches, Series, SeriesBatches, make_batches
from .model import Forecaster, LanguageModel, SearchNetwork, derive_genotype
from .schedule import WeightSchedule, build_arch_optimizer, build_weight_optimizer, check_disjoint
from .spec import PRIMITIVES, EarlyStoppingSpec, JobSpec

EpochRecord = dict[str, Any]
TIMING_FIELDS = ("seconds", "samples_per_second")  # the only fields that differ between identical runs


class SearchDiverged(RuntimeError):
    """The training loss stopped being a finite number."""


@dataclass
class SearchResult:
    records: list[EpochRecord]
    genotype: dict[str, Any]
    alpha: list[list[float]]  # softmax of alpha, one row per edge
    stop_reason: str  # "completed", "early_stopping" or "cancelled"
    best_val_loss: float | None
    best_epoch: int | None
    checkpoints: list[CheckpointInfo] = field(default_factory=list)


@dataclass
class EarlyStopping:
    """Improvement means val_loss < best - min_delta; after `patience` epochs in a row without one,
    the next epoch without one stops the search (ReduceLROnPlateau's reading of patience)."""

    patience: int | None  # None: never stop early
    min_delta: float = 0.0
    best: float = math.inf
    best_epoch: int | None = None
    bad_epochs: int = 0

    @classmethod
    def from_spec(cls, spec: EarlyStoppingSpec | None) -> EarlyStopping:
        return cls(None) if spec is None else cls(spec.patience, spec.min_delta)

    def update(self, epoch: int, val_loss: float) -> bool:
        """Record an epoch's validation loss; True when it improved on the best."""
        if val_loss < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs > self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch or 0, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_epochs = float(state["best"]), int(state["bad_epochs"])
        self.best_epoch = int(state["best_epoch"]) or None


def build_network(spec: JobSpec, batches: LMBatches | SeriesBatches, generator: torch.Generator) -> SearchNetwork:
    if isinstance(batches, LMBatches):
        return LanguageModel(spec, batches.ntoken, generator)
    return Forecaster(spec, batches.features, generator)


class Search:
    """Everything one search holds; `run_search` drives it epoch by epoch."""

    def __init__(self, spec: JobSpec, data: Corpus | Series, device: torch.device) -> None:
        self.spec, self.device = spec, device
        s = spec.search
        self.batches = make_batches(spec, data, device)
        self.model = build_network(spec, self.batches, torch.Generator().manual_seed(s.seed)).to(device)
        self.data_gen = torch.Generator().manual_seed(s.seed + 1)  # shuffling, on the CPU
        self.model.gen = torch.Generator(device=device).manual_seed(s.seed + 2)  # dropout masks
        self.steps_per_epoch = min(self.batches.n_train, s.batches_per_epoch or self.batches.n_train)
        self.eval_batches = min(self.batches.n_valid, s.eval_batches or self.batches.n_valid)
        self.weights = list(self.model.weight_parameters())
        self.weight_optimizer = build_weight_optimizer(spec.optimizer, self.weights)
        self.arch_optimizer = build_arch_optimizer(spec.arch_optimizer, self.model.arch_parameters())
        check_disjoint(self.weight_optimizer, self.arch_optimizer, self.model.arch_parameters())
        self.schedule = WeightSchedule(
            spec.scheduler, self.weight_optimizer, epochs=s.epochs, steps_per_epoch=self.steps_per_epoch
        )
        self.architect = Architect(
            self.model,
            self.weight_optimizer,
            self.arch_optimizer,
            order=s.order,
            xi=None if s.xi == "follow_lr" else float(s.xi),
            weight_decay=spec.optimizer.weight_decay,
            grad_clip=s.grad_clip,
        )
        self.stopper = EarlyStopping.from_spec(spec.early_stopping)
        self.history: list[EpochRecord] = []

    @property
    def epoch(self) -> int:
        return len(self.history)

    def hidden(self, batch: int) -> Tensor:
        return self.model.init_hidden(batch)

    def train_epoch(
        self, should_stop: Callable[[], bool], on_step: Callable[[int, int], None] | None
    ) -> dict[str, float] | None:
        """One epoch of alternating alpha and weight steps; None when stopped before its end."""
        model, batches = self.model, self.batches
        model.train()
        batches.begin_epoch(self.data_gen)
        size = self.spec.search.batch_size
        h_train, h_valid = self.hidden(size), self.hidden(size)
        total_loss, total_samples, seconds = 0.0, 0, 0.0
        for step in range(self.steps_per_epoch):
            if step > 0 and should_stop():
                return None
            started = time.perf_counter()
            x, y = batches.train_batch(step)
            xv, yv = batches.valid_batch(step)
            if not batches.carries_hidden:
                h_train, h_valid = self.hidden(x.shape[0]), self.hidden(xv.shape[0])
            h_valid = self.architect.step((x, y), h_train, (xv, yv), h_valid)
            with model.only_grads_for("weights"):  # alpha gets no gradient from the weight step
                loss, h_train = model.loss(x, y, h_train)
                grads = torch.autograd.grad(loss, self.weights)
            value = float(loss.detach())
            if not math.isfinite(value):  # checked before the step, so the weights stay as they were
                raise SearchDiverged(
                    f"the training loss became {value} in epoch {self.epoch + 1}, step {step + 1}; "
                    "the search cannot go on (if it grew step by step, lower optimizer.lr or search.grad_clip)"
                )
            for w, g in zip(self.weights, grads, strict=True):
                w.grad = g
            nn.utils.clip_grad_norm_(self.weights, self.spec.search.grad_clip)
            self.weight_optimizer.step()
            self.weight_optimizer.zero_grad(set_to_none=True)
            self.schedule.after_step()
            h_train = h_train.detach()
            samples = batches.samples(y)
            total_loss += value * samples
            total_samples += samples
            seconds += time.perf_counter() - started
            if on_step is not None:
                on_step(step + 1, self.steps_per_epoch)
        return {"train_loss": total_loss / total_samples, "samples_per_second": total_samples / max(seconds, 1e-9)}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss (per token or per forecast value) over `eval_batches` batches."""
        self.model.eval()
        hidden = self.hidden(self.spec.search.batch_size)
        total, count = 0.0, 0
        for i in range(self.eval_batches):
            x, y = self.batches.eval_batch(i)
            if not self.batches.carries_hidden:
                hidden = self.hidden(x.shape[0])
            loss, hidden = self.model.loss(x, y, hidden)
            total += float(loss) * y.numel()
            count += y.numel()
        return total / count

    def alpha_probs(self) -> list[list[float]]:
        with torch.no_grad():
            return self.model.probs().tolist()

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "spec": self.spec.model_dump_json(),
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "weight_optimizer": self.weight_optimizer.state_dict(),
            "arch_optimizer": self.arch_optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "early_stopping": self.stopper.state_dict(),
            "rng": {"data": self.data_gen.get_state(), "dropout": self.model.gen.get_state()},  # type: ignore[union-attr]
            "history": json.dumps(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = JobSpec.model_validate_json(state["spec"])
        if saved != self.spec:
            raise ValueError("the checkpoint was written by a search with a different spec")
        self.model.load_state_dict(state["model"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.arch_optimizer.load_state_dict(state["arch_optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self.stopper.load_state_dict(state["early_stopping"])
        # Generator states are CPU byte tensors even for a CUDA generator; map_location may have moved them.
        self.data_gen.set_state(state["rng"]["data"].cpu())
        self.model.gen.set_state(state["rng"]["dropout"].cpu())  # type: ignore[union-attr]
        self.history = json.loads(state["history"])
        if len(self.history) != int(state["epoch"]):
            raise ValueError("the checkpoint's history does not match its epoch")


def run_search(
    spec: JobSpec,
    *,
    data: Corpus | Series,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[EpochRecord], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume_from: Path | dict[str, Any] | None = None,
    checkpoint_dir: Path | None = None,
    on_checkpoint: Callable[[list[CheckpointInfo]], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    checkpoint_retry_seconds: float = 0.0,
) -> SearchResult:
    """Run (or continue) a search; report each finished epoch to `on_epoch`.

    `should_stop` is polled between steps: at an epoch boundary the search checkpoints that epoch and
    returns; inside an epoch it drops the partial epoch and returns (stop_reason "cancelled"), keeping
    the checkpoints already written. `resume_from` is a checkpoint (path or loaded dict) of the same spec.
    A checkpoint write that fails (full disk, I/O error) is retried for `checkpoint_retry_seconds`, then
    raises CheckpointWriteError with the earlier checkpoints intact.
    """
    search = Search(spec, data, torch.device(device))
    stop = should_stop or (lambda: False)
    if resume_from is not None:
        state = resume_from if isinstance(resume_from, dict) else load_checkpoint(resume_from, search.device)
        search.load_state_dict(state)
    store = (
        CheckpointStore(
            checkpoint_dir,
            keep_last=spec.checkpoint.keep_last,
            on_change=on_checkpoint,
            retry_seconds=checkpoint_retry_seconds,
        )
        if checkpoint_dir is not None
        else None
    )
    saved_epoch = search.epoch  # the newest epoch with a resumable checkpoint
    stop_reason = "completed"
    at_boundary = True  # False once a stop drops a partial epoch: the state is then past the last record
    while search.epoch < spec.search.epochs:
        if stop():
            stop_reason = "cancelled"
            break
        started = time.perf_counter()
        lr = float(search.weight_optimizer.param_groups[0]["lr"])
        arch_lr = float(search.arch_optimizer.param_groups[0]["lr"])
        train = search.train_epoch(stop, on_step)
        if train is None:
            stop_reason, at_boundary = "cancelled", False
            break
        val_loss = search.evaluate()
        search.schedule.after_epoch(val_loss)
        epoch = search.epoch + 1
        search.stopper.update(epoch, val_loss)
        best_before = min((r["val_loss"] for r in search.history), default=math.inf)
        improved = val_loss < best_before  # the lowest validation loss so far, whatever min_delta says
        alpha = search.alpha_probs()
        record: EpochRecord = {
            "epoch": epoch,
            "train_loss": train["train_loss"],
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 700.0)) if spec.task == "language_model" else None,
            "lr": lr,
            "arch_lr": arch_lr,
            "best_val_loss": min(val_loss, best_before),
            "genotype": derive_genotype(alpha, spec.model.steps),
            "alpha": alpha,
            "seconds": time.perf_counter() - started,
            "samples_per_second": train["samples_per_second"],
        }
        search.history.append(record)
        last = epoch == spec.search.epochs or search.stopper.should_stop
        if store is not None:
            state = search.state_dict()
            if improved and spec.checkpoint.keep_best:
                store.save(state, epoch=epoch, kind="best")
            if last or epoch % spec.checkpoint.every_epochs == 0:
                store.save(state, epoch=epoch, kind="epoch")
                saved_epoch = epoch
        if on_epoch is not None:
            on_epoch(record)
        if search.stopper.should_stop:
            stop_reason = "early_stopping"
            break
    if stop_reason == "cancelled" and at_boundary and store is not None and saved_epoch < search.epoch:
        store.save(search.state_dict(), epoch=search.epoch, kind="epoch")
    best = min(search.history, key=lambda r: r["val_loss"], default=None)
    alpha = search.alpha_probs()
    return SearchResult(
        records=search.history,
        genotype=derive_genotype(alpha, spec.model.steps),
        alpha=alpha,
        stop_reason=stop_reason,
        best_val_loss=best["val_loss"] if best else None,
        best_epoch=best["epoch"] if best else None,
        checkpoints=store.items() if store is not None else [],
    )


__all__ = ["PRIMITIVES", "DataError", "EpochRecord", "SearchDiverged", "SearchResult", "run_search"]
