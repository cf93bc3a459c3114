"""The server autocomplete shared by /server, /setup and /models (bot.autocomplete)."""

from __future__ import annotations

import pytest

from core.audit import Actor
from tests.conftest import BotEnv

ADMIN = Actor(1, is_admin=True)


@pytest.mark.parametrize(
    ("command", "subcommand"),
    [("server", "start"), ("server", "diagnose"), ("setup", "run"), ("models", "list"),
     ("models", "delete")],
)
async def test_server_option_completes_live_server_names(
    env: BotEnv, command: str, subcommand: str
) -> None:
    for name in ("alpha", "beta", "alpine"):
        await env.services.servers.add_direct(ADMIN, name, "http://127.0.0.1:9")
    everyone = await env.fake.autocomplete(command, {}, "server", user=env.fake.admin,
                                           subcommand=subcommand)
    assert [(c["name"], c["value"]) for c in everyone] == [
        ("alpha", "alpha"), ("alpine", "alpine"), ("beta", "beta")
    ]
    typed = await env.fake.autocomplete(command, {"server": "alp"}, "server",
                                        user=env.fake.admin, subcommand=subcommand)
    assert [c["value"] for c in typed] == ["alpha", "alpine"]
