"""The relay's gather (bot/relay.py, GATHER): a message that changes after a quiet time
is edited a moment later with whatever followed, final states at once. Pure logic with
edit callables standing in for interaction webhooks; the lanes' Discord traffic is tested
through the fake Discord in tests/test_relay_e2e.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bot.relay import MessageRelay


class Sent:
    def __init__(self) -> None:
        self.states: list[tuple[float, str]] = []

    async def __call__(self, **kwargs: Any) -> None:
        self.states.append((time.monotonic(), kwargs["content"]))


def _state(text: str) -> Any:
    async def build() -> dict[str, Any]:
        return {"content": text}

    return build


def _relay(sent: Sent, *, gather: float) -> MessageRelay:
    relay = MessageRelay(None, interval=1.0, gather=gather)  # type: ignore[arg-type]
    relay.via_webhook(1, lane=("interaction", 1), edit=sent, send=None, lifetime=60.0)
    return relay


async def _until(check: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


async def test_a_change_after_a_quiet_time_goes_out_with_what_follows_it() -> None:
    sent = Sent()
    relay = _relay(sent, gather=0.25)
    started = time.monotonic()
    relay.update(1, 1, _state("running"))
    await asyncio.sleep(0.05)
    relay.update(1, 1, _state("step 1"))
    await asyncio.sleep(0.05)
    relay.update(1, 1, _state("step 2"))
    await _until(lambda: sent.states)
    await asyncio.sleep(0.3)
    assert [text for _, text in sent.states] == ["step 2"]  # one edit, the newest state
    assert sent.states[0][0] - started >= 0.25
    await relay.close()


async def test_without_gather_the_first_change_goes_at_once() -> None:
    sent = Sent()
    relay = _relay(sent, gather=0.0)
    relay.update(1, 1, _state("running"))
    await _until(lambda: sent.states)
    assert [text for _, text in sent.states] == ["running"]
    await relay.close()


async def test_a_final_state_does_not_wait_for_the_gather() -> None:
    sent = Sent()
    relay = _relay(sent, gather=5.0)
    relay.update(1, 1, _state("running"))
    started = time.monotonic()
    async with asyncio.timeout(2):
        assert await relay.finish(1, 1, _state("done"))
    assert time.monotonic() - started < 1.0
    assert [text for _, text in sent.states] == ["done"]
    await relay.close()


async def test_steady_progress_keeps_its_interval() -> None:
    """Gathering is for the first change after a quiet time: a message edited all along
    keeps one edit per interval, not one per interval plus the gather."""
    sent = Sent()
    relay = MessageRelay(None, interval=0.3, gather=0.25)  # type: ignore[arg-type]
    relay.via_webhook(1, lane=("interaction", 1), edit=sent, send=None, lifetime=60.0)
    for step in range(30):  # 1.5 s of steps every 50 ms
        relay.update(1, 1, _state(f"step {step}"))
        await asyncio.sleep(0.05)
    times = [t for t, _ in sent.states]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(times) >= 4 and max(gaps) < 0.45, gaps
    await relay.close()
