"""One subscriber's view of a ComfyUI event stream: a queue of events that ends with the
prompt's :class:`PromptDone` (or when the subscription or the stream closes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from core.comfy.events import ComfyEvent, PromptDone

# Put in a subscription's queue to end it.
CLOSED = object()


class EventSubscription:
    """Events for one prompt (or all events): ``await sub.get()`` or ``async for``.

    A prompt subscription ends after its :class:`PromptDone`; every subscription ends when
    it is closed or the stream closes.
    """

    def __init__(
        self, unsubscribe: Callable[[EventSubscription], None], prompt_id: str | None
    ) -> None:
        # The stream's hook that forgets this subscription (and its prompt, if last).
        self._unsubscribe = unsubscribe
        self.prompt_id = prompt_id
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._ended = False

    def put(self, event: Any) -> None:
        """Called by the stream only."""
        self._queue.put_nowait(event)

    async def get(self, timeout: float | None = None) -> ComfyEvent:
        """The next event; raises StopAsyncIteration once the subscription ended."""
        if self._ended:
            raise StopAsyncIteration
        if timeout is None:
            item = await self._queue.get()
        else:
            # asyncio.timeout, not wait_for: no extra task per event (this is the hot path).
            async with asyncio.timeout(timeout):
                item = await self._queue.get()
        if item is CLOSED:
            self._ended = True
            raise StopAsyncIteration
        if isinstance(item, PromptDone) and self.prompt_id is not None:
            self._ended = True
        return item  # type: ignore[no-any-return]

    def drain(self) -> list[ComfyEvent]:
        """The events already waiting, without blocking (so a slow reader can skip stale
        progress and previews instead of replaying them one by one)."""
        items: list[ComfyEvent] = []
        while not self._ended:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if item is CLOSED:
                self._queue.put_nowait(item)  # let the next get() see the end
                break
            items.append(item)
            if isinstance(item, PromptDone) and self.prompt_id is not None:
                self._ended = True
        return items

    async def wait_done(self, timeout: float | None = None) -> PromptDone:
        """Skip to this prompt's :class:`PromptDone`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            event = await self.get(left)
            if isinstance(event, PromptDone):
                return event

    def __aiter__(self) -> AsyncIterator[ComfyEvent]:
        return self

    async def __anext__(self) -> ComfyEvent:
        return await self.get()

    def close(self) -> None:
        self._unsubscribe(self)
        self._queue.put_nowait(CLOSED)

    async def __aenter__(self) -> EventSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
