"""Coalesced message edits: at most one progress edit per message per interval, within a
per-channel budget shared fairly, and final states first.

Progress arrives far faster than Discord lets a bot edit (ComfyUI sends a message per
sampler step, several jobs share a channel, and Discord allows 5 edits per 5 s per channel).
Each message keeps only its latest wanted state; a newer state replaces an unsent older one,
so nothing queues up. One worker per channel spends that channel's budget:

- a final state (done, failed, cancelled) goes before any progress, without waiting for the
  message's interval, and progress edits leave a token in reserve for it, so the final state
  lands with the result instead of queueing behind other jobs' progress;
- progress edits go to the message edited least recently (round robin), so when the budget
  is short every job of the channel gets its share and none starves, and when it is not a
  message is edited every ``interval``.

A final state is awaited by its caller, who learns whether it was sent: a result carried by
the final edit must be posted some other way when its message is gone.
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

# What became of a state sent (see MessageRelay._send).
_SENT, _GONE, _FAILED = object(), object(), object()

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

    def delay(self, tokens: float = 1.0) -> float:
        """Seconds until ``tokens`` are available (0 when they are)."""
        self._refill()
        return 0.0 if self._tokens >= tokens else (tokens - self._tokens) / self.rate

    def take(self) -> None:
        self._refill()
        self._tokens -= 1


@dataclass
class _Slot:
    channel_id: int
    message_id: int
    builder: EditBuilder | None = None
    final: bool = False
    # Never edited: first in the round robin, and its interval has long passed.
    last_edit: float = float("-inf")
    sending: bool = False
    done: asyncio.Future[bool] | None = None
    edits: int = 0


@dataclass
class _Channel:
    bucket: TokenBucket
    # Messages of this channel with an unsent state, in the order they first wanted one.
    pending: dict[int, _Slot] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    worker: asyncio.Task[None] | None = None


class MessageRelay:
    def __init__(
        self,
        client: discord.Client,
        *,
        interval: float = 1.0,
        channel_capacity: float = 5.0,
        channel_rate: float = 1.0,
        final_reserve: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.interval = interval
        # Discord: 5 edits per 5 s per channel; a bucket of 5 refilled at 1 per second keeps
        # to it on average, and discord.py waits out the headers if a burst runs ahead.
        self._capacity = channel_capacity
        self._rate = channel_rate
        # Tokens progress edits leave unspent, so a final state never waits for the refill.
        self._reserve = final_reserve
        self._clock = clock
        self._slots: dict[int, _Slot] = {}
        self._channels: dict[int, _Channel] = {}
        # Messages whose final state was sent: later (stale) updates are ignored.
        self._finished: dict[int, None] = {}
        # One worker task per channel with edits to send; it ends when the channel has none.
        self._workers = TaskRegistry("relay")

    def update(self, channel_id: int, message_id: int, builder: EditBuilder) -> None:
        """Replace the wanted state of a message; sent when the budget allows."""
        if message_id in self._finished:
            return
        slot = self._slot(channel_id, message_id)
        if slot.final:
            return  # the end state is set; later progress is stale
        slot.builder = builder
        self._want(slot, urgent=False)

    async def finish(self, channel_id: int, message_id: int, builder: EditBuilder) -> bool:
        """Set the final state and wait until it has been sent (never dropped). True when
        it was; False when the message is gone, cannot be edited, or every try failed."""
        slot = self._slot(channel_id, message_id)
        slot.builder = builder
        slot.final = True
        if slot.done is None:
            slot.done = asyncio.get_running_loop().create_future()
        self._want(slot, urgent=True)
        return await asyncio.shield(slot.done)

    def _slot(self, channel_id: int, message_id: int) -> _Slot:
        slot = self._slots.get(message_id)
        if slot is None:
            slot = _Slot(channel_id, message_id)
            self._slots[message_id] = slot
        return slot

    def _want(self, slot: _Slot, *, urgent: bool) -> None:
        """``slot`` has a state to send: queue it in its channel and make sure a worker runs.
        A progress state replacing one already queued changes nothing for the worker, so
        it is not woken (that happens per progress event)."""
        channel = self._channels.get(slot.channel_id)
        if channel is None:
            channel = _Channel(TokenBucket(self._capacity, self._rate, self._clock))
            self._channels[slot.channel_id] = channel
        if slot.sending:
            return  # the worker queues it again after the send
        if urgent and slot.final:
            # Final states are sent in the order they were set: a message queued long ago
            # (its progress starved by other finals) must not jump ahead of older finals.
            channel.pending.pop(slot.message_id, None)
        if slot.message_id not in channel.pending:
            channel.pending[slot.message_id] = slot
            urgent = True
        if channel.worker is None:
            channel.worker = self._workers.spawn(
                self._work(slot.channel_id, channel), name=f"relay-{slot.channel_id}"
            )
        elif urgent:
            channel.wake.set()

    def _next(self, channel: _Channel) -> tuple[_Slot, float]:
        """The message to edit next and when its interval allows: a final state first (the
        one set first), else the progress of the message edited least recently."""
        best: _Slot | None = None
        for slot in channel.pending.values():
            if slot.final:
                return slot, 0.0
            if best is None or slot.last_edit < best.last_edit:
                best = slot
        assert best is not None
        return best, best.last_edit + self.interval

    async def _work(self, channel_id: int, channel: _Channel) -> None:
        loop = asyncio.get_running_loop()
        try:
            while channel.pending:
                slot, ready_at = self._next(channel)
                wait = max(
                    ready_at - self._clock(),
                    channel.bucket.delay(1.0 if slot.final else 1.0 + self._reserve),
                )
                if wait > 0:
                    # Sleep until then, or until a final state or a new message wants an edit.
                    channel.wake.clear()
                    timer = loop.call_later(wait, channel.wake.set)
                    try:
                        await channel.wake.wait()
                    finally:
                        timer.cancel()
                    continue
                del channel.pending[slot.message_id]
                builder, final = slot.builder, slot.final
                slot.builder = None
                if builder is None:
                    continue
                channel.bucket.take()
                slot.sending = True
                try:
                    outcome = await self._send(slot, builder, final)
                finally:
                    slot.sending = False
                # Measured from the end of the edit: building and sending can take a
                # while under load, and the next edit must still wait a full interval.
                slot.last_edit = self._clock()
                if outcome is _GONE or (final and slot.builder is None):
                    channel.pending.pop(slot.message_id, None)
                    self._settle(slot, sent=outcome is _SENT)
                elif slot.builder is not None:
                    channel.pending[slot.message_id] = slot  # changed while it was sent
        except asyncio.CancelledError:
            for slot in self._slots.values():
                if slot.channel_id == channel_id and slot.done is not None and not slot.done.done():
                    slot.done.cancel()
            raise
        finally:
            # The channel (and its bucket's state) stays: a new worker spends the same budget.
            channel.worker = None

    def _settle(self, slot: _Slot, *, sent: bool) -> None:
        """The final state was sent (or cannot be): forget the message, wake its caller."""
        self._finished[slot.message_id] = None
        if len(self._finished) > 10_000:
            del self._finished[next(iter(self._finished))]
        if self._slots.get(slot.message_id) is slot:
            del self._slots[slot.message_id]
        if slot.done is not None and not slot.done.done():
            slot.done.set_result(sent)

    async def _send(self, slot: _Slot, builder: EditBuilder, final: bool) -> object:
        """Send one state: _SENT; _GONE when the message is gone or cannot be edited (no
        more edits are worth it); _FAILED when every try failed."""
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
                return _SENT
            except (discord.NotFound, discord.Forbidden) as exc:
                # Deleted, or no longer ours to edit (e.g. the channel's permissions changed).
                log.info("status message %s cannot be edited (%s); no more edits",
                         slot.message_id, exc)
                return _GONE
            except (discord.HTTPException, OSError) as exc:
                # discord.py already retried 429s; a final state gets a few more tries.
                log.warning("edit of message %s failed (%s)", slot.message_id, exc)
                if attempt + 1 < attempts:
                    await asyncio.sleep(1.0 * (attempt + 1))
            except Exception:
                log.exception("building the state of message %s failed", slot.message_id)
                return _FAILED
        return _FAILED

    async def close(self) -> None:
        # Cancel every worker and wait (no time limit, as before) until each has ended.
        await self._workers.close(timeout=None)
