"""Loaded into a hub under test: records every blocking subprocess call made on the event
loop's thread (subprocess.run, check_output, call, communicate, os.system ...), with its
stack, into a file the test reads. One such call stalls every request of every user while
it runs; a spawner's commands must go through asyncio (aifab.slurm.arun) or an executor.

asyncio's own subprocess transport also calls Popen on the loop's thread, but returns at
once and never waits: it is not counted. Neither is a Popen made from a worker thread.
"""

from __future__ import annotations

import asyncio
import sys
import traceback

# (file, function) on the stack of a Popen that then waits for the command to end
BLOCKING = {("subprocess.py", name) for name in (
    "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput")} | {
    ("slurm.py", "run")}  # aifab.slurm.run: Popen, then communicate


def install(path: str) -> None:
    def hook(event: str, args) -> None:
        if event not in ("subprocess.Popen", "os.system"):
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # not on a thread that runs a loop
        stack = traceback.extract_stack()[:-1]
        files = {(frame.filename.rsplit("/", 1)[-1], frame.name) for frame in stack}
        if event == "subprocess.Popen" and not files & BLOCKING:
            return
        with open(path, "a") as out:
            out.write(f"{event} {args[1] if event == 'subprocess.Popen' else args[0]!r}\n")
            out.write("".join(traceback.format_list(stack[-15:])))
            out.write("----\n")

    sys.addaudithook(hook)
