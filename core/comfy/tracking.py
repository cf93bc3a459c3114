"""The prompts an event stream follows, and the one :class:`PromptDone` each of them gets.

A tracked prompt finishes from the live messages when the socket saw its whole run;
otherwise (the socket was down meanwhile, or ComfyUI stopped sending to it) its outcome is
recovered from ``/queue`` and ``/history`` by :meth:`PromptTracker.reconcile`. A prompt
that is neither queued nor in the history is "lost" once it was seen or its grace ran out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from core.comfy.client import ComfyClient
from core.comfy.errors import (
    ComfyError,
    ComfyExecutionError,
    ComfyInterrupted,
    ComfyMalformed,
    ComfyPromptLost,
)
from core.comfy.events import (
    ComfyEvent,
    Executed,
    Executing,
    ExecutionError,
    ExecutionInterrupted,
    ExecutionStart,
    ExecutionSuccess,
    PromptDone,
)
from core.comfy.responses import OutputImage, PromptResult
from core.tasks import TaskRegistry

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Tracked:
    prompt_id: str
    since: float
    seen: bool = False  # seen in the queue or in a message: it was really submitted
    gap: bool = False  # the socket was down while it was live: live data is incomplete
    outputs: list[OutputImage] = field(default_factory=list)
    terminal: ExecutionSuccess | ExecutionError | ExecutionInterrupted | None = None
    done: bool = False


class PromptTracker:
    """Follows prompts for one stream; ``on_done`` receives each prompt's PromptDone once.

    ``on_running`` is told which of our prompts ``/queue`` shows running, so the stream can
    attribute id-less preview frames to it after a reconnect.
    """

    def __init__(
        self,
        client: ComfyClient,
        tasks: TaskRegistry,
        *,
        base_url: str,
        client_id: str,
        lost_grace: float,
        on_done: Callable[[PromptDone], None],
        on_running: Callable[[str], None],
    ) -> None:
        self._client = client
        self._tasks = tasks
        self._base_url = base_url
        self._client_id = client_id
        self._lost_grace = lost_grace
        self._on_done = on_done
        self._on_running = on_running
        self._tracked: dict[str, _Tracked] = {}
        self._reconcile_lock = asyncio.Lock()

    def __bool__(self) -> bool:
        return bool(self._tracked)

    def track(self, prompt_id: str) -> None:
        self._tracked.setdefault(prompt_id, _Tracked(prompt_id, time.monotonic()))

    def forget(self, prompt_id: str) -> None:
        self._tracked.pop(prompt_id, None)

    def clear(self) -> None:
        self._tracked.clear()

    def mark_gap(self) -> None:
        """The socket dropped: live data of every tracked prompt is incomplete now."""
        for tracked in self._tracked.values():
            tracked.gap = True

    def on_event(self, event: ComfyEvent) -> None:
        """Feed one event, after the stream dispatched it to its subscribers."""
        tracked = self._tracked.get(event.prompt_id) if event.prompt_id else None
        if tracked is None or tracked.done:
            return
        tracked.seen = True
        if isinstance(event, ExecutionStart):
            # A fresh run (a reused prompt_id starts over): from here we see everything.
            tracked.outputs.clear()
            tracked.terminal = None
            tracked.gap = False
        elif isinstance(event, Executed):
            tracked.outputs.extend(event.images)
        elif isinstance(event, ExecutionSuccess | ExecutionError | ExecutionInterrupted):
            tracked.terminal = event
            if isinstance(event, ExecutionSuccess) and tracked.outputs and not tracked.gap:
                # Every ``executed`` came before this: the images are known and saved, so
                # results need not wait for the history write that the end signal follows.
                self._finish_live(tracked)
        elif isinstance(event, Executing) and event.node is None:
            if tracked.terminal is not None and not tracked.gap:
                self._finish_live(tracked)
            else:
                # We missed part of the run; the history entry is written before this
                # message is sent, so it is complete now.
                self._tasks.spawn(self._resolve_from_history(tracked.prompt_id),
                                  name="comfy-events:resolve")

    def _finish_live(self, tracked: _Tracked) -> None:
        terminal = tracked.terminal
        if isinstance(terminal, ExecutionError):
            done = PromptDone(tracked.prompt_id, "error", tuple(tracked.outputs),
                              terminal.to_exception())
        elif isinstance(terminal, ExecutionInterrupted):
            done = PromptDone(
                tracked.prompt_id,
                "interrupted",
                tuple(tracked.outputs),
                ComfyInterrupted(tracked.prompt_id, terminal.node_id, terminal.node_type),
            )
        else:
            done = PromptDone(tracked.prompt_id, "success", tuple(tracked.outputs))
        self._finish(tracked, done)

    def _finish(self, tracked: _Tracked, done: PromptDone) -> None:
        if tracked.done:
            return
        tracked.done = True
        self._tracked.pop(tracked.prompt_id, None)
        self._on_done(done)

    def _finish_from_result(self, tracked: _Tracked, result: PromptResult) -> None:
        error: ComfyError | None = None
        if result.status == "error":
            error = ComfyExecutionError(
                result.node_id,
                result.node_type,
                result.exception_message or "",
                exception_type=result.exception_type or "",
                prompt_id=result.prompt_id,
            )
        elif result.status == "interrupted":
            error = ComfyInterrupted(result.prompt_id, result.node_id, result.node_type)
        self._finish(
            tracked, PromptDone(tracked.prompt_id, result.status, result.outputs, error, True)
        )

    def _finish_malformed(self, tracked: _Tracked, exc: ComfyMalformed) -> None:
        # The prompt is over (it left the queue) but its outcome is junk: asking again
        # would get the same entry, so the job ends with the protocol error.
        log.warning("History of prompt %s on %s is malformed: %s", tracked.prompt_id,
                    self._base_url, exc)
        self._finish(tracked, PromptDone(tracked.prompt_id, "error", (), exc, True))

    async def _resolve_from_history(self, prompt_id: str) -> None:
        tracked = self._tracked.get(prompt_id)
        if tracked is None or tracked.done:
            return
        try:
            result = await self._client.get_prompt_result(prompt_id)
        except ComfyMalformed as exc:
            self._finish_malformed(tracked, exc)
            return
        except ComfyError as exc:
            log.warning("Could not read the history of prompt %s: %s", prompt_id, exc)
            return  # the next reconnect or poll tick tries again
        if result is not None:
            self._finish_from_result(tracked, result)

    async def reconcile(self, reason: str) -> None:
        """Compare every tracked prompt with /queue and /history."""
        async with self._reconcile_lock:
            pending = [t for t in self._tracked.values() if not t.done]
            if not pending:
                return
            try:
                queue = await self._client.get_queue()
            except ComfyError as exc:
                log.warning("Reconcile (%s) of %s failed: %s", reason, self._base_url, exc)
                return
            mine = [item for item in queue.running if item.client_id == self._client_id]
            if mine:
                self._on_running(mine[0].prompt_id)
            now = time.monotonic()
            for tracked in pending:
                if tracked.done:
                    continue
                if tracked.prompt_id in queue:
                    tracked.seen = True
                    continue
                try:
                    result = await self._client.get_prompt_result(tracked.prompt_id)
                except ComfyMalformed as exc:
                    self._finish_malformed(tracked, exc)
                    continue
                except ComfyError as exc:
                    log.warning("Reconcile (%s) of %s failed: %s", reason, self._base_url, exc)
                    return
                if tracked.done:
                    continue
                if result is not None:
                    log.info(
                        "Prompt %s finished (%s) while unobserved; recovered from history",
                        tracked.prompt_id,
                        result.status,
                    )
                    self._finish_from_result(tracked, result)
                elif tracked.seen or now - tracked.since > self._lost_grace:
                    log.warning("Prompt %s is gone from %s", tracked.prompt_id, self._base_url)
                    self._finish(
                        tracked,
                        PromptDone(
                            tracked.prompt_id,
                            "lost",
                            (),
                            ComfyPromptLost(tracked.prompt_id),
                            True,
                        ),
                    )
