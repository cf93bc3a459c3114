"""What the setup service hands out: run views, installation facts, reset plans and
results, the observer the Discord side implements, and the sentences a run fails with."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from core.db.models import ExecutionStatus, utcnow
from core.servers import ServerView

# A pending/running row makes autostop treat the server as busy, so these are kept exact.
ACTIVE_STATES = (ExecutionStatus.PENDING.value, ExecutionStatus.RUNNING.value)
RESTART_ERROR = "The bot restarted while this setup was running; run /setup run again to resume."
STOP_ERROR = "The bot stopped while this setup was running; run /setup run again to resume."


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


class SetupObserver:
    """Told about a run's progress; the Discord side renders the status message from it.

    The methods do nothing here, so an instance of this class is the observer of a service
    nobody watches (tests, the CLI).
    """

    def on_update(self, execution_id: int) -> None:
        """Something changed; cheap, called often (the renderer coalesces)."""
        return None

    async def on_finished(self, view: ExecutionView, log_text: str) -> None:
        """The run ended (succeeded or failed); ``log_text`` is the full log."""
        return None
