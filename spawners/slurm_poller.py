"""One ``squeue`` for all of a hub's Slurm sessions.

batchspawner's model has every session poll ``squeue -j ITS_JOB`` on its own: a class of 100
is 100 ``squeue`` calls per poll interval, the load that makes HPC admins forbid hub-driven
sessions on a busy ``slurmctld``. Here all the hub's sessions share one poller: a session
asks for its job's line and gets it from the last answer if that is recent enough for the
question (``max_age``), else it waits for the next *round*, one ``squeue --jobs=ID,ID,...``
for every job the hub watches. Rounds are at most one per ``min_gap`` seconds (with jitter),
however many sessions ask; when ``slurmctld`` is slow or down they back off (doubling, up to
``max_backoff``) and every session hears "unknown" — never "gone" — until it answers again.

A job missing from an answer is not declared gone here: the spawner checks it once by its
own job id (``squeue -j``), which tells a finished job from one the answer missed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from aifab import slurm

log = logging.getLogger("aifab.slurm_poller")

# job id, long state, reason, batch host, expected start: "|" never occurs in any of them
SQUEUE_FORMAT = "%i|%T|%r|%B|%S"
# squeue's answer when none of the jobs asked about is known (any more): the only error that
# is an answer; every other failure is trouble, and no job is declared gone for it
INVALID_JOB = re.compile(r"slurm_load_jobs error: Invalid job id specified")
MAX_JOBS_PER_CALL = 1000


@dataclass(frozen=True)
class JobLine:
    """One job in an answer, as squeue printed it."""

    job_id: str
    state: str  # PENDING, RUNNING, ...
    reason: str  # Resources, Priority, None, ...
    node: str  # the batch host; "n/a" or "(null)" while pending
    start: str  # Slurm's expected start (ISO time, or N/A / Unknown)

    @property
    def estimated_start(self) -> str:
        """Slurm's estimate for a pending job, '' when it has none."""
        return self.start if re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", self.start) else ""


class Unknown(Exception):
    """The controller did not answer (or squeue timed out): nothing is known of any job."""


def _short(exc: slurm.SlurmError) -> str:
    """What went wrong, in a line without the job list (it lands in every user's state)."""
    if exc.timed_out:
        return "squeue timed out"
    text = (exc.stderr or exc.stdout).strip().splitlines()
    return f"squeue exited {exc.returncode}: {text[-1][:200] if text else 'no output'}"


def parse(out: str) -> dict[str, JobLine]:
    jobs = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 5 and parts[0]:
            # an array or het job prints 123_4 / 123+0: the session's own jobs are plain
            jobs[parts[0]] = JobLine(*parts)
    return jobs


