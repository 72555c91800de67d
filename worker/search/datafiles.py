"""Reading and checking data files without torch: the API checks uploads by the rules the worker loads them by."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EOS, UNK = "<eos>", "<unk>"
MAX_COLUMNS = 256  # a series wider than this is almost certainly not what the user meant to upload


class DataError(ValueError):
    """The data cannot serve this search; the message says why in words a user can act on."""


@dataclass(frozen=True)
class Series:
    """A multivariate series in time order, raw (unnormalised) values (T, F)."""

    values: np.ndarray
    columns: list[str]


def load_series_csv(path: Path) -> Series:
    """Numeric columns of a CSV file with a header row (see `parse_series_csv`)."""
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        return parse_series_csv(f.read(), name=path.name)


def parse_series_csv(text: str, *, name: str) -> Series:
    """Numeric columns of CSV text with a header row; non-numeric columns (dates, labels) are left out."""
    try:
        rows = [r for r in csv.reader(io.StringIO(text, newline="")) if r]
    except csv.Error as exc:
        raise DataError(f"{name}: not readable as CSV ({exc})") from None
    if len(rows) < 2:
        raise DataError(f"{name}: needs a header row and at least one data row")
    header, body = rows[0], rows[1:]
    if any(len(r) != len(header) for r in body):
        bad = next(i for i, r in enumerate(body, start=2) if len(r) != len(header))
        raise DataError(f"{name}: row {bad} has a different number of fields than the header")
    keep: list[int] = []
    for col in range(len(header)):
        try:
            [float(r[col]) for r in body]
        except ValueError:
            continue
        keep.append(col)
    if not keep:
        raise DataError(f"{name}: no column holds only numbers")
    if len(keep) > MAX_COLUMNS:
        raise DataError(f"{name}: {len(keep)} numeric columns; at most {MAX_COLUMNS} are supported")
    values = np.array([[float(r[c]) for c in keep] for r in body], dtype=np.float64)
    if not np.isfinite(values).all():
        raise DataError(f"{name}: values must be finite numbers (no NaN or inf)")
    largest = float(np.finfo(np.float32).max)
    if np.abs(values).max() > largest:
        raise DataError(f"{name}: values must lie within ±{largest:.3g} (the search computes in float32)")
    return Series(values=values.astype(np.float32), columns=[header[c] for c in keep])
