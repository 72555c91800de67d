"""Loading and batching: corpora, CSV series, built-in series, chronological split, train-only statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from worker.search.data import (
    DataError,
    LMBatches,
    SeriesBatches,
    load_builtin_series,
    load_corpus,
    load_dataset,
    load_series_csv,
)
from worker.search.spec import BUILTIN_DATASETS, DatasetRef, series_split_lengths

from .factories import tiny_series, write_corpus, write_series_csv

CPU = torch.device("cpu")


def test_corpus_vocabulary_and_unknown_words(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("a b c\nb c d\n")
    (tmp_path / "valid.txt").write_text("a z\n")
    corpus = load_corpus(tmp_path)
    assert corpus.vocab[:2] == ["<unk>", "<eos>"]
    words = [corpus.vocab[i] for i in corpus.train.tolist()]
    assert words == ["a", "b", "c", "<eos>", "b", "c", "d", "<eos>"]
    assert [corpus.vocab[i] for i in corpus.valid.tolist()] == ["a", "<unk>", "<eos>"]


def test_corpus_folder_errors_are_plain(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("a b\n")
    with pytest.raises(DataError, match=r"lacks valid\.txt"):
        load_corpus(tmp_path)


def test_lm_batches_read_streams_in_order(tmp_path: Path) -> None:
    corpus = load_corpus(write_corpus(tmp_path, tokens=500))
    batches = LMBatches(corpus, batch_size=4, bptt=7, device=CPU)
    x, y = batches.train_batch(0)
    assert x.shape == (7, 4) and torch.equal(x[1:], y[:-1])
    column = corpus.train[: batches.train.shape[0]]
    assert torch.equal(x[:, 0], column[:7]) and torch.equal(y[:, 0], column[1:8])
    with pytest.raises(DataError, match="too few for batch_size"):
        LMBatches(corpus, batch_size=400, bptt=7, device=CPU)


def test_csv_keeps_numeric_columns_and_rejects_bad_files(tmp_path: Path) -> None:
    series = load_series_csv(write_series_csv(tmp_path / "s.csv", tiny_series(length=50)))
    assert series.columns == ["x0", "x1", "x2"] and series.values.shape == (50, 3)
    cases = {
        "empty.csv": ("", "header row"),
        "ragged.csv": ("a,b\n1,2\n3\n", "row 3 has a different number"),
        "words.csv": ("a,b\nx,y\n", "no column holds only numbers"),
        "nan.csv": ("a\n1\nnan\n", "finite"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message):
            load_series_csv(tmp_path / name)


@pytest.mark.parametrize("name", [n for n, d in BUILTIN_DATASETS.items() if d.task == "forecast"])
def test_builtin_series_have_the_documented_shape(name: str) -> None:
    series = load_builtin_series(name)
    meta = BUILTIN_DATASETS[name]
    assert series.values.shape == (meta.length, meta.features)
    assert np.isfinite(series.values).all()


def test_split_is_chronological_and_statistics_come_from_training_rows_only() -> None:
    series = tiny_series(length=200, features=2)
    values = series.values.copy()
    values[150:] += 100.0  # a shift that only the later parts see
    shifted = type(series)(values=values, columns=series.columns)
    batches = SeriesBatches(shifted, window=10, horizon=2, batch_size=8, device=CPU)
    n_train, n_valid = series_split_lengths(200)
    np.testing.assert_allclose(batches.mean, values[:n_train].mean(0), rtol=1e-6)
    np.testing.assert_allclose(batches.std, values[:n_train].std(0), rtol=1e-6)
    # targets: training windows end inside the training rows, validation windows inside the validation rows
    assert int(batches.train_starts.max()) + 10 + 2 <= n_train
    assert int(batches.valid_starts.min()) + 10 == n_train
    assert int(batches.valid_starts.max()) + 10 + 2 == n_train + n_valid
    x, y = batches.eval_batch(0)
    assert x.shape == (8, 10, 2) and y.shape == (8, 2, 2)
    start = int(batches.valid_starts[0])
    expected = (values[start + 10 : start + 12] - batches.mean) / batches.std
    np.testing.assert_allclose(y[0].numpy(), expected, rtol=1e-5)


def test_series_too_short_for_the_window_is_a_data_error() -> None:
    with pytest.raises(DataError, match="exceeds the"):
        SeriesBatches(tiny_series(length=40), window=30, horizon=1, batch_size=4, device=CPU)


def test_load_dataset_by_path_and_task(tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus")
    csv = write_series_csv(tmp_path / "s.csv", tiny_series(length=60))
    assert load_dataset(DatasetRef(path=str(tmp_path / "corpus")), "language_model").vocab
    assert load_dataset(DatasetRef(path=str(csv)), "forecast").values.shape == (60, 3)
    with pytest.raises(DataError, match="is a folder"):
        load_dataset(DatasetRef(path=str(csv)), "language_model")
    with pytest.raises(DataError, match="CSV file"):
        load_dataset(DatasetRef(path=str(tmp_path / "corpus")), "forecast")
    with pytest.raises(DataError, match="through the service"):
        load_dataset(DatasetRef(id="abc"), "forecast")


def test_shared_corpora_load(data_dir: Path) -> None:
    ptb = load_dataset(DatasetRef(builtin="ptb"), "language_model", data_dir=data_dir)
    assert len(ptb.vocab) == 10000 and len(ptb.train) == 929589  # SOURCE.md's counts, <eos> included
    wiki = load_dataset(DatasetRef(builtin="wikitext-2"), "language_model", data_dir=data_dir)
    assert len(wiki.vocab) > 30000
