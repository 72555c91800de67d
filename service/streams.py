"""One watcher per API process feeds every open stream: one poll for all watched jobs, one read of new epochs
per changed job, however many streams follow it. Streams wait for their job to change; they poll nothing."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import anyio
from fastapi.sse import ServerSentEvent

from .models import TERMINAL
from .telemetry import OPEN_STREAMS

log = logging.getLogger(__name__)

KEEP = 64  # newest epochs kept per watched job; a stream further behind reads the database itself
STREAM_PAGE = 500  # epochs a stream sends per database read of its own while it catches up
OWN_READS = 16  # streams' own database reads at once per process: the rest of the pool serves requests


Records = list[tuple[int, str]]  # (epoch, the epoch record as stored JSON text), oldest first


@dataclass(frozen=True)
class JobState:
    status: str
    epoch: int
    stop_reason: str | None
    error: str | None


@dataclass(frozen=True)
class Snapshot:
    """A job as the watcher last read it: its state and its newest epochs `(base, state.epoch]` as JSON text."""

    version: int
    read_at: float  # time.monotonic() when the read began: the snapshot is at least as new as that moment
    state: JobState | None  # None once the job is gone
    base: int
    records: tuple[tuple[int, str], ...]

    def after(self, epoch: int, *, newer_than: float) -> Records | None:
        """The records after `epoch`; None when this snapshot does not reach back that far, or may be older
        than what the caller read itself at `newer_than` (then it would go back in time)."""
        if self.state is None or epoch < self.base or self.read_at < newer_than:
            return None
        return [r for r in self.records if r[0] > epoch]


# Given {job id: newest epoch already read, or -1 for a job not read before}, the read returns each job's state
# and its epochs after that one, up to the state's epoch (none for a job not read before).
Read = Callable[[Mapping[str, int]], dict[str, tuple[JobState, Records]]]


class JobWatcher:
    """A stream notes its job's version before it looks, then waits for a newer one: a change committed after
    the look is always seen by a later poll, so nothing is missed."""

    def __init__(self, read: Read, *, interval: float) -> None:
        self.read = read
        self.interval = interval
        self.watching: Counter[str] = Counter()
        self.snapshots: dict[str, Snapshot] = {}
        self.changed = asyncio.Condition()
        self.task: asyncio.Task[None] | None = None
        self.own_reads = anyio.CapacityLimiter(OWN_READS)  # made in the app's event loop, like the rest

    @asynccontextmanager
    async def watch(self, job_id: str) -> AsyncIterator[None]:
        self.watching[job_id] += 1
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run())
        try:
            yield
        finally:
            self.watching[job_id] -= 1
            if self.watching[job_id] <= 0:
                del self.watching[job_id]
                self.snapshots.pop(job_id, None)

    def snapshot(self, job_id: str) -> Snapshot | None:
        return self.snapshots.get(job_id)

    def version(self, job_id: str) -> int:
        snap = self.snapshots.get(job_id)
        return snap.version if snap else 0

    async def wait(self, job_id: str, version: int, timeout: float) -> bool:
        """True once the job's version passes `version`; False after `timeout` seconds without a change."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.version(job_id) > version), timeout)
            except TimeoutError:
                return False
        return True

    async def _run(self) -> None:
        while self.watching:
            known = {job_id: self._newest(job_id) for job_id in self.watching}
            read_at = time.monotonic()
            try:
                found = await anyio.to_thread.run_sync(self.read, known)
            except Exception as exc:  # the database is away: streams keep waiting (and sending keep-alives)
                log.warning("stream watcher could not read job states: %s", exc)
            else:
                if self._update(known, found, read_at):
                    async with self.changed:
                        self.changed.notify_all()
            await asyncio.sleep(self.interval)

    def _newest(self, job_id: str) -> int:
        snap = self.snapshots.get(job_id)
        return -1 if snap is None or snap.state is None else snap.state.epoch

    def _update(self, known: Mapping[str, int], found: Mapping[str, tuple[JobState, Records]], read_at: float) -> bool:
        bumped = False
        for job_id in known:
            if job_id not in self.watching:
                continue  # the last stream left while the read ran
            old = self.snapshots.get(job_id)
            state, new = found.get(job_id, (None, []))
            if old is not None and old.state == state:
                continue
            records: tuple[tuple[int, str], ...] = ()
            if old is None or old.state is None or state is None:
                base = state.epoch if state else 0
            else:
                records = (*old.records, *new)[-KEEP:]
                base = records[0][0] - 1 if records else state.epoch
            self.snapshots[job_id] = Snapshot(self.version(job_id) + 1, read_at, state, base, records)
            bumped = True
        return bumped

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task


async def follow(
    job_id: str,
    after: int,
    *,
    watcher: JobWatcher,
    read: Callable[[int], tuple[JobState | None, Records]],
    keepalive: float,
) -> AsyncIterator[ServerSentEvent]:
    """A job's events from epoch `after` on: `epoch` (id = epoch, data = the stored record), `status` on each
    change, a keep-alive comment after `keepalive` seconds of quiet; ends after a terminal status or when the
    job is deleted. `read(after)` is the database read of a stream that is behind the watcher's window."""
    sent, last_status = after, None
    own_read_at = 0.0  # when this stream last read the database itself
    OPEN_STREAMS.inc()
    try:
        async with watcher.watch(job_id):
            while True:
                snapshot = watcher.snapshot(job_id)
                version = snapshot.version if snapshot else 0
                cached = snapshot.after(sent, newer_than=own_read_at) if snapshot else None
                if cached is not None and snapshot is not None:
                    state, rows = snapshot.state, cached  # what the watcher read once for every stream of the job
                else:  # behind the watcher's window, or ahead of its last read: read the database itself
                    state, rows = await anyio.to_thread.run_sync(read, sent, limiter=watcher.own_reads)
                    own_read_at = time.monotonic()
                if state is None:
                    return  # deleted while streaming
                for epoch, text in rows:
                    yield ServerSentEvent(event="epoch", id=str(epoch), raw_data=text)
                    sent = epoch
                if state.status != last_status:
                    data = {"status": state.status, "stop_reason": state.stop_reason, "error": state.error}
                    yield ServerSentEvent(event="status", data=data | {"epoch": state.epoch})
                    last_status = state.status
                if len(rows) == STREAM_PAGE:
                    continue  # more to catch up on before waiting
                if state.status in TERMINAL:
                    return
                while not await watcher.wait(job_id, version, keepalive):
                    yield ServerSentEvent(comment="keep-alive")
    finally:
        OPEN_STREAMS.dec()
