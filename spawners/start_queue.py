"""A line for session starts: at most N under way in a hub, the rest wait their turn.

JupyterHub's own guard, ``concurrent_spawn_limit``, refuses the spawn past its limit (HTTP
429, "Too many users trying to log in right now"): a participant of a class that presses
Start with everyone else gets an error page. Here the spawn is accepted and waits in order,
and its progress says how many sessions are starting before it. (Keep the hub's
``concurrent_spawn_limit`` above the class size, as the hard backstop.) A Slurm session
leaves the line once its job waits in Slurm's queue: from then on Slurm, not the hub, sets
the pace, and a full GPU partition must not hold up everyone else's start.
"""

from __future__ import annotations

import asyncio
import weakref


class StartQueue:
    def __init__(self, limit: int):
        self.limit = limit
        self._holding: set[asyncio.Future] = set()  # tickets with a slot
        self._waiting: list[asyncio.Future] = []

    @property
    def active(self) -> int:
        return len(self._holding)

    def ahead_of(self, ticket: asyncio.Future | None) -> int:
        """Sessions starting or waiting before this ticket (0 once it holds a slot)."""
        if ticket is None or ticket not in self._waiting:
            return 0
        return self.active + self._waiting.index(ticket)

    def enter(self) -> asyncio.Future:
        """A ticket: done when its start may go ahead (at once while slots are free)."""
        ticket = asyncio.get_running_loop().create_future()
        if self.limit <= 0 or (self.active < self.limit and not self._waiting):
            self._grant(ticket)
        else:
            self._waiting.append(ticket)
        return ticket

    def leave(self, ticket: asyncio.Future) -> None:
        """The ticket's start ended (ready, failed, cancelled) or no longer needs the hub (its
        job waits in Slurm's queue): its slot goes to the next. Leaving twice is harmless."""
        if ticket in self._waiting:  # it never got a slot
            self._waiting.remove(ticket)
            ticket.cancel()
            return
        if ticket not in self._holding:
            return
        self._holding.discard(ticket)
        while self._waiting and (self.limit <= 0 or self.active < self.limit):
            nxt = self._waiting.pop(0)
            if not nxt.done():
                self._grant(nxt)

    def _grant(self, ticket: asyncio.Future) -> None:
        self._holding.add(ticket)
        ticket.set_result(None)


_queues: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per event loop


def hub_queue(limit: int) -> StartQueue:
    """The hub's one queue (per event loop); its limit follows the configuration."""
    queue = _queues.get(asyncio.get_running_loop())
    if queue is None:
        queue = _queues[asyncio.get_running_loop()] = StartQueue(limit)
    queue.limit = limit
    return queue
