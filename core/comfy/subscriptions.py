"""Who receives a ComfyUI event stream's events.

:class:`EventSubscription` is one subscriber's queue of events, ending with its prompt's
:class:`PromptDone` (or when the subscription or the stream closes); :class:`EventFanout`
hands every event to the subscriptions and synchronous listeners it concerns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from core.comfy.events import (
    ComfyEvent,
    Disconnected,
    Listener,
    NodeProgress,
    PreviewEvent,
    Progress,
    ProgressState,
    PromptDone,
    Reconnected,
    TextEvent,
    UnknownMessage,
)

log = logging.getLogger(__name__)

# Put in a subscription's queue to end it.
CLOSED = object()


class _Newest:
    """Stands in a subscription's queue for the newest unread event of one stale kind
    (see EventSubscription.put)."""

    __slots__ = ("kind",)

    def __init__(self, kind: type) -> None:
        self.kind = kind

# Events that concern the connection, handed to every subscription.
_CONNECTION_EVENTS = (Disconnected, Reconnected)

#: Events a subscription may hold before it sheds stale ones. A real ComfyUI sends a few
#: per sampler step and the reader keeps up; a hostile server can send previews (each up
#: to the frame cap) far faster than a reader that waits on Discord, so the queue is
#: bounded instead of growing with whatever the server sends.
MAX_PENDING = 256

# Only the newest of each of these matters to a reader: older ones are shed first.
_STALE_KINDS = (Progress, ProgressState, NodeProgress, PreviewEvent, TextEvent, UnknownMessage)
# Never shed: the end of the prompt, the connection's state, the end of the subscription.
_KEEP = (PromptDone, *_CONNECTION_EVENTS)


class EventSubscription:
    """Events for one prompt (or all events): ``await sub.get()`` or ``async for``.

    A prompt subscription ends after its :class:`PromptDone`; every subscription ends when
    it is closed or the stream closes.
    """

    def __init__(
        self, unsubscribe: Callable[[EventSubscription], None], prompt_id: str | None,
        *, latest_only: bool = False,
    ) -> None:
        # The stream's hook that forgets this subscription (and its prompt, if last).
        self._unsubscribe = unsubscribe
        self.prompt_id = prompt_id
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._ended = False
        self.shed = 0  # events dropped: stale ones past MAX_PENDING, or superseded
        self._warned = False
        # With ``latest_only`` at most one event of each stale kind waits: the newest,
        # read where the oldest unread one stood (see put).
        self._latest_only = latest_only
        self._newest: dict[type, Any] = {}
        self._settling: asyncio.Future[None] | None = None  # see settle()

    def put(self, event: Any) -> None:
        """Called by the stream only."""
        if not isinstance(event, _STALE_KINDS):
            self._end_settling()
        if self._newest and isinstance(event, PromptDone):
            # A reader that shows only the newest progress skips to the end once it is
            # there: the progress and preview it has not read yet would never be shown.
            # Dropped now, not when the reader catches up (at 2,000 jobs, finished
            # prompts waiting for their follow loop each kept their last preview).
            self._drop_newest()
        item = event
        if self._latest_only and isinstance(event, _STALE_KINDS):
            kind = type(event)
            if kind in self._newest:
                # A reader that shows only the newest progress and preview, behind by one:
                # the waiting event is replaced, not queued behind. A preview is a 512-px
                # JPEG of ~65 KB (up to the frame cap from an untrusted server); at 2,000
                # jobs on 100 servers the follow loops lag the sockets by seconds, and the
                # previews queued meanwhile were most of the bot's memory (bench.relay
                # --memory-profile: 700 MB at the peak).
                self._newest[kind] = event
                self.shed += 1
                return
            self._newest[kind], item = event, _Newest(kind)
        if self._queue.qsize() >= MAX_PENDING and item is not CLOSED:
            self._shed_stale()
            if self._queue.qsize() >= MAX_PENDING and not isinstance(item, _KEEP):
                if isinstance(item, _Newest):
                    del self._newest[item.kind]
                self._note_shed(1)
                return
        self._queue.put_nowait(item)

    def _empty_queue(self) -> list[Any]:
        """Everything queued, in order; the queue is left empty."""
        items: list[Any] = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                return items

    def _drop_newest(self) -> None:
        items = self._empty_queue()
        for item in items:
            if not isinstance(item, _Newest):
                self._queue.put_nowait(item)
        self.shed += len(self._newest)
        self._newest.clear()

    def _take(self, item: Any) -> Any:
        """The event a queued item stands for."""
        if isinstance(item, _Newest):
            return self._newest.pop(item.kind)
        return item

    def _shed_stale(self) -> None:
        """Keep, in order, every event that is not stale plus the newest of each stale
        kind (the latest progress and preview are what a reader shows)."""
        items = self._empty_queue()
        newest: dict[type, int] = {}
        for index, item in enumerate(items):
            if isinstance(item, _STALE_KINDS):
                newest[type(item)] = index
        kept = [item for index, item in enumerate(items)
                if not isinstance(item, _STALE_KINDS) or newest[type(item)] == index]
        for item in kept:
            self._queue.put_nowait(item)
        self._note_shed(len(items) - len(kept))

    def _note_shed(self, count: int) -> None:
        if count and not self._warned:
            self._warned = True
            log.warning("prompt %s: the reader fell %d events behind; stale progress and "
                        "previews are dropped", self.prompt_id, MAX_PENDING)
        self.shed += count

    async def settle(self, seconds: float) -> None:
        """Wait up to ``seconds`` while only progress and previews arrive; return as soon
        as anything else is waiting (the prompt's end, a node change, a disconnect).

        For a ``latest_only`` reader: the progress and previews that arrive meanwhile
        replace each other, so it wakes once for many instead of once for each. A running
        job gets a step and a preview ~20 times a second; its status is edited about once.
        """
        if self._ended or self._queue.qsize() > len(self._newest):
            return  # something other than the newest progress is already waiting
        self._settling = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(seconds):
                await self._settling
        except TimeoutError:
            pass
        finally:
            self._settling = None

    def _end_settling(self) -> None:
        if self._settling is not None and not self._settling.done():
            self._settling.set_result(None)

    @property
    def pending(self) -> int:
        """Events waiting to be read."""
        return self._queue.qsize()

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
        item = self._take(item)
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
            item = self._take(item)
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
        self._end_settling()

    async def __aenter__(self) -> EventSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class EventFanout:
    """The subscriptions and listeners of one stream, and the routing of events to them.

    ``on_last_unsubscribed`` is told when a prompt's last subscription closed, so the
    stream stops tracking that prompt.
    """

    def __init__(self, on_last_unsubscribed: Callable[[str], None]) -> None:
        self._on_last_unsubscribed = on_last_unsubscribed
        self._subs: dict[str, list[EventSubscription]] = {}
        self._all_subs: list[EventSubscription] = []
        self._listeners: list[Listener] = []

    def subscribe(self, prompt_id: str, *, latest_only: bool = False) -> EventSubscription:
        sub = EventSubscription(self._unsubscribe, prompt_id, latest_only=latest_only)
        self._subs.setdefault(prompt_id, []).append(sub)
        return sub

    def subscribe_all(self) -> EventSubscription:
        sub = EventSubscription(self._unsubscribe, None)
        self._all_subs.append(sub)
        return sub

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    @property
    def takes_everything(self) -> bool:
        """Whether someone reads every event (a listener or an all-events subscription),
        not only the events of its prompts."""
        return bool(self._listeners or self._all_subs)

    def remove_listener(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def end_prompt(self, prompt_id: str) -> None:
        """End the prompt's subscriptions now (it will get no PromptDone)."""
        for sub in self._subs.pop(prompt_id, []):
            sub.put(CLOSED)

    def drop_prompt(self, prompt_id: str) -> None:
        """Forget the prompt's subscriptions after its PromptDone was dispatched."""
        self._subs.pop(prompt_id, None)

    def close(self) -> None:
        """End every subscription."""
        for sub in [*self._all_subs, *(s for subs in self._subs.values() for s in subs)]:
            sub.put(CLOSED)
        self._subs.clear()
        self._all_subs.clear()

    def _unsubscribe(self, sub: EventSubscription) -> None:
        if sub.prompt_id is None:
            with contextlib.suppress(ValueError):
                self._all_subs.remove(sub)
            return
        subs = self._subs.get(sub.prompt_id, [])
        with contextlib.suppress(ValueError):
            subs.remove(sub)
        if not subs:
            self._subs.pop(sub.prompt_id, None)
            self._on_last_unsubscribed(sub.prompt_id)

    def dispatch(self, event: ComfyEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("ComfyUI event listener %r failed", listener)
        for sub in list(self._all_subs):
            sub.put(event)
        if isinstance(event, _CONNECTION_EVENTS):
            for subs in list(self._subs.values()):
                for sub in subs:
                    sub.put(event)
            return
        prompt_id = getattr(event, "prompt_id", None)
        if prompt_id is not None:
            for sub in list(self._subs.get(prompt_id, ())):
                sub.put(event)

