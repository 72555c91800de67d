"""Plain factory functions for small, real data: a word corpus and a multivariate series."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np

from worker.search.data import Corpus, Series, load_corpus
from worker.search.engine import TIMING_FIELDS
from worker.search.spec import JobSpec

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "dogs",
    "ran",
    "past",
    "red",
    "cars",
    "and",
    "blue",
    "trees",
    "under",
    "bright",
    "summer",
    "sky",
]


def write_corpus(folder: Path, *, tokens: int = 3000, seed: int = 0) -> Path:
    """train/valid/test.txt of short sentences from a small vocabulary, with some structure to learn."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", tokens), ("valid", tokens // 3), ("test", tokens // 3)):
        lines, count = [], 0
        while count < size:
            start = rng.randrange(len(WORDS))
            line = [WORDS[(start + i) % len(WORDS)] for i in range(rng.randint(4, 9))]
            lines.append(" ".join(line))
            count += len(line) + 1
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


def tiny_corpus(folder: Path) -> Corpus:
    return load_corpus(write_corpus(folder))


def tiny_series(length: int = 400, features: int = 3, seed: int = 0) -> Series:
    """Noisy sines of different periods: forecastable, multivariate."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)[:, None]
    periods = np.array([12.0, 30.0, 7.0][:features])
    values = np.sin(2 * math.pi * t / periods) + 0.1 * rng.standard_normal((length, features)) + np.arange(features)
    return Series(values=values.astype(np.float32), columns=[f"x{i}" for i in range(features)])


def write_series_csv(path: Path, series: Series) -> Path:
    header = ["date", *series.columns]
    rows = [",".join([f"2020-01-{1 + i % 28:02d}", *(f"{v:.6f}" for v in row)]) for i, row in enumerate(series.values)]
    path.write_text("\n".join([",".join(header), *rows]) + "\n")
    return path


def forecast_spec(**overrides: Any) -> JobSpec:
    return JobSpec.tiny("forecast", **overrides)


def lm_spec(**overrides: Any) -> JobSpec:
    base: dict[str, Any] = {"dataset": {"path": "corpus"}}
    return JobSpec.tiny("language_model", **(base | overrides))


def without_timing(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]
