"""Issue 12, member input, privacy and secrets, through the real bot and the fake Discord:
bounded options, hostnames and addresses, server lookups that cannot crash or be
shadowed, redacted audit details, /history and /progress limited to what the member can
see, and temporary input images deleted."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select

from core.db.models import AuditLog, Server
from core.errors import GENERIC_FAILURE, ValidationFailed
from core.servers import validate_host
from tests.conftest import (
    BotEnv,
    _answered,
    add_server,
    bot_settings,
    eventually,
    start_bot,
)
from tests.fakecomfy import FakeComfy
from tests.fakediscord.models import VIEW_CHANNEL
from tests.test_generation_e2e import (
    finished_row,
    generate,
    job_row,
    result_messages,
    status_message,
)

reply = _answered


async def answer(env: BotEnv, interaction: Any) -> str:
    message = await env.fake.wait_for(lambda: reply(interaction))
    return str(message.content)


async def server_rows(env: BotEnv) -> list[str]:
    async with env.services.sessions() as session:
        return list((await session.scalars(select(Server.name))).all())


# ---------------------------------------------------------------- 1. bounded options


async def test_discord_refuses_an_overlong_server_option(env: BotEnv) -> None:
    """The synced schema carries max_length, so Discord's client refuses the value and the
    bot never has to echo it (the fake applies the schema like Discord does)."""
    with pytest.raises(AssertionError, match="longer than max_length"):
        await env.fake.slash(
            "generate", {"prompt": "x", "server": "s" * 41}, user=env.fake.member,
            guild_id=env.fake.guild.id,
        )
    with pytest.raises(AssertionError, match="longer than max_length"):
        await env.fake.slash(
            "server", {"server": "s" * 41}, user=env.fake.admin,
            guild_id=env.fake.guild.id, subcommand="status",
        )


# ---------------------------------------------------------------- 2. hosts and addresses


async def test_add_ssh_refuses_an_overlong_label_clearly(env: BotEnv) -> None:
    host = "0123456789abcdef" * 6 + "abcd"  # 100 hex letters: one label over 63
    interaction = await env.slash(
        "server", {"name": "box", "host": host}, user=env.fake.admin, subcommand="add-ssh"
    )
    text = await answer(env, interaction)
    assert "63 characters" in text and GENERIC_FAILURE not in text, text
    assert await server_rows(env) == []


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("gpu.example.com", "gpu.example.com"),
        ("gpu.example.com.", "gpu.example.com"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("10.0.0.5", "10.0.0.5"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("a" * 63 + ".example", "a" * 63 + ".example"),
        ("a" * 64 + ".example", None),
        (".".join(["abcdefgh"] * 29), None),  # 260 characters
        ("1.2.3", None),
        ("-gpu.example", None),
        ("gpu..example", None),
        ("xn--zz.example", None),
        ("ü" * 70 + ".de", None),
    ],
)
def test_hostnames(host: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(ValidationFailed):
            validate_host(host)
    else:
        assert validate_host(host) == expected


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254:8188",
        "http://[fe80::1]:8188",
        "http://[::ffff:169.254.169.254]:8188",
        "http://metadata.google.internal",
        "http://0xa9fea9fe:8188",  # a name getaddrinfo resolves to 169.254.169.254
        "http://0.0.0.0:8188",
    ],
)
async def test_add_direct_refuses_link_local_and_metadata(env: BotEnv, url: str) -> None:
    interaction = await env.slash(
        "server", {"name": "meta", "url": url}, user=env.fake.admin, subcommand="add-direct"
    )
    text = await answer(env, interaction)
    assert "link-local" in text and "metadata" in text, text
    assert await server_rows(env) == []


async def test_add_direct_still_takes_loopback(env: BotEnv, comfy: FakeComfy) -> None:
    # Loopback stays allowed on purpose: a ComfyUI on the bot's machine (and every fake).
    await add_server(env, "local", comfy.url)
    assert await server_rows(env) == ["local"]


# ---------------------------------------------------------------- 3. lookups


@pytest.mark.parametrize("value", ["²", "9" * 30, "#99999999999", "#x", "٣"])
async def test_odd_server_values_are_not_found_not_crashes(studio: BotEnv, value: str) -> None:
    interaction = await studio.slash("generate", {"prompt": "x", "server": value})
    text = await answer(studio, interaction)
    assert "There is no server named" in text and GENERIC_FAILURE not in text, text


async def test_all_digit_names_are_refused_and_hash_means_id(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    interaction = await studio.slash(
        "server", {"name": "2", "url": comfy.url}, user=studio.fake.admin,
        subcommand="add-direct",
    )
    assert "digits alone" in await answer(studio, interaction)
    [gpu] = await studio.services.servers.list()
    status = await studio.slash(
        "server", {"server": f"#{gpu.id}"}, user=studio.fake.admin, subcommand="status"
    )
    message = await studio.fake.wait_for(lambda: reply(status))
    assert "gpu-1" in str(message.embeds[0]), message.embeds


async def test_progress_of_an_out_of_range_job_is_refused_by_discord(studio: BotEnv) -> None:
    with pytest.raises(AssertionError, match="above max_value"):
        await studio.fake.slash(
            "progress", {"generation": 2**31}, user=studio.fake.member,
            guild_id=studio.fake.guild.id,
        )


# ---------------------------------------------------------------- 4. secrets


async def test_audit_details_are_redacted(env: BotEnv) -> None:
    secret = "s3cr3tv4lu3"
    url = f"https://civitai.com/api/download/models/1?token={secret}&type=Model"
    interaction = await env.slash(
        "models",
        {"server": "nowhere", "url": url, "folder": "checkpoints"},
        user=env.fake.admin,
        subcommand="download",
    )
    assert "no server named" in await answer(env, interaction)

    async def rows() -> list[AuditLog]:
        async with env.services.sessions() as session:
            return list((await session.scalars(select(AuditLog))).all())

    [row] = await eventually(rows, timeout=15)
    assert row.action == "models download"
    assert secret not in repr(row.details) and secret not in (row.resource or "")
    assert row.details["options"]["url"] == (
        "https://civitai.com/api/download/models/1?token=REDACTED&type=Model"
    )


# ---------------------------------------------------------------- 5. privacy


@pytest.fixture
async def two_guilds(fake_discord: Any, tmp_path: Path, comfy: FakeComfy) -> AsyncIterator[BotEnv]:
    """The usual guild plus a hidden channel "staff" (only admins see it) and a second
    guild with a member of its own; all known before the bot connects."""
    fake = fake_discord
    guild = fake.guild
    admin_role = next(r.id for r in guild.roles.values() if r.name == "Admin")
    fake.staff = fake.add_channel(guild.id, "staff", overwrites=[
        {"id": guild.id, "type": 0, "deny": VIEW_CHANNEL},
        {"id": admin_role, "type": 0, "allow": VIEW_CHANNEL},
    ])
    fake.other_guild = fake.add_guild("Other Guild")
    fake.stranger = fake.add_user("stranger", guild_id=fake.other_guild.id)
    fake.colleague = fake.add_user("colleague", guild_id=guild.id)
    running = await start_bot(fake, bot_settings(tmp_path, fake))
    await add_server(running, "gpu-1", comfy.url)
    yield running
    await running.stop()


async def slash_in(env: BotEnv, name: str, options: dict[str, Any], user: Any,
                   guild_id: int) -> Any:
    """A command from a member of ``guild_id`` (BotEnv.slash always uses the first guild)."""
    interaction = await env.fake.slash(name, options, user=user, guild_id=guild_id)
    await interaction.wait_response()
    return interaction


async def history_text(env: BotEnv, user: Any, guild_id: int) -> str:
    interaction = await slash_in(env, "history", {"limit": 25}, user, guild_id)
    message = interaction.response_message()
    return message.content + " ".join(str(e.get("description")) for e in message.embeds)


async def progress_text(env: BotEnv, job_id: int, user: Any, guild_id: int) -> str:
    interaction = await slash_in(env, "progress", {"generation": job_id}, user, guild_id)
    message = interaction.response_message()
    return message.content + " ".join(str(e.get("title")) for e in message.embeds)


async def test_history_and_progress_stay_in_the_guild_and_visible_channels(
    two_guilds: BotEnv,
) -> None:
    env, fake = two_guilds, two_guilds.fake
    await generate(env, {"prompt": "public lighthouse"})
    public = await finished_row(env)
    staff = await env.slash(
        "generate", {"prompt": "secret staff plan"}, user=fake.admin, channel_id=fake.staff
    )
    await fake.wait_for(lambda: reply(staff))
    hidden = await finished_row(env)
    assert hidden.channel_id == fake.staff and public.id != hidden.id

    # A member of the guild sees the public job, not the one in the channel they cannot see.
    seen = await history_text(env, fake.colleague, fake.guild.id)
    assert "public lighthouse" in seen and "secret staff plan" not in seen, seen
    assert f"job #{public.id}" in await progress_text(env, public.id, fake.colleague,
                                                      fake.guild.id)
    refused = await progress_text(env, hidden.id, fake.colleague, fake.guild.id)
    assert f"no generation #{hidden.id}" in refused and "staff" not in refused, refused

    # Nor can they run a command in the hidden channel (Discord does not show it to them).
    with pytest.raises(AssertionError, match="cannot see channel"):
        await fake.slash("history", {}, user=fake.colleague, guild_id=fake.guild.id,
                         channel_id=fake.staff)

    # Someone from another guild sees nothing of this guild.
    other = await history_text(env, fake.stranger, fake.other_guild.id)
    assert "public lighthouse" not in other and "No generations yet" in other, other
    assert "no generation" in await progress_text(env, public.id, fake.stranger,
                                                  fake.other_guild.id)

    # An admin sees the whole guild.
    everything = await history_text(env, fake.admin, fake.guild.id)
    assert "public lighthouse" in everything and "secret staff plan" in everything


# ---------------------------------------------------------------- 6. temporary inputs


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 130, 30)).save(buffer, "PNG")
    return buffer.getvalue()


async def test_input_image_is_deleted_when_the_job_ends(studio: BotEnv, comfy: FakeComfy) -> None:
    inputs = studio.services.settings.data_dir / "inputs"
    interaction = await studio.slash(
        "generate", {"prompt": "repaint", "image": "photo.png"},
        attachments={"image": ("photo.png", png(), "image/png")},
    )
    await studio.fake.wait_for(lambda: reply(interaction))
    row = await finished_row(studio)
    assert row.status == "completed", row.error_message
    saved = Path(row.parameters["input_path"])
    assert saved.parent == inputs

    async def gone() -> bool:
        return not saved.exists()

    await eventually(gone, timeout=15)
    assert list(inputs.iterdir()) == []


async def test_input_image_is_kept_while_running_and_deleted_on_cancel(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    comfy.pause_sampling()
    interaction = await studio.slash(
        "generate", {"prompt": "repaint slowly", "image": "photo.png"},
        attachments={"image": ("photo.png", png(), "image/png")},
    )
    await studio.fake.wait_for(lambda: reply(interaction))
    row = await job_row(studio)
    await comfy.wait_running(row.comfy_prompt_id, timeout=10)
    saved = Path(row.parameters["input_path"])
    assert saved.exists()  # a failover or a restart would upload it again
    status = status_message(studio, row.id)
    click = await studio.fake.click(status.id, f"cv:cancel:{row.id}", user=studio.fake.member)
    comfy.resume_sampling()
    row = await finished_row(studio, row.id)
    assert row.status == "cancelled"
    await studio.fake.wait_for(lambda: reply(click))
    await eventually(lambda: _false_if_exists(saved), timeout=15)


async def test_reroll_of_an_ended_img2img_job_says_the_image_is_gone(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    interaction = await studio.slash(
        "generate", {"prompt": "repaint", "image": "photo.png"},
        attachments={"image": ("photo.png", png(), "image/png")},
    )
    await studio.fake.wait_for(lambda: reply(interaction))
    row = await finished_row(studio)
    saved = Path(row.parameters["input_path"])
    await eventually(lambda: _false_if_exists(saved), timeout=15)
    [result] = result_messages(studio)
    click = await studio.fake.click(result.id, f"cv:reroll:{row.id}", user=studio.fake.member)
    await studio.fake.wait_for(lambda: reply(click))
    assert "not kept" in reply(click).content
    assert (await job_row(studio)).id == row.id  # nothing was queued without the image


async def _false_if_exists(path: Path) -> bool:
    return not path.exists()


async def test_orphaned_inputs_are_swept_on_start(
    fake_discord: Any, tmp_path: Path, comfy: FakeComfy
) -> None:
    settings = bot_settings(tmp_path, fake_discord)
    inputs = settings.data_dir / "inputs"
    inputs.mkdir(parents=True)
    orphan = inputs / "job-41.png"
    orphan.write_bytes(png())
    env = await start_bot(fake_discord, settings)
    try:
        await eventually(lambda: _false_if_exists(orphan), timeout=15)
    finally:
        await env.stop()


# ---------------------------------------------------------------- 6. Discord refusals


@pytest.mark.parametrize(("status", "code", "said"), [
    (403, 50013, "check my Send Messages"),
    # A 429 without Via is one discord.py does not retry (discord.md): as when it gave
    # up after five, the member hears about the rate limit, not about permissions.
    (429, 0, "limiting how fast I can post"),
    (400, 50035, "Discord refused my status message (HTTP 400)"),
])
async def test_a_refused_status_post_says_why_and_queues_nothing(
    studio: BotEnv, comfy: FakeComfy, status: int, code: int, said: str
) -> None:
    # The status is shown by editing the interaction's "thinking..." reply.
    studio.fake.fail_once("PATCH", "/messages/@original", status, code, "refused")
    interaction = await studio.slash("generate", {"prompt": "a cat"})
    text = await answer(studio, interaction)
    assert said in text, text
    assert ("Send Messages" in text) == (status == 403)
    row = await job_row(studio)
    assert row is not None and row.status == "failed" and not comfy.prompts
    # The reply it was recorded with is not its status message: it is not edited.
    assert row.message_id is None and row.channel_id == studio.channel_id
    # The reply was removed and the explanation is private: nothing public is left behind.
    assert studio.fake.messages[interaction.original_message_id].deleted
    assert _answered(interaction).ephemeral


async def test_a_status_lost_on_the_way_frees_the_members_job_slot(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    # The connection drops under the edit that shows the status (no HTTP answer at all):
    # the job is ended, not left pending, so it does not hold one of the member's slots.
    studio.services.settings.limits.user_concurrent_jobs = 1
    studio.fake.cut_once("PATCH", "/messages/@original")
    interaction = await studio.slash("generate", {"prompt": "a cat"})
    text = await answer(studio, interaction)
    assert text == GENERIC_FAILURE
    assert _answered(interaction).ephemeral
    row = await job_row(studio)
    assert row is not None and row.status == "failed" and not comfy.prompts
    again = await studio.slash("generate", {"prompt": "a dog"})
    await answer(studio, again)
    assert (await finished_row(studio, row.id + 1)).status == "completed"
