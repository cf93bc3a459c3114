"""The grouping of result pings (bot/pings.py): pure logic; the pings themselves go
through the fake Discord in tests/test_result_in_place_e2e.py."""

from __future__ import annotations

import asyncio
from typing import Any

import discord

from bot.pings import ResultPings


def _pings() -> tuple[ResultPings, list[str]]:
    sent: list[str] = []

    async def send(content: str, mention: discord.AllowedMentions, result: Any,
                   job_id: int) -> None:
        sent.append(content)

    return ResultPings(send, asyncio.ensure_future), sent


async def test_an_update_after_its_jobs_end_does_not_hold_the_next_ping() -> None:
    pings, sent = _pings()
    pings.seen(1, 10, 100)
    await pings.ended(1, 10, 100)
    pings.seen(1, 10, 100)  # a progress event handled after the end
    pings.seen(1, 10, 101)
    await pings.ready(1, 10, 101, result=None)
    assert sent == ["<@1> job #101 is ready."]


async def test_results_wait_for_the_members_last_job_in_that_channel() -> None:
    pings, sent = _pings()
    for job in (1, 2, 3):
        pings.seen(7, 10, job)
    pings.seen(7, 20, 4)  # another channel: does not hold this one's ping
    await pings.ready(7, 10, 1, result=None)
    await pings.ended(7, 10, 1)
    await pings.ended(7, 10, 2)  # failed: nothing to announce of its own
    assert sent == []
    await pings.ready(7, 10, 3, result=None)
    assert sent == ["<@7> jobs #1 and #3 are ready."]
    pings.close()
