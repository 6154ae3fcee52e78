"""``aifab loadtest``: a class pressing Start at once, against a site's own hub.

    aifab loadtest --hub http://127.0.0.1:8000 --users 10 --password-file demo-state/password
    aifab loadtest --hub https://hub.example.org --site-hub --tokens-file tokens.txt ...

Each simulated participant, all at the same moment (one thread each):

1. logs in through the hub's real login form (the class password), or uses an API token an
   admin made for it (``--tokens-file``: lines of ``USER TOKEN``);
2. starts their server with the chosen profile and options, through the hub's REST API, and
   waits until the hub says it is ready;
3. starts a kernel in it, waits for its first answer, runs one cell and checks its output;
4. stops the kernel and the server.

It reports failures (with the first errors), p50/p95 of login, spawn-to-ready, kernel-ready
and cell time, and, with an admin token that may read the hub's metrics (``read:metrics``),
the hub's CPU seconds and the Slurm commands it ran. The last line is one JSON object.

Bounded: at most MAX_USERS users and ``--timeout`` seconds in all; loopback hubs only,
unless ``--site-hub`` says the hub is the caller's own. Tokens are read from files, never
from the command line, and never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import re
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import quote, urlparse

import requests

from .hub_client import HubSession

MAX_USERS = 200
USER_NAME = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
METRIC_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')


@dataclass
class Participant:
    name: str
    token: str = ""  # given (--tokens-file) or made after logging in
    token_id: str = ""  # set when the load test made the token (it revokes it at the end)
    started: bool = False  # only a server this test started is stopped by it
    times: dict[str, float] = field(default_factory=dict)
    error: str = ""


# ---------------------------------------------------------------- the hub's own metrics
def hub_metrics(hub: str, token: str) -> dict[str, float]:
    """The hub's Prometheus metrics, ``name{labels}`` -> value (needs read:metrics)."""
    r = requests.get(f"{hub}/hub/metrics", headers={"Authorization": f"token {token}"},
                     timeout=30)
    r.raise_for_status()
    values = {}
    for line in r.text.splitlines():
        m = METRIC_LINE.match(line)
        if m and not line.startswith("#"):
            key = m["name"] + (f"{{{m['labels']}}}" if m["labels"] else "")
            try:
                values[key] = float(m["value"])
            except ValueError:
                continue
    return values


def slurm_commands(metrics: dict[str, float]) -> dict[str, int]:
    prefix = 'aifab_slurm_commands_total{command="'
    return {k[len(prefix):-2]: int(v) for k, v in metrics.items() if k.startswith(prefix)}


# ---------------------------------------------------------------- one participant
def run_participant(hub: str, who: Participant, *, password: str, profile: str,
                    options: dict, cell: str, expect: str, deadline: float) -> None:
    try:
        _walk(hub, who, password=password, profile=profile, options=options, cell=cell,
              expect=expect, deadline=deadline)
    except Exception as exc:  # a participant's failure is reported, the others go on
        who.error = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        if who.started:
            _stop_server(hub, who, deadline)
        if who.token_id:
            _revoke_token(hub, who)


def _walk(hub, who, *, password, profile, options, cell, expect, deadline) -> None:
    user = quote(who.name, safe="")
    if not who.token:
        person = HubSession(hub)
        t0 = time.perf_counter()
        r = person.login(who.name, password)
        if r.status_code != 200 or "/hub/login" in r.url:
            raise RuntimeError(f"login refused (HTTP {r.status_code})")
        who.times["login"] = time.perf_counter() - t0
        who.token, who.token_id = person.new_token(who.name, "aifab loadtest")
    auth = {"Authorization": f"token {who.token}"}
    model = requests.get(f"{hub}/hub/api/users/{user}", headers=auth, timeout=30).json()
    if model.get("servers") or model.get("pending"):
        raise RuntimeError("this user already has a server: the load test leaves it alone")

    t0 = time.perf_counter()
    body = {"profile": profile, **options} if profile else dict(options)
    r = requests.post(f"{hub}/hub/api/users/{user}/server", json=body, headers=auth,
                      timeout=60)
    if r.status_code not in (201, 202):
        raise RuntimeError(f"start refused: HTTP {r.status_code} {r.text[:300]}")
    who.started = True
    while True:
        model = requests.get(f"{hub}/hub/api/users/{user}", headers=auth, timeout=30).json()
        server = model.get("servers", {}).get("")
        if server and server.get("ready"):
            break
        if not server and not model.get("pending"):
            raise RuntimeError("the server's start failed (see the hub's log)")
        _check_time(deadline, "waiting for the server")
        time.sleep(1.0)  # as a browser's spawn page does not hammer the hub either
    who.times["spawn"] = time.perf_counter() - t0

    base = f"{hub}/user/{user}"
    t0 = time.perf_counter()
    r = requests.post(f"{base}/api/kernels", json={}, headers=auth, timeout=120)
    if r.status_code != 201:
        raise RuntimeError(f"kernel start refused: HTTP {r.status_code} {r.text[:300]}")
    kernel = r.json()["id"]
    try:
        answered_at, ran = asyncio.run(_kernel_round_trip(base, kernel, who.token, cell,
                                                          expect, deadline))
        who.times["kernel"] = answered_at - t0  # start request -> the kernel's first answer
        who.times["cell"] = ran
    finally:
        requests.delete(f"{base}/api/kernels/{kernel}", headers=auth, timeout=60)


