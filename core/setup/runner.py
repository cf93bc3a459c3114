"""Running a begun setup: the steps in order, the ticker that persists progress, the
outcome (row, audit, observer), and the per-server lock that allows one setup or reset at
a time. Runs started in the background are tracked in a :class:`TaskRegistry`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from core.audit import OUTCOME_ERROR, OUTCOME_OK, AuditService
from core.db.models import ExecutionStatus, utcnow
from core.errors import ComfyVastError, ResourceBusy
from core.remote import Remote
from core.servers import ServerRegistry, ServerView
from core.setup.profiles import SetupStep
from core.setup.runlog import Run
from core.setup.steps import run_step
from core.setup.store import SetupStore
from core.setup.types import STOP_ERROR, ExecutionView, SetupObserver
from core.ssh import HostKeyMismatch, SSHAuthError, SSHCommandFailed, SSHTarget, SSHTimeout
from core.tasks import TaskRegistry

log = logging.getLogger(__name__)

# How often a running setup persists its tail and refreshes the status message, seconds.
TICK_SECONDS = 2.0


class SetupRunner:
    """Executes runs and holds what they share in this process: the live runs, the
    per-server lock, the observer."""

    def __init__(
        self,
        store: SetupStore,
        registry: ServerRegistry,
        remote: Remote,
        audit: AuditService,
        *,
        tick: float = TICK_SECONDS,
    ) -> None:
        self._store = store
        self._registry = registry
        self._remote = remote
        self._audit = audit
        self.tick = tick
        self.observer = SetupObserver()
        # Told (synchronously, with the server) after a setup succeeded: the server joins.
        self.on_installed: list[Callable[[ServerView], None]] = []
        self.runs: dict[int, Run] = {}
        # server id -> execution id (0 while reserving): one setup or reset per server.
        self.active: dict[int, int] = {}
        self._tasks = TaskRegistry("setup")
        # Apart from the runs: close() cancels runs, and a run cancels its own ticker.
        self._tickers = TaskRegistry("setup-tick")

    # ------------------------------------------------------------------ the lock

    def reserve(self, server: ServerView) -> None:
        # Check and set with no await in between: this is the per-server lock.
        if server.id in self.active:
            current = self.active[server.id]
            what = f" (run #{current})" if current else ""
            raise ResourceBusy(
                f"Setup is busy on {server.name}{what}; wait for it to finish or check "
                "/setup status.")
        self.active[server.id] = 0

    def release(self, server_id: int) -> None:
        self.active.pop(server_id, None)

    # ------------------------------------------------------------------ running

    def start(self, execution_id: int) -> asyncio.Task[ExecutionView]:
        """Run in the background; the task is kept and its failure logged."""
        if execution_id not in self.runs:
            raise KeyError(execution_id)  # here, not inside the task
        return self._tasks.spawn(self.execute(execution_id), key=execution_id,
                                 name=f"setup-{execution_id}")

    async def close(self) -> None:
        """Cancel the background runs and wait until their rows are written."""
        await self._tasks.close(timeout=None)

    async def execute(self, execution_id: int) -> ExecutionView:
        """Run the steps of a begun run; returns its final view (never raises for a failed
        step: the failure is the run's outcome)."""
        run = self.runs[execution_id]
        run.status = ExecutionStatus.RUNNING.value
        run.started_at = utcnow()
        total = len(run.profile.steps)
        run.mark(f"comfyvast setup #{execution_id}: profile {run.profile.name} "
                 f"v{run.profile.version} on {run.server.name} "
                 f"({run.started_at:%Y-%m-%d %H:%M:%S} UTC)")
        await self._store.persist(run, full=True)
        await self._registry.touch(run.server.id, channel_id=run.channel_id)
        self.observer.on_update(execution_id)
        ticker = self._tickers.spawn(self._tick(run), key=execution_id,
                                     name=f"setup-{execution_id}-tick")
        index = 0
        try:
            target = self._remote.target(run.server)
            # Connect (and verify the pinned host key) before any step is marked started.
            async with self._remote.pool.connection(target):
                pass
            for index, step in enumerate(run.profile.steps, start=1):
                await self._step(run, target, index, total, step)
            # Before the run counts as succeeded: where ComfyUI now lives and answers, and
            # that it comes back by itself after a restart (readiness waits for it then).
            await self._store.record_installation(
                run.server.id, run.profile.name, run.params, installed=True)
            run.status = ExecutionStatus.SUCCEEDED.value
            run.mark(f"finished: all {total} steps done")
        except asyncio.CancelledError:
            run.error = STOP_ERROR
            run.status = ExecutionStatus.FAILED.value
            run.mark(f"stopped: {STOP_ERROR}")
            ticker.cancel()
            # Record the outcome even though we are being cancelled (bot shutdown).
            with contextlib.suppress(Exception):
                await asyncio.shield(self._finish(run, notify=False))
            raise
        except Exception as exc:
            run.error = _describe_failure(run, exc, index, total)
            run.status = ExecutionStatus.FAILED.value
            if not isinstance(exc, ComfyVastError):
                log.error("setup #%d crashed", execution_id, exc_info=exc)
            run.mark(f"failed: {run.error}")
        finally:
            ticker.cancel()
        return await self._finish(run, notify=True)

    async def _step(
        self, run: Run, target: SSHTarget, index: int, total: int, step: SetupStep
    ) -> None:
        run.current_step, run.step_name = index, step.name
        await self._store.persist(run, full=False)
        self.observer.on_update(run.execution_id)
        skipped = await run_step(self._remote.pool, target, run, index, total, step,
                                 lambda: self.observer.on_update(run.execution_id))
        if skipped:
            self.observer.on_update(run.execution_id)
        else:
            await self._store.persist(run, full=True)

    async def _tick(self, run: Run) -> None:
        """Persist the tail when output arrived, and refresh the elapsed time of a quiet
        step now and then (every fifth tick) without spending Discord's edit budget."""
        ticks = 0
        while True:
            await asyncio.sleep(self.tick)
            ticks += 1
            if run.dirty:
                try:
                    await self._store.persist(run, full=False)
                except Exception:
                    log.exception("could not store the progress of setup #%d", run.execution_id)
                self.observer.on_update(run.execution_id)
            elif ticks % 5 == 0:
                self.observer.on_update(run.execution_id)

    async def _finish(self, run: Run, *, notify: bool) -> ExecutionView:
        run.completed_at = utcnow()
        try:
            await self._store.persist(run, full=True)
        except BaseException:
            self.runs.pop(run.execution_id, None)
            raise
        finally:
            # Released even when the row could not be written: the lock is in memory.
            self.release(run.server.id)
        view = run.view()
        log.info("setup #%d of %s %s in %.1f s", run.execution_id, run.server.name,
                 run.status, view.elapsed())
        try:
            await self._registry.touch(run.server.id)
            if notify:
                await self._audit.record(
                    run.actor, "setup run",
                    outcome=OUTCOME_OK if view.succeeded else OUTCOME_ERROR,
                    resource=run.server.name,
                    details={"execution": run.execution_id, "profile": run.profile.name,
                             "version": run.profile.version, "error": run.error},
                )
                await self.observer.on_finished(view, run.text())
            if view.succeeded:
                for callback in self.on_installed:
                    callback(run.server)
        except Exception:
            log.exception("reporting the end of setup #%d failed", run.execution_id)
        finally:
            self.runs.pop(run.execution_id, None)
        return view


def _describe_failure(run: Run, exc: Exception, index: int, total: int) -> str:
    """One user-safe paragraph: which step failed and the end of its error output."""
    step = f"Step {index}/{total} ({run.step_name})" if index else "Setup"
    if isinstance(exc, HostKeyMismatch | SSHAuthError):
        return f"Setup refused: {exc}"
    if isinstance(exc, SSHCommandFailed):
        text = f"{step} failed with exit status {exc.exit_status}."
        if exc.stderr_tail:
            text += f"\n{exc.stderr_tail}"
        return text
    if isinstance(exc, SSHTimeout):
        text = f"{step} did not finish within {exc.timeout:g} seconds and was stopped."
        last = list(run.tail)[-5:]
        return text + ("\nLast lines of its output:\n" + "\n".join(last) if last else "")
    if isinstance(exc, ComfyVastError):
        return f"{step} failed: {exc}"
    return f"{step} failed with an unexpected error; it has been logged."
