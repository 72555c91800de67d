"""Data sets and batching: word-level corpora for language modelling, multivariate series for forecasting."""

from __future__ import annotations

import csv
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .datafiles import EOS, UNK, DataError, Series, load_series_csv
from .spec import BUILTIN_DATASETS, DatasetRef, JobSpec, series_split_lengths


@dataclass(frozen=True)
class Corpus:
    """A tokenised corpus: vocabulary (index -> word) and the training and validation token ids."""

    vocab: list[str]
    train: Tensor  # (N,) int64
    valid: Tensor


def load_corpus(folder: Path) -> Corpus:
    """Read train.txt and valid.txt (one sentence a line, tokens split on whitespace, <eos> per line)."""
    paths = {split: folder / f"{split}.txt" for split in ("train", "valid")}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise DataError(f"corpus folder {folder.name!r} lacks {', '.join(missing)}")
    index: dict[str, int] = {UNK: 0, EOS: 1}
    train = _tokenize(paths["train"], index, grow=True)
    valid = _tokenize(paths["valid"], index, grow=False)
    if len(train) < 3 or len(valid) < 3:
        raise DataError("corpus too small: train.txt and valid.txt need a few tokens each")
    vocab = [""] * len(index)
    for word, i in index.items():
        vocab[i] = word
    return Corpus(vocab=vocab, train=train, valid=valid)


def _tokenize(path: Path, index: dict[str, int], *, grow: bool) -> Tensor:
    ids: list[int] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            for word in [*line.split(), EOS]:
                i = index.get(word)
                if i is None:
                    i = index.setdefault(word, len(index)) if grow else index[UNK]
                ids.append(i)
    return torch.tensor(ids, dtype=torch.int64)


def _vega_csv(name: str) -> Path:
    """A CSV file the vega_datasets package ships for offline use (located without importing pandas)."""
    found = importlib.util.find_spec("vega_datasets")
    if found is None or not found.submodule_search_locations:
        raise DataError("the vega_datasets package is not installed, so built-in series are unavailable")
    return Path(next(iter(found.submodule_search_locations))) / "_data" / f"{name}.csv"


def load_builtin_series(name: str) -> Series:
    if name == "stocks":  # long format (symbol, date, price) -> one column per symbol, common dates only
        with _vega_csv("stocks").open(newline="") as f:
            rows = list(csv.DictReader(f))
        symbols = sorted({r["symbol"] for r in rows})
        prices: dict[str, dict[str, float]] = {s: {} for s in symbols}
        for r in rows:
            prices[r["symbol"]][r["date"]] = float(r["price"])
        dates = sorted(set.intersection(*(set(p) for p in prices.values())), key=_month_key)
        values = np.array([[prices[s][d] for s in symbols] for d in dates], dtype=np.float32)
        return Series(values=values, columns=symbols)
    return load_series_csv(_vega_csv(name))


def _month_key(date: str) -> tuple[int, int]:  # "Jan 1 2000"
    month, _, year = date.split()
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    return int(year), months.index(month)


def load_dataset(
    ref: DatasetRef, task: str, *, data_dir: Path | None = None, uploads_dir: Path | None = None
) -> Corpus | Series:
    """Load what a spec's `dataset` names; corpora are folders, series are CSV files."""
    if ref.builtin is not None:
        if BUILTIN_DATASETS[ref.builtin].task == "forecast":
            return load_builtin_series(ref.builtin)
        if data_dir is None or not (data_dir / ref.builtin).is_dir():
            raise DataError(
                f"built-in corpus {ref.builtin!r} not found in the data directory ({data_dir}); "
                "point the command line's --data-dir (or DARTS_DATA_DIR) at a folder holding ptb/ and wikitext-2/"
            )
        return load_corpus(data_dir / ref.builtin)
    if ref.id is not None:
        if uploads_dir is None:
            raise DataError("uploaded datasets are only available through the service")
        path = uploads_dir / ref.id
    else:
        path = Path(ref.path or "")
    if task == "language_model":
        if not path.is_dir():
            raise DataError(f"{path}: a language_model dataset is a folder with train.txt and valid.txt")
        return load_corpus(path)
    if not path.is_file():
        raise DataError(f"{path}: a forecast dataset is a CSV file")
    return load_series_csv(path)


