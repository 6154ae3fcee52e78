"""Runs on each node of a run's multi-node step: ``python -m aifab.extension.node_rank
PROGRAM ARGS...`` runs PROGRAM (torchrun) with ``PET_NODE_RANK`` set to Slurm's
``SLURM_NODEID`` (this node's place in the step, 0 on the first node).

torchrun's static rendezvous needs each node's rank, and srun starts the same command line on
every node: only Slurm, on the node, knows which one it is. torchrun reads ``--node-rank``
from ``PET_NODE_RANK`` when the flag is not given. (The static rendezvous, not torch's c10d
one: c10d keeps its state pickled in an unauthenticated store on the first node, which every
agent unpickles, so anyone who reaches that port could run code in the run.)
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> None:
    program = argv[1:] if argv[:1] == ["--"] else argv
    if not program or "SLURM_NODEID" not in os.environ:
        sys.exit("usage (inside a Slurm step): python -m aifab.extension.node_rank PROGRAM ...")
    os.environ["PET_NODE_RANK"] = os.environ["SLURM_NODEID"]
    os.execvp(program[0], program)


if __name__ == "__main__":
    main(sys.argv[1:])
