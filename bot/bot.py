"""The wiring: the Bot subclass that injects the services, loads the cogs, and syncs commands
only when they changed.

Only this module and the entry point (bot/cli.py) import it; every other bot module and cog
types against :class:`bot.context.BotContext`, which this class satisfies.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Coroutine
from typing import Any

import discord
import yarl
from discord.ext import commands

from bot.checks import actor_of, is_admin_command
from bot.tree import ComfyVastTree, _options
from core.audit import OUTCOME_OK
from core.services import Services
from core.stats.metrics import MetricsServer
from core.tasks import TaskRegistry

log = logging.getLogger(__name__)

EXTENSIONS = (
    "cogs.meta",
    "cogs.servers",
    "cogs.generation",
    "cogs.workflows",
    "cogs.setup",
    "cogs.models",
    "cogs.stats",
    "cogs.pools",
)

DEFAULT_API_BASE = "https://discord.com/api/v10"
DEFAULT_GATEWAY = "wss://gateway.discord.gg"


def point_discord_at(api_base_url: str, gateway_url: str) -> None:
    """Send discord.py's REST and Gateway traffic to the configured endpoints.

    discord.py reads these two class attributes whenever it builds a route or connects;
    changing them is how the bot runs behind a Discord REST proxy (and against the fake).
    """
    discord.http.Route.BASE = api_base_url
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


class ComfyVastBot(commands.Bot):
    def __init__(self, services: Services, *, extensions: tuple[str, ...] = EXTENSIONS) -> None:
        settings = services.settings
        super().__init__(
            command_prefix=commands.when_mentioned,
            # Slash commands and buttons arrive as interactions, whatever the intents:
            # the bot needs its guilds (names, upload limits) and no message events.
            intents=discord.Intents(guilds=True),
            max_messages=None,
            tree_cls=ComfyVastTree,
            help_command=None,
            guild_ready_timeout=settings.discord.guild_ready_timeout,
            allowed_mentions=discord.AllowedMentions(everyone=False, roles=False, users=True),
        )
        self.services = services
        self.started_at = time.monotonic()
        self._extensions = extensions
        self._tasks = TaskRegistry("bot")
        self.metrics: MetricsServer | None = None
        self.metrics_port: int | None = None

    async def setup_hook(self) -> None:
        from bot.job_observer import DiscordJobObserver
        from bot.jobs import DYNAMIC_ITEMS
        from bot.relay import MessageRelay
        from bot.server_events import DiscordServerEvents, KeepAliveButton

        self.relay = MessageRelay(self)
        self.services.generation.observer = DiscordJobObserver(self, self.relay)
        self.services.server_ops.events = DiscordServerEvents(self)
        # Buttons whose custom ids carry a job or server id keep working across restarts.
        self.add_dynamic_items(*DYNAMIC_ITEMS, KeepAliveButton)
        for ext in self._extensions:
            await self.load_extension(ext)
        await self.sync_commands_if_changed()
        await self.services.models.recover()
        self.spawn(self._resume_jobs(), name="resume-generations")
        self.services.server_ops.start_maintenance()
        metrics = self.services.settings.metrics
        if metrics.enabled:
            await self._start_metrics(metrics.host, metrics.port)

    async def _start_metrics(self, host: str, port: int) -> None:
        """Serve /metrics; a port already taken costs the metrics, not the bot."""
        server = MetricsServer(self.services.stats, host, port)
        try:
            self.metrics_port = await server.start()
        except OSError as exc:
            log.error("metrics endpoint not started: cannot listen on %s:%d (%s)",
                      host, port, exc.strerror or exc)
            return
        self.metrics = server

    async def _resume_jobs(self) -> None:
        await self.wait_until_ready()
        resumed = await self.services.generation.resume_unfinished()
        if resumed:
            log.info("resumed %d unfinished generations", len(resumed))

    async def sync_commands_if_changed(self) -> list[str]:
        """Sync each scope whose command definitions differ from the last sync.

        Returns the scopes synced ("global" or guild ids). Discord rate-limits syncs
        heavily, so an unchanged tree is never re-sent.
        """
        guild_ids = self.services.settings.discord.guild_ids
        synced: list[str] = []
        for guild_id in guild_ids or [None]:
            guild = discord.Object(id=guild_id) if guild_id else None
            if guild is not None:
                self.tree.copy_global_to(guild=guild)
            payload = [cmd.to_dict(self.tree) for cmd in self.tree.get_commands(guild=guild)]
            digest = hashlib.sha256(
                json.dumps(payload, sort_keys=True, default=str).encode()
            ).hexdigest()
            scope = str(guild_id) if guild_id else "global"
            key = f"command-sync:{self.application_id}:{scope}"
            stored = await self.services.state.get(key)
            if stored and stored.get("hash") == digest:
                log.info("commands for %s unchanged; not syncing", scope)
                continue
            await self.tree.sync(guild=guild)
            await self.services.state.set(key, {"hash": digest})
            log.info("synced %d commands to %s", len(payload), scope)
            synced.append(scope)
        return synced

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Run a background task that is tracked and whose failure is logged."""
        return self._tasks.spawn(coro, name=name)

    async def on_app_command_completion(
        self, interaction: discord.Interaction, command: Any
    ) -> None:
        if is_admin_command(command):
            await self.services.audit.record(
                actor_of(interaction),
                command.qualified_name,
                outcome=OUTCOME_OK,
                details={"options": _options(interaction)},
            )

    async def on_ready(self) -> None:
        log.info(
            "connected as %s (%s) to %d guilds",
            self.user,
            self.user and self.user.id,
            len(self.guilds),
        )

    async def close(self) -> None:
        if self.metrics is not None:
            await self.metrics.close()
        from bot.job_observer import DiscordJobObserver

        observer = self.services.generation.observer
        if isinstance(observer, DiscordJobObserver):
            observer.pings.close()
        await self.services.generation.close()
        await self.services.server_ops.close()
        if hasattr(self, "relay"):
            await self.relay.close()
        # No timeout: as before, close waits until every background task has ended.
        await self._tasks.close(timeout=None)
        await super().close()
