"""A real search on PTB at a small size: a few CPU epochs lower the validation perplexity."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.search.data import load_dataset
from worker.search.engine import run_search
from worker.search.spec import JobSpec


@pytest.mark.slow
@pytest.mark.needs_data
def test_small_search_on_ptb_lowers_validation_perplexity(data_dir: Path) -> None:
    spec = JobSpec.model_validate(
        {
            "task": "language_model",
            "dataset": {"builtin": "ptb"},
            "model": {
                "emsize": 32,
                "nhid": 32,
                "steps": 4,
                "dropout": 0.1,
                "dropouth": 0.05,
                "dropoutx": 0.05,
                "dropouti": 0.05,
            },
            "search": {"epochs": 3, "batch_size": 32, "bptt": 20, "batches_per_epoch": 40, "eval_batches": 15},
            "optimizer": {"type": "SGD", "lr": 20.0, "weight_decay": 5e-7},
            "scheduler": {"type": "CosineAnnealingLR", "T_max": 3, "eta_min": 5.0},
        }
    )
    corpus = load_dataset(spec.dataset, spec.task, data_dir=data_dir)
    result = run_search(spec, data=corpus)
    ppl = [r["val_ppl"] for r in result.records]
    assert len(ppl) == 3
    assert ppl[-1] < ppl[0] < 10000  # below a uniform guess over the 10,000 words, and improving
    assert ppl[-1] < 0.8 * ppl[0], ppl
    assert result.genotype["concat"] == [1, 2, 3, 4]
