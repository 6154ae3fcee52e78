"""The allocation manager's state machine through a scripted Slurm (tests/test_allocations.py
checks it against the real one)."""

from __future__ import annotations

import asyncio
import logging

from aifab import slurm
from aifab.extension.allocations import Allocation, AllocationManager

LOG = logging.getLogger("test")
NO_CONTROLLER = slurm.SlurmError(["scancel"], 1, "", "scancel: error: Unable to contact slurm "
                                                    "controller (connect failure)")
REQUEST = {"name": "gpu", "profile": "gh200", "nodes": 1, "gpus": 1, "cpus": 2,
           "memory_gb": 4, "walltime": "00:10:00", "partition": "gh200"}


def manager(tmp_path, monkeypatch, answer) -> AllocationManager:
    async def arun(argv, **kw):
        result = answer(argv)
        if isinstance(result, BaseException):
            raise result
        return result

    monkeypatch.setattr(slurm, "arun", arun)
    m = AllocationManager(tmp_path, "key", [], LOG, idle_timeout=0)
    m.allocations["gpu"] = Allocation(name="gpu", job_id="7", request=REQUEST, state="running")
    return m


def test_a_failed_scancel_keeps_the_allocation_watched_and_is_retried(tmp_path, monkeypatch):
    calls = []

    def answer(argv):
        calls.append(argv[0])
        if argv[0] == "scancel":
            return NO_CONTROLLER if calls.count("scancel") == 1 else ""
        return "7|RUNNING|None|n1|N/A|gh200|1" if calls.count("scancel") < 2 else ""

    m = manager(tmp_path, monkeypatch, answer)

    async def main():
        alloc = await m.release("gpu")
        assert alloc.state == "releasing" and alloc.live  # not "released": it still runs
        await m.refresh()  # the next round tries again, and Slurm takes it
        assert alloc.state == "released"
        await m.refresh()
        assert alloc.state == "released"

    asyncio.run(main())
    assert calls.count("scancel") == 2


def test_a_release_while_squeue_runs_stands(tmp_path, monkeypatch):
    def answer(argv):
        return "7|RUNNING|None|n1|N/A|gh200|1" if argv[0] == "squeue" else ""

    m = manager(tmp_path, monkeypatch, answer)
    real = slurm.arun

    async def slow_squeue(argv, **kw):
        if argv[0] == "squeue":
            await asyncio.sleep(0.05)  # the release happens meanwhile
        return await real(argv, **kw)

    monkeypatch.setattr(slurm, "arun", slow_squeue)

    async def main():
        refresh = asyncio.ensure_future(m.refresh())
        await asyncio.sleep(0.01)
        await m.release("gpu")
        await refresh
        return m.allocations["gpu"].state

    assert asyncio.run(main()) == "released"


def test_requeued_is_watched_not_ended_and_odd_job_ids_do_not_stop_the_round(tmp_path,
                                                                             monkeypatch):
    answers = {"squeue-jobs": "7|REQUEUED|BeginTime|(null)|N/A|gh200|1"}

    def answer(argv):
        if "-t" in argv:  # the partition's pending jobs, with an array and a het job
            return "123_4|100\n99+0|50\n7|10\nbad|x"
        return answers["squeue-jobs"]

    m = manager(tmp_path, monkeypatch, answer)
    asyncio.run(m.refresh())
    assert m.allocations["gpu"].state == "running"  # as it was: still Slurm's, watched
    answers["squeue-jobs"] = "7|PENDING|Priority|(null)|N/A|gh200|10"
    asyncio.run(m.refresh())
    alloc = m.allocations["gpu"]
    assert (alloc.state, alloc.reason, alloc.position) == ("queued", "Priority", 3)
