"""SetupService: install, repair and reset ComfyUI on a server over SSH, one step at a time.

A *profile* is data (a TOML file in ``core/profiles/``): named parameters with defaults and
a list of steps, each with a ``check`` command that exits 0 when the step is already done,
the ``run`` command, and a timeout. A run executes the steps in order and skips every step
whose check passes, so a run after a failure or a dropped connection resumes where the last
one stopped, and a run on an installed server only checks. One run per server at a time.

Templating: ``{{name}}`` in a command is replaced by the parameter's value **already
quoted** for the shell (:func:`shlex.quote`), so it must stand outside quotes:
``cd {{install_dir}}/models``, never ``cd "{{install_dir}}"``. Parameter defaults may
refer to earlier parameters (``python = "{{install_dir}}/venv/bin/python"``); there the
expansion is raw, the quoting happens when the final value lands in a command. Nothing
secret is ever templated: any secret a future step needs must go through ``secret_env``
(stdin), never the command line that ``ps`` shows.

Profiles are read from TOML at start-up and stored in ``setup_scripts`` (name, version,
entries), which is what runs use. Each run is a ``server_executions`` row: status, current
step, the tail of the output (persisted every few seconds) and the full log. A
``pending``/``running`` row is what makes autostop treat the server as busy, so the
statuses are kept exact, and rows left ``running`` by a bot that died mid-setup are marked
failed on start (:meth:`SetupService.recover`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
import secrets
import shlex
import time
import tomllib
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from sqlalchemy import select, update

from core.audit import OUTCOME_ERROR, OUTCOME_OK, Actor, AuditService
from core.config import Settings
from core.db.engine import SessionFactory
from core.db.models import (
    ExecutionStatus,
    Provider,
    Server,
    ServerExecution,
    ServerStatus,
    SetupScript,
    utcnow,
)
from core.errors import ComfyVastError, ConfigError, NotFound, ResourceBusy, ValidationFailed
from core.remote import Remote
from core.servers import ServerRegistry, ServerView
from core.ssh import (
    HostKeyMismatch,
    SSHAuthError,
    SSHCommandFailed,
    SSHError,
    SSHTarget,
    SSHTimeout,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PROFILE",
    "DEFAULT_PROFILE_DIR",
    "ExecutionView",
    "Installation",
    "ResetPlan",
    "ResetResult",
    "SetupObserver",
    "SetupProfile",
    "SetupService",
    "SetupStep",
    "StepOutcome",
    "load_profiles",
]

DEFAULT_PROFILE_DIR = Path(__file__).with_name("profiles")
DEFAULT_PROFILE = "default"

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
PROFILE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
STEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Parameters the service fills from the server and the settings when a profile has them.
COMPUTED_PARAMS = ("port", "listen")
# Lines and characters of output kept in the row's tail and shown in Discord.
TAIL_LINES = 15
TAIL_LINE_CHARS = 300
# The full log is kept in memory and the row; past this, the oldest part is dropped.
MAX_LOG_CHARS = 4_000_000
CHECK_TIMEOUT = 60.0
MAX_TIMEOUT = 6 * 3600.0
# How often a running setup persists its tail and refreshes the status message, seconds.
TICK_SECONDS = 2.0
# A marker line in the log per step outcome; /setup status rebuilds the step list from it.
_MARKER = "==> "
_OUTCOME_LINE = re.compile(
    r"^==> \[(\d+)/(\d+)\] (.+?): (skipped|done|failed)(?: in ([0-9.]+) s)?", re.MULTILINE
)
ACTIVE_STATES = (ExecutionStatus.PENDING.value, ExecutionStatus.RUNNING.value)
RESTART_ERROR = "The bot restarted while this setup was running; run /setup run again to resume."
STOP_ERROR = "The bot stopped while this setup was running; run /setup run again to resume."


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True, slots=True)
class SetupStep:
    """One step: ``check`` exits 0 when it is already done; ``run`` does it."""

    name: str
    run: str
    check: str | None = None
    timeout: float = 600.0


@dataclass(frozen=True)
class SetupProfile:
    """A named, versioned list of steps over named parameters (see the module docstring)."""

    name: str
    version: str
    description: str
    params: Mapping[str, str]
    steps: tuple[SetupStep, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    reset: str | None = None
    reset_timeout: float = 300.0
    reset_summary: str = "removes what this profile installed"

    def step(self, name: str) -> SetupStep:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    # -- parameters and templates

    def resolve(self, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        """The parameter values: defaults, then ``overrides`` (names the profile lacks are
        ignored), each expanded raw against the parameters defined before it."""
        overrides = overrides or {}
        values: dict[str, str] = {}
        for name, default in self.params.items():
            raw = str(overrides.get(name, default))
            value = PLACEHOLDER.sub(lambda m, n=name: _lookup(values, m.group(1), n), raw)
            _check_value(name, value)
            values[name] = value
        return values

    def render(self, template: str, values: Mapping[str, str]) -> str:
        """A command with every placeholder replaced by its shell-quoted value."""
        return PLACEHOLDER.sub(lambda m: shlex.quote(_lookup(values, m.group(1), "command")),
                               template)

    def describe(self, template: str, values: Mapping[str, str]) -> str:
        """A human sentence with placeholders replaced raw (for Discord, never a shell)."""
        return PLACEHOLDER.sub(lambda m: _lookup(values, m.group(1), "text"), template)

    # -- storage in setup_scripts.steps (a JSON list of typed entries, in order)

    def to_entries(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = [
            {"kind": "param", "name": k, "default": v} for k, v in self.params.items()
        ]
        entries += [{"kind": "env", "name": k, "value": v} for k, v in self.env.items()]
        entries += [
            {"kind": "step", "name": s.name, "check": s.check, "run": s.run,
             "timeout": s.timeout}
            for s in self.steps
        ]
        if self.reset is not None:
            entries.append({"kind": "reset", "run": self.reset, "timeout": self.reset_timeout,
                            "summary": self.reset_summary})
        return entries

    @classmethod
    def from_entries(
        cls, name: str, version: str, description: str | None, entries: Sequence[Any]
    ) -> SetupProfile:
        params: dict[str, str] = {}
        env: dict[str, str] = {}
        steps: list[SetupStep] = []
        reset: dict[str, Any] = {}
        for entry in entries:
            kind = entry.get("kind")
            if kind == "param":
                params[entry["name"]] = str(entry["default"])
            elif kind == "env":
                env[entry["name"]] = str(entry["value"])
            elif kind == "step":
                steps.append(SetupStep(entry["name"], entry["run"], entry.get("check"),
                                       float(entry["timeout"])))
            elif kind == "reset":
                reset = entry
        return cls(
            name=name, version=version, description=description or "", params=params,
            steps=tuple(steps), env=env, reset=reset.get("run"),
            reset_timeout=float(reset.get("timeout", 300.0)),
            reset_summary=reset.get("summary") or "removes what this profile installed",
        )


def _lookup(values: Mapping[str, str], name: str, where: str) -> str:
    try:
        return values[name]
    except KeyError:
        raise ValueError(f"{where} refers to the unknown parameter {name!r}") from None


def _check_value(name: str, value: str) -> None:
    if "\n" in value or "\0" in value or "\r" in value:
        raise ValidationFailed(f"The setup parameter {name} must be a single line.")
    if name == "install_dir":
        path = PurePosixPath(value)
        # reset deletes this directory: refuse anything that could be a system directory.
        if not path.is_absolute() or ".." in path.parts or len(path.parts) < 3:
            raise ValidationFailed(
                "The setup parameter install_dir must be an absolute path at least two "
                "directories deep (like /opt/ComfyUI) without '..'."
            )


def _placeholders(text: str | None) -> set[str]:
    return set(PLACEHOLDER.findall(text or ""))


def load_profiles(dirs: Iterable[Path]) -> dict[str, SetupProfile]:
    """Read every ``*.toml`` in ``dirs`` (later directories win on a name clash).

    A step may be ``{name = "start", from = "default"}``: a copy of that profile's step,
    so profiles share steps instead of duplicating shell. Raises :class:`ConfigError`
    naming the file and the problem.
    """
    docs: dict[str, tuple[Path, dict[str, Any]]] = {}
    for directory in dirs:
        for path in sorted(Path(directory).glob("*.toml")):
            try:
                doc = tomllib.loads(path.read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"The setup profile {path} could not be read: {exc}.") from None
            name = str(doc.get("name", path.stem))
            docs[name] = (path, doc)
    profiles: dict[str, SetupProfile] = {}
    for name, (path, doc) in docs.items():
        try:
            profiles[name] = _profile_from_doc(name, doc, docs)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"The setup profile {path} is invalid: {exc}.") from None
    return profiles


def _profile_from_doc(
    name: str, doc: dict[str, Any], docs: Mapping[str, tuple[Path, dict[str, Any]]],
    _seen: tuple[str, ...] = (),
) -> SetupProfile:
    if not PROFILE_NAME.match(name):
        raise ValueError("the name must be 1-32 lowercase letters, digits, '-' or '_'")
    known = {"name", "version", "description", "params", "env", "steps", "reset",
             "reset_timeout", "reset_summary"}
    unknown = set(doc) - known
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    params = {str(k): str(v) for k, v in (doc.get("params") or {}).items()}
    env = {str(k): str(v) for k, v in (doc.get("env") or {}).items()}
    for key in env:
        if not ENV_NAME.match(key):
            raise ValueError(f"env name {key!r} is not a valid variable name")
    steps: list[SetupStep] = []
    for raw in doc.get("steps") or []:
        steps.append(_step_from_doc(raw, docs, (*_seen, name)))
    if not steps:
        raise ValueError("a profile needs at least one [[steps]] entry")
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError("step names must be unique")
    reset = doc.get("reset")
    profile = SetupProfile(
        name=name, version=str(doc.get("version", "1")),
        description=str(doc.get("description", "")).strip(), params=params,
        steps=tuple(steps), env=env, reset=str(reset) if reset else None,
        reset_timeout=_timeout(doc.get("reset_timeout", 300)),
        reset_summary=str(doc.get("reset_summary") or "removes what this profile installed"),
    )
    # Every placeholder must name a parameter; parameters may only use earlier ones.
    defined: list[str] = []
    for key, value in params.items():
        missing = _placeholders(value) - set(defined)
        if missing:
            raise ValueError(f"parameter {key} refers to {sorted(missing)} defined after it")
        defined.append(key)
    texts = [(s.name, s.check) for s in steps] + [(s.name, s.run) for s in steps]
    texts += [("reset", profile.reset), ("reset_summary", profile.reset_summary)]
    for where, text in texts:
        missing = _placeholders(text) - set(params)
        if missing:
            raise ValueError(f"{where} uses undefined parameters {sorted(missing)}")
    return profile


def _step_from_doc(
    raw: dict[str, Any], docs: Mapping[str, tuple[Path, dict[str, Any]]], seen: tuple[str, ...]
) -> SetupStep:
    name = str(raw.get("name", ""))
    if not STEP_NAME.match(name):
        raise ValueError(
            f"step name {name!r} must be 1-64 letters, digits, spaces, '.', '_' or '-'")
    source = raw.get("from")
    if source is not None:
        if source in seen or source not in docs:
            raise ValueError(f"step {name}: there is no profile {source!r} to copy it from")
        _, other = docs[source]
        match = [s for s in other.get("steps") or [] if s.get("name") == name]
        if not match:
            raise ValueError(f"step {name}: profile {source!r} has no step of that name")
        base = _step_from_doc(match[0], docs, (*seen, source))
        return replace(base, timeout=_timeout(raw.get("timeout", base.timeout)))
    unknown = set(raw) - {"name", "check", "run", "timeout"}
    if unknown:
        raise ValueError(f"step {name}: unknown keys {sorted(unknown)}")
    run = raw.get("run")
    if not isinstance(run, str) or not run.strip():
        raise ValueError(f"step {name} has no run command")
    check = raw.get("check")
    if check is not None and (not isinstance(check, str) or not check.strip()):
        check = None
    return SetupStep(name=name, run=run.strip(), check=check.strip() if check else None,
                     timeout=_timeout(raw.get("timeout", 600)))


def _timeout(value: Any) -> float:
    seconds = float(value)
    if not 0 < seconds <= MAX_TIMEOUT:
        raise ValueError(f"timeouts must be between 0 and {MAX_TIMEOUT:g} seconds")
    return seconds


def posix_sh(script: str) -> str:
    """Run ``script`` with ``sh`` whatever the user's login shell is (zsh does not split
    words, fish is not POSIX). ``exec`` keeps the pid the SSH layer reported, so a timed
    out step is still killed with its whole process group."""
    return "exec sh -c " + shlex.quote(script)


def step_command(
    profile: SetupProfile, step: SetupStep, values: Mapping[str, str], marker: str
) -> str:
    """The one remote command for a step: its check, then (unless the check passed) its
    command with ``set -e``.

    One SSH session per step instead of two halves the round trips. The check runs in its
    own ``sh -e`` (``set -e`` is ignored inside an ``if`` condition), silenced and bounded
    by ``timeout`` when the server has it; when it passes, ``marker`` is printed and
    nothing else runs.
    """
    run = "set -e\n" + profile.render(step.run, values)
    if step.check is None:
        return posix_sh(run)
    check = shlex.quote("set -e\n" + profile.render(step.check, values))
    return posix_sh(
        f"if command -v timeout >/dev/null 2>&1; then limit='timeout {CHECK_TIMEOUT:g}'; "
        "else limit=; fi\n"
        f"if $limit sh -c {check} </dev/null >/dev/null 2>&1; then\n"
        f"  echo {shlex.quote(marker)}\n  exit 0\nfi\n"
        f"unset limit\n{run}"
    )


# --------------------------------------------------------------------------- views


@dataclass(frozen=True, slots=True)
class StepOutcome:
    index: int
    name: str
    outcome: str  # "skipped" | "done" | "failed"
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class ExecutionView:
    """A snapshot of one setup run, safe to pass to the Discord side."""

    id: int
    server_id: int
    server_name: str
    profile: str | None
    profile_version: str | None
    status: str
    current_step: int
    total_steps: int
    step_name: str | None
    step_names: tuple[str, ...]
    outcomes: tuple[StepOutcome, ...]
    output_tail: str
    error: str | None
    requested_by: int | None
    channel_id: int | None
    message_id: int | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    completed_at: dt.datetime | None

    @property
    def finished(self) -> bool:
        return self.status in (ExecutionStatus.SUCCEEDED.value, ExecutionStatus.FAILED.value)

    @property
    def succeeded(self) -> bool:
        return self.status == ExecutionStatus.SUCCEEDED.value

    def elapsed(self, now: dt.datetime | None = None) -> float:
        if self.started_at is None:
            return 0.0
        end = self.completed_at or now or utcnow()
        return max((end - self.started_at).total_seconds(), 0.0)

    def ran(self) -> list[str]:
        """Names of the steps whose command ran (not skipped), in order."""
        return [o.name for o in self.outcomes if o.outcome != "skipped"]

    def skipped(self) -> list[str]:
        return [o.name for o in self.outcomes if o.outcome == "skipped"]


@dataclass(frozen=True, slots=True)
class Installation:
    """Where a server's ComfyUI lives according to the profile it was set up with."""

    server: ServerView
    profile: str
    params: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class ResetPlan:
    server: str
    profile: str
    summary: str


