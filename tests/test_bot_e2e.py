"""The foundation end to end: the real bot against the fake Discord."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select

from core.db.models import AuditLog
from tests.conftest import BotEnv, bot_settings, eventually, start_bot


async def test_about_answers_with_version_and_counts(env: BotEnv) -> None:
    interaction = await env.slash("about")
    message = interaction.response_message()
    assert message is not None and message.ephemeral
    embed = message.embeds[0]
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert fields["Servers"] == "0 known, 0 running"
    assert fields["Queue"] == "0 waiting, 0 running"
    assert fields["Version"]


async def test_help_lists_every_command(env: BotEnv) -> None:
    interaction = await env.slash("help")
    text = interaction.response_message().embeds[0]["description"]
    for name in ("/about", "/generate", "/imagine", "/server add-direct", "/workflow add"):
        assert f"`{name}`" in text


async def test_non_admin_is_refused_and_audited(env: BotEnv) -> None:
    interaction = await env.fake.slash(
        "audit", {}, user=env.fake.member, guild_id=env.fake.guild.id, force=True
    )
    await interaction.wait_response()
    message = interaction.response_message()
    assert message.ephemeral
    assert "for admins" in message.content
    async with env.services.sessions() as session:
        rows = (await session.scalars(select(AuditLog))).all()
    assert [(r.action, r.outcome, r.user_id) for r in rows] == [
        ("audit", "refused", env.fake.member.id)
    ]


async def test_admin_command_succeeds_and_is_audited(env: BotEnv) -> None:
    await env.slash("audit", user=env.fake.member, force=True)  # refused first
    interaction = await env.slash("audit", {"limit": 5}, user=env.fake.admin)
    message = interaction.response_message()
    assert message.ephemeral
    assert "refused" in message.embeds[0]["description"]

    async def audit_rows() -> list[AuditLog]:
        async with env.services.sessions() as session:
            rows = (await session.scalars(select(AuditLog).order_by(AuditLog.id))).all()
        return list(rows) if len(rows) == 2 else []

    rows = await eventually(audit_rows)
    assert [(r.action, r.outcome) for r in rows] == [("audit", "refused"), ("audit", "ok")]
    assert rows[1].details == {"options": {"limit": 5}}


async def test_admin_commands_are_hidden_from_members_by_default(env: BotEnv) -> None:
    synced = env.fake.commands[None]
    assert synced["audit"]["default_member_permissions"] == str(1 << 5)
    assert synced["server"]["default_member_permissions"] == str(1 << 5)
    assert synced["generate"].get("default_member_permissions") is None


async def test_commands_sync_only_when_changed(fake_discord: Any, tmp_path: Path) -> None:
    settings = bot_settings(tmp_path, fake_discord)
    first = await start_bot(fake_discord, settings)
    await first.stop()
    assert fake_discord.sync_count == 1
    second = await start_bot(fake_discord, settings)
    try:
        assert fake_discord.sync_count == 1  # same definitions: no second sync
        interaction = await second.slash("about")
        assert interaction.response_message().embeds
    finally:
        await second.stop()


async def test_guild_scoped_sync_when_guild_ids_are_set(fake_discord: Any, tmp_path: Path) -> None:
    settings = bot_settings(tmp_path, fake_discord, discord={"guild_ids": [fake_discord.guild.id]})
    running = await start_bot(fake_discord, settings)
    try:
        assert "about" in fake_discord.commands[fake_discord.guild.id]
        assert not fake_discord.commands.get(None)
        interaction = await running.slash("about")
        assert interaction.response_message().embeds
    finally:
        await running.stop()
