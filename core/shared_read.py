"""Reads shared by concurrent callers and kept for a short while.

Many jobs ask the same thing at once (a server's ComfyUI queue, the pools a job may wait
for): one read answers all of them, and its value serves later callers for ``ttl``
seconds. The read runs as a task of its own, so a caller that is cancelled while it
waits does not cancel it for the others; a failed read is not kept (the next caller
reads again).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SharedReads(Generic[K, V]):
    """The newest value read per key, at most ``ttl`` seconds old, and the reads under way."""

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._values: dict[K, tuple[float, V]] = {}
        self._inflight: dict[K, asyncio.Future[V]] = {}

    async def get(self, key: K, read: Callable[[], Awaitable[V]], *, fresh: bool = False) -> V:
        """``key``'s value: the kept one if recent (and not ``fresh``), else the read under
        way, else a new read."""
        hit = self._values.get(key)
        if hit is not None and not fresh and time.monotonic() - hit[0] < self._ttl:
            return hit[1]
        pending = self._inflight.get(key)
        if pending is None or fresh:
            pending = asyncio.ensure_future(self._read(key, read))
            self._inflight[key] = pending
            pending.add_done_callback(lambda f: self._settled(key, f))
        return await asyncio.shield(pending)

    async def _read(self, key: K, read: Callable[[], Awaitable[V]]) -> V:
        began = time.monotonic()  # the value is as old as the read's start
        value = await read()
        self._values[key] = (began, value)
        return value

    def _settled(self, key: K, future: asyncio.Future[V]) -> None:
        if self._inflight.get(key) is future:
            del self._inflight[key]
        if not future.cancelled():
            future.exception()  # read even when every waiter was cancelled
