"""Checkpoint files: written atomically, listed in a manifest with their sha256, verified before a resume.

A checkpoint is a plain dict of tensors, numbers and strings, so `torch.load(path, weights_only=True)`
reads it. The manifest (`manifest.json` beside the files) is this folder's record of what is there; the
service keeps the same facts in its database.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
FORMAT_VERSION = 1

log = logging.getLogger(__name__)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, I/O error); the checkpoints before it are intact."""


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    epoch: int
    kind: str  # "epoch" (resumable, newest keep_last kept) or "best" (lowest validation loss so far)
    bytes: int
    sha256: str


def write_atomic(path: Path, payload: bytes) -> None:
    """Temporary file, fsync, rename over the target, fsync the folder: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    state: dict[str, Any] = torch.load(path, map_location=map_location, weights_only=True)
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path.name}: not a checkpoint of format {FORMAT_VERSION}")
    return state


class CheckpointStore:
    """One search's checkpoint folder: saves, prunes to `keep_last`, and finds the newest good one."""

    def __init__(
        self,
        folder: Path,
        *,
        keep_last: int,
        on_change: Callable[[list[CheckpointInfo]], None] | None = None,
        retry_seconds: float = 0.0,
    ) -> None:
        self.folder = folder
        self.keep_last = keep_last
        self.on_change = on_change
        self.retry_seconds = retry_seconds  # a failed write is tried again (with backoff) for this long
        folder.mkdir(parents=True, exist_ok=True)

    def items(self) -> list[CheckpointInfo]:
        path = self.folder / MANIFEST
        if not path.exists():
            return []
        try:
            return [CheckpointInfo(**item) for item in json.loads(path.read_text())["items"]]
        except (ValueError, KeyError, TypeError):
            return []  # an unreadable manifest lists nothing; the files themselves are left alone

    def save(self, state: dict[str, Any], *, epoch: int, kind: str) -> CheckpointInfo:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        name = "best.pt" if kind == "best" else f"epoch-{epoch:04d}.pt"
        info = CheckpointInfo(name, epoch, kind, len(payload), hashlib.sha256(payload).hexdigest())
        before = self.items()
        others = [i for i in before if i.name != name]
        items = [*others, info]
        epochs = sorted((i for i in items if i.kind == "epoch"), key=lambda i: i.epoch)
        stale = {i.name for i in epochs[: max(0, len(epochs) - self.keep_last)]}
        items = sorted((i for i in items if i.name not in stale), key=lambda i: (i.epoch, i.kind))
        # The manifest never lists a file with other bytes than it says, whatever write fails: a file about to
        # be replaced with new bytes (best.pt) is first taken off the manifest, then written, then listed again
        # with the rest. Stale files go only after that.
        replacing = any(i.name == name and i.sha256 != info.sha256 for i in before)
        if replacing:
            self._write(MANIFEST, lambda: self._write_manifest(others))
            self._report(others)
        try:
            self._write(name, lambda: write_atomic(self.folder / name, payload))
        except CheckpointWriteError:
            if replacing:  # the old file is still whole: list it again if the disk lets us
                with contextlib.suppress(OSError):
                    self._write_manifest(before)
                    self._report(before)
            raise
        self._write(MANIFEST, lambda: self._write_manifest(items))
        for old in stale:
            (self.folder / old).unlink(missing_ok=True)
        self._report(items)
        return info

    def _report(self, items: list[CheckpointInfo]) -> None:
        if self.on_change is not None:
            self.on_change(items)

    def _write(self, name: str, write: Callable[[], None]) -> None:
        deadline = time.monotonic() + self.retry_seconds
        pause = 0.5
        while True:
            try:
                write()
                return
            except OSError as exc:
                if time.monotonic() + pause > deadline:
                    raise CheckpointWriteError(
                        exc.errno,
                        f"could not write {name} in the checkpoint folder: {exc.strerror or exc}; "
                        "the checkpoints written before it are intact",
                    ) from exc
                log.warning("checkpoint %s: %s; retrying in %.1f s", name, exc, pause)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)

    def _write_manifest(self, items: list[CheckpointInfo]) -> None:
        text = json.dumps({"items": [asdict(i) for i in items]}, indent=1)
        write_atomic(self.folder / MANIFEST, text.encode())

    def latest_valid(self, map_location: str | torch.device = "cpu") -> tuple[CheckpointInfo, dict[str, Any]] | None:
        """The newest resumable checkpoint whose bytes match the manifest and which loads; older ones
        are tried in turn when a newer one is missing, truncated or corrupted."""
        for info in sorted((i for i in self.items() if i.kind == "epoch"), key=lambda i: -i.epoch):
            path = self.folder / info.name
            if not path.is_file() or sha256_file(path) != info.sha256:
                continue
            try:
                return info, load_checkpoint(path, map_location)
            except Exception:
                continue
        return None
