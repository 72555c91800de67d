"""Checkpoint writes that fail (full disk, transient I/O errors) and checkpoints corrupted on disk before a resume.

The faults are injected inside `write_atomic`, where a real full disk shows up: either the write of the
temporary file stops half way with ENOSPC, or its fsync fails with ENOSPC after every byte was handed over.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from worker.search import checkpoint
from worker.search.checkpoint import MANIFEST, CheckpointInfo, CheckpointStore, CheckpointWriteError
from worker.search.engine import run_search
from worker.search.spec import JobSpec

from .factories import forecast_spec, tiny_series, without_timing

KEEP_LAST = 2
SPEC = forecast_spec(
    search={"epochs": 4},
    checkpoint={"every_epochs": 1, "keep_last": KEEP_LAST, "keep_best": True},
    model={"dropout": 0.1, "dropouth": 0.1},  # the dropout generator's state must survive a resume too
    early_stopping=None,
)
SPEC5 = SPEC.model_copy(update={"search": SPEC.search.model_copy(update={"epochs": 5})})  # for resumes
NO_SPACE = "No space left on device"

# A fault rule: given the target file's name and the attempts made before this one (name, succeeded), fail it?
Rule = Callable[[str, list[tuple[str, bool]]], bool]


class FullDisk:
    """Makes `write_atomic` fail as a full disk does, for the attempts that `rule` picks.

    where="write": half the bytes reach the temporary file, then the write raises ENOSPC.
    where="fsync": every byte is written, then fsync of the temporary file raises ENOSPC.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, rule: Rule, where: str = "fsync") -> None:
        assert where in ("write", "fsync")
        self.rule, self.where = rule, where
        self.attempts: list[tuple[str, bool]] = []  # every write_atomic call: (target name, succeeded)
        self._failing = False
        real_write_atomic, real_fsync, real_open = checkpoint.write_atomic, os.fsync, builtins.open

        def write_atomic(path: Path, payload: bytes) -> None:
            self._failing = self.rule(path.name, list(self.attempts))
            try:
                real_write_atomic(path, payload)
            except BaseException:
                self.attempts.append((path.name, False))
                raise
            finally:
                self._failing = False
            self.attempts.append((path.name, True))

        def fsync(fd: int) -> None:
            if self._failing and self.where == "fsync" and stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.ENOSPC, NO_SPACE)
            real_fsync(fd)

        def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            f = real_open(file, mode, *args, **kwargs)
            return _HalfWrites(f) if self._failing and self.where == "write" and "w" in mode else f

        monkeypatch.setattr(checkpoint, "write_atomic", write_atomic)
        monkeypatch.setattr(os, "fsync", fsync)  # the module checkpoint.py calls
        monkeypatch.setattr(checkpoint, "open", open_, raising=False)  # only the checkpoint module's open

    @property
    def failures(self) -> list[str]:
        return [name for name, ok in self.attempts if not ok]


