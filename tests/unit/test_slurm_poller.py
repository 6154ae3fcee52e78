"""The hub's shared squeue and its line for starts, without Slurm (tests/test_class_start.py
checks both against a real Slurm and a real hub)."""

from __future__ import annotations

import asyncio
import time

import pytest
from batchspawner.batchspawner import JobStatus

from aifab import slurm
from aifab.spawners.slurm_poller import SqueuePoller, Unknown, parse, shared_poller
from aifab.spawners.start_queue import StartQueue
from tests.unit.test_spawner_states import GONE, NO_CONTROLLER, TIMED_OUT, Script, make_spawner


class Squeue(Script):
    """squeue as the shared poller meets it: it answers for the jobs asked that it knows."""

    def __init__(self, *rows: str):
        super().__init__()
        self.known = {r.split("|")[0]: r for r in rows}

    async def __call__(self, argv, *, timeout, stdin=None, env=None, prefix=()):
        self.steps.append(("squeue", "\n".join(
            self.known[j] for j in argv[2].removeprefix("--jobs=").split(",")
            if j in self.known)))
        return await super().__call__(argv, timeout=timeout, stdin=stdin, env=env,
                                      prefix=prefix)


def test_parse_reads_the_format_and_skips_what_is_not_a_job_line():
    jobs = parse("12|PENDING|Resources|n/a|2026-12-03T14:00:00\n13|RUNNING|None|nid001|N/A\n"
                 "garbage\n\n")
    assert set(jobs) == {"12", "13"}
    assert jobs["12"].estimated_start == "2026-12-03T14:00:00"
    assert jobs["13"].node == "nid001" and jobs["13"].estimated_start == ""


def test_twenty_sessions_polling_together_share_one_squeue(monkeypatch):
    rows = [f"{100 + i}|{'RUNNING' if i % 2 else 'PENDING'}|None|n{i}|N/A" for i in range(20)]
    script = Squeue(*rows)
    spawners = [make_spawner(script, monkeypatch, shared_poll=True, name=f"u{i}")
                for i in range(20)]
    for i, sp in enumerate(spawners):
        sp.load_state({"job_id": str(100 + i)})

    async def main():
        return await asyncio.gather(*(sp.query_job_status() for sp in spawners))

    statuses = asyncio.run(main())
    assert statuses == [JobStatus.RUNNING if i % 2 else JobStatus.PENDING for i in range(20)]
    squeues = [c for c in script.calls if c.argv[0] == "squeue"]
    assert len(squeues) == 1  # one call for all twenty
    asked = ",".join(sorted(str(100 + i) for i in range(20)))
    assert squeues[0].argv == ["squeue", "-h", f"--jobs={asked}", "-o", "%i|%T|%r|%B|%S"]
    assert squeues[0].prefix == []  # as the hub, not sudo -u one of the users
    assert spawners[3].job_status == "RUNNING None n3" and spawners[3].state_gethost() == "n3"


def test_an_answer_young_enough_is_reused_and_rounds_keep_their_gap(monkeypatch):
    calls = []

    async def arun(argv, **kw):
        calls.append(asyncio.get_running_loop().time())
        return "7|RUNNING|None|n1|N/A"

    async def main():
        poller = SqueuePoller(min_gap=0.05)
        for _ in range(5):  # the hub's periodic poll: an answer 30 s old is good enough
            assert (await poller.line("7", max_age=30)).state == "RUNNING"
        for _ in range(4):  # a start-up wants a fresh one each time: one round per gap
            await poller.line("7", max_age=0)
        return poller

    monkeypatch.setattr(slurm, "arun", arun)
    poller = asyncio.run(main())
    assert len(calls) == 5 and poller.rounds == 5
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert all(g >= 0.05 * 0.75 - 0.005 for g in gaps), gaps


