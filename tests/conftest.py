"""Shared fixtures: settings in a temp dir, services, the real bot against the fake Discord."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.config import Settings, load_settings
from core.services import Services, build_services

pytest_plugins = ["tests.fakediscord.pytest_plugin"]

POSTGRES_ENV = "COMFYVAST_TEST_POSTGRES_URL"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's config.toml or real credentials."""
    for name in list(os.environ):
        if name.startswith("COMFYVAST_") and name != POSTGRES_ENV:
            monkeypatch.delenv(name)
    for name in (
        "DISCORD_TOKEN",
        "VAST_AI_API_KEY",
        "VAST_AI_BASE_URL",
        "DATABASE_URL",
        "COMFY_DEFAULT_PORT",
        "COMFY_MODEL_CACHE_SIZE",
        "COMFY_MAX_GENERATIONS",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COMFYVAST_CONFIG", str(tmp_path / "absent-config.toml"))


def make_settings(tmp_path: Path, **sections: Any) -> Settings:
    base: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "database": {"url": f"sqlite+aiosqlite:///{tmp_path}/test.db"},
        "discord": {"guild_ready_timeout": 0.05},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return load_settings(**base)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
async def services(settings: Settings) -> AsyncIterator[Services]:
    svc = await build_services(settings)
    yield svc
    await svc.close()


def postgres_url() -> str | None:
    return os.environ.get(POSTGRES_ENV)


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database on each backend (PostgreSQL when .ci/run provides one)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/storage.db"
        return
    url = postgres_url()
    if not url:
        pytest.skip(f"no PostgreSQL server configured: set {POSTGRES_ENV} (.ci/run does)")
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text("DROP SCHEMA public CASCADE"))
        await conn.execute(text("CREATE SCHEMA public"))
    await engine.dispose()
    yield url


class BotEnv:
    """The real bot, its services, and the fake Discord it talks to."""

    def __init__(self, fake: Any, services: Services, bot: Any, handle: Any) -> None:
        self.fake = fake
        self.services = services
        self.bot = bot
        self.handle = handle

    @property
    def channel_id(self) -> int:
        return int(self.fake.guild.channel_id)

    async def slash(
        self, name: str, options: dict[str, Any] | None = None, *, user: Any = None, **kw: Any
    ) -> Any:
        """Run a slash command and wait until the bot has answered it."""
        interaction = await self.fake.slash(
            name, options or {}, user=user or self.fake.member, guild_id=self.fake.guild.id, **kw
        )
        await interaction.wait_response()
        return interaction

    async def stop(self) -> None:
        await self.handle.close()
        await self.services.close()


async def start_bot(fake: Any, settings: Settings) -> BotEnv:
    from bot.bot import ComfyVastBot
    from tests.fakediscord import connect_bot

    services = await build_services(settings)
    bot = ComfyVastBot(services)
    handle = await connect_bot(bot, fake)
    return BotEnv(fake, services, bot, handle)


def bot_settings(tmp_path: Path, fake: Any, **sections: Any) -> Settings:
    discord_section = {
        "token": fake.token,
        "api_base_url": fake.api_base,
        "gateway_url": fake.gateway_url,
        "guild_ready_timeout": 0.05,
        **sections.pop("discord", {}),
    }
    return make_settings(tmp_path, discord=discord_section, **sections)


@pytest.fixture
async def env(fake_discord: Any, tmp_path: Path) -> AsyncIterator[BotEnv]:
    running = await start_bot(fake_discord, bot_settings(tmp_path, fake_discord))
    yield running
    await running.stop()


async def eventually(check: Any, timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll an async ``check()`` until it returns something truthy."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {result!r})")
        await asyncio.sleep(interval)


@pytest.fixture(params=["asyncssh", "openssh"])
async def ssh_host(request: pytest.FixtureRequest, env: BotEnv) -> AsyncIterator[Any]:
    """A real SSH server on loopback that accepts the bot's own key (both kinds)."""
    from tests.sshserver import start_ssh_server

    server = await start_ssh_server(request.param, env.services.remote.key.public_openssh)
    yield server
    await server.close()


async def register_ssh_server(
    env: BotEnv, server: Any, name: str = "box", comfy_port: int = 8188
) -> Any:
    """Register an SSH host through /server add-ssh, as an admin would."""
    interaction = await env.slash(
        "server",
        {
            "name": name,
            "host": server.host,
            "port": server.port,
            "user": server.username,
            "comfy_port": comfy_port,
        },
        user=env.fake.admin,
        subcommand="add-ssh",
    )
    message = await env.fake.wait_for(lambda: _answered(interaction))
    assert "Added server" in message.content, message.content
    return await env.services.servers.get(name)


def _answered(interaction: Any) -> Any:
    followups = interaction.followups()
    if followups:
        return followups[-1]
    message = interaction.response_message()
    if message is not None and not message.loading and (message.content or message.embeds):
        return message
    return None


MODELS = {
    "checkpoints": ["sd15.safetensors", "sdxl.safetensors"],
    "loras": ["detail.safetensors"],
    "upscale_models": ["4x-ultra.pth"],
}


@pytest.fixture
async def comfy() -> AsyncIterator[Any]:
    from tests.fakecomfy import FakeComfy

    fake = FakeComfy(models=MODELS, step_delay=0.01, output_size=(64, 64))
    await fake.start()
    yield fake
    await fake.stop()


async def add_server(env: BotEnv, name: str, url: str) -> None:
    interaction = await env.slash(
        "server", {"name": name, "url": url}, user=env.fake.admin, subcommand="add-direct"
    )
    text = (await env.fake.wait_for(lambda: _answered(interaction))).content
    assert "Added server" in text, text


@pytest.fixture
async def studio(env: BotEnv, comfy: Any) -> BotEnv:
    await add_server(env, "gpu-1", comfy.url)
    return env
