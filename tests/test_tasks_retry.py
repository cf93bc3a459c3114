"""The task registry and the retry policy (pure asyncio, no sockets needed)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from core.retry import Backoff
from core.tasks import TaskRegistry


async def test_keyed_spawn_is_unique_while_running() -> None:
    reg = TaskRegistry("test")
    gate = asyncio.Event()
    runs = []

    async def work(n: int) -> int:
        runs.append(n)
        await gate.wait()
        return n

    first = reg.spawn(work(1), key="job")
    second = reg.spawn(work(2), key="job")
    assert second is first and "job" in reg and len(reg) == 1
    gate.set()
    assert await first == 1
    await asyncio.sleep(0)
    assert runs == [1] and "job" not in reg
    # Once ended, the key can run again.
    assert await reg.spawn(work(3), key="job") == 3


async def test_crash_is_logged_and_on_done_runs(caplog: pytest.LogCaptureFixture) -> None:
    reg = TaskRegistry("owner")
    done: list[str] = []

    async def boom() -> None:
        raise RuntimeError("kaput")

    task = reg.spawn(boom(), key=7, name="boom-7", on_done=lambda t: done.append(t.get_name()))
    with caplog.at_level(logging.ERROR, logger="core.tasks"):
        with pytest.raises(RuntimeError):
            await task
        await asyncio.sleep(0)
    assert done == ["boom-7"]
    assert "owner: task boom-7 crashed" in caplog.text and "kaput" in caplog.text


async def test_cancel_and_close() -> None:
    reg = TaskRegistry("test")
    keyed = reg.spawn(asyncio.sleep(60), key="a")
    loose = reg.spawn(asyncio.sleep(60))
    assert reg.cancel("a") and not reg.cancel("missing")
    await asyncio.sleep(0)
    assert keyed.cancelled() and len(reg) == 1
    await reg.close()
    assert loose.cancelled() and len(reg) == 0


@pytest.mark.parametrize("attempt", range(1, 10))
def test_equal_jitter_stays_in_upper_half(attempt: int) -> None:
    b = Backoff(base=0.5, cap=10.0, jitter="equal")
    ceiling = min(10.0, 0.5 * 2 ** (attempt - 1))
    for _ in range(50):
        assert ceiling / 2 <= b.delay(attempt) <= ceiling


@pytest.mark.parametrize("attempt", range(1, 10))
def test_full_jitter_spans_zero_to_ceiling(attempt: int) -> None:
    b = Backoff(base=0.5, cap=30.0, jitter="full")
    ceiling = min(30.0, 0.5 * 2 ** (attempt - 1))
    delays = [b.delay(attempt) for _ in range(200)]
    assert all(0 <= d <= ceiling for d in delays)
    assert min(delays) < ceiling / 2  # not equal jitter