@pytest.mark.parametrize("trouble", [TIMED_OUT, NO_CONTROLLER, slurm.SlurmError(["squeue"], 127)])
def test_a_controller_that_does_not_answer_is_unknown_for_all_and_backs_off(monkeypatch,
                                                                             trouble):
    answers = [trouble] * 3 + ["7|RUNNING|None|n1|N/A"]
    gaps_seen = []

    async def arun(argv, **kw):
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def main():
        poller = SqueuePoller(min_gap=0.01, max_backoff=0.05)
        for _ in range(3):
            await asyncio.sleep(max(0, poller._next_due - time.monotonic()))  # the next try
            with pytest.raises(Unknown):
                await poller.line("7", max_age=0)
            gaps_seen.append(min(poller.max_backoff, poller.min_gap * 2 ** poller.failures))
        assert poller.failures == 3
        await asyncio.sleep(max(0, poller._next_due - time.monotonic()))
        line = await poller.line("7", max_age=0)  # seen again when it answers
        assert line.state == "RUNNING" and poller.failures == 0 and not poller.trouble

    monkeypatch.setattr(slurm, "arun", arun)
    asyncio.run(main())
    assert gaps_seen == [0.02, 0.04, 0.05]  # doubling, capped


def test_spawners_keep_their_session_while_slurm_is_down(monkeypatch):
    script = Script(("squeue", NO_CONTROLLER), ("squeue", NO_CONTROLLER))
    sp = make_spawner(script, monkeypatch, shared_poll=True)
    sp.load_state({"job_id": "42"})
    assert asyncio.run(sp.poll()) is None  # not declared dead
    assert sp.job_id == "42"


@pytest.mark.parametrize("direct, polled", [(GONE, 1), ("", 1), ("RUNNING None n1", None)])
def test_a_job_missing_from_the_answer_is_checked_once_by_its_id(monkeypatch, direct, polled):
    script = Script(("squeue", ""), ("squeue", direct))
    sp = make_spawner(script, monkeypatch, shared_poll=True)
    sp.load_state({"job_id": "42"})
    assert asyncio.run(sp.poll()) == polled
    assert [c.argv[1:] for c in script.calls] == [
        ["-h", "--jobs=42", "-o", "%i|%T|%r|%B|%S"], ["-h", "-j", "42", "-o", "%T %r %B"]]
    assert sp.job_id == ("" if polled else "42")


def test_all_jobs_unknown_to_slurm_is_an_empty_answer_not_trouble(monkeypatch):
    script = Script(("squeue", GONE), ("squeue", GONE))
    sp = make_spawner(script, monkeypatch, shared_poll=True)
    sp.load_state({"job_id": "42"})
    assert asyncio.run(sp.poll()) == 1 and sp.job_id == ""


def test_the_queue_message_has_slurms_estimate_and_the_hubs_waiting_sessions(monkeypatch):
    answer = ("40|PENDING|Priority|n/a|N/A\n41|RUNNING|None|n1|N/A\n"
              "42|PENDING|Resources|n/a|2026-12-03T14:05:00\n43|PENDING|Priority|n/a|N/A")
    script = Script(("squeue", answer))
    sp = make_spawner(script, monkeypatch, shared_poll=True)
    sp.load_state({"job_id": "42"})

    async def main():
        for job in ("40", "41", "43"):
            shared_poller(prefix=[], min_gap=0.001).watch(job)
        assert await sp.query_job_status() == JobStatus.PENDING
        return sp.queue_message()

    assert asyncio.run(main()) == ("Job 42 queued (Resources); Slurm expects it to start at "
                                   "2026-12-03 14:05:00; 1 session of this hub is waiting "
                                   "before yours")


# ---------------------------------------------------------------- the line for starts
def test_the_start_line_lets_n_through_and_tells_the_others_their_place():
    async def main():
        q = StartQueue(2)
        tickets = [q.enter() for _ in range(5)]
        assert [t.done() for t in tickets] == [True, True, False, False, False]
        assert [q.ahead_of(t) for t in tickets] == [0, 0, 2, 3, 4]
        q.leave(tickets[3])  # gave up waiting (the hub's timeout, the user's cancel)
        assert tickets[3].cancelled() and q.ahead_of(tickets[4]) == 3
        q.leave(tickets[0])  # a start ended: the first in line goes
        assert tickets[2].done() and q.active == 2 and q.ahead_of(tickets[4]) == 2
        q.leave(tickets[1])
        q.leave(tickets[2])
        assert tickets[4].done() and q.active == 1
        q.leave(tickets[4])
        assert q.active == 0

    asyncio.run(main())


