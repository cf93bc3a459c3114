"""No rental is ever lost: the real bot process is killed (SIGKILL) mid-operation.

The bot runs as ``python -m bot`` with a config pointing at the fake Discord and the
fake Vast.ai in this process. The fake Vast.ai carries out each call, then holds its
answer (``FakeVast.hold_after``); the test kills the bot the moment Vast has acted, so
the bot never learns the outcome. After a restart the bot must settle the operation with
Vast.ai and finish the Discord message, and the fake's ledger must show exactly one
instance for the request, none running unknown to the bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakediscord import FakeDiscord
from tests.fakediscord.models import iter_components
from tests.fakevast import FakeVast
from tests.fakevast.server import make_offer

ROOT = Path(__file__).resolve().parent.parent
WAIT = 60.0  # generous: a loaded machine starts a Python process slowly


def child_env() -> dict[str, str]:
    """The environment without anything that would configure the bot from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYVAST_")}
    for name in ("DISCORD_TOKEN", "VAST_AI_API_KEY", "VAST_AI_BASE_URL", "DATABASE_URL",
                 "COMFY_DEFAULT_PORT", "COMFY_MODEL_CACHE_SIZE", "COMFY_MAX_GENERATIONS"):
        env.pop(name, None)
    env["PYTHONPATH"] = str(ROOT)
    return env


class BotProcess:
    """``python -m bot`` against the fakes; killed with SIGKILL, started again at will."""

    def __init__(self, tmp: Path, discord: FakeDiscord, vast: FakeVast) -> None:
        self.tmp = tmp
        self.discord = discord
        self.db = tmp / "bot.db"
        self.config = tmp / "config.toml"
        self.config.write_text(f"""\
data_dir = {json.dumps(str(tmp / "data"))}
log_level = "INFO"

[discord]
token = {json.dumps(discord.token)}
api_base_url = {json.dumps(discord.api_base)}
gateway_url = {json.dumps(discord.gateway_url)}
guild_ready_timeout = 0.05

[vast]
api_key = {json.dumps(vast.api_key)}
base_url = {json.dumps(vast.base_url)}
request_timeout = 5
poll_interval = 0.1

[ssh]
connect_timeout = 2

[costs]
idle_timeout = 0

[database]
url = {json.dumps(f"sqlite+aiosqlite:///{self.db}")}
""")
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        identified = len(self.discord.identifies)
        self.starts += 1
        log = (self.tmp / f"bot-{self.starts}.log").open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "--config", str(self.config), cwd=ROOT,
            stdout=log, stderr=asyncio.subprocess.STDOUT, env=child_env(),
        )
        deadline = time.monotonic() + WAIT
        while not (len(self.discord.identifies) > identified
                   and any(not s.dead for s in self.discord._sessions.values())
                   and self._synced()):
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"the bot did not come up; see {log.name}:\n"
                                     + Path(log.name).read_text()[-3000:])
            await asyncio.sleep(0.05)

    def _synced(self) -> bool:
        return any("server" in cmds for cmds in self.discord.commands.values())

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()

    def row(self, name_prefix: str) -> dict[str, Any]:
        with contextlib.closing(sqlite3.connect(self.db)) as db:
            db.row_factory = sqlite3.Row
            found = db.execute(
                "SELECT * FROM servers WHERE name = ? OR name LIKE ?",
                (name_prefix, f"{name_prefix}~%"),
            ).fetchall()
        assert len(found) == 1, found
        return dict(found[0])


@pytest.fixture
async def vast() -> AsyncIterator[FakeVast]:
    fake = FakeVast(
        # Loopback addresses only: nothing may reach beyond this machine.
        offers=[make_offer(301, "RTX 3090", dph_base=0.2, public_ipaddr="127.0.0.1")],
        clock=time.time, provision_seconds=0.05, boot_seconds=0.3, restart_seconds=0.3,
    )
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def bot(tmp_path: Path, fake_discord: FakeDiscord,
              vast: FakeVast) -> AsyncIterator[BotProcess]:
    process = BotProcess(tmp_path, fake_discord, vast)
    await process.start()
    yield process
    await process.stop()


def buttons(message: Any) -> dict[str, str]:
    return {c.get("label"): c["custom_id"] for c in iter_components(message.components)
            if c.get("type") == 2 and "custom_id" in c}


