"""run_search end to end on small real data: records, early stopping, cancellation, checkpoints, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from worker.search.checkpoint import CheckpointStore, load_checkpoint
from worker.search.engine import EarlyStopping, SearchDiverged, run_search
from worker.search.spec import PRIMITIVES, JobSpec

from .factories import forecast_spec, lm_spec, tiny_corpus, tiny_series, without_timing

RECORD_FIELDS = {
    "epoch",
    "train_loss",
    "val_loss",
    "val_ppl",
    "lr",
    "arch_lr",
    "best_val_loss",
    "genotype",
    "alpha",
    "seconds",
    "samples_per_second",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tiny_corpus(tmp_path_factory.mktemp("corpus"))


def test_epoch_records_have_the_contracts_fields(corpus: Any) -> None:
    spec = lm_spec(search={"epochs": 2})
    seen: list[dict[str, Any]] = []
    result = run_search(spec, data=corpus, on_epoch=seen.append)
    assert seen == result.records
    assert [r["epoch"] for r in seen] == [1, 2]
    for r in seen:
        assert set(r) == RECORD_FIELDS
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert len(r["alpha"]) == 6 and all(len(row) == len(PRIMITIVES) for row in r["alpha"])
        assert all(sum(row) == pytest.approx(1.0) for row in r["alpha"])
        assert r["genotype"]["concat"] == [1, 2, 3] and len(r["genotype"]["recurrent"]) == 3
        assert r["samples_per_second"] > 0 and r["seconds"] > 0
        json.dumps(r)  # plain JSON, as the API and metrics.jsonl need
    assert seen[1]["best_val_loss"] == min(seen[0]["val_loss"], seen[1]["val_loss"])
    assert result.stop_reason == "completed"
    forecast = run_search(forecast_spec(search={"epochs": 1}), data=tiny_series()).records[0]
    assert forecast["val_ppl"] is None


def test_search_is_deterministic_for_a_seed_and_differs_across_seeds() -> None:
    spec = forecast_spec(model={"dropout": 0.2, "dropouth": 0.1, "dropoutx": 0.1})
    a = run_search(spec, data=tiny_series()).records
    b = run_search(spec, data=tiny_series()).records
    c = run_search(forecast_spec(model={"dropout": 0.2}, search={"seed": 7}), data=tiny_series()).records
    assert without_timing(a) == without_timing(b)
    assert without_timing(a) != without_timing(c)


def expected_stop_epoch(val_losses: list[float], patience: int, min_delta: float) -> int | None:
    """The rule, written out: stop at the first epoch that makes `patience` + 1 non-improving epochs in a row."""
    best, bad = math.inf, 0
    for epoch, loss in enumerate(val_losses, start=1):
        if loss < best - min_delta:
            best, bad = loss, 0
        else:
            bad += 1
            if bad > patience:
                return epoch
    return None


def test_early_stopping_rule_on_a_sequence() -> None:
    stopper = EarlyStopping(patience=2, min_delta=0.1)
    losses = [1.0, 0.95, 0.8, 0.85, 0.75, 0.9]  # improves at 1 and 3; 4, 5, 6 do not beat 0.8 - 0.1
    stops = []
    for epoch, loss in enumerate(losses, start=1):
        stopper.update(epoch, loss)
        stops.append(stopper.should_stop)
    assert stops == [False, False, False, False, False, True]
    assert expected_stop_epoch(losses, 2, 0.1) == 6
    assert (stopper.best, stopper.best_epoch) == (0.8, 3)


@pytest.mark.parametrize(("patience", "min_delta"), [(0, 1e9), (2, 1e9), (1, 0.005), (0, 0.0)])
def test_early_stopping_ends_on_exactly_the_epoch_the_rule_names(patience: int, min_delta: float) -> None:
    epochs = 8
    spec = forecast_spec(search={"epochs": epochs}, early_stopping={"patience": patience, "min_delta": min_delta})
    result = run_search(spec, data=tiny_series())
    full = run_search(spec.model_copy(update={"early_stopping": None}), data=tiny_series()).records
    expected = expected_stop_epoch([r["val_loss"] for r in full], patience, min_delta)
    if min_delta == 1e9:
        assert expected == patience + 2  # only epoch 1 improves on infinity
    assert len(result.records) == (expected or epochs)
    assert result.stop_reason == ("early_stopping" if expected else "completed")
    assert without_timing(result.records) == without_timing(full[: len(result.records)])


RESUME_CASES = [
    pytest.param("forecast", {}, id="forecast-first-order"),
    pytest.param(
        "forecast",
        {
            "search": {"order": "second", "epochs": 5},
            "model": {"dropout": 0.2, "dropouth": 0.2, "dropoutx": 0.1, "dropouti": 0.1},
            "optimizer": {"type": "SGD", "lr": 0.05, "momentum": 0.9},
            "scheduler": {"type": "ReduceLROnPlateau", "factor": 0.5, "patience": 0, "threshold": 0.05},
        },
        id="forecast-second-order-plateau-dropout",
    ),
    pytest.param(
        "language_model",
        {
            "search": {"epochs": 5},
            "model": {"dropout": 0.3, "dropouth": 0.2, "dropoutx": 0.2, "dropouti": 0.1, "dropoute": 0.1},
            "scheduler": {"type": "CosineAnnealingLR", "T_max": 6, "interval": "step", "warmup_epochs": 1},
        },
        id="lm-per-step-cosine-warmup",
    ),
    pytest.param(
        "language_model",
        {"search": {"order": "second", "epochs": 4}, "optimizer": {"type": "Adam", "lr": 0.01}},
        id="lm-second-order-adam",
    ),
]


def spec_and_data(task: str, overrides: dict[str, Any], corpus: Any) -> tuple[JobSpec, Any]:
    if task == "forecast":
        return forecast_spec(early_stopping=None, **overrides), tiny_series()
    return lm_spec(early_stopping=None, **overrides), corpus


@pytest.mark.parametrize(("task", "overrides"), RESUME_CASES)
def test_resume_after_epoch_k_gives_the_same_later_epochs(
    task: str, overrides: dict[str, Any], corpus: Any, tmp_path: Path
) -> None:
    spec, data = spec_and_data(task, overrides, corpus)
    uninterrupted = run_search(spec, data=data).records
    done: list[int] = []
    first = run_search(
        spec,
        data=data,
        checkpoint_dir=tmp_path,
        on_epoch=lambda r: done.append(r["epoch"]),
        should_stop=lambda: len(done) >= 2,
    )
    assert first.stop_reason == "cancelled" and len(first.records) == 2
    found = CheckpointStore(tmp_path, keep_last=5).latest_valid()
    assert found is not None and found[0].epoch == 2
    resumed = run_search(spec, data=data, checkpoint_dir=tmp_path, resume_from=found[1])
    assert resumed.stop_reason == "completed"
    assert without_timing(resumed.records) == without_timing(uninterrupted)


def test_a_cancel_inside_an_epoch_keeps_the_checkpoints_and_drops_the_partial_epoch(tmp_path: Path) -> None:
    spec = forecast_spec(search={"epochs": 4, "batches_per_epoch": 4}, checkpoint={"every_epochs": 1, "keep_last": 10})
    steps = 0

    def on_step(step: int, total: int) -> None:
        nonlocal steps
        steps += 1

    result = run_search(
        spec, data=tiny_series(), checkpoint_dir=tmp_path, on_step=on_step, should_stop=lambda: steps >= 6
    )
    assert result.stop_reason == "cancelled"
    assert [r["epoch"] for r in result.records] == [1]  # epoch 2 was cut at step 2 of 4
    assert steps == 6
    epochs = sorted(i.epoch for i in CheckpointStore(tmp_path, keep_last=10).items() if i.kind == "epoch")
    assert epochs == [1]
    state = load_checkpoint(tmp_path / "epoch-0001.pt")
    resumed = run_search(spec, data=tiny_series(), resume_from=state)
    assert without_timing(resumed.records) == without_timing(run_search(spec, data=tiny_series()).records)


def test_checkpoints_hold_everything_and_are_pruned_to_keep_last(tmp_path: Path) -> None:
    spec = forecast_spec(search={"epochs": 5}, checkpoint={"every_epochs": 2, "keep_last": 2}, early_stopping=None)
    result = run_search(spec, data=tiny_series(), checkpoint_dir=tmp_path)
    items = {i.name: i for i in result.checkpoints}
    # every 2 epochs plus the final one; the oldest pruned; best kept apart
    assert sorted(n for n, i in items.items() if i.kind == "epoch") == ["epoch-0004.pt", "epoch-0005.pt"]
    assert "best.pt" in items
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == sorted(items)
    assert not list(tmp_path.glob(".*tmp")), "no temporary files are left behind"
    state = torch.load(tmp_path / "epoch-0005.pt", weights_only=True)
    assert set(state) >= {
        "model",
        "weight_optimizer",
        "arch_optimizer",
        "scheduler",
        "early_stopping",
        "rng",
        "epoch",
        "spec",
        "history",
    }
    assert "alpha" in state["model"] and state["epoch"] == 5
    assert JobSpec.model_validate_json(state["spec"]) == spec
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    best_epoch = min(result.records, key=lambda r: r["val_loss"])["epoch"]
    assert best["epoch"] == items["best.pt"].epoch == best_epoch


def test_a_corrupted_newest_checkpoint_falls_back_to_the_one_before(tmp_path: Path) -> None:
    spec = forecast_spec(search={"epochs": 3}, checkpoint={"keep_last": 3}, early_stopping=None)
    run_search(spec, data=tiny_series(), checkpoint_dir=tmp_path)
    store = CheckpointStore(tmp_path, keep_last=3)
    newest = tmp_path / "epoch-0003.pt"
    payload = bytearray(newest.read_bytes())
    payload[len(payload) // 2] ^= 0xFF  # one flipped bit pattern
    newest.write_bytes(bytes(payload))
    found = store.latest_valid()
    assert found is not None and found[0].epoch == 2
    (tmp_path / "epoch-0002.pt").write_bytes(b"truncated")
    found = store.latest_valid()
    assert found is not None and found[0].epoch == 1


def test_resume_refuses_a_checkpoint_of_another_spec(tmp_path: Path) -> None:
    spec = forecast_spec(search={"epochs": 2})
    run_search(spec, data=tiny_series(), checkpoint_dir=tmp_path)
    other = forecast_spec(search={"epochs": 2, "seed": 3})
    with pytest.raises(ValueError, match="different spec"):
        run_search(other, data=tiny_series(), resume_from=tmp_path / "epoch-0002.pt")


def test_a_non_finite_training_loss_fails_with_a_clear_message() -> None:
    """The batch norm keeps this cell finite even at absurd rates, so a poisoned value stands in for divergence."""
    series = tiny_series()
    values = series.values.copy()
    values[5:40, 0] = np.nan
    spec = forecast_spec(search={"epochs": 2})
    with pytest.raises(SearchDiverged, match=r"became nan in epoch 1, step 1; .*lower optimizer.lr"):
        run_search(spec, data=type(series)(values=values, columns=series.columns))
