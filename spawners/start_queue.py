"""A line for session starts: at most N under way in a hub, the rest wait their turn.

JupyterHub's own guard, ``concurrent_spawn_limit``, refuses the spawn past its limit (HTTP
429, "Too many users trying to log in right now"): a participant of a class that presses
Start with everyone else gets an error page. Here the spawn is accepted and waits in order,
and its progress says how many sessions are starting before it. (Keep the hub's
``concurrent_spawn_limit`` above the class size, as the hard backstop.)
"""

from __future__ import annotations

import asyncio
import weakref


class StartQueue:
    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self._waiting: list[asyncio.Future] = []

    def ahead_of(self, ticket: asyncio.Future | None) -> int:
        """Sessions starting or waiting before this ticket (0 once it holds a slot)."""
        if ticket is None or ticket.done():
            return 0
        try:
            return self.active + self._waiting.index(ticket)
        except ValueError:
            return 0

    def enter(self) -> asyncio.Future:
        """A ticket: done when its start may go ahead (at once while slots are free)."""
        ticket = asyncio.get_running_loop().create_future()
        if self.limit <= 0 or (self.active < self.limit and not self._waiting):
            self.active += 1
            ticket.set_result(None)
        else:
            self._waiting.append(ticket)
        return ticket

    def leave(self, ticket: asyncio.Future) -> None:
        """The ticket's start ended (ready, failed or cancelled): its slot goes to the next."""
        if ticket in self._waiting:  # it never got a slot
            self._waiting.remove(ticket)
            ticket.cancel()
            return
        if not ticket.done() or ticket.cancelled():
            return
        self.active -= 1
        while self._waiting and self.active < max(self.limit, 1):
            nxt = self._waiting.pop(0)
            if not nxt.done():
                self.active += 1
                nxt.set_result(None)


_queues: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per event loop


def hub_queue(limit: int) -> StartQueue:
    """The hub's one queue (per event loop); its limit follows the configuration."""
    queue = _queues.get(asyncio.get_running_loop())
    if queue is None:
        queue = _queues[asyncio.get_running_loop()] = StartQueue(limit)
    queue.limit = limit
    return queue
