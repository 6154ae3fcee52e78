"""PlacementSpawner: one JupyterHub spawner that places a session on this machine, on a
Slurm allocation or in a Kubernetes pod, as the user's validated choice of profile says.

The pipeline is the one kubespawner taught the field: render the form → parse it (no side
effects) → validate (allow-lists and bounds) → apply (build the child spawner). The hub's
hooks all reach the child: port callback, start/poll/stop, progress, state and timeouts.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping

from jupyterhub.spawner import Spawner
from jupyterhub.utils import url_path_join
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from traitlets import Any, Dict, Int, List, Type, Unicode, default, observe

from aifab.allocation import allowances_to_env
from aifab.session import (
    CONTRACT_PREFIX,
    ENV_ALLOCATABLE,
    ENV_POD_NAME,
    ENV_WALLTIME_END,
    Session,
)

from .batchspawner_settings import SlurmConfigError, check_config, slurm_sections
from .form import render_form
from .options import OPTION_KEYS, OptionsError, Placement, options_from_form, validate_options
from .port_api import install_port_handler
from .profiles import Profile, ProfileConfigError, load_profiles, load_profiles_file
from .start_queue import hub_queue

STATE_VERSION = 1

# batchspawner's import registers a port handler that setattr()s any attribute from the POST
# body; swap in our strict one now, while the hub is still loading its config (it reads the
# handler list later, in init_handlers).
install_port_handler()

DEFAULT_PROFILES = [
    {
        "slug": "local-cpu",
        "display_name": "This machine (CPU)",
        "description": "A session on the hub's own machine: for trying things out.",
        "backend": "local",
        "default": True,
    }
]

# What JupyterHub hands a spawner at construction (User._new_spawner) and the child needs.
_CHILD_KWARGS = (
    "user", "orm_spawner", "hub", "authenticator", "config", "proxy_spec",
    "_deprecated_db_session", "oauth_client_id", "cookie_options",
    "cookie_host_prefix_enabled", "trusted_alt_names", "public_url", "public_hub_url",
    "internal_ssl", "internal_trust_bundles", "internal_certs_location",
)


class PlacementSpawner(Spawner):
    profiles = List(
        Dict(),
        default_value=DEFAULT_PROFILES,
        help="""Profiles users choose from. Each is a dict with slug, display_name,
        description, backend (local | slurm | kubernetes), default, allowed_users,
        allowed_groups, choices (gpus/cpus/memory_gb as {default, min, max}; walltime as
        {default, max} in HH:MM:SS; image as {default, allowed: {key: reference}}), the
        backend's settings under `slurm:` or `kubernetes:`, and optionally model_cache (a
        shared read-only folder of models) and environment ({NAME: value} for the session).
        See docs/admin-guide.md.""",
    ).tag(config=True)

    profiles_file = Unicode(
        "",
        help="A YAML file holding the profiles (a list, or {profiles: [...]}). Used instead "
             "of `profiles` when set.",
    ).tag(config=True)

    local_spawner_class = Type(
        "aifab.spawners.local.LocalSessionSpawner", klass=Spawner,
        help="Spawner for profiles with backend 'local'.",
    ).tag(config=True)
    slurm_spawner_class = Type(
        "aifab.spawners.slurm.SlurmSessionSpawner", klass=Spawner,
        help="Spawner for profiles with backend 'slurm' (a batchspawner.SlurmSpawner).",
    ).tag(config=True)
    kubernetes_spawner_class = Type(
        "aifab.spawners.kubernetes.KubeSessionSpawner", klass=Spawner,
        help="Spawner for profiles with backend 'kubernetes' (a kubespawner.KubeSpawner).",
    ).tag(config=True)

    concurrent_starts = Int(
        0,
        help="""At most this many sessions start at once in this hub (0: no limit). The others
        wait in line and their start page says how many are starting before them, instead
        of the 429 of JupyterHub's concurrent_spawn_limit (keep that one above the class
        size). A wait in line counts against the profile's start timeout.""",
    ).tag(config=True)

    # JupyterHub's Dict trait would refuse a REST body that is a list, a string or a number
    # with a TraitError (HTTP 500) before any hook runs; apply_placement refuses it with 400
    user_options = Any(
        {}, allow_none=True,
        help="The user's options as sent (form or REST body); checked by apply_placement.",
    )

    child = Any(None, allow_none=True, help="The backend's spawner for the current session.")
    placement = Any(None, allow_none=True, help="The validated Placement of this session.")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        from .slurm import SlurmSessionSpawner

        # batchspawner settings the Slurm backend would ignore: refused, not silently dropped
        if issubclass(self.slurm_spawner_class, SlurmSessionSpawner):
            check_config(self.config, slurm_sections(self.slurm_spawner_class))

    # ------------------------------------------------------------ profiles
    _profile_cache: list[Profile] | None = None

    def load_profiles(self) -> list[Profile]:
        if self._profile_cache is None:
            raw = load_profiles_file(self.profiles_file) if self.profiles_file else self.profiles
            self._profile_cache = load_profiles(raw)
        return self._profile_cache

    def _user_groups(self) -> list[str]:
        return [g.name for g in getattr(self.user, "groups", [])]

    def visible_profiles(self) -> list[Profile]:
        return [p for p in self.load_profiles()
                if p.visible_to(self.user.name, self._user_groups(), bool(self.user.admin))]

    def profile(self, slug: str) -> Profile | None:
        return next((p for p in self.load_profiles() if p.slug == slug), None)

    # ------------------------------------------------------------ form → options
    @default("options_form")
    def _options_form_default(self):
        return lambda spawner: render_form(spawner.visible_profiles())

    @default("options_from_form")
    def _options_from_form_default(self):
        def parse(formdata):
            try:
                return options_from_form(formdata)
            except OptionsError as exc:
                raise web.HTTPError(400, str(exc).replace("%", "%%")) from None
        return parse

    @default("apply_user_options")
    def _apply_user_options_default(self):
        return lambda spawner, user_options: spawner.apply_placement(user_options)

    def apply_placement(self, user_options) -> Placement:
        """Validate ``user_options`` and build the child spawner. HTTP 400 on a bad option.

        Runs before start() (JupyterHub's apply_user_options hook), and again from start()
        if an admin replaced that hook, so nothing reaches a child unvalidated.
        """
        try:
            profiles = self.load_profiles()
        except ProfileConfigError as exc:
            raise web.HTTPError(500, f"the hub's profiles are misconfigured: {exc}") from None
        try:
            placement = validate_options(
                _options_object(user_options), profiles, self.user.name, self._user_groups(),
                bool(self.user.admin),
            )
        except OptionsError as exc:
            self._forget_refused_options()
            # tornado %-formats the message: escape what came from the user
            raise web.HTTPError(400, str(exc).replace("%", "%%")) from None
        self.placement = placement
        try:
            self.child = self._make_child(placement, self.profile(placement.profile))
        except SlurmConfigError as exc:  # the admin's mistake, not the user's: not a 400
            raise web.HTTPError(500, str(exc).replace("%", "%%")) from None
        self._validated_for_start = True
        return placement

    def _forget_refused_options(self) -> None:
        """JupyterHub stored the body as this server's default options before any hook ran;
        a refused body is not kept, so a later start without a body gets the defaults."""
        from sqlalchemy.orm import object_session

        orm_spawner = self.orm_spawner
        if orm_spawner is not None and orm_spawner.user_options is not None:
            orm_spawner.user_options = None
            session = object_session(orm_spawner)
            if session is not None:
                session.commit()

    # ------------------------------------------------------------ the child
    def _child_class(self, backend: str) -> type[Spawner]:
        return {
            "local": self.local_spawner_class,
            "slurm": self.slurm_spawner_class,
            "kubernetes": self.kubernetes_spawner_class,
        }[backend]

    def _make_child(self, placement: Placement, profile: Profile | None) -> Spawner:
        kwargs = {k: getattr(self, k) for k in _CHILD_KWARGS if hasattr(self, k)}
        # the user's raw options never reach the child (batchspawner merges them into its
        # script): the child sees only what configure_child derives from the placement
        child = self._child_class(placement.backend)(**kwargs, user_options={})
        child.clear_state()
        self.configure_child(child, placement, profile)
        # JupyterHub applies the *wrapper's* timeouts: take the child's
        self.start_timeout = child.start_timeout
        self.http_timeout = child.http_timeout
        return child

    def configure_child(self, child: Spawner, placement: Placement,
                        profile: Profile | None) -> None:
        """Set the child's traits from the placement (and the profile's admin settings)."""
        contract = Session(
            backend=placement.backend, profile=placement.profile, gpu_count=placement.gpus,
        ).to_env()
        if placement.backend == "local":
            child.placement = placement
            if getattr(child, "enforce_limits", False):
                # the local backend ends a session at its walltime (see local_limits.py)
                child.walltime_end = time.time() + placement.walltime_s
                contract[ENV_WALLTIME_END] = str(int(child.walltime_end))
        elif placement.backend == "slurm":
            from .slurm import configure_slurm_child

            configure_slurm_child(child, placement, profile)
        else:
            from .kubernetes import configure_kube_child

            end = time.time() + placement.walltime_s
            contract[ENV_WALLTIME_END] = str(int(end))
            contract[ENV_POD_NAME] = child.pod_name
            configure_kube_child(child, placement, profile)
        # the Slurm profiles this user may use: the session may hold allocations of them
        slurm_profiles = [p for p in self.visible_profiles() if p.backend == "slurm"]
        if slurm_profiles:
            contract[ENV_ALLOCATABLE] = allowances_to_env([p.allowance() for p in slurm_profiles])
        extra = profile.session_environment() if profile is not None else {}
        child.environment = {**child.environment, **extra, **contract}

    # ------------------------------------------------------------ hub → child
    @observe("port")
    def _forward_port(self, change):
        # the job reports its port to the hub, which sets it on us (see port_api)
        if self.child is not None and change.new:
            self.child.port = change.new

    _validated_for_start = False
    _listening_at = ""

    @default("_listening")
    def _listening_default(self):
        return asyncio.Event()

    _listening = Any()

    async def start(self):
        if not self._validated_for_start:
            self.apply_placement(self.user_options)
        self._validated_for_start = False
        self._listening = asyncio.Event()
        self.port = 0  # a stale value would hide the job's port callback (no change event)
        child = self.child
        # what the hub's hooks (pre_spawn_hook, group overrides) set on us after the child was
        # built reaches it too; the session contract stays as validated
        child.environment = {**child.environment, **{
            k: v for k, v in self.environment.items() if not k.startswith(CONTRACT_PREFIX)}}
        child.api_token = self.api_token
        child.admin_access = self.admin_access
        child.cert_paths = self.cert_paths
        child.handler = self.handler
        queue = hub_queue(self.concurrent_starts)
        self._ticket = ticket = queue.enter()
        try:
            if not ticket.done():
                self.log.info("%s: %d session(s) are starting before this one; waiting",
                              self._log_name, queue.ahead_of(ticket))
                await ticket
            self.log.info("%s: starting profile %r on %s", self._log_name,
                          self.placement.profile, self.placement.backend)
            # a job waiting in Slurm's queue needs nothing of the hub: its slot goes on
            child.on_queued = lambda: queue.leave(ticket)
            where = await child.start()
            await self._wait_until_listening(where)
        finally:
            queue.leave(ticket)
            self._ticket = None
        return where

    _ticket = None

    async def _queue_progress(self):
        """While this start waits in the hub's line: how many are starting before it."""
        queue, last = hub_queue(self.concurrent_starts), None
        while self._ticket is not None and not self._ticket.done():
            ahead = queue.ahead_of(self._ticket)
            if ahead != last:
                last = ahead
                many = "sessions are" if ahead != 1 else "session is"
                yield {"progress": 7, "message": f"{ahead} {many} starting before yours"}
            await asyncio.sleep(0.5)

    async def _wait_until_listening(self, where) -> None:
        """Return as soon as the server answers HTTP at all.

        The hub then checks it once and finds it up; left to itself it polls with an
        exponential backoff and typically notices a server ~1 s after it started listening.
        On timeout, or if the child ends, we return and the hub's own check reports it.
        """
        if self.internal_ssl or self.server is None:
            return
        if isinstance(where, str):
            base = where.rstrip("/")
        else:
            ip, port = where
            base = f"http://{'[' + ip + ']' if ':' in ip else ip}:{int(port)}"
        url = base + url_path_join(self.server.base_url, "api")
        self._listening_at = base
        client = AsyncHTTPClient()
        deadline = time.monotonic() + self.http_timeout
        # the child's poll may run squeue: jittered, so sessions started together do not poll
        # the controller in lock-step
        next_poll = time.monotonic() + random.uniform(0.75, 1.25)
        # 50 ms at first (a server that is up is seen at once), growing to 0.5 s: ten starts
        # knocking every 50 ms would be 200 requests a second from the hub's own loop
        wait = 0.05
        while time.monotonic() < deadline:
            try:
                await client.fetch(url, request_timeout=2, raise_error=False)
                self._listening.set()
                return
            except (OSError, HTTPClientError):  # not listening yet, or too busy to answer
                pass
            if time.monotonic() > next_poll:
                next_poll = time.monotonic() + random.uniform(0.75, 1.25)
                if await self.child.poll() is not None:
                    return
            await asyncio.sleep(wait * random.uniform(0.75, 1.25))
            wait = min(0.5, wait * 1.5)

    async def poll(self):
        if self.child is None:
            return 0
        return await self.child.poll()

    async def stop(self, now=False):
        if self.child is not None:
            await self.child.stop(now=now)

    async def progress(self):
        p = self.placement
        if p is not None:
            yield {"progress": 5, "message": f"Profile {p.profile!r}: {p.gpus} GPU(s), "
                                             f"{p.cpus} CPU(s), {p.memory_gb} GiB"}
        async for event in self._queue_progress():
            yield event
        if self.child is not None:
            async for event in self.child.progress():
                yield event
        await self._listening.wait()
        yield {"progress": 90, "message": f"Server up at {self._listening_at}; connecting"}

    # ------------------------------------------------------------ state
    def get_state(self):
        state = super().get_state()
        if self.placement is not None:
            state["aifab"] = {
                "version": STATE_VERSION,
                "placement": self.placement.to_state(),
                "child": self.child.get_state() if self.child is not None else {},
            }
        return state

    def load_state(self, state):
        super().load_state(state)
        saved = (state or {}).get("aifab")
        if not saved:
            return
        if saved.get("version") != STATE_VERSION:
            self.log.warning("%s: saved state version %r is not %r; not re-adopting",
                             self._log_name, saved.get("version"), STATE_VERSION)
            return
        try:
            placement = Placement(**saved["placement"])
        except TypeError as exc:
            self.log.error("%s: saved placement unreadable (%s); not re-adopting",
                           self._log_name, exc)
            return
        profile = self.profile(placement.profile)
        if profile is None:
            self.log.warning(
                "%s: profile %r is no longer configured; the running session is kept and "
                "can be stopped, but a new start must choose another profile",
                self._log_name, placement.profile)
        self.placement = placement
        self.child = self._make_child(placement, profile)
        self.child.load_state(saved.get("child", {}))

    def clear_state(self):
        super().clear_state()
        if self.child is not None:
            self.child.clear_state()
        # the next start validates and builds afresh; a stopped spawner saves nothing stale
        self.child = None
        self.placement = None


def _options_object(user_options) -> Mapping:
    """The options as a mapping: None (no body) is no options; any other shape is refused."""
    if user_options is None:
        return {}
    if not isinstance(user_options, Mapping):
        kind = {list: "a list", str: "a string", bool: "a boolean", int: "a number",
                float: "a number"}.get(type(user_options), type(user_options).__name__)
        raise OptionsError(
            "user_options", f"the request body must be a JSON object such as "
                            f'{{"profile": "...", "gpus": 1}}, not {kind}; allowed keys: '
                            f"{', '.join(OPTION_KEYS)}")
    return user_options