class _HalfWrites:
    """A file on a disk that fills up half way through the write."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def __enter__(self) -> _HalfWrites:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def write(self, data: bytes) -> int:
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, NO_SPACE)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def disk_full_from_pt_write(n: int) -> Rule:
    """The disk fills up at the n-th write of a checkpoint (.pt) file and stays full."""

    def rule(name: str, before: list[tuple[str, bool]]) -> bool:
        return sum(1 for b, _ in before if b.endswith(".pt")) + name.endswith(".pt") >= n

    return rule


def first_attempts_fail(target: str, k: int) -> Rule:
    """The first k attempts to write `target` fail; the ones after succeed."""
    return lambda name, before: name == target and sum(1 for b, _ in before if b == target) < k


def manifest_after(target: str, nth: int, k: int | None = None) -> Rule:
    """The manifest write that follows the nth successful write of `target` fails (its first k attempts; all
    of them when k is None)."""

    def rule(name: str, before: list[tuple[str, bool]]) -> bool:
        done = [i for i, (b, ok) in enumerate(before) if b == target and ok]
        if name != MANIFEST or len(done) != nth or any(b != MANIFEST for b, _ in before[done[-1] + 1 :]):
            return False
        return k is None or len(before) - done[-1] - 1 < k

    return rule


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def assert_folder_consistent(folder: Path) -> list[CheckpointInfo]:
    """The manifest parses; every file it lists exists, with its size and sha256, and loads; no temporary file."""
    manifest = json.loads((folder / MANIFEST).read_text())
    items = [CheckpointInfo(**item) for item in manifest["items"]]
    for info in items:
        path = folder / info.name
        assert path.is_file(), f"{info.name} is listed in the manifest but missing"
        data = path.read_bytes()
        assert len(data) == info.bytes, f"{info.name}: {len(data)} bytes, the manifest says {info.bytes}"
        assert hashlib.sha256(data).hexdigest() == info.sha256, f"{info.name} does not match its sha256"
        state = torch.load(path, weights_only=True)
        assert state["epoch"] == info.epoch
    leftovers = [name for name in files_in(folder) if name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    return items


def epoch_names(items: list[CheckpointInfo]) -> list[str]:
    return sorted(i.name for i in items if i.kind == "epoch")


def expected_epoch_names(last_epoch: int) -> list[str]:
    return [f"epoch-{e:04d}.pt" for e in range(max(1, last_epoch - KEEP_LAST + 1), last_epoch + 1)]


def best_epoch(records: list[dict[str, Any]]) -> int:
    return min(records, key=lambda r: r["val_loss"])["epoch"]


def improved_epochs(records: list[dict[str, Any]]) -> list[int]:
    """The epochs whose validation loss was the lowest so far: those that write best.pt."""
    out, best = [], float("inf")
    for r in records:
        if r["val_loss"] < best:
            out.append(r["epoch"])
            best = r["val_loss"]
    return out


@pytest.fixture(scope="module")
def reference() -> list[dict[str, Any]]:
    """An undisturbed run of SPEC, without checkpoints."""
    return run_search(SPEC, data=tiny_series()).records


@pytest.fixture(scope="module")
def reference5() -> list[dict[str, Any]]:
    """An undisturbed run of SPEC5, without checkpoints."""
    return run_search(SPEC5, data=tiny_series()).records


class Run:
    """run_search on SPEC into a folder, remembering what it reported to on_epoch and on_checkpoint, and the
    manifest as it was at each on_checkpoint report."""

    def __init__(self, folder: Path, spec: JobSpec = SPEC) -> None:
        self.folder, self.spec = folder, spec
        self.epochs: list[dict[str, Any]] = []
        self.reports: list[list[CheckpointInfo]] = []
        self.manifests: list[bytes] = []

    def report(self, items: list[CheckpointInfo]) -> None:
        self.reports.append(items)
        self.manifests.append((self.folder / MANIFEST).read_bytes())

    def __call__(self, **kwargs: Any) -> Any:
        return run_search(
            self.spec,
            data=tiny_series(),
            checkpoint_dir=self.folder,
            on_epoch=self.epochs.append,
            on_checkpoint=self.report,
            **kwargs,
        )


# 1. A full disk -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "where"),
    [(1, "write"), (2, "fsync"), (3, "write"), (4, "fsync"), (5, "write"), (5, "fsync")],
)
def test_a_full_disk_fails_with_a_clear_error_and_keeps_the_earlier_checkpoints(
    n: int, where: str, reference: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = FullDisk(monkeypatch, disk_full_from_pt_write(n), where)
    run = Run(tmp_path)
    with pytest.raises(CheckpointWriteError) as raised:
        run()
    failed = disk.failures[0]
    assert failed.endswith(".pt") and failed not in disk.failures[1:]  # no retries by default
    assert set(disk.failures[1:]) <= {MANIFEST}  # best.pt's failure tries to list the old one again
    message = str(raised.value)
    assert failed in message and NO_SPACE in message
    assert raised.value.errno == errno.ENOSPC
    assert isinstance(raised.value.__cause__, OSError)

    epoch = len(run.epochs) + 1  # the epoch whose checkpoint failed; on_epoch has seen the ones before
    assert without_timing(run.epochs) == without_timing(reference[: epoch - 1])
    store = CheckpointStore(tmp_path, keep_last=KEEP_LAST)
    if not (tmp_path / MANIFEST).exists():  # the very first write failed: nothing was ever listed
        assert epoch == 1 and not files_in(tmp_path) and run.reports == []
        assert store.latest_valid() is None
        return
    items = assert_folder_consistent(tmp_path)
    assert items == store.items() == run.reports[-1]  # what the service was told is what is on disk
    assert epoch_names(items) == expected_epoch_names(epoch - 1)
    if failed == "best.pt" and disk.failures[1:]:
        # best.pt was taken off the manifest before its bytes were to be replaced, and the disk was too full
        # to list the old one again: unlisted, never listed with the wrong sha256
        assert [i for i in items if i.kind == "best"] == []
    else:
        # best.pt is written before the epoch file: when that one failed, best.pt may already hold this epoch
        best_so_far = reference[: epoch - 1] if failed == "best.pt" else reference[:epoch]
        assert [i.epoch for i in items if i.kind == "best"] == [best_epoch(best_so_far)]

    found = store.latest_valid()
    if epoch == 1:  # only best.pt of epoch 1 was written: nothing to resume from
        assert found is None
        return
    assert found is not None
    info, state = found
    assert info.epoch == state["epoch"] == epoch - 1 and info.name == f"epoch-{epoch - 1:04d}.pt"
    loaded = torch.load(tmp_path / info.name, weights_only=True)
    assert json.loads(loaded["history"]) == json.loads(state["history"]) == run.epochs
    assert JobSpec.model_validate_json(loaded["spec"]) == SPEC


# 2. Transient failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule",
    [
        pytest.param(first_attempts_fail("epoch-0002.pt", 1), id="epoch-file-once"),
        pytest.param(first_attempts_fail("epoch-0002.pt", 2), id="epoch-file-twice"),
        pytest.param(first_attempts_fail("best.pt", 2), id="best-file-twice"),
        pytest.param(manifest_after("epoch-0003.pt", 1, k=2), id="manifest-twice"),
    ],
)
@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_transient_failure_is_retried_and_changes_nothing(
    rule: Rule,
    where: str,
    reference: list[dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    disk = FullDisk(monkeypatch, rule, where)
    run = Run(tmp_path)
    with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
        result = run(checkpoint_retry_seconds=2)
    assert disk.failures, "the fault was never injected"
    assert result.stop_reason == "completed"
    assert without_timing(result.records) == without_timing(reference)
    assert run.epochs == result.records
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == len(disk.failures)
    assert all(NO_SPACE in r.getMessage() for r in retries)
    items = assert_folder_consistent(tmp_path)
    assert items == result.checkpoints == run.reports[-1]
    assert epoch_names(items) == expected_epoch_names(SPEC.search.epochs)
    assert [i.epoch for i in items if i.kind == "best"] == [best_epoch(reference)]
    found = CheckpointStore(tmp_path, keep_last=KEEP_LAST).latest_valid()
    assert found is not None and found[0].epoch == SPEC.search.epochs


def test_a_failure_that_outlasts_the_retry_time_gives_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = FullDisk(monkeypatch, first_attempts_fail("epoch-0002.pt", 100))
    run = Run(tmp_path)
    started = time.monotonic()
    with pytest.raises(CheckpointWriteError, match=rf"epoch-0002\.pt.*{NO_SPACE}"):
        run(checkpoint_retry_seconds=1)
    assert time.monotonic() - started < 10
    assert len(disk.failures) >= 2  # tried again at least once before giving up
    assert epoch_names(assert_folder_consistent(tmp_path)) == ["epoch-0001.pt"]


# 3. A failure while writing the manifest ------------------------------------------------------------------


def _manifest_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rule: Rule, where: str
) -> tuple[Run, bytes, list[CheckpointInfo]]:
    """Run until the manifest write that `rule` picks fails; returns the run, and the manifest as it was."""
    run = Run(tmp_path)
    disk = FullDisk(monkeypatch, rule, where)
    with pytest.raises(CheckpointWriteError, match=NO_SPACE):
        run()
    assert disk.failures and set(disk.failures) == {MANIFEST}
    assert run.manifests, "no manifest was written before the failure"
    return run, run.manifests[-1], run.reports[-1]


@pytest.mark.parametrize("where", ["write", "fsync"])
@pytest.mark.parametrize("epoch", [1, 3])
def test_a_failed_manifest_write_after_a_new_epoch_file_keeps_the_old_manifest(
    epoch: int, where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run, before, reported = _manifest_failure(tmp_path, monkeypatch, manifest_after(f"epoch-{epoch:04d}.pt", 1), where)
    assert (tmp_path / MANIFEST).read_bytes() == before  # the old manifest, byte for byte
    items = assert_folder_consistent(tmp_path)
    assert items == reported
    assert epoch_names(items) == expected_epoch_names(epoch - 1)
    found = CheckpointStore(tmp_path, keep_last=KEEP_LAST).latest_valid()
    if epoch == 1:
        assert found is None
    else:
        assert found is not None and found[0].epoch == epoch - 1


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_failed_manifest_write_after_a_new_best_file_keeps_the_old_manifest_consistent(
    where: str, reference: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    improved = improved_epochs(reference)
    assert len(improved) >= 2, "the reference run must improve after epoch 1 for best.pt to be rewritten"
    rule = manifest_after("best.pt", 2)  # the second best.pt: it replaces the one of epoch 1
    run, before, reported = _manifest_failure(tmp_path, monkeypatch, rule, where)
    assert len(run.epochs) == improved[1] - 1
    assert (tmp_path / MANIFEST).read_bytes() == before
    assert json.loads(before)["items"]  # readable
    items = assert_folder_consistent(tmp_path)
    assert items == reported
    assert "best.pt" not in [i.name for i in items]  # taken off the manifest before its bytes were replaced


# 4. Corrupted checkpoints before a resume -----------------------------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def truncate_to_nothing(path: Path) -> None:
    path.write_bytes(b"")


def flip_a_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def flip_a_late_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # in the zip's central directory: the tensors are untouched
    path.write_bytes(bytes(data))


def stopped_after_epoch_3_with_a_corrupted_newest(
    folder: Path, corrupt: Callable[[Path], None], undisturbed: list[dict[str, Any]]
) -> dict[str, Any]:
    """SPEC5 cancelled after epoch 3, epoch-0003.pt corrupted; returns the state latest_valid() finds."""
    first = Run(folder, SPEC5)
    result = first(should_stop=lambda: len(first.epochs) >= 3)
    assert result.stop_reason == "cancelled" and len(result.records) == 3
    assert epoch_names(assert_folder_consistent(folder)) == ["epoch-0002.pt", "epoch-0003.pt"]

    newest = folder / "epoch-0003.pt"
    intact = newest.read_bytes()
    corrupt(newest)
    assert newest.read_bytes() != intact
    found = CheckpointStore(folder, keep_last=KEEP_LAST).latest_valid()
    assert found is not None
    info, state = found
    assert info.name == "epoch-0002.pt" and state["epoch"] == 2
    assert without_timing(json.loads(state["history"])) == without_timing(undisturbed[:2])
    return state


@pytest.mark.parametrize("corrupt", [truncate, truncate_to_nothing, flip_a_middle_byte, flip_a_late_byte])
def test_a_corrupted_newest_checkpoint_is_skipped_and_the_resume_matches_an_undisturbed_run(
    corrupt: Callable[[Path], None], reference5: list[dict[str, Any]], tmp_path: Path
) -> None:
    undisturbed = reference5
    state = stopped_after_epoch_3_with_a_corrupted_newest(tmp_path, corrupt, undisturbed)
    store = CheckpointStore(tmp_path, keep_last=KEEP_LAST)
    resumed = Run(tmp_path, SPEC5)
    final = resumed(resume_from=state)
    assert final.stop_reason == "completed"
    assert without_timing(final.records) == without_timing(undisturbed)
    assert [r["epoch"] for r in resumed.epochs] == [3, 4, 5]
    items = assert_folder_consistent(tmp_path)
    assert items == final.checkpoints == resumed.reports[-1]
    assert epoch_names(items) == ["epoch-0004.pt", "epoch-0005.pt"]
    assert [i.epoch for i in items if i.kind == "best"] == [best_epoch(undisturbed)]
    again = store.latest_valid()
    assert again is not None and again[0].epoch == 5


def test_a_failed_manifest_write_after_rewriting_an_epoch_file_on_resume_keeps_the_manifest_consistent(
    reference5: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = stopped_after_epoch_3_with_a_corrupted_newest(tmp_path, flip_a_middle_byte, reference5)
    disk = FullDisk(monkeypatch, manifest_after("epoch-0003.pt", 1))
    with pytest.raises(CheckpointWriteError, match=NO_SPACE):
        Run(tmp_path, SPEC5)(resume_from=state)
    assert disk.failures == [MANIFEST]
    listed = [item["name"] for item in json.loads((tmp_path / MANIFEST).read_text())["items"]]
    assert "epoch-0003.pt" not in listed  # taken off the manifest before it was rewritten with other bytes
    assert_folder_consistent(tmp_path)
