"""One registry for background tasks: spawn by key, cancel, log crashes.

Every long-lived task the services start (a generation's follow loop, a download, a setup
run, a prefetch, an event stream's reader) goes through a :class:`TaskRegistry`, so no task
is dropped by the garbage collector, none crashes unseen, and shutdown can cancel them all.
Modelled on python-discord bot-core's ``Scheduler`` (``utils/scheduling.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Hashable, Iterator
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class TaskRegistry:
    """Tracks the background tasks of one owner (named in crash logs).

    A keyed task is unique while it runs: spawning the same key again returns the running
    task and closes the new coroutine unstarted. Unkeyed tasks are tracked until they end.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._keyed: dict[Hashable, asyncio.Task[Any]] = {}
        self._anonymous: set[asyncio.Task[Any]] = set()

    def spawn(
        self,
        coro: Coroutine[Any, Any, T],
        *,
        key: Hashable | None = None,
        name: str | None = None,
        on_done: Callable[[asyncio.Task[T]], None] | None = None,
    ) -> asyncio.Task[T]:
        """Start ``coro`` in a tracked task; ``on_done`` runs after the registry forgot it."""
        if key is not None:
            running = self._keyed.get(key)
            if running is not None and not running.done():
                coro.close()
                return running
        task = asyncio.create_task(coro, name=name or f"{self.owner}-{key}")
        if key is None:
            self._anonymous.add(task)
        else:
            self._keyed[key] = task
        task.add_done_callback(lambda t: self._done(key, t, on_done))
        return task

    def _done(
        self,
        key: Hashable | None,
        task: asyncio.Task[Any],
        on_done: Callable[[asyncio.Task[Any]], None] | None,
    ) -> None:
        if key is None:
            self._anonymous.discard(task)
        elif self._keyed.get(key) is task:
            del self._keyed[key]
        if on_done is not None:
            try:
                on_done(task)
            except Exception:
                log.exception("%s: done callback of %s failed", self.owner, task.get_name())
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: task %s crashed", self.owner, task.get_name(),
                      exc_info=task.exception())

    def get(self, key: Hashable) -> asyncio.Task[Any] | None:
        """The running task under ``key``, if any."""
        task = self._keyed.get(key)
        return task if task is not None and not task.done() else None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, Hashable) and self.get(key) is not None

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        yield from (t for t in (*self._keyed.values(), *self._anonymous) if not t.done())

    def keys(self) -> list[Hashable]:
        return [k for k, t in self._keyed.items() if not t.done()]

    def cancel(self, key: Hashable) -> bool:
        """Cancel the task under ``key``; False when none runs."""
        task = self.get(key)
        if task is None:
            return False
        task.cancel()
        return True

    async def close(self, timeout: float | None = 5.0) -> None:
        """Cancel every task and wait (up to ``timeout``) for them to end."""
        tasks = list(self)
        for task in tasks:
            task.cancel()
        if tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait(tasks, timeout=timeout)
