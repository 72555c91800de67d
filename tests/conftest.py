"""Shared fixtures: where the real corpora are, and tiny data made on the spot."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """$DARTS_DATA_DIR, else ../shared/data beside the checkout."""
    return Path(os.environ.get("DARTS_DATA_DIR") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real corpora; tests that take this fixture need them (and fail instead of skipping in CI)."""
    path = shared_data_dir()
    if not (path / "ptb" / "train.txt").is_file():
        if os.environ.get("REQUIRE_SHARED_DATA"):
            pytest.fail(f"shared data required but missing at {path}")
        pytest.skip(f"needs ../shared/data (PTB, WikiText-2); not found at {path}")
    return path


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fault-repeats",
        type=int,
        default=1,
        help="how many times each fault scenario runs, with its own random timing (`make faults`: 5)",
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    faults = sys.modules.get("tests.service.faults")
    rows = getattr(faults, "ROWS", None)
    if faults is not None and rows:
        terminalreporter.write_sep("=", "fault scenarios")
        terminalreporter.write_line(faults.table(list(rows.values())))
