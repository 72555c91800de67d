"""One database poll for every open stream: streams wait for their job to change instead of polling alone."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio

log = logging.getLogger(__name__)

State = tuple[Any, ...] | None  # what a stream's news depends on (status, epoch, ...); None once the job is gone


class JobWatcher:
    """Reads the state of every watched job with one query per `interval`, and bumps a job's version when
    its state changes. A stream notes the version before it reads the database, then waits for a newer one:
    a change committed after its read is always seen by a later poll, so nothing is missed."""

    def __init__(self, read_states: Callable[[Sequence[str]], dict[str, State]], *, interval: float) -> None:
        self.read_states = read_states
        self.interval = interval
        self.watching: Counter[str] = Counter()
        self.states: dict[str, State] = {}
        self.versions: dict[str, int] = {}
        self.changed = asyncio.Condition()
        self.task: asyncio.Task[None] | None = None

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
                self.states.pop(job_id, None)
                self.versions.pop(job_id, None)

    def version(self, job_id: str) -> int:
        return self.versions.get(job_id, 0)

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
            ids = list(self.watching)
            try:
                states = await anyio.to_thread.run_sync(self.read_states, ids)
            except Exception as exc:  # the database is away: streams keep waiting (and sending keep-alives)
                log.warning("stream watcher could not read job states: %s", exc)
            else:
                bumped = False
                for job_id in ids:
                    state = states.get(job_id)
                    if job_id in self.watching and (job_id not in self.states or self.states[job_id] != state):
                        self.states[job_id] = state
                        self.versions[job_id] = self.version(job_id) + 1
                        bumped = True
                if bumped:
                    async with self.changed:
                        self.changed.notify_all()
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task
