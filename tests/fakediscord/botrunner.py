"""Run a real discord.py client against a :class:`FakeDiscord`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import discord
import discord.gateway
import discord.http
import yarl

from .server import FakeDiscord


class BotHandle:
    """A bot connected to the fake. ``await handle.close()`` closes the bot, awaits its connect
    task (re-raising anything it died of) and restores the patched discord.py URLs."""

    def __init__(self, bot: discord.Client, fake: FakeDiscord, task: asyncio.Task,
                 saved: tuple[str, Any]) -> None:
        self.bot = bot
        self.fake = fake
        self.task = task
        self._saved = saved
        self._closed = False

    def check_alive(self) -> None:
        if self.task.done():
            exc = None if self.task.cancelled() else self.task.exception()
            raise AssertionError(f"the bot's connect task died: {exc!r}") from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        died_early = self.task.done()
        self.fake.unwatch_task(self.task)
        try:
            await self.bot.close()
            done, _ = await asyncio.wait({self.task}, timeout=10)
            if not done:
                self.task.cancel()
                raise AssertionError("the bot's connect task did not end after close()")
            exc = None if self.task.cancelled() else self.task.exception()
            if died_early or exc is not None:
                raise AssertionError(f"the bot's connect task died: {exc!r}") from exc
        finally:
            Route = discord.http.Route  # noqa: N806
            Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = self._saved


async def connect_bot(bot: discord.Client, fake: FakeDiscord, *,
                      ready_timeout: float = 10.0) -> BotHandle:
    """Point discord.py at ``fake`` (``Route.BASE`` and ``DEFAULT_GATEWAY``), log in, start
    ``bot.connect(reconnect=True)`` in a task and wait for ready. Construct the bot with a small
    ``guild_ready_timeout`` (e.g. 0.05) or this takes 2 s."""
    saved = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
    discord.http.Route.BASE = fake.api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
    try:
        await bot.login(fake.token)
    except BaseException:
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = saved
        await bot.close()
        raise
    task = asyncio.create_task(bot.connect(reconnect=True), name=f"{type(bot).__name__}.connect")
    handle = BotHandle(bot, fake, task, saved)
    fake.watch_task(task, f"{type(bot).__name__}.connect")
    ready = asyncio.create_task(bot.wait_until_ready())
    try:
        done, _ = await asyncio.wait({task, ready}, timeout=ready_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            if task in done:
                exc = None if task.cancelled() else task.exception()
                raise AssertionError(f"the bot's connect task died before ready: {exc!r}") from exc
            raise AssertionError(f"the bot was not ready after {ready_timeout}s")
    except BaseException:
        ready.cancel()
        with contextlib.suppress(BaseException):
            await handle.close()
        raise
    return handle


@contextlib.asynccontextmanager
async def running_bot(bot: discord.Client, fake: FakeDiscord, *,
                      ready_timeout: float = 10.0) -> AsyncIterator[discord.Client]:
    """``async with running_bot(bot, fake): ...`` connects, waits for ready, and on exit closes
    the bot; raises if the connect task died while the block ran."""
    handle = await connect_bot(bot, fake, ready_timeout=ready_timeout)
    try:
        yield bot
        handle.check_alive()
    finally:
        await handle.close()
