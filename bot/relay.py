"""Coalesced message edits: at most one progress edit per message per interval, within the
budget of the Discord route that edits it, shared fairly, and final states first.

Progress arrives far faster than Discord lets a bot edit (ComfyUI sends a message per
sampler step, several jobs share a channel). Each message keeps only its latest wanted
state; a newer state replaces an unsent older one, so nothing queues up. Each message is
edited through a *lane*, one rate-limit bucket of Discord's, and one worker per lane spends
that lane's budget:

- a channel lane: ``PATCH /channels/{c}/messages/{m}``, a bucket per channel (observed: 5
  edits per 5 s), shared by every message of the channel;
- an interaction lane: a generation's status message is the reply to its member's
  interaction, edited through the interaction's webhook (``PATCH
  /webhooks/{app}/{token}/messages/...``) while its token lives (15 minutes). That bucket is
  the token's own (Discord keys webhook buckets by webhook id + token) and interaction
  routes do not count against the bot's global limit, so one job's edits never wait for
  another job's. Past the token's life (or after a restart, when it is forgotten) the
  message moves to its channel's lane.

Within a lane:

- a final state (done, failed, cancelled) goes before any progress, without waiting for the
  message's interval, and progress edits leave a request in reserve for it, so the final
  state lands with the result instead of queueing behind other jobs' progress;
- progress edits go to the message edited least recently (round robin), so when the budget
  is short every job gets its share and none starves, and when it is not a message is
  edited every ``interval``.

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
_SENT, _GONE, _FAILED, _MOVED = object(), object(), object(), object()

# What an edit sends: keyword arguments for PartialMessage.edit, built lazily so that
# expensive work (thumbnails) is only done for states that are really sent.
EditBuilder = Callable[[], Awaitable[dict[str, Any]]]
# A lane: ("channel", channel id) or ("interaction", interaction id).
LaneKey = tuple[str, int]

# Discord's buckets are fixed windows: ``limit`` requests, all reset ``per`` seconds after
# the window's first (tests/fakediscord/ratelimit.py has the sources). The relay keeps its
# own count so that it never sends what Discord would refuse (a 429 costs a round trip and
# a wait inside discord.py, where a final state could not overtake it); the margin covers
# the window starting a little later at Discord than here.
CHANNEL_EDITS = (5, 5.0)  # observed: 5 edits per 5 s per channel
WEBHOOK_EDITS = (5, 2.0)  # observed for webhooks; assumed for interaction webhooks
WINDOW_MARGIN = 0.25
# An interaction token lives 15 minutes; its webhook is left this long before that, so an
# edit in flight does not meet an expired token.
TOKEN_MARGIN = 60.0
# Progress edits in flight at once, over every lane. Each lane (an interaction's token)
# has its own budget, so with thousands of jobs nothing else bounds them: at 2,000 jobs
# the bot held 920 connections to Discord open at once, each with its buffers. Final
# states are not counted (they never wait for progress), nor are other requests.
MAX_PROGRESS_IN_FLIGHT = 32


class FixedWindow:
    """``limit`` requests per window; a window starts with its first request and all of its
    requests reset together ``per`` seconds later (as Discord's buckets do).

    Paced requests (progress) are also spread evenly, ``spacing`` apart: sent in a burst
    at each window's start they would be in flight together when a result comes, and the
    final state would wait for all of them."""

    def __init__(
        self, limit: int, per: float, clock: Callable[[], float], *, spacing: float = 0.0
    ) -> None:
        self.limit = limit
        self.per = per + WINDOW_MARGIN
        self.spacing = spacing
        self._clock = clock
        self._used = 0
        self._ends = float("-inf")
        self._last = float("-inf")

    def delay(self, tokens: float = 1.0, *, paced: bool = False) -> float:
        """Seconds until ``tokens`` requests may be sent (0 when they may now)."""
        now = self._clock()
        wait = max(0.0, self._last + self.spacing - now) if paced else 0.0
        if now >= self._ends or self.limit - self._used >= tokens:
            return wait
        return max(wait, self._ends - now)

    def take(self) -> None:
        now = self._clock()
        if now >= self._ends:
            self._used, self._ends = 0, now + self.per
        self._used += 1
        self._last = now


@dataclass
class WebhookRoute:
    """How to edit a message through its interaction's webhook while the token lives."""

    lane: LaneKey  # ("interaction", id): the token's bucket, shared by its messages
    edit: Callable[..., Awaitable[Any]]  # PATCH .../webhooks/{app}/{token}/messages/...
    expires: float  # relay clock: when to stop using it
    send: Callable[..., Awaitable[Any]] | None = None  # a followup (a ping) on the same token
    shown_at: float = float("-inf")  # relay clock: when the message was posted


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
    lane: LaneKey | None = None  # the lane it is queued in (None: not queued)
    interval: float | None = None  # of the wanted state, when not the relay's


@dataclass
class _Lane:
    window: FixedWindow
    # Messages of this lane with an unsent state, in the order they first wanted one.
    pending: dict[int, _Slot] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    worker: asyncio.Task[None] | None = None


class MessageRelay:
    def __init__(
        self,
        client: discord.Client,
        *,
        interval: float = 1.0,
        final_reserve: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.interval = interval
        # Requests progress edits leave unspent, so a final state never waits for a window.
        self._reserve = final_reserve
        self._clock = clock
        self._slots: dict[int, _Slot] = {}
        self._lanes: dict[LaneKey, _Lane] = {}
        # Messages editable through their interaction's webhook (message id -> route).
        self._webhooks: dict[int, WebhookRoute] = {}
        # Messages whose final state was sent: later (stale) updates are ignored.
        self._finished: dict[int, None] = {}
        # One worker task per lane with edits to send; it ends when the lane has none.
        self._workers = TaskRegistry("relay")
        self._progress_slots = asyncio.Semaphore(MAX_PROGRESS_IN_FLIGHT)

    def via_webhook(
        self,
        message_id: int,
        *,
        lane: LaneKey,
        edit: Callable[..., Awaitable[Any]],
        send: Callable[..., Awaitable[Any]] | None,
        lifetime: float,
    ) -> None:
        """Edit ``message_id`` through its interaction's webhook for ``lifetime`` seconds."""
        if lifetime <= 0:
            return
        now = self._clock()
        route = WebhookRoute(lane, edit, now + lifetime, send, shown_at=now)
        self._webhooks[message_id] = route
        if len(self._webhooks) > 10_000:  # long expired ones go first
            del self._webhooks[next(iter(self._webhooks))]

    def drop_webhook(self, message_id: int) -> None:
        """Forget the webhook of a message whose job has ended (it holds the interaction)."""
        self._webhooks.pop(message_id, None)

    def webhook_of(self, message_id: int) -> WebhookRoute | None:
        """The live webhook route of a message, if it has one."""
        route = self._webhooks.get(message_id)
        if route is not None and self._clock() >= route.expires:
            del self._webhooks[message_id]
            return None
        return route

    def update(
        self,
        channel_id: int,
        message_id: int,
        builder: EditBuilder,
        *,
        interval: float | None = None,
    ) -> None:
        """Replace the wanted state of a message; sent when the budget allows, at least
        ``interval`` (default: the relay's) after the message's previous edit."""
        if message_id in self._finished:
            return
        slot = self._slot(channel_id, message_id)
        if slot.final:
            return  # the end state is set; later progress is stale
        slot.builder = builder
        # A new pace (the job left the line and runs) wakes the worker sleeping on the old.
        paced = interval != slot.interval
        slot.interval = interval
        self._want(slot, urgent=paced)

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
            route = self._webhooks.get(message_id)
            if route is not None:
                # Just posted: its first progress edit waits an interval like the next ones.
                slot.last_edit = route.shown_at
            self._slots[message_id] = slot
        return slot

    def _lane_key(self, slot: _Slot) -> LaneKey:
        route = self.webhook_of(slot.message_id)
        return route.lane if route is not None else ("channel", slot.channel_id)

    def _lane(self, key: LaneKey) -> _Lane:
        lane = self._lanes.get(key)
        if lane is None:
            limit, per = CHANNEL_EDITS if key[0] == "channel" else WEBHOOK_EDITS
            # Progress at an even pace: the window's requests less the finals' reserve.
            spacing = (per + WINDOW_MARGIN) / max(1, limit - self._reserve)
            lane = _Lane(FixedWindow(limit, per, self._clock, spacing=spacing))
            self._lanes[key] = lane
        return lane

    def _want(self, slot: _Slot, *, urgent: bool) -> None:
        """``slot`` has a state to send: queue it in its lane and make sure a worker runs.
        A progress state replacing one already queued changes nothing for the worker, so
        it is not woken (that happens per progress event)."""
        if slot.sending:
            return  # the worker queues it again after the send
        key = self._lane_key(slot)
        if slot.lane != key:
            self._unqueue(slot)  # its token expired: it leaves the interaction's lane
        slot.lane = key
        lane = self._lane(key)
        if urgent and slot.final:
            # Final states are sent in the order they were set: a message queued long ago
            # (its progress starved by other finals) must not jump ahead of older finals.
            lane.pending.pop(slot.message_id, None)
        if slot.message_id not in lane.pending:
            lane.pending[slot.message_id] = slot
            urgent = True
        if lane.worker is None:
            lane.worker = self._workers.spawn(self._work(key, lane), name=f"relay-{key[0]}")
        elif urgent:
            lane.wake.set()

    def _next(self, lane: _Lane) -> tuple[_Slot, float]:
        """The message to edit next and when its interval allows: a final state first (the
        one set first), else the message whose interval ends first, of those the one
        edited least recently (a waiting job's long interval must not hold back a running
        job's progress)."""
        best: _Slot | None = None
        best_key = (float("inf"), float("inf"))
        for slot in lane.pending.values():
            if slot.final:
                return slot, 0.0
            interval = self.interval if slot.interval is None else slot.interval
            key = (slot.last_edit + interval, slot.last_edit)
            if best is None or key < best_key:
                best, best_key = slot, key
        assert best is not None
        return best, best_key[0]

    async def _work(self, key: LaneKey, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        slot: _Slot | None = None
        try:
            while lane.pending:
                slot, ready_at = self._next(lane)
                if self._lane_key(slot) != key:
                    # Its token expired while it waited: the channel's lane takes it.
                    self._want(slot, urgent=True)
                    continue
                wait = max(
                    ready_at - self._clock(),
                    # Paced when messages share the lane; a lone one keeps its interval.
                    lane.window.delay(1.0 if slot.final else 1.0 + self._reserve,
                                      paced=not slot.final and len(lane.pending) > 1),
                )
                if wait > 0:
                    # Sleep until then, or until a final state or a new message wants an edit.
                    lane.wake.clear()
                    timer = loop.call_later(wait, lane.wake.set)
                    try:
                        await lane.wake.wait()
                    finally:
                        timer.cancel()
                    continue
                del lane.pending[slot.message_id]
                slot.lane = None
                builder, final = slot.builder, slot.final
                slot.builder = None
                if builder is None:
                    continue
                slot.sending = True
                try:
                    if final:
                        lane.window.take()
                        outcome = await self._send(slot, builder, final)
                    else:
                        async with self._progress_slots:
                            lane.window.take()
                            outcome = await self._send(slot, builder, final)
                finally:
                    slot.sending = False
                # Measured from the end of the edit: building and sending can take a
                # while under load, and the next edit must still wait a full interval.
                slot.last_edit = self._clock()
                if outcome is _MOVED:
                    if slot.builder is None:
                        slot.builder = builder  # not sent: the channel's lane sends it
                    self._want(slot, urgent=True)
                elif outcome is _GONE or (final and slot.builder is None):
                    self._unqueue(slot)
                    self._settle(slot, sent=outcome is _SENT)
                elif slot.builder is not None:
                    self._want(slot, urgent=False)  # changed while it was sent
        except asyncio.CancelledError:
            for waiting in (*lane.pending.values(), *([slot] if slot is not None else [])):
                if waiting.done is not None and not waiting.done.done():
                    waiting.done.cancel()
            raise
        finally:
            # The lane (and its window) stays: a new worker spends the same budget.
            lane.worker = None

    def _unqueue(self, slot: _Slot) -> None:
        if slot.lane is not None:
            lane = self._lanes.get(slot.lane)
            if lane is not None:
                lane.pending.pop(slot.message_id, None)
            slot.lane = None

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
        more edits are worth it); _MOVED when its webhook refused (an expired or revoked
        token: the channel's route is tried next); _FAILED when every try failed."""
        route = self.webhook_of(slot.message_id)
        if route is not None:
            edit = route.edit
        else:
            channel = self._client.get_partial_messageable(slot.channel_id)
            edit = channel.get_partial_message(slot.message_id).edit
        attempts = 3 if final else 1
        for attempt in range(attempts):
            try:
                # Within Discord's limits, whatever the builder put together: a refused
                # edit (400) would freeze the message at its last state.
                kwargs = fit_message(await builder())
                await edit(**kwargs)
                slot.edits += 1
                return _SENT
            except (discord.NotFound, discord.Forbidden) as exc:
                if route is not None:
                    return self._webhook_refused(slot, exc)
                # Deleted, or no longer ours to edit (e.g. the channel's permissions changed).
                log.info("status message %s cannot be edited (%s); no more edits",
                         slot.message_id, exc)
                return _GONE
            except (discord.HTTPException, OSError) as exc:
                if route is not None and getattr(exc, "status", None) == 401:
                    return self._webhook_refused(slot, exc)  # 50027 Invalid Webhook Token
                # discord.py already retried 429s; a final state gets a few more tries.
                log.warning("edit of message %s failed (%s)", slot.message_id, exc)
                if attempt + 1 < attempts:
                    await asyncio.sleep(1.0 * (attempt + 1))
            except Exception:
                log.exception("building the state of message %s failed", slot.message_id)
                return _FAILED
        return _FAILED

    def _webhook_refused(self, slot: _Slot, exc: Exception) -> object:
        """The interaction's webhook refused an edit: the token expired early, or the
        message is gone. Either way the channel's route decides (it says which)."""
        log.info("webhook edit of message %s refused (%s); using the channel's route",
                 slot.message_id, getattr(exc, "status", None))
        self._webhooks.pop(slot.message_id, None)
        return _MOVED

    async def close(self) -> None:
        # Cancel every worker and wait (no time limit, as before) until each has ended.
        await self._workers.close(timeout=None)
