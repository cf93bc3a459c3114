"""The in-memory state of a setup run in this process: its log buffer (bounded), the tail
shown in Discord, and the marker lines from which a finished run's steps are rebuilt."""

from __future__ import annotations

import datetime as dt
import re
from collections import deque
from dataclasses import dataclass, field

from core.audit import Actor
from core.db.models import ExecutionStatus
from core.servers import ServerView
from core.setup.profiles import SetupProfile
from core.setup.types import ExecutionView, StepOutcome

# Lines and characters of output kept in the row's tail and shown in Discord.
TAIL_LINES = 15
TAIL_LINE_CHARS = 300
# The full log is kept in memory and the row; past this, the oldest part is dropped.
MAX_LOG_CHARS = 4_000_000
# One step's output kept in the log; past this, the oldest part *of that step* is dropped
# with a note saying how much, so one chatty step cannot push the others (and their
# marker lines) out of the log. The SSH layer bounds each line (core.ssh.capture).
MAX_STEP_LOG_CHARS = 1_000_000
# A marker line in the log per step outcome; /setup status rebuilds the step list from it.
MARKER = "==> "
_OUTCOME_LINE = re.compile(
    r"^==> \[(\d+)/(\d+)\] (.+?): (skipped|done|failed)(?: in ([0-9.]+) s)?", re.MULTILINE
)


def outcomes_of(log_text: str) -> tuple[StepOutcome, ...]:
    """The step outcomes recorded by the marker lines of a run's log."""
    return tuple(
        StepOutcome(int(m.group(1)), m.group(3), m.group(4),
                    float(m.group(5)) if m.group(5) else None)
        for m in _OUTCOME_LINE.finditer(log_text)
    )


@dataclass(eq=False)
class Run:
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
    # Where the current step's output starts in ``chunks``, its size and what was dropped.
    step_start: int = 0
    step_size: int = 0
    step_dropped: int = 0
    # Output arrived since the row was last written.
    dirty: bool = False

    def write(self, line: str) -> None:
        self.chunks.append(line + "\n")
        self.size += len(line) + 1
        if self.size > MAX_LOG_CHARS:
            # Keep the newest part: the failure is at the end.
            text = "".join(self.chunks)[-MAX_LOG_CHARS // 2 :]
            self.chunks = ["[earlier output dropped]\n", text]
            self.size = len(text) + 25
            self.step_start, self.step_size = len(self.chunks), 0

    def mark(self, text: str) -> None:
        """A marker line (see :data:`MARKER`); the output after it is the next step's."""
        self.write(MARKER + text)
        self.step_start, self.step_size, self.step_dropped = len(self.chunks), 0, 0

    def _trim_step(self) -> None:
        """Keep the newest half of the current step's output, noting what was dropped."""
        # The previous note (if any) is replaced, not counted as dropped output.
        first = self.step_start + (1 if self.step_dropped else 0)
        old_note = len(self.chunks[self.step_start]) if self.step_dropped else 0
        text = "".join(self.chunks[first:])
        keep = text[-MAX_STEP_LOG_CHARS // 2 :]
        keep = keep[keep.find("\n") + 1 :] if "\n" in keep else keep  # whole lines
        self.step_dropped += len(text) - len(keep)
        note = f"[{self.step_dropped} earlier characters of this step's output dropped]\n"
        self.chunks[self.step_start :] = [note, keep]
        self.size += len(note) + len(keep) - len(text) - old_note
        self.step_size = len(note) + len(keep)

    def output(self, line: str) -> None:
        self.write(line)
        self.step_size += len(line) + 1
        if self.step_size > MAX_STEP_LOG_CHARS:
            self._trim_step()
        self.tail.append(line[:TAIL_LINE_CHARS])
        self.dirty = True

    def text(self) -> str:
        return "".join(self.chunks)

    def view(self) -> ExecutionView:
        return ExecutionView(
            id=self.execution_id, server_id=self.server.id, server_name=self.server.name,
            profile=self.profile.name, profile_version=self.profile.version,
            status=self.status, current_step=self.current_step,
            total_steps=len(self.profile.steps), step_name=self.step_name,
            step_names=tuple(s.name for s in self.profile.steps),
            outcomes=tuple(self.outcomes), output_tail="\n".join(self.tail), error=self.error,
            requested_by=self.actor.user_id, channel_id=self.channel_id,
            message_id=self.message_id, created_at=self.created_at,
            started_at=self.started_at, completed_at=self.completed_at,
        )