async def _kernel_round_trip(base: str, kernel: str, token: str, cell: str, expect: str,
                             deadline: float) -> tuple[float, float]:
    """When the kernel first answered (kernel_info_reply, perf_counter time), and the seconds
    of one execute_request to its reply with the expected output."""
    async with kernel_channel(base, kernel, token) as run:
        await run("kernel_info_request", {}, deadline)
        answered_at = time.perf_counter()
        t1 = time.perf_counter()
        output = await run("execute_request", execute_content(cell), deadline)
        if expect not in output:
            raise RuntimeError(f"the cell printed {output[:200]!r}, not {expect!r}")
        return answered_at, time.perf_counter() - t1


def execute_content(code: str) -> dict:
    return {"code": code, "silent": False, "store_history": False, "user_expressions": {},
            "allow_stdin": False}


@contextlib.asynccontextmanager
async def kernel_channel(base: str, kernel: str, token: str):
    """A kernel's websocket through a Jupyter server (and the hub's proxy): yields
    ``run(msg_type, content, deadline) -> the stream output the request caused``."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    url = base.replace("http", "ws", 1) + f"/api/kernels/{kernel}/channels"
    ws = await websocket_connect(HTTPRequest(
        f"{url}?session_id={uuid.uuid4().hex}", headers={"Authorization": f"token {token}"},
        request_timeout=60, connect_timeout=60))
    session = uuid.uuid4().hex
    try:
        yield lambda msg_type, content, deadline: _request(ws, session, msg_type, content,
                                                           deadline)
    finally:
        ws.close()


async def _request(ws, session: str, msg_type: str, content: dict, deadline: float) -> str:
    """Send one shell request; its reply's status must be ok. Returns the stream output the
    request caused (iopub messages with it as parent)."""
    msg_id = uuid.uuid4().hex
    await ws.write_message(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": msg_type, "session": session,
                   "username": "loadtest", "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "content": content, "channel": "shell"}))
    # the reply (shell) and the kernel's idle status (iopub, after the last output) may
    # arrive in either order: both end the request
    output, replied, idle = [], False, False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {msg_type.replace('_request', '_reply')} in time")
        raw = await asyncio.wait_for(ws.read_message(), left)
        if raw is None:
            raise RuntimeError("the kernel's websocket closed")
        msg = json.loads(raw)
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind = msg["header"]["msg_type"]
        if kind == "stream":
            output.append(msg["content"].get("text", ""))
        elif kind == "error":
            raise RuntimeError(f"the cell failed: {msg['content'].get('ename')}: "
                               f"{msg['content'].get('evalue')}")
        elif kind.endswith("_reply"):
            if msg["content"].get("status") != "ok":
                raise RuntimeError(f"{kind}: {msg['content'].get('status')}")
            replied = True
        elif kind == "status" and msg["content"].get("execution_state") == "idle":
            idle = True
        if replied and (idle or msg_type == "kernel_info_request"):
            return "".join(output)


def _stop_server(hub: str, who: Participant, deadline: float) -> None:
    user, auth = quote(who.name, safe=""), {"Authorization": f"token {who.token}"}
    try:
        t0 = time.perf_counter()
        requests.delete(f"{hub}/hub/api/users/{user}/server", headers=auth, timeout=60)
        while time.monotonic() < deadline + 60:  # a stop is waited for even after a failure
            model = requests.get(f"{hub}/hub/api/users/{user}", headers=auth, timeout=30).json()
            if not model.get("servers") and not model.get("pending"):
                who.times["stop"] = time.perf_counter() - t0
                return
            time.sleep(1.0)
        who.error = who.error or "the server did not stop"
    except requests.RequestException as exc:
        who.error = who.error or f"stop: {exc}"


def _revoke_token(hub: str, who: Participant) -> None:
    user, auth = quote(who.name, safe=""), {"Authorization": f"token {who.token}"}
    try:
        requests.delete(f"{hub}/hub/api/users/{user}/tokens/{who.token_id}", headers=auth,
                        timeout=30)
    except requests.RequestException:
        pass  # it expires within the hour anyway


def _check_time(deadline: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError(f"out of time {what}")


# ---------------------------------------------------------------- the class
def percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return round(statistics.median(ordered), 3), round(p95, 3)


def run_class(hub: str, participants: list[Participant], *, password: str = "",
              profile: str = "", options: dict | None = None, cell: str = "print(6 * 7)",
              expect: str = "42", timeout: float = 600, admin_token: str = "") -> dict:
    before = hub_metrics(hub, admin_token) if admin_token else {}
    deadline = time.monotonic() + timeout
    start = threading.Barrier(len(participants))  # everyone presses Start together

    def one(who: Participant) -> None:
        start.wait()
        run_participant(hub, who, password=password, profile=profile, options=options or {},
                        cell=cell, expect=expect, deadline=deadline)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(participants)) as pool:
        list(pool.map(one, participants))
    wall = time.perf_counter() - t0
    after = hub_metrics(hub, admin_token) if admin_token else {}

    report: dict = {"bench": "loadtest", "users": len(participants),
                    "failures": sum(bool(p.error) for p in participants),
                    "wall_s": round(wall, 1)}
    for step in ("login", "spawn", "kernel", "cell", "stop"):
        p50, p95 = percentiles([p.times[step] for p in participants if step in p.times])
        report[f"{step}_p50_s"], report[f"{step}_p95_s"] = p50, p95
    if admin_token:
        cpu = "process_cpu_seconds_total"
        report["hub_cpu_s"] = round(after.get(cpu, 0) - before.get(cpu, 0), 2)
        b, a = slurm_commands(before), slurm_commands(after)
        report["slurm_commands"] = {c: a[c] - b.get(c, 0) for c in a if a[c] - b.get(c, 0)}
    else:
        report["hub_cpu_s"] = report["slurm_commands"] = None
    report["errors"] = [f"{p.name}: {p.error}" for p in participants if p.error][:10]
    return report


# ---------------------------------------------------------------- command line
def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_secret(path: str, what: str) -> str:
    try:
        return open(path).read().strip()
    except OSError as exc:
        raise SystemExit(f"aifab loadtest: cannot read the {what} file {path}: "
                         f"{exc.strerror}") from None


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[a-z_]{1,32}", key):
        raise argparse.ArgumentTypeError(f"{text!r}: an option is NAME=VALUE, e.g. cpus=1")
    return key, int(value) if re.fullmatch(r"-?\d+", value) else value


def build_parser(sub) -> None:
    p = sub.add_parser("loadtest", help="a class pressing Start at once, against your hub",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hub", required=True, help="the hub's public URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--users", type=int, default=10, help=f"participants (1..{MAX_USERS})")
    p.add_argument("--user-prefix", default="loadtest-",
                   help="participants are PREFIX01, PREFIX02, ... (with --password-file)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--password-file", help="the class password (shared-password login)")
    who.add_argument("--tokens-file", help="lines of 'USER TOKEN' that an admin made")
    p.add_argument("--admin-token-file",
                   help="a token with read:metrics: the hub's CPU seconds and Slurm commands")
    p.add_argument("--profile", default="", help="the profile to start (default: the hub's)")
    p.add_argument("--option", type=_option, action="append", default=[],
                   help="a spawn option NAME=VALUE (repeatable), e.g. --option cpus=1")
    p.add_argument("--cell", default="print(6 * 7)", help="the code each kernel runs")
    p.add_argument("--expect", default="42", help="what the cell must print")
    p.add_argument("--timeout", type=float, default=600, help="seconds for the whole class")
    p.add_argument("--site-hub", action="store_true",
                   help="the hub is not on loopback, and it is your own site's hub")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    hub = args.hub.rstrip("/")
    if urlparse(hub).scheme not in ("http", "https"):
        raise SystemExit(f"aifab loadtest: --hub {args.hub!r} is not an http(s) URL")
    if not _is_loopback(hub) and not args.site_hub:
        raise SystemExit(f"aifab loadtest: {hub} is not on loopback; a load test runs only "
                         "against your own hub: add --site-hub if it is")
    if not 1 <= args.users <= MAX_USERS:
        raise SystemExit(f"aifab loadtest: --users {args.users}: allowed 1..{MAX_USERS}")
    if not 10 <= args.timeout <= 3600:
        raise SystemExit(f"aifab loadtest: --timeout {args.timeout:g}: allowed 10..3600 s")
    password = ""
    if args.tokens_file:
        lines = [ln.split() for ln in _read_secret(args.tokens_file, "tokens").splitlines()
                 if ln.strip()]
        if any(len(ln) != 2 for ln in lines):
            raise SystemExit("aifab loadtest: --tokens-file: each line is 'USER TOKEN'")
        participants = [Participant(name, token) for name, token in lines[:args.users]]
        if len(participants) < args.users:
            raise SystemExit(f"aifab loadtest: --tokens-file has {len(participants)} users, "
                             f"--users asks for {args.users}")
    else:
        password = _read_secret(args.password_file, "password")
        participants = [Participant(f"{args.user_prefix}{i:02d}")
                        for i in range(1, args.users + 1)]
    bad = [p.name for p in participants if not USER_NAME.fullmatch(p.name)]
    if bad:
        raise SystemExit(f"aifab loadtest: user name(s) {bad[:3]} are not plain names "
                         "(lowercase letters, digits, _ . -; at most 32)")
    admin = _read_secret(args.admin_token_file, "admin token") if args.admin_token_file else ""
    report = run_class(hub, participants, password=password, profile=args.profile,
                       options=dict(args.option), cell=args.cell, expect=args.expect,
                       timeout=args.timeout, admin_token=admin)
    for line in report["errors"]:
        print(f"failed: {line}", file=sys.stderr)
    print(json.dumps(report))
    return 1 if report["failures"] else 0


__all__ = ["Participant", "build_parser", "hub_metrics", "run_class", "slurm_commands"]
