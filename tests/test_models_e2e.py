"""/models end to end: real bot, fake Discord, a real SSH server, a loopback model source."""

from __future__ import annotations

import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.model_files import ModelService
from core.servers import ServerView
from tests.conftest import BotEnv, _answered, bot_settings, register_ssh_server, start_bot
from tests.test_models import (  # noqa: F401  (fixtures)
    ModelSource,
    build_service,
    closed_port,
    install_fixture,
    source_fixture,
)


@pytest.fixture
async def env(fake_discord: Any, tmp_path: Path) -> AsyncIterator[BotEnv]:
    settings = bot_settings(tmp_path, fake_discord, comfy={"http_allowlist": ["127.0.0.1"]})
    running = await start_bot(fake_discord, settings)
    yield running
    await running.stop()


@pytest.fixture
async def ssh_host(env: BotEnv) -> AsyncIterator[Any]:
    """One SSH server kind here: tests/test_models.py covers both against the service."""
    from tests.sshserver import AsyncSSHTestServer

    server = AsyncSSHTestServer(env.services.remote.key.public_openssh)
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def models(env: BotEnv, install: Path) -> AsyncIterator[ModelService]:
    """The service on the bot's container and the cog loaded, as bot/bot.py will do it."""
    service = build_service(env, install)
    env.services.models = service  # type: ignore[attr-defined]
    if "cogs.models" not in env.bot.extensions:
        await env.bot.load_extension("cogs.models")
        await env.bot.sync_commands_if_changed()
    yield service
    await service.close()


@pytest.fixture
async def box(env: BotEnv, ssh_host: Any, models: ModelService) -> ServerView:
    return await register_ssh_server(env, ssh_host, comfy_port=closed_port())


async def reply(env: BotEnv, interaction: Any) -> Any:
    return await env.fake.wait_for(lambda: _answered(interaction))


def channel_messages(env: BotEnv) -> list[Any]:
    return [
        m
        for m in env.fake.channel_messages(env.channel_id, include_ephemeral=False)
        if m.embeds and m.embeds[0].get("footer", {}).get("text", "").startswith("Download")
    ]


async def test_download_shows_live_progress_in_a_channel_message(
    env: BotEnv, box: ServerView, source: ModelSource, install: Path
) -> None:
    data = secrets.token_bytes(1_400_000)
    source.files["fresh.safetensors"] = data
    source.rate = 1_000_000
    # Edits more often than the production 1 s, so curl's once-a-second meter line is shown
    # within a short download; the relay still coalesces everything in between.
    env.bot.relay.interval = 0.3
    interaction = await env.slash(
        "models",
        {"server": "box", "url": source.url("fresh.safetensors", "slow"), "folder": "checkpoints"},
        user=env.fake.admin,
        subcommand="download",
    )
    answer = await reply(env, interaction)
    assert answer.ephemeral
    assert "Downloading **fresh.safetensors**" in answer.content
    [status] = channel_messages(env)
    assert status.id and str(status.id) in answer.content  # the jump link
    await env.fake.wait_for(
        lambda: status.embeds[0]["title"] == "Downloaded: fresh.safetensors", timeout=15
    )
    assert (install / "models" / "checkpoints" / "fresh.safetensors").read_bytes() == data

    # Progress was shown while it ran: percent, speed and ETA, in coalesced edits.
    shown = [
        f["value"]
        for e in status.edits
        for emb in e.get("embeds", [])
        for f in emb.get("fields", [])
        if f["name"] == "Progress"
    ]
    assert any("%" in v and "/s" in v and "ETA" in v for v in shown), shown
    assert len(status.edits) <= 8

    listing = await env.slash(
        "models", {"server": "box", "folder": "checkpoints"}, subcommand="list"
    )
    text = (await reply(env, listing)).embeds[0]
    assert text["fields"][0]["name"] == "checkpoints (1)"
    assert "fresh.safetensors" in text["fields"][0]["value"]


async def test_members_may_list_but_not_download_or_delete(
    env: BotEnv, box: ServerView, source: ModelSource, install: Path
) -> None:
    (install / "models" / "checkpoints" / "keep.safetensors").write_bytes(b"k")
    listing = await env.slash("models", {}, subcommand="list")
    embed = (await reply(env, listing)).embeds[0]
    assert embed["title"] == "box" and "keep.safetensors" in embed["fields"][0]["value"]

    source.files["x.safetensors"] = b"x"
    for sub, options in (
        (
            "download",
            {"server": "box", "url": source.url("x.safetensors"), "folder": "checkpoints"},
        ),
        ("delete", {"server": "box", "folder": "checkpoints", "filename": "keep.safetensors"}),
    ):
        interaction = await env.slash("models", options, subcommand=sub)
        message = await reply(env, interaction)
        assert message.ephemeral and "for admins" in message.content
    assert source.seen == []
    assert (install / "models" / "checkpoints" / "keep.safetensors").exists()


