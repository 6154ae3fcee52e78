"""REST API of the session's Slurm allocations, behind the Jupyter server's authentication:

    GET    /aifab/api/allocations          the session's allocations
    POST   /aifab/api/allocations          request one ({profile, nodes, gpus, cpus,
                                           memory_gb, walltime, name}); 201, or 400 naming
                                           the field and what the profile allows
    GET    /aifab/api/allocations/NAME     one: state, Slurm's reason, estimate, position
    DELETE /aifab/api/allocations/NAME     release it (scancel)
"""

from __future__ import annotations

import json

from tornado import web

from aifab.api import ApiError
from aifab.names import SERVICE_NAME_ROUTE

from .allocations import AllocationManager
from .handlers import AifabAPIHandler


class _Base(AifabAPIHandler):
    @property
    def allocations(self) -> AllocationManager:
        return self.settings["aifab_allocations"]


class AllocationsHandler(_Base):
    @web.authenticated
    def get(self) -> None:
        self.finish(json.dumps({
            "allocations": [a.public() for a in self.allocations.allocations.values()],
            "allowed": [a.describe() for a in self.allocations.allowances]}))

    @web.authenticated
    async def post(self) -> None:
        spec = self.json_body()
        try:
            alloc = await self.allocations.create(spec)
        except ApiError as exc:
            self.fail(exc)
        self.set_status(201)
        self.finish(json.dumps(alloc.public()))


class AllocationHandler(_Base):
    @web.authenticated
    def get(self, name: str) -> None:
        try:
            self.finish(json.dumps(self.allocations.get(name).public()))
        except ApiError as exc:
            self.fail(exc)

    @web.authenticated
    async def delete(self, name: str) -> None:
        try:
            alloc = await self.allocations.release(name)
        except ApiError as exc:
            self.fail(exc)
        self.finish(json.dumps(alloc.public()))


def handlers() -> list[tuple]:
    name = f"(?P<name>{SERVICE_NAME_ROUTE})"
    return [(r"/aifab/api/allocations", AllocationsHandler),
            (rf"/aifab/api/allocations/{name}", AllocationHandler)]
