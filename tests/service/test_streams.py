"""The stream watcher on its own: one read per interval for all streams, and the epochs it keeps for them."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from service.streams import KEEP, JobState, JobWatcher, Snapshot


class FakeJobs:
    """Jobs whose epochs grow when told; counts the watcher's reads and records what it asked for."""

    def __init__(self) -> None:
        self.epochs = {"a": 0, "b": 0}
        self.status = "running"
        self.reads: list[dict[str, int]] = []

    def read(self, known: Mapping[str, int]) -> dict[str, tuple[JobState, list[tuple[int, str]]]]:
        self.reads.append(dict(known))
        out = {}
        for job_id, k in known.items():
            top = self.epochs[job_id]
            new = [(e, f'{{"epoch": {e}}}') for e in range(k + 1, top + 1)] if k >= 0 else []
            out[job_id] = (JobState(self.status, top, None, None), new)
        return out


def test_snapshot_serves_only_what_it_covers_and_never_goes_back_in_time() -> None:
    snap = Snapshot(
        3, read_at=10.0, state=JobState("running", 5, None, None), base=2, records=((3, "c"), (4, "d"), (5, "e"))
    )
    assert snap.after(2, newer_than=0.0) == [(3, "c"), (4, "d"), (5, "e")]
    assert snap.after(4, newer_than=9.0) == [(5, "e")]
    assert snap.after(5, newer_than=0.0) == []
    assert snap.after(1, newer_than=0.0) is None  # epoch 2 is not kept: read the database
    assert snap.after(4, newer_than=11.0) is None  # the caller read the database after this snapshot's read


def test_one_read_per_interval_for_all_streams_and_contiguous_kept_epochs() -> None:
    jobs = FakeJobs()

    async def scenario() -> None:
        watcher = JobWatcher(jobs.read, interval=0.01)

        async def stream(job_id: str, until: int) -> None:
            async with watcher.watch(job_id):
                while True:
                    version = watcher.version(job_id)
                    snap = watcher.snapshot(job_id)
                    if snap and snap.state and snap.state.epoch >= until:
                        return
                    assert await watcher.wait(job_id, version, timeout=1)  # woken by a change, not a timeout

        streams = [asyncio.create_task(stream("a", KEEP + 30)) for _ in range(50)]
        streams.append(asyncio.create_task(stream("b", 3)))
        await asyncio.sleep(0.05)
        for _ in range(KEEP + 30):
            jobs.epochs["a"] += 1
            jobs.epochs["b"] = min(jobs.epochs["b"] + 1, 3)
            await asyncio.sleep(0.012)
        await asyncio.wait_for(asyncio.gather(*streams), 5)
        assert not watcher.watching and not watcher.snapshots  # the last stream out forgets the job
        await watcher.close()

    asyncio.run(scenario())
    # 51 streams for about 1.2 s at a 0.01 s interval: about one read per interval (streams polling on their
    # own would have made some 6000), each covering every watched job.
    assert 20 < len(jobs.reads) < 250
    assert any(set(r) == {"a", "b"} for r in jobs.reads)
    assert jobs.reads[0] == {"a": -1, "b": -1}  # a job seen for the first time: no history is fetched
    assert max(r.get("a", -1) for r in jobs.reads) >= KEEP  # later reads ask only for what is new


def test_kept_epochs_are_the_newest_keep_and_contiguous() -> None:
    jobs = FakeJobs()

    async def scenario() -> Snapshot | None:
        watcher = JobWatcher(jobs.read, interval=0.005)
        async with watcher.watch("a"):
            await asyncio.sleep(0.03)  # first read: state only
            for _ in range(KEEP + 10):
                jobs.epochs["a"] += 1
                await asyncio.sleep(0.008)
            jobs.status = "succeeded"
            await asyncio.sleep(0.05)
            snap = watcher.snapshot("a")
        await watcher.close()
        return snap

    snap = asyncio.run(scenario())
    assert snap is not None and snap.state is not None
    assert snap.state == JobState("succeeded", KEEP + 10, None, None)
    epochs = [e for e, _ in snap.records]
    assert epochs == list(range(KEEP + 10 - KEEP + 1, KEEP + 11)) and snap.base == epochs[0] - 1
    assert snap.after(snap.base, newer_than=0.0) == list(snap.records)