@pytest.mark.parametrize(
    ("url", "filename", "expected"),
    [
        ("ftp://127.0.0.1/x.safetensors", None, "Only https:// URLs"),
        (None, "../x.safetensors", "must not contain path separators"),
        (None, "a;rm -rf ~", "may only contain letters"),
        ("missing", None, "HTTP 404"),
    ],
)
async def test_download_problems_are_one_private_sentence(
    env: BotEnv,
    box: ServerView,
    source: ModelSource,
    install: Path,
    url: str | None,
    filename: str | None,
    expected: str,
) -> None:
    source.files["x.safetensors"] = b"x"
    if url is None:
        url = source.url("x.safetensors")
    elif url == "missing":
        url = source.url("missing.safetensors")
    options = {"server": "box", "url": url, "folder": "checkpoints"}
    if filename is not None:
        options["filename"] = filename
    interaction = await env.slash("models", options, user=env.fake.admin, subcommand="download")
    message = await reply(env, interaction)
    assert message.ephemeral and expected in message.content
    assert "\n" not in message.content.strip()
    assert channel_messages(env) == []
    assert list((install / "models" / "checkpoints").iterdir()) == []


async def test_delete_asks_first_and_only_the_invoker_may_answer(
    env: BotEnv, box: ServerView, install: Path
) -> None:
    target = install / "models" / "checkpoints" / "old.safetensors"
    target.write_bytes(b"old")
    interaction = await env.slash(
        "models",
        {"server": "box", "folder": "checkpoints", "filename": "old.safetensors"},
        user=env.fake.admin,
        subcommand="delete",
    )
    prompt = await env.fake.wait_for(lambda: _answered(interaction))
    assert "Delete `checkpoints/old.safetensors` from **box**?" in prompt.content
    yes, _no = prompt.custom_ids()

    other = await env.fake.click(prompt.id, yes, user=env.fake.member)
    assert "Only the person" in (await other.wait_response())["data"]["content"]
    assert target.exists()

    click = await env.fake.click(prompt.id, yes, user=env.fake.admin)
    await click.wait_response()
    done = await env.fake.wait_for(lambda: interaction.followups())
    assert done[-1].ephemeral
    assert done[-1].content == "Deleted `checkpoints/old.safetensors` from **box**."
    assert prompt.custom_ids() == []
    assert not target.exists()


async def test_delete_without_an_answer_deletes_nothing(
    env: BotEnv, box: ServerView, install: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The module object discord.py loaded the cog from (extensions bypass the parent package).
    monkeypatch.setattr(sys.modules["cogs.models"], "CONFIRM_TIMEOUT", 0.3)
    target = install / "models" / "checkpoints" / "stay.safetensors"
    target.write_bytes(b"stay")
    interaction = await env.slash(
        "models",
        {"server": "box", "folder": "checkpoints", "filename": "stay.safetensors"},
        user=env.fake.admin,
        subcommand="delete",
    )
    prompt = await env.fake.wait_for(lambda: _answered(interaction))
    await env.fake.wait_for(lambda: "nothing was changed" in prompt.content)
    assert prompt.custom_ids() == [] and interaction.followups() == []
    assert target.exists()


async def test_model_names_autocomplete_from_the_cache(
    env: BotEnv, box: ServerView, install: Path
) -> None:
    loras = install / "models" / "loras"
    loras.mkdir()
    for name in ("style-a.safetensors", "anime.safetensors", "zz-style.pt"):
        (loras / name).write_bytes(b"l")
    choices = await env.fake.autocomplete(
        "models",
        {"server": "box", "folder": "loras"},
        "filename",
        user=env.fake.admin,
        subcommand="delete",
    )
    assert [c["value"] for c in choices] == [
        "anime.safetensors",
        "style-a.safetensors",
        "zz-style.pt",
    ]
    choices = await env.fake.autocomplete(
        "models",
        {"server": "box", "folder": "loras", "filename": "sty"},
        "filename",
        user=env.fake.admin,
        subcommand="delete",
    )
    assert [c["value"] for c in choices] == ["style-a.safetensors", "zz-style.pt"]
