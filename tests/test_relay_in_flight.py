"""The relay's bound on progress edits in flight (bot/relay.py): pure logic with edit
callables standing in for interaction webhooks; the lanes' Discord traffic is tested
through the fake Discord in tests/test_relay_e2e.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import bot.relay
from bot.relay import MessageRelay


class Edits:
    """Edits that take a while, counting how many are in flight at once."""

    def __init__(self) -> None:
        self.in_flight = self.peak = self.done = 0

    async def __call__(self, **kwargs: Any) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(0.05)
        self.in_flight -= 1
        self.done += 1


async def _state() -> dict[str, Any]:
    return {"content": "state"}


def _relay(edits: Edits, messages: int) -> MessageRelay:
    relay = MessageRelay(None, interval=0.0)  # type: ignore[arg-type]
    for message_id in range(1, messages + 1):
        # One interaction each: every message has a lane and a budget of its own.
        relay.via_webhook(message_id, lane=("interaction", message_id), edit=edits,
                          send=None, lifetime=60.0)
    return relay


async def test_progress_edits_in_flight_are_bounded_over_every_lane(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bot.relay, "MAX_PROGRESS_IN_FLIGHT", 3)
    edits = Edits()
    relay = _relay(edits, 12)
    for message_id in range(1, 13):
        relay.update(1, message_id, _state)
    async with asyncio.timeout(5):
        while edits.done < 12:
            await asyncio.sleep(0.01)
    assert edits.peak == 3
    await relay.close()


async def test_final_states_are_not_held_by_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bot.relay, "MAX_PROGRESS_IN_FLIGHT", 1)
    edits = Edits()
    relay = _relay(edits, 6)
    async with asyncio.timeout(5):
        sent = await asyncio.gather(*(relay.finish(1, m, _state) for m in range(1, 7)))
    assert sent == [True] * 6 and edits.peak == 6
    await relay.close()