class SqueuePoller:
    """All the hub's watched jobs, one ``squeue`` per round; see the module's docstring."""

    def __init__(self, *, min_gap: float = 1.0, max_backoff: float = 60.0,
                 timeout: float = 30.0, prefix: Sequence[str] = (),
                 logger: logging.Logger | None = None):
        self.log = logger or log
        self.min_gap = min_gap
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.prefix = list(prefix)
        self.jobs: set[str] = set()
        self.answer: dict[str, JobLine] = {}
        self.asked: frozenset[str] = frozenset()  # the jobs the last good answer covered
        self.answered_at = float("-inf")  # monotonic time of the last good answer
        self.trouble = ""  # why the last round failed; "" after a good one
        self.failures = 0  # rounds failed in a row
        self.rounds = 0
        self._next_due = float("-inf")  # when the next round may run
        self._round: asyncio.Task | None = None

    # ------------------------------------------------------------ what sessions call
    def watch(self, job_id: str) -> None:
        self.jobs.add(job_id)

    def forget(self, job_id: str) -> None:
        self.jobs.discard(job_id)
        self.answer.pop(job_id, None)

    async def line(self, job_id: str, max_age: float) -> JobLine | None:
        """The job's line in an answer at most ``max_age`` seconds old; None if that answer
        does not list it. Raises :class:`Unknown` while the controller does not answer."""
        self.watch(job_id)
        if self.trouble and time.monotonic() < self._next_due:
            # Slurm is in trouble and the next try is not due: say so at once (a hub page
            # or a stop must not wait out the backoff), and let that try run meanwhile
            self._start_round()
            raise Unknown(self.trouble)
        # a round already under way when this job was first watched did not ask for it:
        # wait for the next one (at most two rounds in all)
        for _ in range(2):
            if self._fresh(job_id, max_age):
                break
            await self._next_round()
            if self.trouble:
                raise Unknown(self.trouble)
            if job_id in self.asked:
                break
        if self.trouble:
            raise Unknown(self.trouble)
        return self.answer.get(job_id)

    def pending_before(self, job_id: str) -> int | None:
        """How many pending jobs of the last answer were submitted before this one (job ids
        grow with submission): the session's place among the hub's waiting sessions."""
        mine = self.answer.get(job_id)
        if mine is None or mine.state != "PENDING" or not job_id.isdigit():
            return None
        return sum(1 for j in self.answer.values()
                   if j.state == "PENDING" and j.job_id.isdigit() and int(j.job_id) < int(job_id))

    # ------------------------------------------------------------ rounds
    def _fresh(self, job_id: str, max_age: float) -> bool:
        return (not self.trouble and job_id in self.asked
                and time.monotonic() - self.answered_at <= max_age)

    def _start_round(self) -> asyncio.Task:
        # everyone who asks while a round is due or under way waits for that same round
        if self._round is None or self._round.done():
            self._round = asyncio.ensure_future(self._run_round())
        return self._round

    async def _next_round(self) -> None:
        await asyncio.shield(self._start_round())

    def _gap(self) -> float:
        """The least time between two rounds: min_gap, doubled per failed round (up to
        max_backoff), with +-25% jitter so that hubs and retries do not align."""
        gap = min(self.max_backoff, self.min_gap * 2 ** self.failures)
        return gap * random.uniform(0.75, 1.25)

    async def _run_round(self) -> None:
        wait = self._next_due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        jobs = sorted(self.jobs)
        if not jobs:
            return
        self.rounds += 1
        try:
            answer = {}
            # one argument per chunk: a class of thousands stays far below the argv limit
            for i in range(0, len(jobs), MAX_JOBS_PER_CALL):
                chunk = jobs[i:i + MAX_JOBS_PER_CALL]
                argv = ["squeue", "-h", f"--jobs={','.join(chunk)}", "-o", SQUEUE_FORMAT]
                answer.update(parse(await self._squeue(argv)))
        except slurm.SlurmError as exc:
            # only an answer is an answer: a controller that is down, munge that is not up,
            # a hub out of file descriptors say nothing about any job
            self.failures += 1
            self.trouble = _short(exc)
            self.log.warning("squeue for %d session job(s) failed (%s); next try in about "
                             "%.0f s", len(jobs), self.trouble,
                             min(self.max_backoff, self.min_gap * 2 ** self.failures))
        else:
            if self.failures:
                self.log.info("squeue answers again after %d failed round(s)", self.failures)
            self._answered(answer, jobs)
        finally:
            # the gap counts from the end of a round: a command that waits out its timeout
            # must not eat the backoff
            self._next_due = time.monotonic() + self._gap()

    async def _squeue(self, argv: list[str]) -> str:
        try:
            return await slurm.arun(argv, timeout=self.timeout, prefix=self.prefix)
        except slurm.SlurmError as exc:
            if exc.returncode == 1 and INVALID_JOB.search(exc.stderr):
                return ""  # none of these jobs is known any more: an answer
            raise

    def _answered(self, answer: dict[str, JobLine], asked: list[str]) -> None:
        self.answer, self.asked = answer, frozenset(asked)
        self.answered_at = time.monotonic()
        self.trouble, self.failures = "", 0


# per event loop (a test runs many), and per identity the shared squeue runs as
_pollers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_poller(*, prefix: Sequence[str] = (), min_gap: float = 1.0,
                  max_backoff: float = 60.0, timeout: float = 30.0,
                  logger: logging.Logger | None = None) -> SqueuePoller:
    """The hub's one poller for this identity (``prefix``) and event loop; the first
    caller's settings and logger (the hub's) make it."""
    of_loop = _pollers.setdefault(asyncio.get_running_loop(), {})
    poller = of_loop.get(tuple(prefix))
    if poller is None:
        poller = of_loop[tuple(prefix)] = SqueuePoller(
            prefix=prefix, min_gap=min_gap, max_backoff=max_backoff, timeout=timeout,
            logger=logger)
    return poller