async def press(fake: FakeDiscord, interaction: Any, label: str) -> None:
    def prompt() -> Any:
        for message in reversed([*interaction.followups(), interaction.response_message()]):
            if message is not None and label in buttons(message):
                return message
        return None

    message = await fake.wait_for(prompt, timeout=WAIT)
    await fake.click(message.id, buttons(message)[label], user=fake.admin)


def channel_message(fake: FakeDiscord, *needles: str) -> Callable[[], Any]:
    def find() -> Any:
        for message in fake.channel_messages(fake.guild.channel_id, include_ephemeral=False):
            if all(n in (message.content or "") for n in needles):
                return message
        return None

    return find


async def killed_after(bot: BotProcess, vast: FakeVast, route: str,
                       action: Callable[[], Any]) -> None:
    """Run ``action`` (a slash command) and SIGKILL the bot as soon as Vast.ai has carried
    out the call matching ``route``, before the bot reads the answer."""
    hold = vast.hold_after(route)
    await action()
    await asyncio.wait_for(hold.arrived.wait(), WAIT)
    await bot.kill()
    hold.release()


def ledger(vast: FakeVast, label_prefix: str) -> list[Any]:
    every = [*vast.instances.values(), *vast.destroyed.values()]
    return [i for i in every if (i.label or "").startswith(label_prefix)]


async def test_killed_mid_create_start_stop_destroy_loses_nothing(
    bot: BotProcess, fake_discord: FakeDiscord, vast: FakeVast
) -> None:
    fake = fake_discord
    admin = fake.admin

    # --- killed right after Vast.ai received the create
    async def create() -> None:
        interaction = await fake.slash("server", {"gpu": "RTX 3090", "name": "kill"},
                                       user=admin, subcommand="create")
        await press(fake, interaction, "Rent it")

    await killed_after(bot, vast, "PUT /api/v0/asks/", create)
    row = bot.row("kill")
    assert row["status"] == "creating" and row["provider_id"] is None  # the id was lost
    (instance,) = ledger(vast, "comfyvast:kill:")
    assert instance.label == row["request_label"]
    await fake.wait_for(channel_message(fake, "Renting **kill**"), timeout=WAIT)

    await bot.start()
    message = await fake.wait_for(
        channel_message(fake, "Renting **kill**", "✅ **kill** is running"), timeout=WAIT)
    assert "found the rental at Vast.ai" in message.content
    row = bot.row("kill")
    assert row["status"] == "running" and row["provider_id"] == str(instance.id)
    assert len(ledger(vast, "comfyvast:kill:")) == 1 and len(vast.instances) == 1
    assert vast.instances[instance.id].actual_status == "running"
    iid = instance.id

    # --- killed during stop
    await killed_after(bot, vast, f"PUT /api/v0/instances/{iid}/", lambda: fake.slash(
        "server", {"server": "kill"}, user=admin, subcommand="stop"))
    assert bot.row("kill")["status"] == "stopping"
    await bot.start()
    await fake.wait_for(channel_message(fake, "Stopped **kill**", "after the bot restarted"),
                        timeout=WAIT)
    assert bot.row("kill")["status"] == "stopped"
    assert vast.instances[iid].actual_status == "stopped" and len(vast.instances) == 1

    # --- killed during start
    async def start() -> None:
        interaction = await fake.slash("server", {"server": "kill"}, user=admin,
                                       subcommand="start")
        await press(fake, interaction, "Start it")

    await killed_after(bot, vast, f"PUT /api/v0/instances/{iid}/", start)
    assert bot.row("kill")["status"] == "starting"
    await bot.start()
    await fake.wait_for(channel_message(fake, "Starting **kill**", "✅ **kill** is running"),
                        timeout=WAIT)
    assert bot.row("kill")["status"] == "running"
    assert vast.instances[iid].actual_status == "running" and len(vast.instances) == 1

    # --- killed during destroy
    async def destroy() -> None:
        interaction = await fake.slash("server", {"server": "kill"}, user=admin,
                                       subcommand="destroy")
        await press(fake, interaction, "Destroy")

    await killed_after(bot, vast, f"DELETE /api/v0/instances/{iid}/", destroy)
    assert bot.row("kill")["status"] == "destroying"
    await bot.start()
    await fake.wait_for(channel_message(fake, "Destroyed **kill**", "after the bot restarted"),
                        timeout=WAIT)
    row = bot.row("kill")
    assert row["status"] == "destroyed" and row["name"].startswith("kill~")
    assert vast.instances == {} and list(vast.destroyed) == [iid]
    # One create request, one instance, over the whole story.
    assert len(vast.calls("PUT /api/v0/asks/")) == 1