def test_no_limit_lets_everyone_through():
    async def main():
        q = StartQueue(0)
        tickets = [q.enter() for _ in range(50)]
        assert all(t.done() for t in tickets)
        for t in tickets:
            q.leave(t)
        assert q.active == 0

    asyncio.run(main())


def test_a_job_watched_while_a_round_runs_waits_for_the_next_not_a_direct_check(monkeypatch):
    asked = []

    async def arun(argv, **kw):
        asked.append(argv[2])
        await asyncio.sleep(0.02)  # a round under way
        return "\n".join(f"{j}|RUNNING|None|n1|N/A"
                         for j in argv[2].removeprefix("--jobs=").split(","))

    async def main():
        poller = SqueuePoller(min_gap=0.01)
        first = asyncio.ensure_future(poller.line("1", max_age=0))
        await asyncio.sleep(0.005)  # job 2 arrives while job 1's round runs
        second = await poller.line("2", max_age=0)
        return await first, second

    monkeypatch.setattr(slurm, "arun", arun)
    first, second = asyncio.run(main())
    assert (first.job_id, second.job_id) == ("1", "2")
    assert asked == ["--jobs=1", "--jobs=1,2"]  # no squeue -j of its own


MUNGE_DOWN = slurm.SlurmError(["squeue"], 1, "", "slurm_load_jobs error: Protocol "
                                                 "authentication error")
NO_FORK = slurm.SlurmError(["squeue"], 126, "", "[Errno 24] Too many open files")


@pytest.mark.parametrize("trouble", [MUNGE_DOWN, NO_FORK, TIMED_OUT, NO_CONTROLLER])
def test_no_failure_but_slurms_own_answer_declares_a_job_gone(monkeypatch, trouble):
    """A hub that came up before munged, or ran out of file descriptors, keeps its class."""
    script = Script(("squeue", trouble), ("squeue", trouble))
    sp = make_spawner(script, monkeypatch, shared_poll=True)
    sp.load_state({"job_id": "42"})
    assert asyncio.run(sp.poll()) is None and sp.job_id == "42"
    direct = make_spawner(Script(("squeue", trouble)), monkeypatch)  # batchspawner's way too
    direct.load_state({"job_id": "43"})
    assert asyncio.run(direct.poll()) is None and direct.job_id == "43"
    assert "--jobs" not in direct.job_status  # a short line in the user's state


def test_the_backoff_counts_from_the_end_of_a_failed_round_and_callers_do_not_wait_it_out(
        monkeypatch):
    ends, starts = [], []

    async def slow_failure(argv, **kw):
        starts.append(time.monotonic())
        await asyncio.sleep(0.05)  # a controller that makes squeue wait for its timeout
        ends.append(time.monotonic())
        raise NO_CONTROLLER

    async def main():
        poller = SqueuePoller(min_gap=0.04, max_backoff=1.0)
        with pytest.raises(Unknown):
            await poller.line("7", max_age=0)  # the first round fails (after 0.05 s)
        t0 = time.monotonic()
        with pytest.raises(Unknown):  # the next try is not due: told at once, not after it
            await poller.line("7", max_age=0)
        assert time.monotonic() - t0 < 0.02
        await poller._round  # the try that the call above started in the background
        return poller

    monkeypatch.setattr(slurm, "arun", slow_failure)
    poller = asyncio.run(main())
    assert poller.failures == 2
    idle = starts[1] - ends[0]  # between the end of one failure and the next try
    assert idle >= 0.04 * 2 * 0.75 - 0.005, idle  # the doubled gap, after the failure
