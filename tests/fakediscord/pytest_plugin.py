"""pytest fixtures for the fake Discord.

Root conftest: ``pytest_plugins = ["tests.fakediscord.pytest_plugin"]``. A test module may also
``from tests.fakediscord.pytest_plugin import *`` (module fixtures simply shadow the plugin's).

* ``fake_discord``: a started :class:`FakeDiscord` with ``.guild``, ``.admin`` (role with
  MANAGE_GUILD) and ``.member`` (default permissions); stopped in teardown. It pulls in
  ``fail_on_discord_errors``.
* ``fail_on_discord_errors``: fails the test if any ``discord.*`` logger logs ERROR or worse.
  Yields the list of captured records (clear it to accept expected errors), or mark a test
  ``@pytest.mark.allow_discord_errors``.
* ``running_bot(bot, fake)`` / ``connect_bot(bot, fake)``: see :mod:`.botrunner`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import pytest

from .botrunner import BotHandle, connect_bot, running_bot
from .models import MANAGE_GUILD
from .server import FakeDiscord

__all__ = [
    "BotHandle",
    "FakeDiscord",
    "connect_bot",
    "fail_on_discord_errors",
    "fake_discord",
    "running_bot",
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_discord_errors: do not fail the test on discord.* ERROR logs")


class _ErrorCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def fail_on_discord_errors(request: pytest.FixtureRequest) -> Iterator[list[logging.LogRecord]]:
    collector = _ErrorCollector()
    logger = logging.getLogger("discord")
    logger.addHandler(collector)
    try:
        yield collector.records
    finally:
        logger.removeHandler(collector)
    if collector.records and request.node.get_closest_marker("allow_discord_errors") is None:
        fmt = logging.Formatter("%(name)s %(levelname)s: %(message)s")
        lines = []
        for rec in collector.records:
            text = fmt.format(rec)  # includes the traceback when exc_info is set
            lines.append(text)
        pytest.fail("discord.py logged errors:\n" + "\n---\n".join(lines), pytrace=False)


@pytest.fixture
async def fake_discord(fail_on_discord_errors: list) -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord()
    await fake.start()
    try:
        fake.guild = fake.add_guild()
        admin_role = fake.add_role(fake.guild.id, "Admin", permissions=MANAGE_GUILD)
        fake.admin = fake.add_user("admin", guild_id=fake.guild.id, roles=[admin_role])
        fake.member = fake.add_user("member", guild_id=fake.guild.id)
        yield fake
    finally:
        await fake.stop()
