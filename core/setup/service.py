"""SetupService: the facade the bot uses to install, repair and reset ComfyUI on a server.

It keeps the public names and signatures; the work is done by the modules beside it:
profiles (:mod:`core.setup.profiles`), rows (:mod:`core.setup.store`) and running
(:mod:`core.setup.runner`, one step at a time by :mod:`core.setup.steps`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from core.audit import OUTCOME_ERROR, OUTCOME_OK, Actor, AuditService
from core.config import Settings
from core.db.engine import SessionFactory
from core.db.models import ServerStatus
from core.errors import NotFound, ValidationFailed
from core.providers import has_shell
from core.remote import Remote
from core.servers import ServerRegistry, ServerView
from core.setup.profiles import (
    DEFAULT_PROFILE,
    DEFAULT_PROFILE_DIR,
    SetupProfile,
    load_profiles,
    server_values,
)
from core.setup.runlog import TAIL_LINES, Run
from core.setup.runner import TICK_SECONDS, SetupRunner
from core.setup.steps import posix_sh
from core.setup.store import SetupStore
from core.setup.types import (
    ExecutionView,
    Installation,
    ResetPlan,
    ResetResult,
    SetupObserver,
)
from core.ssh import SSHError

log = logging.getLogger(__name__)


class SetupService:
    """Runs setup profiles on servers over SSH; see :mod:`core.setup`."""

    def __init__(
        self,
        settings: Settings,
        sessions: SessionFactory,
        registry: ServerRegistry,
        remote: Remote,
        audit: AuditService,
        *,
        profile_dirs: Sequence[Path] = (DEFAULT_PROFILE_DIR,),
        params: Mapping[str, str] | None = None,
        tick: float = TICK_SECONDS,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._remote = remote
        self._audit = audit
        self._store = SetupStore(sessions)
        self._runner = SetupRunner(self._store, registry, remote, audit, tick=tick)
        self.profile_dirs = tuple(profile_dirs)
        # Overrides applied to every profile that has the parameter (e.g. install_dir).
        self.params = dict(params or {})
        self._ready = False
        self._ready_lock = asyncio.Lock()

    @property
    def observer(self) -> SetupObserver:
        """Told about every run's progress (the Discord side sets it)."""
        return self._runner.observer

    @observer.setter
    def observer(self, observer: SetupObserver) -> None:
        self._runner.observer = observer

    def when_installed(self, callback: Callable[[ServerView], None]) -> None:
        """Call ``callback(server)`` after each setup that succeeded (the server joined)."""
        self._runner.on_installed.append(callback)

    @property
    def tick(self) -> float:
        """Seconds between two progress writes of a running setup."""
        return self._runner.tick

    @tick.setter
    def tick(self, seconds: float) -> None:
        self._runner.tick = seconds

    @property
    def _runs(self) -> dict[int, Run]:
        return self._runner.runs

    # ------------------------------------------------------------------ start-up

    async def startup(self) -> None:
        """Store the profiles from the TOML files and fail rows a dead bot left running."""
        async with self._ready_lock:
            await self.sync_profiles()
            await self.recover()
            self._ready = True

    async def _ensure_ready(self) -> None:
        if not self._ready:
            await self.startup()

    async def sync_profiles(self) -> list[str]:
        """Upsert every profile file into ``setup_scripts``; returns the names changed."""
        profiles = await asyncio.to_thread(load_profiles, self.profile_dirs)
        changed = await self._store.sync_profiles(profiles)
        if changed:
            log.info("stored setup profiles: %s", ", ".join(sorted(changed)))
        return changed

    async def recover(self) -> int:
        """Mark runs left pending/running by a previous process failed; returns how many."""
        count = await self._store.recover(keep=list(self._runs))
        if count:
            log.warning("marked %d interrupted setup runs failed", count)
        return count

    async def close(self) -> None:
        """Cancel running setups; their rows are marked failed (resumable)."""
        await self._runner.close()

    # ------------------------------------------------------------------ profiles

    async def profiles(self) -> list[SetupProfile]:
        await self._ensure_ready()
        return await self._store.profiles()

    async def profile_names(self, prefix: str = "") -> list[str]:
        return [p.name for p in await self.profiles() if prefix.lower() in p.name]

    async def _script(self, name: str) -> tuple[int, SetupProfile]:
        await self._ensure_ready()
        found = await self._store.script(name)
        if found is None:
            names = ", ".join(await self.profile_names()) or "none"
            raise NotFound(f"There is no setup profile named '{name}' (known: {names}).")
        return found

    def _values(
        self, profile: SetupProfile, server: ServerView, overrides: Mapping[str, str] | None
    ) -> dict[str, str]:
        return server_values(profile, server, self._settings, self.params, overrides)

    # ------------------------------------------------------------------ queries

    async def get(self, execution_id: int) -> ExecutionView:
        run = self._runs.get(execution_id)
        if run is not None:
            return run.view()
        view = await self._store.view(execution_id)
        if view is None:
            raise NotFound(f"There is no setup run #{execution_id}.")
        return view

    def snapshot(self, execution_id: int) -> ExecutionView | None:
        """The live state of a run in this process (no database access), else None."""
        run = self._runs.get(execution_id)
        return run.view() if run is not None else None

    async def latest(self, server: str | int) -> ExecutionView | None:
        view = await self._registry.get(server)
        for run in sorted(self._runs.values(), key=lambda r: -r.execution_id):
            if run.server.id == view.id:
                return run.view()
        return await self._store.latest(view.id)

    async def recent(self, limit: int = 25) -> list[ExecutionView]:
        return [self.snapshot(v.id) or v for v in await self._store.recent(limit)]

    async def log(self, execution_id: int) -> str:
        """The full log of a run (live while it runs)."""
        run = self._runs.get(execution_id)
        if run is not None:
            return run.text()
        text = await self._store.output(execution_id)
        if text is None:
            raise NotFound(f"There is no setup run #{execution_id}.")
        return text

    async def installation(self, server: str | int | ServerView) -> Installation:
        """The parameters of the profile this server was last set up with (else default)."""
        view = server if isinstance(server, ServerView) else await self._registry.get(server)
        await self._ensure_ready()
        profile = await self._store.last_profile(view.id)
        if profile is None:
            _, profile = await self._script(view.setup_profile or DEFAULT_PROFILE)
        return Installation(view, profile.name, self._values(profile, view, None))

    # ------------------------------------------------------------------ running

    def _require_ssh(self, server: ServerView) -> None:
        if not has_shell(server):
            raise ValidationFailed(
                f"Server {server.name} is reached by its ComfyUI URL only; there is no SSH "
                "access to set it up.")
        if server.status != ServerStatus.RUNNING.value:
            raise ValidationFailed(
                f"Server {server.name} is {server.status}; setup needs it running.")

    async def begin(
        self,
        actor: Actor,
        server: str | int,
        profile: str | None = None,
        *,
        channel_id: int | None = None,
        params: Mapping[str, str] | None = None,
    ) -> ExecutionView:
        """Reserve the server and record a pending run; :meth:`start` or :meth:`execute`
        it next. Raises :class:`ResourceBusy` when a setup already runs there."""
        view = await self._registry.get(server)
        self._require_ssh(view)
        # Without a profile: the one the server's image calls for (fast on Vast's ComfyUI
        # image), else the default.
        script_id, prof = await self._script(profile or view.setup_profile or DEFAULT_PROFILE)
        values = self._values(prof, view, params)
        self._runner.reserve(view)
        try:
            execution_id, created = await self._store.create(
                view.id, script_id, len(prof.steps), actor.user_id, channel_id)
        except BaseException:
            self._runner.release(view.id)
            raise
        self._runner.active[view.id] = execution_id
        run = Run(execution_id=execution_id, server=view, profile=prof, script_id=script_id,
                  params=values, actor=actor, created_at=created, channel_id=channel_id)
        self._runs[execution_id] = run
        log.info("setup #%d of %s with profile %s v%s requested", execution_id, view.name,
                 prof.name, prof.version)
        return run.view()

    async def attach_message(self, execution_id: int, channel_id: int, message_id: int) -> None:
        run = self._runs[execution_id]
        run.channel_id, run.message_id = channel_id, message_id
        await self._store.attach_message(execution_id, channel_id, message_id)

    async def abandon(self, execution_id: int, reason: str) -> None:
        """Give up a run that never started (e.g. its status message could not be posted)."""
        run = self._runs.pop(execution_id, None)
        if run is None:
            return
        self._runner.release(run.server.id)
        await self._store.fail(execution_id, reason)

    def start(self, execution_id: int) -> asyncio.Task[ExecutionView]:
        """Run in the background; the task is kept and its failure logged."""
        return self._runner.start(execution_id)

    async def run(
        self, actor: Actor, server: str | int, profile: str | None = None, *,
        params: Mapping[str, str] | None = None,
    ) -> ExecutionView:
        """Begin and execute in one call (tests, the CLI)."""
        view = await self.begin(actor, server, profile, params=params)
        return await self.execute(view.id)

    async def execute(self, execution_id: int) -> ExecutionView:
        """Run the steps of a begun run; returns its final view (never raises for a failed
        step: the failure is the run's outcome)."""
        return await self._runner.execute(execution_id)

    def busy(self, server_id: int) -> bool:
        return server_id in self._runner.active

    # ------------------------------------------------------------------ reset

    async def _reset_profile(self, server: ServerView, profile: str | None) -> SetupProfile:
        if profile is not None:
            return (await self._script(profile))[1]
        return (await self._script((await self.installation(server)).profile))[1]

    async def reset_plan(self, server: str | int, profile: str | None = None) -> ResetPlan:
        """What :meth:`reset` would do, for the confirmation prompt (no side effects)."""
        view = await self._registry.get(server)
        self._require_ssh(view)
        prof = await self._reset_profile(view, profile)
        if prof.reset is None:
            raise ValidationFailed(f"The setup profile {prof.name} has no reset command.")
        values = self._values(prof, view, None)
        return ResetPlan(view.name, prof.name, prof.describe(prof.reset_summary, values))

    async def reset(
        self, actor: Actor, server: str | int, profile: str | None = None
    ) -> ResetResult:
        """Remove the installation state so the next run starts clean."""
        plan = await self.reset_plan(server, profile)
        view = await self._registry.get(server)
        prof = await self._reset_profile(view, plan.profile)
        assert prof.reset is not None
        values = self._values(prof, view, None)
        self._runner.reserve(view)
        try:
            result = await self._remote.pool.run(
                self._remote.target(view), posix_sh("set -e\n" + prof.render(prof.reset, values)),
                timeout=prof.reset_timeout, env=prof.env)
        except SSHError as exc:
            await self._audit.record(actor, "setup reset", outcome=OUTCOME_ERROR,
                                     resource=view.name,
                                     details={"profile": prof.name, "error": str(exc)})
            raise
        finally:
            self._runner.release(view.id)
        # ComfyUI is no longer expected to come back by itself after a restart.
        await self._store.record_installation(view.id, prof.name, {}, installed=False)
        await self._audit.record(actor, "setup reset", outcome=OUTCOME_OK, resource=view.name,
                                 details={"profile": prof.name})
        log.info("setup state of %s reset (profile %s)", view.name, prof.name)
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-TAIL_LINES:])
        return ResetResult(view.name, prof.name, plan.summary, tail)
