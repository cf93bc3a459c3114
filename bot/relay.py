"""Coalesced message edits: at most one edit per message per interval, within a
per-channel budget, and the final state always lands.

Progress arrives far faster than Discord lets a bot edit (ComfyUI sends a message per
sampler step, several jobs share a channel). Each message keeps only its latest wanted
state; one worker per message sends it when both the message's interval and the
channel's token bucket allow. A newer state replaces an unsent older one, so nothing
queues up, and a final state is awaited by its caller.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import discord

from bot.rendering import fit_message
from core.tasks import TaskRegistry

log = logging.getLogger(__name__)

# What an edit sends: keyword arguments for PartialMessage.edit, built lazily so that
# expensive work (thumbnails) is only done for states that are really sent.
EditBuilder = Callable[[], Awaitable[dict[str, Any]]]


class TokenBucket:
    """``capacity`` edits at once, refilled at ``rate`` per second."""

    def __init__(self, capacity: float, rate: float, clock: Callable[[], float]) -> None:
        self.capacity = capacity
        self.rate = rate
        self._tokens = capacity
        self._clock = clock
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def delay(self) -> float:
        """Seconds until a token is available (0 when one is)."""
        self._refill()
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate

    def take(self) -> None:
        self._refill()
        self._tokens -= 1


@dataclass
class _Slot:
    channel_id: int
    message_id: int
    builder: EditBuilder | None = None
    final: bool = False
    last_edit: float = 0.0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Future[None] | None = None
    worker: asyncio.Task[None] | None = None
    edits: int = 0


class MessageRelay:
    def __init__(
        self,
        client: discord.Client,
        *,
        interval: float = 1.0,
        channel_capacity: float = 5.0,
        channel_rate: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.interval = interval
        self._capacity = channel_capacity
        self._rate = channel_rate
        self._clock = clock
        self._slots: dict[int, _Slot] = {}
        self._buckets: dict[int, TokenBucket] = {}
        # Messages whose final state was sent: later (stale) updates are ignored.
        self._finished: dict[int, None] = {}
        # One worker task per message in flight. The registry's bookkeeping (a done callback)
        # costs once per message, a few microseconds, and nothing per edit: an update only
        # wakes the message's running worker. Unkeyed: _slots already holds at most one
        # worker per message.
        self._workers = TaskRegistry("relay")

    def update(self, channel_id: int, message_id: int, builder: EditBuilder) -> None:
        """Replace the wanted state of a message; sent when the budget allows."""
        if message_id in self._finished:
            return
        slot = self._slot(channel_id, message_id)
        if slot.final:
            return  # the end state is set; later progress is stale
        slot.builder = builder
        slot.wake.set()

    async def finish(self, channel_id: int, message_id: int, builder: EditBuilder) -> None:
        """Set the final state and wait until it has been sent (never dropped)."""
        slot = self._slot(channel_id, message_id)
        slot.builder = builder
        slot.final = True
        if slot.done is None:
            slot.done = asyncio.get_running_loop().create_future()
        slot.wake.set()
        await asyncio.shield(slot.done)

    def _slot(self, channel_id: int, message_id: int) -> _Slot:
        slot = self._slots.get(message_id)
        if slot is None:
            slot = _Slot(channel_id, message_id)
            self._slots[message_id] = slot
            slot.worker = self._workers.spawn(self._work(slot), name=f"relay-{message_id}")
        return slot

    def _bucket(self, channel_id: int) -> TokenBucket:
        bucket = self._buckets.get(channel_id)
        if bucket is None:
            bucket = TokenBucket(self._capacity, self._rate, self._clock)
            self._buckets[channel_id] = bucket
        return bucket

    async def _work(self, slot: _Slot) -> None:
        bucket = self._bucket(slot.channel_id)
        try:
            while True:
                await slot.wake.wait()
                # Wait out this message's interval and the channel's budget, then send the
                # newest state (it may have been replaced while we slept).
                while True:
                    wait = max(slot.last_edit + self.interval - self._clock(), bucket.delay())
                    if wait <= 0:
                        break
                    await asyncio.sleep(wait)
                slot.wake.clear()
                builder, final = slot.builder, slot.final
                if builder is None:
                    continue
                slot.builder = None
                bucket.take()
                await self._send(slot, builder, final)
                # Measured from the end of the edit: building and sending can take a
                # while under load, and the next edit must still wait a full interval.
                slot.last_edit = self._clock()
                if final and slot.builder is None:
                    self._finished[slot.message_id] = None
                    if len(self._finished) > 10_000:
                        del self._finished[next(iter(self._finished))]
                    if slot.done is not None and not slot.done.done():
                        slot.done.set_result(None)
                    return
        except asyncio.CancelledError:
            if slot.done is not None and not slot.done.done():
                slot.done.cancel()
            raise
        finally:
            if self._slots.get(slot.message_id) is slot:
                del self._slots[slot.message_id]

    async def _send(self, slot: _Slot, builder: EditBuilder, final: bool) -> None:
        channel = self._client.get_partial_messageable(slot.channel_id)
        message = channel.get_partial_message(slot.message_id)
        attempts = 3 if final else 1
        for attempt in range(attempts):
            try:
                # Within Discord's limits, whatever the builder put together: a refused
                # edit (400) would freeze the message at its last state.
                kwargs = fit_message(await builder())
                await message.edit(**kwargs)
                slot.edits += 1
                return
            except discord.NotFound:
                log.info("status message %s is gone; no more edits", slot.message_id)
                return
            except (discord.HTTPException, OSError) as exc:
                # discord.py already retried 429s; a final state gets a few more tries.
                log.warning("edit of message %s failed (%s)", slot.message_id, exc)
                if attempt + 1 < attempts:
                    await asyncio.sleep(1.0 * (attempt + 1))
            except Exception:
                log.exception("building the state of message %s failed", slot.message_id)
                return

    async def close(self) -> None:
        # Cancel every worker and wait (no time limit, as before) until each has ended.
        await self._workers.close(timeout=None)