class LMBatches:
    """Corpus columns of `batch_size` streams, read `bptt` tokens at a time; the hidden state carries on."""

    carries_hidden = True

    def __init__(self, corpus: Corpus, batch_size: int, bptt: int, device: torch.device) -> None:
        self.bptt = bptt
        self.train = _batchify(corpus.train, batch_size, "train").to(device)  # (rows, B)
        self.valid = _batchify(corpus.valid, batch_size, "valid").to(device)
        self.n_train = math.ceil((self.train.shape[0] - 1) / bptt)
        self.n_valid = math.ceil((self.valid.shape[0] - 1) / bptt)
        self.ntoken = len(corpus.vocab)

    def begin_epoch(self, gen: torch.Generator) -> None:
        """Language model batches are read in order; nothing to shuffle."""

    def train_batch(self, i: int) -> tuple[Tensor, Tensor]:
        return self._chunk(self.train, i % self.n_train)

    def valid_batch(self, i: int) -> tuple[Tensor, Tensor]:
        return self._chunk(self.valid, i % self.n_valid)

    def eval_batch(self, i: int) -> tuple[Tensor, Tensor]:
        return self._chunk(self.valid, i)

    def _chunk(self, source: Tensor, i: int) -> tuple[Tensor, Tensor]:
        start = i * self.bptt
        length = min(self.bptt, source.shape[0] - 1 - start)
        return source[start : start + length], source[start + 1 : start + 1 + length]

    @staticmethod
    def samples(targets: Tensor) -> int:
        return targets.numel()  # tokens


def _batchify(ids: Tensor, batch_size: int, split: str) -> Tensor:
    rows = ids.shape[0] // batch_size
    if rows < 2:
        raise DataError(
            f"the {split} split has {ids.shape[0]} tokens, too few for batch_size {batch_size}; "
            "use a smaller batch_size or a larger corpus"
        )
    return ids[: rows * batch_size].view(batch_size, rows).t().contiguous()


class SeriesBatches:
    """Windows of a normalised series; targets of training windows lie in the training part, those of
    validation windows in the validation part (their inputs may reach back into the training part)."""

    carries_hidden = False

    def __init__(self, series: Series, window: int, horizon: int, batch_size: int, device: torch.device) -> None:
        length, self.features = series.values.shape
        n_train, n_valid = series_split_lengths(length)
        if window + horizon > n_train:
            raise DataError(f"window + horizon ({window + horizon}) exceeds the {n_train} training rows of this series")
        if n_valid < horizon:
            raise DataError(f"the validation part has {n_valid} rows, fewer than horizon {horizon}")
        train = series.values[:n_train]
        mean, std = train.mean(0), train.std(0)
        std = np.where(std > 0, std, 1.0)  # statistics of the training part only
        values = torch.from_numpy((series.values[: n_train + n_valid] - mean) / std).float()
        self.windows = values.to(device).unfold(0, window + horizon, 1).transpose(1, 2)  # (N, W+H, F)
        self.window, self.batch_size = window, batch_size
        self.train_starts = torch.arange(0, n_train - window - horizon + 1)
        self.valid_starts = torch.arange(n_train - window, n_train + n_valid - window - horizon + 1)
        if min(len(self.train_starts), len(self.valid_starts)) < 2:
            raise DataError("this series is too short for the window: each part needs at least two windows")
        # Training and alpha batches are full (the cell's batch norm needs more than one window per batch;
        # the remainder changes with every epoch's shuffle); evaluation reads every validation window.
        self.n_train = max(1, len(self.train_starts) // batch_size)
        self.n_alpha = max(1, len(self.valid_starts) // batch_size)
        self.n_valid = math.ceil(len(self.valid_starts) / batch_size)
        self._train_order, self._valid_order = self.train_starts, self.valid_starts
        self.mean, self.std = mean, std

    def begin_epoch(self, gen: torch.Generator) -> None:
        """Shuffle both parts' windows for this epoch with the search's data generator."""
        self._train_order = self.train_starts[torch.randperm(len(self.train_starts), generator=gen)]
        self._valid_order = self.valid_starts[torch.randperm(len(self.valid_starts), generator=gen)]

    def train_batch(self, i: int) -> tuple[Tensor, Tensor]:
        return self._take(self._train_order, i % self.n_train)

    def valid_batch(self, i: int) -> tuple[Tensor, Tensor]:
        return self._take(self._valid_order, i % self.n_alpha)

    def eval_batch(self, i: int) -> tuple[Tensor, Tensor]:
        return self._take(self.valid_starts, i)

    def _take(self, order: Tensor, i: int) -> tuple[Tensor, Tensor]:
        starts = order[i * self.batch_size : (i + 1) * self.batch_size].to(self.windows.device)
        w = self.windows[starts]  # (B, W+H, F)
        return w[:, : self.window], w[:, self.window :]

    @staticmethod
    def samples(targets: Tensor) -> int:
        return targets.shape[0]  # windows


def make_batches(spec: JobSpec, data: Corpus | Series, device: torch.device) -> LMBatches | SeriesBatches:
    """Batching for the spec's task; raises DataError when the data does not fit the spec."""
    s, m = spec.search, spec.model
    if spec.task == "language_model":
        if not isinstance(data, Corpus):
            raise DataError("a language_model search needs a text corpus")
        return LMBatches(data, s.batch_size, s.bptt or 35, device)
    if not isinstance(data, Series):
        raise DataError("a forecast search needs a numeric series")
    return SeriesBatches(data, m.window or 24, m.horizon or 1, s.batch_size, device)


__all__ = [
    "Corpus",
    "DataError",
    "LMBatches",
    "Series",
    "SeriesBatches",
    "load_corpus",
    "load_dataset",
    "load_series_csv",
    "make_batches",
]
