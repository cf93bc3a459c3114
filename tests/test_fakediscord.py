"""Tests of the fake Discord itself, driven through the real discord.py client."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
import time
import zlib

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands

from tests.fakediscord import FLAG_EPHEMERAL, FLAG_LOADING, FakeDiscord
from tests.fakediscord.pytest_plugin import *  # noqa: F403
from tests.fakediscord.pytest_plugin import running_bot


def make_png(width: int = 2, height: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                              0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


PNG = make_png()
PNG2 = make_png(3, 1)


class RerollDyn(discord.ui.DynamicItem[discord.ui.Button], template=r"dyn:reroll:(?P<n>\d+)"):
    def __init__(self, n: int) -> None:
        super().__init__(discord.ui.Button(label="Again", custom_id=f"dyn:reroll:{n}"))
        self.n = n

    @classmethod
    async def from_custom_id(cls, interaction, item, match):  # noqa: ANN001
        return cls(int(match["n"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        interaction.client.log.append(("dyn", self.n, interaction.user.id))
        await interaction.response.send_message(f"dyn {self.n}", ephemeral=True)


class NoteModal(discord.ui.Modal, title="Add a note"):
    note = discord.ui.TextInput(label="Note", custom_id="note_text", max_length=100)
    extra = discord.ui.Label(text="Extra", component=discord.ui.TextInput(
        custom_id="extra_text", required=False))

    async def on_submit(self, interaction: discord.Interaction) -> None:
        extra = self.extra.component.value  # type: ignore[union-attr]
        await interaction.response.send_message(f"noted: {self.note.value}|{extra}",
                                                ephemeral=True)


class GenView(discord.ui.View):
    def __init__(self) -> None:
        super().__init__(timeout=180)

    @discord.ui.button(label="Reroll", custom_id="reroll")
    async def reroll(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        interaction.client.log.append(("reroll", interaction.user.id, interaction.message.id))
        await interaction.response.edit_message(content="rerolled", view=None)

    @discord.ui.button(label="Cancel", custom_id="cancel")
    async def cancel(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.defer()
        msg = await interaction.channel.send("cancelled", files=[
            discord.File(io.BytesIO(PNG), "a.png"), discord.File(io.BytesIO(PNG2), "b.png")])
        await msg.edit(content="cancelled (edited)")
        interaction.client.log.append(("cancel", msg.id))

    @discord.ui.button(label="Note", custom_id="note")
    async def note(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.send_modal(NoteModal())

    @discord.ui.select(custom_id="size", options=[discord.SelectOption(label="S", value="s"),
                                                   discord.SelectOption(label="L", value="l")])
    async def size(self, interaction: discord.Interaction, select: discord.ui.Select) -> None:
        await interaction.response.send_message(f"size {select.values}", ephemeral=True)


class TinyBot(commands.Bot):
    def __init__(self, guild_id: int) -> None:
        super().__init__(command_prefix="!", intents=discord.Intents.default(),
                         guild_ready_timeout=0.05, max_messages=100)
        self.guild_id = guild_id
        self.log: list = []
        self.gate = asyncio.Event()
        self.seen_messages: list[int] = []
        self.edited_messages: list[int] = []

    async def on_message(self, message: discord.Message) -> None:
        self.seen_messages.append(message.id)

    async def on_message_edit(self, before: discord.Message, after: discord.Message) -> None:
        self.edited_messages.append(after.id)

    async def setup_hook(self) -> None:
        self.add_dynamic_items(RerollDyn)
        tree = self.tree

        @tree.command(description="Generate")
        @app_commands.describe(prompt="what", steps="how many")
        async def ping(interaction: discord.Interaction, prompt: str, steps: int = 2) -> None:
            await interaction.response.defer(thinking=True)
            await interaction.edit_original_response(content=f"{prompt} 50%")
            await interaction.edit_original_response(
                content=f"{prompt} 100%", embed=discord.Embed(title="done"),
                attachments=[discord.File(io.BytesIO(PNG), "preview.png")])
            msg = await interaction.followup.send(
                f"steps={steps}", file=discord.File(io.BytesIO(PNG), "full.png"), view=GenView(),
                wait=True)
            self.log.append(("ping", msg.id))

        @tree.command(description="Secret")
        async def secret(interaction: discord.Interaction) -> None:
            await interaction.response.send_message(
                "psst", ephemeral=True, file=discord.File(io.BytesIO(PNG), "s.png"))
            original = await interaction.original_response()
            self.log.append(("secret", original.id, original.flags.ephemeral))

        async def model_ac(interaction: discord.Interaction, current: str):  # noqa: ANN202
            names = ["sdxl", "sd15", "flux-dev", "flux-schnell"]
            return [app_commands.Choice(name=n, value=n) for n in names if current in n]

        @tree.command(description="Quick")
        async def quick(interaction: discord.Interaction) -> None:
            await interaction.response.defer(ephemeral=True, thinking=True)
            msg = await interaction.followup.send("done", wait=True)
            dm = await interaction.user.send("psst", file=discord.File(io.BytesIO(PNG), "d.png"))
            self.log.append(("quick", msg.id, dm.id, dm.channel.id))

        @tree.command(description="Pick a model")
        @app_commands.autocomplete(model=model_ac)
        async def pick(interaction: discord.Interaction, model: str, strength: float = 0.5,
                       hires: bool = False) -> None:
            await interaction.response.send_message(f"{model} {strength} {hires}")

        @tree.command(description="Upload")
        async def upload(interaction: discord.Interaction, image: discord.Attachment) -> None:
            data = await image.read()
            self.log.append(("upload", image.filename, data, image.width))
            await interaction.response.send_message(f"got {len(data)}")

        @tree.command(description="Opens a modal")
        async def note(interaction: discord.Interaction) -> None:
            await interaction.response.send_modal(NoteModal())

        @tree.command(description="Slow to ack")
        async def slow(interaction: discord.Interaction) -> None:
            self.log.append("slow-started")
            await self.gate.wait()
            try:
                await interaction.response.defer()
            except discord.NotFound as exc:
                self.log.append(("slow-error", exc.status, exc.code))

        @tree.command(description="Late followup")
        async def later(interaction: discord.Interaction) -> None:
            await interaction.response.defer()
            await interaction.edit_original_response(content="working")
            await self.gate.wait()
            try:
                await interaction.followup.send("late")
            except discord.HTTPException as exc:
                self.log.append(("later-error", exc.status, exc.code))

        @tree.command(description="Too big")
        async def big(interaction: discord.Interaction, size: int) -> None:
            try:
                await interaction.response.send_message(
                    file=discord.File(io.BytesIO(b"x" * size), "big.bin"))
            except discord.HTTPException as exc:
                self.log.append(("big-error", exc.status, exc.code))
            try:
                await interaction.response.send_message("y" * 2001)
            except discord.HTTPException as exc:
                self.log.append(("long-error", exc.status, exc.code))
            await interaction.response.send_message("ok")

        @tree.command(description="Persistent")
        async def persist(interaction: discord.Interaction) -> None:
            view = discord.ui.View(timeout=None)
            view.add_item(RerollDyn(7))
            await interaction.response.send_message("persistent", view=view)

        admin = app_commands.Group(name="admin", description="Admin tools",
                                   default_permissions=discord.Permissions(manage_guild=True))

        @admin.command(description="Status")
        async def status(interaction: discord.Interaction) -> None:
            perms = interaction.permissions
            word = "ok" if perms.manage_guild else "denied"
            await interaction.response.send_message(word, ephemeral=True)

        tree.add_command(admin, guild=discord.Object(self.guild_id))
        await tree.sync()
        await tree.sync(guild=discord.Object(self.guild_id))


def new_bot(fake: FakeDiscord) -> TinyBot:
    return TinyBot(fake.guild.id)


async def run_ping(fake: FakeDiscord, bot: TinyBot) -> tuple:
    before = len(bot.log)
    itx = await fake.slash("ping", {"prompt": "a cat", "steps": 3}, user=fake.member)
    await fake.wait_for(lambda: len(bot.log) > before and bot.log[-1][0] == "ping")
    return itx, fake.messages[bot.log[-1][1]]


async def test_handshake_and_sync(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    big = fake.add_guild("Boosted", filesize_limit_tier=2)
    bot = new_bot(fake)
    async with running_bot(bot, fake):
        assert bot.get_guild(big.id).filesize_limit == 50 * 1024 * 1024
        query = fake.gateway_connects[0]
        assert query["v"] == "10" and query["encoding"] == "json"
        assert query["compress"] in ("zlib-stream", "zstd-stream")
        assert fake.identifies[0]["token"] == fake.token
        assert fake.identifies[0]["intents"] == discord.Intents.default().value
        await fake.wait_for(lambda: fake.heartbeats >= 1)
        assert fake.sync_count == 2
        assert [r.status for r in fake.calls("PUT", "/commands")] == [200, 200]
        ping = fake.command("ping")
        assert [(o["name"], o["type"], o.get("required", False)) for o in ping["options"]] == [
            ("prompt", 3, True), ("steps", 4, False)]
        assert "admin" not in fake.commands[None]
        admin = fake.command("admin", fake.guild.id)
        assert admin["guild_id"] == str(fake.guild.id)
        assert admin["default_member_permissions"] == str(1 << 5)
        guild = bot.get_guild(fake.guild.id)
        assert guild is not None and guild.get_channel(fake.guild.channel_id).name == "general"
        assert guild.filesize_limit == 10 * 1024 * 1024
        fetched = await bot.fetch_guild(fake.guild.id)
        assert fetched.premium_tier == 0
        assert (await bot.fetch_channel(fake.guild.channel_id)).name == "general"
        assert bot.application_id == fake.application_id
    assert fake.unknown_routes == []


async def test_slash_defer_edits_followup(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    bot = new_bot(fake)
    async with running_bot(bot, fake):
        itx, followup = await run_ping(fake, bot)
        assert await itx.wait_response() == {"type": 5}
        callback = fake.calls("POST", f"/interactions/{itx.id}/")[0]
        assert callback.query == {"with_response": "1"}
        patches = fake.calls("PATCH", "/messages/@original")
        assert len(patches) == 2
        assert patches[0].json["content"] == "a cat 50%"
        assert patches[1].json["content"] == "a cat 100%"
        assert patches[1].json["attachments"] == [{"id": 0, "filename": "preview.png"}]
        assert patches[1].files["files[0]"][0] == "preview.png"
        assert patches[1].files["files[0]"][2] == PNG
        original = itx.response_message()
        assert original is not None and not original.loading and not original.ephemeral
        assert original.content == "a cat 100%" and original.embeds[0]["title"] == "done"
        assert [a.filename for a in original.attachments] == ["preview.png"]
        assert len(original.edits) == 2 and original.interaction_id == itx.id
        post = fake.calls("POST", f"/webhooks/{fake.application_id}/{itx.token}")[0]
        assert post.query["wait"] == "1" and post.query["with_components"] == "1"
        assert followup.content == "steps=3" and followup.attachments[0].data == PNG
        assert followup.custom_ids() == ["reroll", "cancel", "note", "size"]
        assert await bot.http.get_from_cdn(followup.attachments[0].url) == PNG
        # the gateway echoed the bot's own messages (MESSAGE_CREATE / MESSAGE_UPDATE)
        await fake.wait_for(lambda: followup.id in bot.seen_messages)
        assert original.id in bot.seen_messages
    assert fake.unknown_routes == []


async def test_ephemeral_send(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    bot = new_bot(fake)
    async with running_bot(bot, fake):
        itx = await fake.slash("secret", user=fake.member)
        body = await itx.wait_response()
        assert body["type"] == 4 and body["data"]["flags"] == FLAG_EPHEMERAL
        await fake.wait_for(lambda: bot.log)
        msg = itx.response_message()
        assert msg is not None and msg.ephemeral and msg.content == "psst"
        assert msg.attachments[0].data == PNG
        assert bot.log == [("secret", msg.id, True)]
        assert msg.id not in bot.seen_messages  # no MESSAGE_CREATE for ephemeral messages

        # the first followup after a thinking defer replaces the loading message
        itx = await fake.slash("quick", user=fake.member)
        assert await itx.wait_response() == {"type": 5, "data": {"flags": FLAG_EPHEMERAL}}
        resource = fake.calls("POST", f"/interactions/{itx.id}/")[0].response["resource"]
        assert resource["message"]["flags"] == FLAG_EPHEMERAL | FLAG_LOADING
        await fake.wait_for(lambda: bot.log[-1][0] == "quick")
        _, followup_id, dm_id, dm_channel = bot.log[-1]
        original = itx.response_message()
        assert followup_id == original.id and original.content == "done"
        assert original.ephemeral and not original.loading and itx.followups() == []
        dm = fake.messages[dm_id]
        assert fake.channels[dm.channel_id].recipient_id == fake.member.id
        assert dm.channel_id == dm_channel and dm.guild_id is None
        await fake.wait_for(lambda: dm_id in bot.seen_messages)


async def test_buttons_select_and_channel_send(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    bot = new_bot(fake)
    async with running_bot(bot, fake):
        _, followup = await run_ping(fake, bot)
        click = await fake.click(followup.id, "reroll", user=fake.admin)
        body = await click.wait_response()
        assert body["type"] == 7 and body["data"]["components"] == []
        assert bot.log[-1] == ("reroll", fake.admin.id, followup.id)
        assert followup.content == "rerolled" and followup.components == []
        await fake.wait_for(lambda: followup.id in bot.edited_messages)

        _, followup = await run_ping(fake, bot)
        click = await fake.click(followup.id, "cancel", user=fake.member)
        assert (await click.wait_response()) == {"type": 6}
        await fake.wait_for(lambda: bot.log[-1][0] == "cancel")
        sent = fake.messages[bot.log[-1][1]]
        assert sent.channel_id == fake.guild.channel_id and sent.content == "cancelled (edited)"
        assert [a.data for a in sent.attachments] == [PNG, PNG2]
        assert fake.calls("POST", f"/channels/{fake.guild.channel_id}/messages")[0].files
        assert len(sent.edits) == 1 and sent in fake.channel_messages(fake.guild.channel_id)
        channel = bot.get_channel(fake.guild.channel_id)
        fetched = await channel.fetch_message(sent.id)
        assert fetched.content == "cancelled (edited)"
        assert await fetched.attachments[1].read() == PNG2
        assert [m.id async for m in channel.history(limit=1)] == [sent.id]
        await fetched.delete()
        assert sent.deleted and sent not in fake.channel_messages(fake.guild.channel_id)
        with pytest.raises(discord.NotFound):
            await channel.fetch_message(sent.id)

        sel = await fake.click(followup.id, "size", user=fake.member, values=["l"])
        body = await sel.wait_response()
        assert body["data"]["content"] == "size ['l']"
        with pytest.raises(AssertionError, match="not in options"):
            await fake.click(followup.id, "size", user=fake.member, values=["xl"])
        with pytest.raises(AssertionError, match="no component"):
            await fake.click(followup.id, "nope", user=fake.member)


async def test_modal_round_trip(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    bot = new_bot(fake)
    async with running_bot(bot, fake):
        _, followup = await run_ping(fake, bot)
        click = await fake.click(followup.id, "note", user=fake.member)
        body = await click.wait_response()
        assert body["type"] == 9 and body["data"]["title"] == "Add a note"
        submit = await fake.submit_modal(click, {"note_text": "hi", "extra_text": "x"},
                                         user=fake.member)
        reply = await submit.wait_response()
        assert reply == {"type": 4, "data": {"content": "noted: hi|x", "tts": False,
                                             "flags": FLAG_EPHEMERAL}} or (
            reply["type"] == 4 and reply["data"]["content"] == "noted: hi|x")
        assert submit.response_message().ephemeral

        itx = await fake.slash("note", user=fake.member)
        await itx.wait_response()
        with pytest.raises(AssertionError, match="required"):
            await fake.submit_modal(itx, {}, user=fake.member)
        with pytest.raises(AssertionError, match="no fields"):
            await fake.submit_modal(itx, {"note_text": "a", "bogus": "b"}, user=fake.member)
        submit = await fake.submit_modal(itx, {"note_text": "direct"}, user=fake.member)
        assert (await submit.wait_response())["data"]["content"] == "noted: direct|"


async def test_autocomplete_and_typed_options(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    bot = new_bot(fake)
    async with running_bot(bot, fake):
        choices = await fake.autocomplete("pick", {}, "model", user=fake.member)
        assert len(choices) == 4
        choices = await fake.autocomplete("pick", {"model": "flux"}, "model", user=fake.member)
        assert [c["value"] for c in choices] == ["flux-dev", "flux-schnell"]
        itx = await fake.slash("pick", {"model": "sdxl", "strength": 0.75, "hires": True},
                               user=fake.member)
        assert (await itx.wait_response())["data"]["content"] == "sdxl 0.75 True"

        itx = await fake.slash("upload", user=fake.member,
                               attachments={"image": ("in.png", PNG2, "image/png")})
        assert (await itx.wait_response())["data"]["content"] == f"got {len(PNG2)}"
        assert bot.log[-1] == ("upload", "in.png", PNG2, 3)


async def test_refuses_unsynced_commands_and_bad_options(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    bot = new_bot(fake)
    async with running_bot(bot, fake):
        with pytest.raises(AssertionError, match="never synced"):
            await fake.slash("nosuch", user=fake.member)
        with pytest.raises(AssertionError, match="not in the synced schema"):
            await fake.slash("ping", {"prompt": "x", "seed": 1}, user=fake.member)
        with pytest.raises(AssertionError, match="needs an int"):
            await fake.slash("ping", {"prompt": "x", "steps": "3"}, user=fake.member)
        with pytest.raises(AssertionError, match="required options missing"):
            await fake.slash("ping", {"steps": 3}, user=fake.member)
        # guild-scoped group/subcommand, gated by default_member_permissions
        with pytest.raises(AssertionError, match="subcommand"):
            await fake.slash("admin", user=fake.admin)
        with pytest.raises(AssertionError, match="hidden"):
            await fake.slash("admin", subcommand="status", user=fake.member)
        itx = await fake.slash("admin", subcommand="status", user=fake.admin)
        assert itx.payload["data"]["guild_id"] == str(fake.guild.id)
        assert itx.payload["data"]["options"] == [{"name": "status", "type": 1, "options": []}]
        assert (await itx.wait_response())["data"]["content"] == "ok"
        itx = await fake.slash("admin", subcommand="status", user=fake.member, force=True)
        assert (await itx.wait_response())["data"]["content"] == "denied"


async def test_rate_limits_are_retried(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    bot = new_bot(fake)
    async with running_bot(bot, fake):
        fake.rate_limit_once("PATCH", "/messages/@original", retry_after=0.1)
        fake.rate_limit_once("PATCH", f"/channels/{fake.guild.channel_id}/messages/",
                             retry_after=0.1)
        _, followup = await run_ping(fake, bot)
        patches = fake.calls("PATCH", "/messages/@original")
        assert [r.status for r in patches] == [429, 200, 200]
        assert patches[1].time - patches[0].time >= 0.1
        assert patches[0].json == patches[1].json

        click = await fake.click(followup.id, "cancel", user=fake.member)
        await click.wait_response()
        await fake.wait_for(lambda: bot.log[-1][0] == "cancel")
        edits = fake.calls("PATCH", f"/channels/{fake.guild.channel_id}/messages/")
        assert [r.status for r in edits] == [429, 200]
        assert edits[0].headers.get("Authorization") == f"Bot {fake.token}"


async def test_reconnect_resume_then_interactions(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    bot = new_bot(fake)
    async with running_bot(bot, fake):
        await fake.reconnect()
        resume = fake.resumes[0]
        assert resume["token"] == fake.token
        assert resume["session_id"] == bot.ws.session_id
        assert resume["seq"] >= 2  # READY + GUILD_CREATE
        # /secret keeps running after its callback (GET @original, then bot.log), so wait for
        # it to finish: leaving the block while it runs closes the bot's HTTP session under it
        # ("Connector is closed"). Exactly one log entry each also proves RESUME's replay did
        # not deliver an interaction twice.
        itx = await fake.slash("secret", user=fake.member)
        assert (await itx.wait_response())["type"] == 4
        await fake.wait_for(lambda: len(bot.log) >= 1)
        assert bot.log == [("secret", itx.original_message_id, True)]
        assert len(fake.identifies) == 1

        await fake.drop_connection()
        assert len(fake.resumes) == 2 and len(fake.identifies) == 1
        itx2 = await fake.slash("secret", user=fake.member)
        assert (await itx2.wait_response())["type"] == 4
        await fake.wait_for(lambda: len(bot.log) >= 2)
        assert bot.log == [("secret", itx.original_message_id, True),
                           ("secret", itx2.original_message_id, True)]


def test_fail_on_discord_errors_collects(fail_on_discord_errors: list) -> None:
    logging.getLogger("discord.app_commands.tree").error("boom")
    logging.getLogger("discord.client").warning("just a warning")
    assert [r.getMessage() for r in fail_on_discord_errors] == ["boom"]
    fail_on_discord_errors.clear()  # accept it


async def test_ack_deadline_is_enforced(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    now = [time.time()]
    fake.clock = lambda: now[0]
    bot = new_bot(fake)
    async with running_bot(bot, fake):
        itx = await fake.slash("slow", user=fake.member)
        await fake.wait_for(lambda: "slow-started" in bot.log)
        now[0] += 3.5
        bot.gate.set()
        await fake.wait_for(lambda: bot.log[-1] != "slow-started")
        assert bot.log[-1] == ("slow-error", 404, 10062)
        assert not itx.responded


async def test_token_expires_after_15_minutes(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    now = [time.time()]
    fake.clock = lambda: now[0]
    bot = new_bot(fake)
    async with running_bot(bot, fake):
        itx = await fake.slash("later", user=fake.member)
        await fake.wait_for(lambda: itx.response_message() and itx.response_message().edits)
        now[0] += 15 * 60 + 1
        bot.gate.set()
        await fake.wait_for(lambda: bot.log)
        assert bot.log == [("later-error", 401, 50027)]


async def test_limits_and_raw_protocol_errors(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    fake.attachment_size_limit = 1000
    bot = new_bot(fake)
    async with running_bot(bot, fake):
        itx = await fake.slash("big", {"size": 1001}, user=fake.member)
        assert itx.payload["attachment_size_limit"] == 1000
        await fake.wait_for(lambda: len(bot.log) == 2)
        assert bot.log == [("big-error", 413, 40005), ("long-error", 400, 50035)]
        assert (await itx.wait_response())["data"]["content"] == "ok"

        async with aiohttp.ClientSession() as http:
            url = f"{fake.api_base}/interactions/{itx.id}/{itx.token}/callback"
            async with http.post(url, json={"type": 4, "data": {"content": "again"}}) as resp:
                assert resp.status == 400 and resp.headers["Content-Type"] == "application/json"
                assert (await resp.json())["code"] == 40060
            url = f"{fake.api_base}/interactions/1/nope/callback"
            async with http.post(url, json={"type": 5}) as resp:
                assert resp.status == 404 and (await resp.json())["code"] == 10062
            hook = f"{fake.api_base}/webhooks/{fake.application_id}/{itx.token}"
            async with http.post(f"{hook}?wait=1", json={"content": "followup"}) as resp:
                followup_id = int((await resp.json())["id"])
            async with http.patch(f"{hook}/messages/{followup_id}", json={"content": "e"}) as resp:
                assert resp.status == 200 and fake.messages[followup_id].content == "e"
            async with http.delete(f"{hook}/messages/{followup_id}") as resp:
                assert resp.status == 204 and fake.messages[followup_id].deleted
            async with http.get(f"{fake.api_base}/users/@me") as resp:
                assert resp.status == 401 and (await resp.json())["code"] == 0
            async with http.get(f"{fake.api_base}/nothing/here") as resp:
                assert resp.status == 404 and (await resp.json())["code"] == 0
    assert fake.unknown_routes == ["GET /nothing/here"]


async def test_persistent_dynamic_item_after_restart(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    bot = new_bot(fake)
    async with running_bot(bot, fake):
        itx = await fake.slash("persist", user=fake.member)
        await itx.wait_response()
        message_id = itx.original_message_id
    assert bot.is_closed()

    bot2 = new_bot(fake)
    async with running_bot(bot2, fake):
        assert len(fake.identifies) == 2
        click = await fake.click(message_id, "dyn:reroll:7", user=fake.admin)
        body = await click.wait_response()
        assert body["data"]["content"] == "dyn 7"
        assert bot2.log == [("dyn", 7, fake.admin.id)]


def _embed(**over: object) -> dict:
    return {"title": "t", "description": "d", **over}


def _field(name: str = "n", value: str = "v") -> dict:
    return {"name": name, "value": value}


def _button(label: str = "ok", custom_id: str = "b") -> dict:
    return {"type": 2, "style": 1, "label": label, "custom_id": custom_id}


# Each payload breaks exactly one of Discord's limits; the path is where Discord's error
# tree (code 50035) points.
LIMIT_CASES = [
    ({"content": "x" * 2001}, "content"),
    ({"embeds": [_embed(title="x" * 257)]}, "embeds.0.title"),
    ({"embeds": [_embed(description="x" * 4097)]}, "embeds.0.description"),
    ({"embeds": [_embed(fields=[_field(name="x" * 257)])]}, "embeds.0.fields.0.name"),
    ({"embeds": [_embed(fields=[_field(), _field(value="x" * 1025)])]},
     "embeds.0.fields.1.value"),
    ({"embeds": [_embed(fields=[_field(value="")])]}, "embeds.0.fields.0.value"),
    ({"embeds": [_embed(footer={"text": "x" * 2049})]}, "embeds.0.footer.text"),
    ({"embeds": [_embed(author={"name": "x" * 257})]}, "embeds.0.author.name"),
    ({"embeds": [_embed(fields=[_field()] * 26)]}, "embeds.0.fields"),
    ({"embeds": [_embed()] * 11}, "embeds"),
    ({"embeds": [_embed(description="x" * 4000), _embed(description="x" * 2000)]}, "embeds"),
    ({"content": "x", "components": [{"type": 1, "components": [_button()]}] * 6},
     "components"),
    ({"content": "x", "components": [{"type": 1, "components": [
        _button(custom_id=f"b{k}") for k in range(6)]}]}, "components.0.components"),
    ({"content": "x", "components": [{"type": 1, "components": [_button(label="x" * 81)]}]},
     "components.0.components.0.label"),
    ({"content": "x", "components": [{"type": 1, "components": [
        _button(custom_id="x" * 101)]}]}, "components.0.components.0.custom_id"),
    ({"content": "x", "nonce": "n" * 26}, "nonce"),
]


@pytest.mark.parametrize(("payload", "path"), LIMIT_CASES)
async def test_message_limits_give_discords_error_tree(
    fake_discord: FakeDiscord, payload: dict, path: str
) -> None:
    fake = fake_discord
    url = f"{fake.api_base}/channels/{fake.guild.channel_id}/messages"
    headers = {"Authorization": f"Bot {fake.token}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=payload, headers=headers) as resp:
            body = await resp.json()
            assert resp.status == 400, body
        assert body["code"] == 50035 and body["message"] == "Invalid Form Body"
        node = body["errors"]
        for part in path.split("."):
            node = node[part]
        assert node["_errors"][0]["code"] in ("BASE_TYPE_MAX_LENGTH", "MAX_EMBED_SIZE_EXCEEDED",
                                              "BASE_TYPE_REQUIRED")
        # The same message at the limits goes through.
        ok = {"content": "x" * 2000, "embeds": [_embed(
            title="x" * 256, fields=[_field("n" * 256, "v" * 1024)] * 2,
            footer={"text": "f" * 2048}, author={"name": "a" * 256})],
            "components": [{"type": 1, "components": [
                _button("l" * 80, f"{k}" + "c" * 99) for k in range(5)]}] * 1}
        async with http.post(url, json=ok, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
    assert not any(m.content == payload.get("content") for m in fake.messages.values()
                   if payload.get("content"))


async def test_eleven_attachments_are_refused(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    url = f"{fake.api_base}/channels/{fake.guild.channel_id}/messages"
    form = aiohttp.FormData(quote_fields=False)
    form.add_field("payload_json", '{"content": "many"}', content_type="application/json")
    for k in range(11):
        form.add_field(f"files[{k}]", PNG, filename=f"{k}.png",
                       content_type="application/octet-stream")
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=form,
                             headers={"Authorization": f"Bot {fake.token}"}) as resp:
            body = await resp.json()
    assert resp.status == 400 and body["code"] == 50035
    assert "attachments" in body["errors"]
    assert not fake.messages


async def test_a_multipart_edit_replaces_attachments_within_ten(
    fake_discord: FakeDiscord,
) -> None:
    """Edit Message with files (multipart PATCH): ``attachments`` is the complete list to
    keep, existing ones by id and new ones by index (Message Resource, "Edit Message");
    the 10-attachment limit counts both."""
    fake = fake_discord
    url = f"{fake.api_base}/channels/{fake.guild.channel_id}/messages"
    headers = {"Authorization": f"Bot {fake.token}"}

    def form(payload: str, count: int) -> aiohttp.FormData:
        data = aiohttp.FormData(quote_fields=False)
        data.add_field("payload_json", payload, content_type="application/json")
        for k in range(count):
            data.add_field(f"files[{k}]", PNG, filename=f"{k}.png",
                           content_type="application/octet-stream")
        return data

    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=form('{"content": "six"}', 6), headers=headers) as resp:
            message = await resp.json()
        kept = [{"id": a["id"]} for a in message["attachments"]]
        new = [{"id": k, "filename": f"{k}.png"} for k in range(5)]
        edit = f"{url}/{message['id']}"
        too_many = json.dumps({"attachments": kept + new})
        async with http.patch(edit, data=form(too_many, 5), headers=headers) as resp:
            body = await resp.json()
        assert resp.status == 400 and "attachments" in body["errors"]
        assert len(fake.messages[int(message["id"])].attachments) == 6  # unchanged
        replace = json.dumps({"content": "one", "attachments": [new[0]]})
        async with http.patch(edit, data=form(replace, 1), headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            edited = await resp.json()
    assert [a["filename"] for a in edited["attachments"]] == ["0.png"]
    assert edited["content"] == "one"


@pytest.mark.parametrize(("choices", "path"), [
    ([{"name": f"c{k}", "value": f"c{k}"} for k in range(26)], "choices"),
    ([{"name": "x" * 101, "value": "v"}], "choices.0.name"),
    ([{"name": "ok", "value": "v"}, {"name": "n", "value": "x" * 101}], "choices.1.value"),
])
async def test_autocomplete_choice_limits(
    fake_discord: FakeDiscord, choices: list, path: str
) -> None:
    fake = fake_discord
    itx = fake._new_interaction(4, fake.member, fake.guild.id, fake.guild.channel_id,
                                {"id": "1", "name": "x", "type": 1})
    url = f"{fake.api_base}/interactions/{itx.id}/{itx.token}/callback"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json={"type": 8, "data": {"choices": choices}}) as resp:
            body = await resp.json()
        assert resp.status == 400 and body["code"] == 50035
        node = body["errors"]["data"]
        for part in path.split("."):
            node = node[part]
        assert node["_errors"]
        assert not itx.responded
        good = [{"name": "n" * 100, "value": "v" * 100}] * 25
        async with http.post(url, json={"type": 8, "data": {"choices": good}}) as resp:
            assert resp.status == 200
    assert itx.choices == good


async def test_route_buckets_answer_429_with_discords_headers(fake_discord: FakeDiscord) -> None:
    """A burst over a channel's message bucket (5 per 5 s) gets Discord's 429; another
    channel (another major parameter) is a bucket of its own."""
    fake = fake_discord
    other = fake.add_channel(fake.guild.id, "other")
    auth = {"Authorization": f"Bot {fake.token}"}
    async with aiohttp.ClientSession(headers=auth) as http:
        answers = []
        for n in range(6):
            async with http.post(f"{fake.api_base}/channels/{fake.guild.channel_id}/messages",
                                 json={"content": f"burst {n}"}) as resp:
                answers.append((resp.status, dict(resp.headers), await resp.json()))
        async with http.post(f"{fake.api_base}/channels/{other}/messages",
                             json={"content": "elsewhere"}) as resp:
            assert resp.status == 200 and resp.headers["X-RateLimit-Remaining"] == "4"
    assert [a[0] for a in answers] == [200] * 5 + [429]
    assert [a[1]["X-RateLimit-Remaining"] for a in answers[:5]] == ["4", "3", "2", "1", "0"]
    assert {a[1]["X-RateLimit-Limit"] for a in answers} == {"5"}
    assert len({a[1]["X-RateLimit-Bucket"] for a in answers}) == 1
    for name in ("X-RateLimit-Reset", "X-RateLimit-Reset-After"):
        assert all(float(a[1][name]) > 0 for a in answers)
    status, headers, body = answers[5]
    assert headers["Via"] and headers["X-RateLimit-Scope"] == "user"
    assert int(headers["Retry-After"]) >= 1
    assert body["global"] is False and 0 < body["retry_after"] <= 5.0
    assert "X-RateLimit-Scope" not in answers[0][1]
    assert fake.answered_429 == 1 and fake.ratelimits.invalid == 1


async def test_discord_py_waits_out_a_bucket(fake_discord: FakeDiscord) -> None:
    """The real client reads the headers: a 429 from an exhausted bucket is slept off and
    retried; afterwards it waits for the reset by itself (no further 429)."""
    fake = fake_discord
    # 3 per 1.5 s: short for the suite, long enough that a busy machine still sends the
    # bot's first message inside the window the other client spent.
    fake.ratelimits.override("POST /channels/{channel_id}/messages", 3, 1.5)
    bot = new_bot(fake)
    channel_id = fake.guild.channel_id
    async with running_bot(bot, fake):
        async with aiohttp.ClientSession() as http:  # another client spends the bucket
            for _ in range(3):
                async with http.post(f"{fake.api_base}/channels/{channel_id}/messages",
                                     json={"content": "x"},
                                     headers={"Authorization": f"Bot {fake.token}"}) as resp:
                    assert resp.status == 200
        channel = bot.get_channel(channel_id)
        mark = len(fake.requests)
        sent = [await channel.send(f"n{n}") for n in range(4)]
        posts = [r for r in fake.requests[mark:]
                 if r.method == "POST" and r.path.endswith("/messages")]
    assert [m.content for m in sent] == [f"n{n}" for n in range(4)]
    assert [r.status for r in posts] == [429] + [200] * 4
    retry_after = posts[0].response["retry_after"]
    assert posts[1].time - posts[0].time >= retry_after - 0.01
    # 3 per 1.5 s: the 4th success waited for the next reset, with no 429 of its own.
    assert posts[-1].time - posts[1].time >= 1.45
    assert fake.answered_429 == 1


async def test_global_limit_spares_interaction_endpoints(fake_discord: FakeDiscord) -> None:
    """Over the global limit discord.py gets a global 429 and waits it out; interaction
    callbacks and followups are not bound to the global limit (Discord's docs)."""
    fake = fake_discord
    fake.ratelimits.global_limit = 2
    channels = [fake.add_channel(fake.guild.id, f"c{n}") for n in range(4)]
    bot = new_bot(fake)
    async with running_bot(bot, fake):
        await asyncio.sleep(1.05)  # the connect's own requests leave the global window
        mark = len(fake.requests)
        sent = await asyncio.gather(*(bot.get_channel(c).send("hi") for c in channels))
        posts = [r for r in fake.requests[mark:] if r.method == "POST"]
        assert len(sent) == 4 and sorted(r.status for r in posts).count(200) == 4
        limited = [r for r in posts if r.status == 429]
        assert limited and all(r.response["global"] is True for r in limited)
        # The global window is spent again; an interaction is still answered at once.
        for c in channels[:2]:
            await bot.get_channel(c).send("spend")
        itx, _ = await run_ping(fake, bot)
        assert itx.responded
        interaction_calls = [r for r in fake.requests[mark:] if "/interactions/" in r.path
                             or "/webhooks/" in r.path]
        assert interaction_calls and all(r.status == 200 for r in interaction_calls)


async def test_too_many_invalid_requests_get_the_cloudflare_ban(
        fake_discord: FakeDiscord) -> None:
    """Past the invalid-request limit every API request gets Cloudflare's 429 (HTML, no
    Via), which discord.py does not retry."""
    fake = fake_discord
    fake.ratelimits.invalid_limit = 3
    url = f"{fake.api_base}/channels/{fake.guild.channel_id}/messages"
    async with aiohttp.ClientSession() as http:
        for _ in range(4):
            async with http.post(url, json={"content": "x"}) as resp:  # no token: 401
                assert resp.status == 401
        async with http.post(url, json={"content": "x"},
                             headers={"Authorization": f"Bot {fake.token}"}) as resp:
            assert resp.status == 429 and "Via" not in resp.headers
            assert resp.content_type == "text/html"
    assert fake.ratelimits.invalid == 5 and fake.ratelimits.bans == 1
