"""The setup rows: profiles in ``setup_scripts`` and runs in ``server_executions``.

Profiles are read from TOML at start-up and stored in ``setup_scripts`` (name, version,
entries), which is what runs use. Each run is a ``server_executions`` row: status, current
step, the tail of the output (persisted every few seconds) and the full log. A
``pending``/``running`` row is what makes autostop treat the server as busy, so the
statuses are kept exact, and rows left ``running`` by a bot that died mid-setup are marked
failed (:meth:`SetupStore.recover`). This module is the only one that touches these tables.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Collection, Mapping
from typing import Any

from sqlalchemy import select, update

from core.db.engine import SessionFactory
from core.db.models import ExecutionStatus, Server, ServerExecution, SetupScript, utcnow
from core.setup.profiles import SetupProfile
from core.setup.runlog import Run, outcomes_of
from core.setup.types import ACTIVE_STATES, RESTART_ERROR, ExecutionView

log = logging.getLogger(__name__)


def profile_of(row: SetupScript) -> SetupProfile:
    return SetupProfile.from_entries(row.name, row.version, row.description, row.steps)


def _view_of_row(
    row: ServerExecution, server_name: str, script: SetupScript | None
) -> ExecutionView:
    profile = profile_of(script) if script is not None else None
    return ExecutionView(
        id=row.id, server_id=row.server_id, server_name=server_name,
        profile=profile.name if profile else None,
        profile_version=profile.version if profile else None, status=row.status,
        current_step=row.current_step, total_steps=row.total_steps,
        step_name=row.step_name,
        step_names=tuple(s.name for s in profile.steps) if profile else (),
        outcomes=outcomes_of(row.output or ""), output_tail=row.output_tail or "",
        error=row.error_log, requested_by=row.requested_by, channel_id=row.channel_id,
        message_id=row.message_id, created_at=row.created_at, started_at=row.started_at,
        completed_at=row.completed_at,
    )


def _select() -> Any:
    return (
        select(ServerExecution, Server.name, SetupScript)
        .join(Server, Server.id == ServerExecution.server_id)
        .outerjoin(SetupScript, SetupScript.id == ServerExecution.script_id)
    )


class SetupStore:
    """Reads and writes the setup tables through one session factory."""

    def __init__(self, sessions: SessionFactory) -> None:
        self._sessions = sessions

    # ------------------------------------------------------------------ profiles

    async def sync_profiles(self, profiles: Mapping[str, SetupProfile]) -> list[str]:
        """Upsert ``profiles`` into ``setup_scripts``; returns the names changed."""
        changed: list[str] = []
        async with self._sessions.begin() as session:
            rows = {r.name: r for r in (await session.scalars(select(SetupScript))).all()}
            for name, profile in profiles.items():
                entries = profile.to_entries()
                row = rows.get(name)
                if row is None:
                    session.add(SetupScript(name=name, version=profile.version,
                                            description=profile.description, steps=entries))
                elif row.steps != entries or row.version != profile.version or (
                    row.description != profile.description
                ):
                    if row.version == profile.version and row.steps != entries:
                        log.warning("setup profile %s changed without a new version", name)
                    row.version, row.description, row.steps = (
                        profile.version, profile.description, entries)
                else:
                    continue
                changed.append(name)
        return changed

    async def profiles(self) -> list[SetupProfile]:
        async with self._sessions() as session:
            rows = (await session.scalars(select(SetupScript).order_by(SetupScript.name))).all()
        return [profile_of(r) for r in rows]

    async def script(self, name: str) -> tuple[int, SetupProfile] | None:
        """The stored profile of that name and its row id, or None."""
        async with self._sessions() as session:
            row = (await session.scalars(
                select(SetupScript).where(SetupScript.name == name.strip().lower()))).first()
        return (row.id, profile_of(row)) if row is not None else None

    async def last_profile(self, server_id: int) -> SetupProfile | None:
        """The profile of the server's newest run, or None when it never had one."""
        async with self._sessions() as session:
            script = (await session.scalars(
                select(SetupScript).join(ServerExecution,
                                         ServerExecution.script_id == SetupScript.id)
                .where(ServerExecution.server_id == server_id)
                .order_by(ServerExecution.id.desc()).limit(1))).first()
        return profile_of(script) if script is not None else None

    # ------------------------------------------------------------------ runs: writes

    async def record_installation(
        self, server_id: int, profile: str, values: Mapping[str, str], *, installed: bool
    ) -> None:
        """After a setup succeeded (or a reset): where ComfyUI lives and answers on the
        server, its profile, and whether it now starts by itself on every boot."""
        changes: dict[str, Any] = {"setup_profile": profile, "comfy_installed": installed}
        if values.get("install_dir"):
            changes["comfy_path"] = values["install_dir"]
        if str(values.get("port", "")).isdigit():
            changes["comfy_port"] = int(values["port"])
        async with self._sessions.begin() as session:
            await session.execute(update(Server).where(Server.id == server_id).values(**changes))

    async def recover(self, keep: Collection[int]) -> int:
        """Mark runs left pending/running failed, except those in ``keep`` (they run in
        this process); returns how many."""
        stmt = (
            update(ServerExecution)
            .where(ServerExecution.status.in_(ACTIVE_STATES))
            .values(status=ExecutionStatus.FAILED.value, error_log=RESTART_ERROR,
                    completed_at=utcnow())
        )
        if keep:
            stmt = stmt.where(ServerExecution.id.not_in(list(keep)))
        async with self._sessions.begin() as session:
            result = await session.execute(stmt)
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    async def create(
        self, server_id: int, script_id: int, total_steps: int, requested_by: int | None,
        channel_id: int | None,
    ) -> tuple[int, dt.datetime]:
        """Record a pending run (failing the server's stale active rows first); returns
        its id and creation time."""
        async with self._sessions.begin() as session:
            # Rows a dead process left active would block autostop forever.
            await session.execute(
                update(ServerExecution)
                .where(ServerExecution.server_id == server_id)
                .where(ServerExecution.status.in_(ACTIVE_STATES))
                .values(status=ExecutionStatus.FAILED.value, error_log=RESTART_ERROR,
                        completed_at=utcnow()))
            row = ServerExecution(
                server_id=server_id, script_id=script_id,
                status=ExecutionStatus.PENDING.value, current_step=0,
                total_steps=total_steps, requested_by=requested_by,
                channel_id=channel_id, output_tail="", output="",
            )
            session.add(row)
            await session.flush()
            return row.id, row.created_at

    async def attach_message(self, execution_id: int, channel_id: int, message_id: int) -> None:
        async with self._sessions.begin() as session:
            await session.execute(
                update(ServerExecution).where(ServerExecution.id == execution_id)
                .values(channel_id=channel_id, message_id=message_id))

    async def fail(self, execution_id: int, reason: str) -> None:
        async with self._sessions.begin() as session:
            await session.execute(
                update(ServerExecution).where(ServerExecution.id == execution_id)
                .values(status=ExecutionStatus.FAILED.value, error_log=reason,
                        completed_at=utcnow()))

    async def persist(self, run: Run, *, full: bool) -> None:
        """Write the run's state; with ``full`` also its whole log."""
        run.dirty = False
        values: dict[str, Any] = {
            "status": run.status, "current_step": run.current_step,
            "step_name": run.step_name, "output_tail": "\n".join(run.tail),
            "started_at": run.started_at, "completed_at": run.completed_at,
            "error_log": run.error,
        }
        if full:
            values["output"] = run.text()
        async with self._sessions.begin() as session:
            await session.execute(
                update(ServerExecution).where(ServerExecution.id == run.execution_id)
                .values(**values))

    # ------------------------------------------------------------------ runs: reads

    async def view(self, execution_id: int) -> ExecutionView | None:
        async with self._sessions() as session:
            found = (await session.execute(
                _select().where(ServerExecution.id == execution_id))).first()
        return _view_of_row(*found) if found is not None else None

    async def latest(self, server_id: int) -> ExecutionView | None:
        async with self._sessions() as session:
            found = (await session.execute(
                _select().where(ServerExecution.server_id == server_id)
                .order_by(ServerExecution.id.desc()).limit(1))).first()
        return _view_of_row(*found) if found else None

    async def recent(self, limit: int) -> list[ExecutionView]:
        async with self._sessions() as session:
            rows = (await session.execute(
                _select().order_by(ServerExecution.id.desc()).limit(limit))).all()
        return [_view_of_row(*r) for r in rows]

    async def output(self, execution_id: int) -> str | None:
        """The full log stored with the run; None when there is no such run."""
        async with self._sessions() as session:
            row = await session.get(ServerExecution, execution_id)
        return None if row is None else row.output or ""
