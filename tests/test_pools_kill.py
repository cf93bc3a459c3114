"""A pool's scale-up survives a SIGKILL of the bot: the rental is adopted, never repeated.

The real bot runs as ``python -m bot`` (the harness of test_servers_recovery_kill). The
autoscaler ticks in the server maintenance loop, whose first round runs at start-up: a
pool below its ``min`` makes that round rent. The fake Vast.ai carries out the create and
holds its answer; the bot is killed then, so it never learns the instance id.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakediscord import FakeDiscord
from tests.fakevast import FakeVast
from tests.fakevast.server import make_offer
from tests.test_servers_recovery_kill import WAIT, BotProcess, channel_message, ledger


@pytest.fixture
async def vast() -> AsyncIterator[FakeVast]:
    fake = FakeVast(
        # Loopback addresses only: nothing may reach beyond this machine.
        offers=[make_offer(301, "RTX 3090", dph_base=0.2, public_ipaddr="127.0.0.1"),
                make_offer(302, "RTX 3090", dph_base=0.3, public_ipaddr="127.0.0.1")],
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


def query(bot: BotProcess, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(bot.db)) as db:
        return db.execute(sql).fetchall()


async def until(check: Any, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not met within {timeout} s: {check}")
        await asyncio.sleep(0.05)
    return found


async def test_killed_mid_scale_up_rents_once(bot: BotProcess, fake_discord: FakeDiscord,
                                              vast: FakeVast) -> None:
    fake = fake_discord
    # The start-up round has run (it would rent for a pool created before its tick).
    log = bot.tmp / f"bot-{bot.starts}.log"
    await until(lambda: "server maintenance: first round done" in log.read_text())
    await fake.slash("pool", {"name": "gpu", "gpu": "RTX 3090", "min": 1},
                     user=fake.admin, subcommand="create")
    await until(lambda: query(bot, "SELECT id FROM server_pools"))
    assert vast.instances == {}  # nothing rents until the next maintenance round

    # Restarted, the first round rents; Vast.ai acts, the bot dies before the answer.
    await bot.stop()
    hold = vast.hold_after("PUT /api/v0/asks/")
    await bot.start()
    await asyncio.wait_for(hold.arrived.wait(), WAIT)
    await bot.kill()
    hold.release()
    [(name, state)] = query(bot, "SELECT server_name, state FROM pool_decisions")
    assert state == "planned"
    assert bot.row(name)["status"] == "creating" and bot.row(name)["provider_id"] is None
    await fake.wait_for(channel_message(fake, f"Pool **gpu**: renting **{name}**"),
                        timeout=WAIT)

    await bot.start()
    # Recovery adopts the instance by its label; the pool counts it and rents nothing more.
    await until(lambda: bot.row(name)["status"] == "running")
    await until(lambda: query(bot, "SELECT state FROM pool_decisions") == [("done",)])
    await asyncio.sleep(1.0)  # the round that settled it has also scaled (or not) by now
    assert [i.label.split(":")[1] for i in ledger(vast, "comfyvast:gpu-")] == [name]
    assert len(query(bot, "SELECT * FROM pool_decisions")) == 1
    assert query(bot, "SELECT pool_id FROM pool_members") == [(1,)]