@dataclass(frozen=True, slots=True)
class ResetResult:
    server: str
    profile: str
    summary: str
    output_tail: str


class SetupObserver(Protocol):
    """Implemented by the Discord side to render a run's status message."""

    def on_update(self, execution_id: int) -> None:
        """Something changed; cheap, called often (the renderer coalesces)."""

    async def on_finished(self, view: ExecutionView, log_text: str) -> None:
        """The run ended (succeeded or failed); ``log_text`` is the full log."""


class _NullObserver:
    def on_update(self, execution_id: int) -> None:
        return None

    async def on_finished(self, view: ExecutionView, log_text: str) -> None:
        return None


@dataclass(eq=False)
class _Run:
    """In-memory state of a run in this process."""

    execution_id: int
    server: ServerView
    profile: SetupProfile
    script_id: int | None
    params: dict[str, str]
    actor: Actor
    created_at: dt.datetime
    channel_id: int | None = None
    message_id: int | None = None
    status: str = ExecutionStatus.PENDING.value
    current_step: int = 0
    step_name: str | None = None
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    error: str | None = None
    outcomes: list[StepOutcome] = field(default_factory=list)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    chunks: list[str] = field(default_factory=list)
    size: int = 0
    dirty: bool = False
    task: asyncio.Task[ExecutionView] | None = None

    def write(self, line: str) -> None:
        self.chunks.append(line + "\n")
        self.size += len(line) + 1
        if self.size > MAX_LOG_CHARS:
            # Keep the newest part: the failure is at the end.
            text = "".join(self.chunks)[-MAX_LOG_CHARS // 2 :]
            self.chunks = ["[earlier output dropped]\n", text]
            self.size = len(text) + 25

    def output(self, line: str) -> None:
        self.write(line)
        self.tail.append(line[:TAIL_LINE_CHARS])
        self.dirty = True

    def text(self) -> str:
        return "".join(self.chunks)


# --------------------------------------------------------------------------- service


class SetupService:
    """Runs setup profiles on servers over SSH; see the module docstring."""

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
        self._sessions = sessions
        self._registry = registry
        self._remote = remote
        self._audit = audit
        self.profile_dirs = tuple(profile_dirs)
        # Overrides applied to every profile that has the parameter (e.g. install_dir).
        self.params = dict(params or {})
        self.tick = tick
        self.observer: SetupObserver = _NullObserver()
        self._runs: dict[int, _Run] = {}
        # server id -> execution id (0 while reserving): one setup or reset per server.
        self._active: dict[int, int] = {}
        self._ready = False
        self._ready_lock = asyncio.Lock()

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
        if changed:
            log.info("stored setup profiles: %s", ", ".join(sorted(changed)))
        return changed

    async def recover(self) -> int:
        """Mark runs left pending/running by a previous process failed; returns how many."""
        stmt = (
            update(ServerExecution)
            .where(ServerExecution.status.in_(ACTIVE_STATES))
            .values(status=ExecutionStatus.FAILED.value, error_log=RESTART_ERROR,
                    completed_at=utcnow())
        )
        if self._runs:
            stmt = stmt.where(ServerExecution.id.not_in(list(self._runs)))
        async with self._sessions.begin() as session:
            result = await session.execute(stmt)
        count = int(result.rowcount or 0)  # type: ignore[attr-defined]
        if count:
            log.warning("marked %d interrupted setup runs failed", count)
        return count

    async def close(self) -> None:
        """Cancel running setups; their rows are marked failed (resumable)."""
        tasks = [r.task for r in self._runs.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ------------------------------------------------------------------ profiles

    async def profiles(self) -> list[SetupProfile]:
        await self._ensure_ready()
        async with self._sessions() as session:
            rows = (await session.scalars(select(SetupScript).order_by(SetupScript.name))).all()
        return [self._profile_of(r) for r in rows]

    async def profile_names(self, prefix: str = "") -> list[str]:
        return [p.name for p in await self.profiles() if prefix.lower() in p.name]

    @staticmethod
    def _profile_of(row: SetupScript) -> SetupProfile:
        return SetupProfile.from_entries(row.name, row.version, row.description, row.steps)

    async def _script(self, name: str) -> tuple[int, SetupProfile]:
        await self._ensure_ready()
        async with self._sessions() as session:
            row = (await session.scalars(
                select(SetupScript).where(SetupScript.name == name.strip().lower()))).first()
        if row is None:
            names = ", ".join(await self.profile_names()) or "none"
            raise NotFound(f"There is no setup profile named '{name}' (known: {names}).")
        return row.id, self._profile_of(row)

    def _values(
        self, profile: SetupProfile, server: ServerView, overrides: Mapping[str, str] | None
    ) -> dict[str, str]:
        computed = {
            "port": str(server.comfy_port or self._settings.comfy.default_port),
            # ComfyUI has no login: it listens on loopback and the bot comes through the SSH
            # tunnel, unless the operator opted in to exposing the port.
            "listen": "0.0.0.0" if self._settings.comfy.expose_port else "127.0.0.1",
        }
        merged: dict[str, str] = {k: v for k, v in computed.items() if k in profile.params}
        merged.update({k: v for k, v in self.params.items() if k in profile.params})
        unknown = set(overrides or {}) - set(profile.params)
        if unknown:
            raise ValidationFailed(
                f"The profile {profile.name} has no parameter {sorted(unknown)[0]}.")
        merged.update(overrides or {})
        try:
            return profile.resolve(merged)
        except ValueError as exc:
            raise ValidationFailed(f"The profile {profile.name} is invalid: {exc}.") from None

    # ------------------------------------------------------------------ queries

    async def get(self, execution_id: int) -> ExecutionView:
        run = self._runs.get(execution_id)
        if run is not None:
            return self._view_of_run(run)
        async with self._sessions() as session:
            found = (await session.execute(
                self._select().where(ServerExecution.id == execution_id))).first()
        if found is None:
            raise NotFound(f"There is no setup run #{execution_id}.")
        return self._view_of_row(*found)

    def snapshot(self, execution_id: int) -> ExecutionView | None:
        """The live state of a run in this process (no database access), else None."""
        run = self._runs.get(execution_id)
        return self._view_of_run(run) if run is not None else None

    async def latest(self, server: str | int) -> ExecutionView | None:
        view = await self._registry.get(server)
        for run in sorted(self._runs.values(), key=lambda r: -r.execution_id):
            if run.server.id == view.id:
                return self._view_of_run(run)
        async with self._sessions() as session:
            found = (await session.execute(
                self._select().where(ServerExecution.server_id == view.id)
                .order_by(ServerExecution.id.desc()).limit(1))).first()
        return self._view_of_row(*found) if found else None

    async def recent(self, limit: int = 25) -> list[ExecutionView]:
        async with self._sessions() as session:
            rows = (await session.execute(
                self._select().order_by(ServerExecution.id.desc()).limit(limit))).all()
        return [self.snapshot(r[0].id) or self._view_of_row(*r) for r in rows]

    async def log(self, execution_id: int) -> str:
        """The full log of a run (live while it runs)."""
        run = self._runs.get(execution_id)
        if run is not None:
            return run.text()
        async with self._sessions() as session:
            row = await session.get(ServerExecution, execution_id)
        if row is None:
            raise NotFound(f"There is no setup run #{execution_id}.")
        return row.output or ""

    @staticmethod
    def _select() -> Any:
        return (
            select(ServerExecution, Server.name, SetupScript)
            .join(Server, Server.id == ServerExecution.server_id)
            .outerjoin(SetupScript, SetupScript.id == ServerExecution.script_id)
        )

    def _view_of_run(self, run: _Run) -> ExecutionView:
        return ExecutionView(
            id=run.execution_id, server_id=run.server.id, server_name=run.server.name,
            profile=run.profile.name, profile_version=run.profile.version, status=run.status,
            current_step=run.current_step, total_steps=len(run.profile.steps),
            step_name=run.step_name, step_names=tuple(s.name for s in run.profile.steps),
            outcomes=tuple(run.outcomes), output_tail="\n".join(run.tail), error=run.error,
            requested_by=run.actor.user_id, channel_id=run.channel_id,
            message_id=run.message_id, created_at=run.created_at, started_at=run.started_at,
            completed_at=run.completed_at,
        )

    def _view_of_row(
        self, row: ServerExecution, server_name: str, script: SetupScript | None
    ) -> ExecutionView:
        profile = self._profile_of(script) if script is not None else None
        outcomes = tuple(
            StepOutcome(int(m.group(1)), m.group(3), m.group(4),
                        float(m.group(5)) if m.group(5) else None)
            for m in _OUTCOME_LINE.finditer(row.output or "")
        )
        return ExecutionView(
            id=row.id, server_id=row.server_id, server_name=server_name,
            profile=profile.name if profile else None,
            profile_version=profile.version if profile else None, status=row.status,
            current_step=row.current_step, total_steps=row.total_steps,
            step_name=row.step_name,
            step_names=tuple(s.name for s in profile.steps) if profile else (),
            outcomes=outcomes, output_tail=row.output_tail or "", error=row.error_log,
            requested_by=row.requested_by, channel_id=row.channel_id,
            message_id=row.message_id, created_at=row.created_at, started_at=row.started_at,
            completed_at=row.completed_at,
        )

    async def installation(self, server: str | int | ServerView) -> Installation:
        """The parameters of the profile this server was last set up with (else default)."""
        view = server if isinstance(server, ServerView) else await self._registry.get(server)
        await self._ensure_ready()
        async with self._sessions() as session:
            script = (await session.scalars(
                select(SetupScript).join(ServerExecution,
                                         ServerExecution.script_id == SetupScript.id)
                .where(ServerExecution.server_id == view.id)
                .order_by(ServerExecution.id.desc()).limit(1))).first()
        if script is not None:
            profile = self._profile_of(script)
        else:
            _, profile = await self._script(DEFAULT_PROFILE)
        return Installation(view, profile.name, self._values(profile, view, None))

    # ------------------------------------------------------------------ running

    def _require_ssh(self, server: ServerView) -> None:
        if server.provider == Provider.DIRECT.value or not server.ssh_host:
            raise ValidationFailed(
                f"Server {server.name} is reached by its ComfyUI URL only; there is no SSH "
                "access to set it up.")
        if server.status != ServerStatus.RUNNING.value:
            raise ValidationFailed(
                f"Server {server.name} is {server.status}; setup needs it running.")

    def _reserve(self, server: ServerView) -> None:
        # Check and set with no await in between: this is the per-server lock.
        if server.id in self._active:
            current = self._active[server.id]
            what = f" (run #{current})" if current else ""
            raise ResourceBusy(
                f"Setup is busy on {server.name}{what}; wait for it to finish or check "
                "/setup status.")
        self._active[server.id] = 0

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
        script_id, prof = await self._script(profile or DEFAULT_PROFILE)
        values = self._values(prof, view, params)
        self._reserve(view)
        try:
            async with self._sessions.begin() as session:
                # Rows a dead process left active would block autostop forever.
                await session.execute(
                    update(ServerExecution)
                    .where(ServerExecution.server_id == view.id)
                    .where(ServerExecution.status.in_(ACTIVE_STATES))
                    .values(status=ExecutionStatus.FAILED.value, error_log=RESTART_ERROR,
                            completed_at=utcnow()))
                row = ServerExecution(
                    server_id=view.id, script_id=script_id,
                    status=ExecutionStatus.PENDING.value, current_step=0,
                    total_steps=len(prof.steps), requested_by=actor.user_id,
                    channel_id=channel_id, output_tail="", output="",
                )
                session.add(row)
                await session.flush()
                execution_id, created = row.id, row.created_at
        except BaseException:
            del self._active[view.id]
            raise
        self._active[view.id] = execution_id
        run = _Run(execution_id=execution_id, server=view, profile=prof, script_id=script_id,
                   params=values, actor=actor, created_at=created, channel_id=channel_id)
        self._runs[execution_id] = run
        log.info("setup #%d of %s with profile %s v%s requested", execution_id, view.name,
                 prof.name, prof.version)
        return self._view_of_run(run)

    async def attach_message(self, execution_id: int, channel_id: int, message_id: int) -> None:
        run = self._runs[execution_id]
        run.channel_id, run.message_id = channel_id, message_id
        async with self._sessions.begin() as session:
            await session.execute(
                update(ServerExecution).where(ServerExecution.id == execution_id)
                .values(channel_id=channel_id, message_id=message_id))

    async def abandon(self, execution_id: int, reason: str) -> None:
        """Give up a run that never started (e.g. its status message could not be posted)."""
        run = self._runs.pop(execution_id, None)
        if run is None:
            return
        self._active.pop(run.server.id, None)
        async with self._sessions.begin() as session:
            await session.execute(
                update(ServerExecution).where(ServerExecution.id == execution_id)
                .values(status=ExecutionStatus.FAILED.value, error_log=reason,
                        completed_at=utcnow()))

    def start(self, execution_id: int) -> asyncio.Task[ExecutionView]:
        """Run in the background; the task is kept and its failure logged."""
        run = self._runs[execution_id]
        task = asyncio.create_task(self.execute(execution_id), name=f"setup-{execution_id}")
        run.task = task
        task.add_done_callback(self._task_done)
        return task

    @staticmethod
    def _task_done(task: asyncio.Task[ExecutionView]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("setup task %s failed", task.get_name(), exc_info=task.exception())

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
        run = self._runs[execution_id]
        run.status = ExecutionStatus.RUNNING.value
        run.started_at = utcnow()
        total = len(run.profile.steps)
        run.write(f"{_MARKER}comfyvast setup #{execution_id}: profile {run.profile.name} "
                  f"v{run.profile.version} on {run.server.name} "
                  f"({run.started_at:%Y-%m-%d %H:%M:%S} UTC)")
        await self._persist(run, full=True)
        await self._registry.touch(run.server.id, channel_id=run.channel_id)
        self.observer.on_update(execution_id)
        ticker = asyncio.create_task(self._tick(run), name=f"setup-{execution_id}-tick")
        index = 0
        try:
            target = self._remote.target(run.server)
            # Connect (and verify the pinned host key) before any step is marked started.
            async with self._remote.pool.connection(target):
                pass
            for index, step in enumerate(run.profile.steps, start=1):
                await self._step(run, target, index, total, step)
            run.status = ExecutionStatus.SUCCEEDED.value
            run.write(f"{_MARKER}finished: all {total} steps done")
        except asyncio.CancelledError:
            run.error = STOP_ERROR
            run.status = ExecutionStatus.FAILED.value
            run.write(f"{_MARKER}stopped: {STOP_ERROR}")
            ticker.cancel()
            # Record the outcome even though we are being cancelled (bot shutdown).
            with contextlib.suppress(Exception):
                await asyncio.shield(self._finish(run, notify=False))
            raise
        except Exception as exc:
            run.error = self._describe_failure(run, exc, index, total)
            run.status = ExecutionStatus.FAILED.value
            if not isinstance(exc, ComfyVastError):
                log.error("setup #%d crashed", execution_id, exc_info=exc)
            run.write(f"{_MARKER}failed: {run.error}")
        finally:
            ticker.cancel()
        return await self._finish(run, notify=True)

    def _describe_failure(self, run: _Run, exc: Exception, index: int, total: int) -> str:
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

    async def _step(
        self, run: _Run, target: SSHTarget, index: int, total: int, step: SetupStep
    ) -> None:
        run.current_step, run.step_name = index, step.name
        label = f"[{index}/{total}] {step.name}"
        await self._persist(run, full=False)
        self.observer.on_update(run.execution_id)
        run.tail.clear()
        # A marker nobody's output can guess: the check passed and the command was skipped.
        marker = f"comfyvast-step-already-done-{secrets.token_hex(8)}"
        skipped = False

        def on_line(_stream: str, line: str) -> None:
            nonlocal skipped
            if line == marker:
                skipped = True
                return
            if not started_logged:
                start_log()
            run.output(line)
            self.observer.on_update(run.execution_id)

        started_logged = False

        def start_log() -> None:
            nonlocal started_logged
            started_logged = True
            run.write(f"{_MARKER}{label}: running (timeout {step.timeout:g} s)")

        started = time.monotonic()
        try:
            await self._remote.pool.run(
                target, step_command(run.profile, step, run.params, marker),
                timeout=step.timeout, on_line=on_line, env=run.profile.env)
        except BaseException:
            seconds = time.monotonic() - started
            if not started_logged:
                start_log()
            run.outcomes.append(StepOutcome(index, step.name, "failed", round(seconds, 1)))
            run.write(f"{_MARKER}{label}: failed in {seconds:.1f} s")
            raise
        seconds = time.monotonic() - started
        if skipped:
            run.outcomes.append(StepOutcome(index, step.name, "skipped"))
            run.write(f"{_MARKER}{label}: skipped (already done)")
            self.observer.on_update(run.execution_id)
            return
        if not started_logged:
            start_log()
        run.outcomes.append(StepOutcome(index, step.name, "done", round(seconds, 1)))
        run.write(f"{_MARKER}{label}: done in {seconds:.1f} s")
        await self._persist(run, full=True)

    async def _tick(self, run: _Run) -> None:
        """Persist the tail when output arrived, and refresh the elapsed time of a quiet
        step now and then (every fifth tick) without spending Discord's edit budget."""
        ticks = 0
        while True:
            await asyncio.sleep(self.tick)
            ticks += 1
            if run.dirty:
                try:
                    await self._persist(run, full=False)
                except Exception:
                    log.exception("could not store the progress of setup #%d", run.execution_id)
                self.observer.on_update(run.execution_id)
            elif ticks % 5 == 0:
                self.observer.on_update(run.execution_id)

    async def _persist(self, run: _Run, *, full: bool) -> None:
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

    async def _finish(self, run: _Run, *, notify: bool) -> ExecutionView:
        run.completed_at = utcnow()
        try:
            await self._persist(run, full=True)
        except BaseException:
            self._runs.pop(run.execution_id, None)
            raise
        finally:
            # Released even when the row could not be written: the lock is in memory.
            self._active.pop(run.server.id, None)
        view = self._view_of_run(run)
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
        except Exception:
            log.exception("reporting the end of setup #%d failed", run.execution_id)
        finally:
            self._runs.pop(run.execution_id, None)
        return view

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
        self._reserve(view)
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
            self._active.pop(view.id, None)
        await self._audit.record(actor, "setup reset", outcome=OUTCOME_OK, resource=view.name,
                                 details={"profile": prof.name})
        log.info("setup state of %s reset (profile %s)", view.name, prof.name)
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-TAIL_LINES:])
        return ResetResult(view.name, prof.name, plan.summary, tail)

    def busy(self, server_id: int) -> bool:
        return server_id in self._active
