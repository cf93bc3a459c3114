"""Discord's limits and untrusted images, through the real bot, the fake Discord (which
refuses what Discord refuses) and the fake ComfyUI."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from bot.diagnose_render import diagnosis_embed
from core.comfy.workflows import GenerationParams, build_workflow
from core.diagnostics import Check, DiagnosticReport
from tests.conftest import BotEnv, _answered, add_server, bot_settings, start_bot
from tests.fakecomfy import FakeComfy
from tests.fakediscord import FakeDiscord
from tests.test_generation_e2e import finished_row, generate, job_row, status_message

MiB = 1024 * 1024


def refused_requests(env: BotEnv) -> list[Any]:
    return [r for r in env.fake.requests if r.status == 400]


# --------------------------------------------------------------------------- helpers


def png_bomb(width: int, height: int) -> bytes:
    """A valid RGB PNG of ``width`` x ``height`` black pixels, built row by row (a few KB
    of memory here, hundreds of MiB for whoever decodes it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + width * 3)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body)
            + chunk(b"IEND", b""))


def jpeg_bomb(side: int) -> bytes:
    """A grey JPEG of ``side`` x ``side`` pixels, encoded in a child process so that this
    process never holds it decoded."""
    code = (
        "import io, sys\nfrom PIL import Image\n"
        f"img = Image.new('L', ({side}, {side}), 128)\nbuf = io.BytesIO()\n"
        "img.save(buf, 'JPEG', quality=50)\nsys.stdout.buffer.write(buf.getvalue())\n"
    )
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          timeout=120).stdout


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_rss_growth() -> Iterator[list[int]]:
    """Samples this process's resident memory every 2 ms; yields [growth] filled on exit
    (the peak minus the resident size at the start)."""
    result = [0]
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result[0] = max(peak[0], _rss()) - base


# --------------------------------------------------------------------------- limits


async def test_a_batch_of_sixteen_is_posted_ten_attachments_at_most(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    studio.services.settings.limits.max_batch = 16
    await generate(studio, {"prompt": "many", "batch": 16})
    row = await finished_row(studio, timeout=30)
    assert row.status == "completed", row.error_message
    posted = [m for m in studio.fake.channel_messages(studio.channel_id, include_ephemeral=False)
              if m.attachments]
    assert [len(m.attachments) for m in posted] == [10, 7]
    first, second = posted
    assert first.attachments[0].filename == "grid.png"
    assert first.embeds[0]["image"]["url"] == "attachment://grid.png"
    assert second.message_reference and int(second.message_reference["message_id"]) == first.id
    names = [a.filename for m in posted for a in m.attachments[:]][1:]
    assert names == [f"comfyvast-{row.id}-{n}.png" for n in range(1, 17)]
    assert not refused_requests(studio)


async def test_a_restart_mid_batch_posts_only_the_missing_part(
    fake_discord: FakeDiscord, tmp_path: Path, comfy: FakeComfy
) -> None:
    settings = bot_settings(tmp_path, fake_discord, limits={"max_batch": 16})
    first = await start_bot(fake_discord, settings)
    await add_server(first, "gpu-1", comfy.url)
    await generate(first, {"prompt": "many", "batch": 12})
    row = await finished_row(first, timeout=30)
    await first.stop()
    [main, part] = [m for m in fake_discord.messages.values() if m.attachments]
    assert part.content == f"Job #{row.id}, part 2 of 2" and len(part.attachments) == 3
    # A crash after the first message, before the second: the row still says running.
    part.deleted = True
    from sqlalchemy import update

    from core.db.engine import create_engine, create_session_factory
    from core.db.models import ComfyGeneration

    engine = create_engine(settings.database.url)
    async with create_session_factory(engine).begin() as session:
        await session.execute(update(ComfyGeneration).where(ComfyGeneration.id == row.id)
                              .values(status="running", delivered_at=None, completed_at=None))
    await engine.dispose()
    second = await start_bot(fake_discord, settings)
    try:
        row = await finished_row(second, row.id, timeout=30)
        assert row.status == "completed", row.error_message
        posted = [m for m in fake_discord.messages.values() if m.attachments and not m.deleted]
        assert [m.id for m in posted][0] == main.id and len(posted) == 2
        assert posted[1].content == f"Job #{row.id}, part 2 of 2"
        assert [a.data for a in posted[1].attachments] == [a.data for a in part.attachments]
    finally:
        await second.stop()


async def test_a_long_node_title_keeps_the_progress_field_within_1024(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    workflow = build_workflow(GenerationParams(prompt="p", model="sd15.safetensors", steps=3,
                                               seed=1))
    workflow["3"]["_meta"] = {"title": "T" * 1500}  # the sampler, as a workflow may name it
    add = await studio.slash(
        "workflow", {"name": "titled", "file": "wf.json"}, user=studio.fake.admin,
        subcommand="add",
        attachments={"file": ("wf.json", json.dumps(workflow).encode(), "application/json")},
    )
    await studio.fake.wait_for(lambda: _answered(add))
    comfy.pause_sampling()
    await generate(studio, {"prompt": "x", "workflow": "titled"})
    row = await job_row(studio)
    await comfy.wait_running(row.comfy_prompt_id, timeout=10)
    status = status_message(studio, row.id)

    def shows_node() -> bool:
        return any("Node: **TTT" in f["value"] for e in status.embeds
                   for f in e.get("fields", []))

    await studio.fake.wait_for(shows_node, timeout=10)
    comfy.resume_sampling()
    row = await finished_row(studio)
    assert row.status == "completed", row.error_message
    assert not refused_requests(studio)


async def test_an_error_that_echoes_a_long_option_still_reaches_the_member(
    studio: BotEnv,
) -> None:
    # The option list as sent (an option without max_length, as several had): the bot's
    # error sentence quotes the value back.
    long_model = "m" * 2500
    interaction = await studio.fake.slash(
        "generate",
        [{"name": "prompt", "type": 3, "value": "x"},
         {"name": "model", "type": 3, "value": long_model}],
        user=studio.fake.member,
    )
    answer = await studio.fake.wait_for(lambda: _answered(interaction), timeout=10)
    assert "mmmm" in answer.content and len(answer.content) <= 2000
    assert answer.ephemeral
    assert not refused_requests(studio)


def test_an_oversized_diagnosis_fits_discords_embed_limits() -> None:
    checks = tuple(Check(f"check {k} " + "n" * 300, k % 2 == 0, "detail " * 400,
                         "hint " * 100) for k in range(30))
    report = DiagnosticReport("box" * 40, "ssh", checks, 1.5)
    embed = diagnosis_embed(report).to_dict()
    FakeDiscord._validate_embeds([embed])  # raises Discord's 50035 error if over a limit
    # As many checks as fit, in order, each with the start of its detail.
    assert 15 <= len(embed["fields"]) <= 25
    assert all(f["name"].startswith(("✅ check", "❌ check")) for f in embed["fields"])
    assert embed["fields"][0]["value"].startswith("detail detail")


# --------------------------------------------------------------------------- images


async def test_a_jpeg_preview_bomb_is_decoded_small(studio: BotEnv, comfy: FakeComfy) -> None:
    bomb = jpeg_bomb(13000)
    assert len(bomb) < 2 * MiB
    comfy.preview_image = bomb
    comfy.step_delay = 0.15  # long enough for the status message to show previews
    with peak_rss_growth() as growth:
        started = time.monotonic()
        await generate(studio, {"prompt": "bomb", "steps": 12})
        row = await finished_row(studio, timeout=60)
        took = time.monotonic() - started
    assert row.status == "completed", row.error_message
    # Decoded whole, one frame is 13000² bytes (161 MiB, RGB 484 MiB); at 1/8 it is 2.5 MiB.
    assert growth[0] < 120 * MiB, f"the bot grew by {growth[0] / MiB:.0f} MiB"
    previews = [r.files["files[0]"][2] for r in studio.fake.calls("PATCH", "/messages/")
                if r.files.get("files[0]", ("",))[0] == "preview.jpg"]
    assert previews and max(Image.open(io.BytesIO(previews[-1])).size) <= 320
    assert took < 60


async def test_a_png_preview_bomb_is_not_decoded(studio: BotEnv, comfy: FakeComfy) -> None:
    comfy.preview_image = png_bomb(13000, 13000)
    with peak_rss_growth() as growth:
        await generate(studio, {"prompt": "bomb"})
        row = await finished_row(studio, timeout=30)
    assert row.status == "completed", row.error_message
    assert growth[0] < 120 * MiB, f"the bot grew by {growth[0] / MiB:.0f} MiB"
    assert not any(r.files.get("files[0]", ("",))[0] == "preview.jpg"
                   for r in studio.fake.calls("PATCH", "/messages/"))


async def test_huge_outputs_are_refused_clearly(studio: BotEnv, comfy: FakeComfy) -> None:
    comfy.output_image = png_bomb(9000, 9000)
    with peak_rss_growth() as growth:
        await generate(studio, {"prompt": "huge", "batch": 4})
        row = await finished_row(studio, timeout=30)
    assert row.status == "failed"
    assert "too large to decode (9000×9000 px)" in row.error_message
    assert growth[0] < 120 * MiB, f"the bot grew by {growth[0] / MiB:.0f} MiB"
    assert not [m for m in studio.fake.messages.values() if m.attachments]


async def test_a_grid_of_large_outputs_is_built_from_small_tiles(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    comfy.output_image = png_bomb(5000, 5000)
    with peak_rss_growth() as growth:
        await generate(studio, {"prompt": "large", "batch": 4})
        row = await finished_row(studio, timeout=60)
    assert row.status == "completed", row.error_message
    # One output decoded at a time (72 MiB); before, four of them and a 10000² grid.
    assert growth[0] < 300 * MiB, f"the bot grew by {growth[0] / MiB:.0f} MiB"
    [result] = [m for m in studio.fake.messages.values() if m.attachments]
    grid = Image.open(io.BytesIO(result.attachments[0].data))
    assert result.attachments[0].filename == "grid.png" and max(grid.size) <= 2048


async def test_an_output_that_is_not_an_image_is_refused(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    comfy.output_image = b"<html><script>alert(1)</script></html>"
    await generate(studio, {"prompt": "junk"})
    row = await finished_row(studio)
    assert row.status == "failed" and "not an image" in row.error_message
    assert not [m for m in studio.fake.messages.values() if m.attachments]


async def test_autocomplete_offers_only_names_it_can_send_whole(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    long_name = "a" * 120 + ".safetensors"
    comfy.models["checkpoints"] = [long_name, "sd15.safetensors"]
    studio.services.generation.catalog.invalidate(1)
    choices = await studio.fake.autocomplete(
        "generate", {"prompt": "x", "model": ""}, "model", user=studio.fake.member
    )
    # A value cut to 100 characters would name a model that does not exist.
    assert [(c["name"], c["value"]) for c in choices] == [
        ("sd15.safetensors", "sd15.safetensors")]
    assert not refused_requests(studio)


def test_fit_embed_always_passes_discords_checks() -> None:
    import random

    import discord

    from bot.rendering import fit_embed, fit_message

    rng = random.Random(12)

    def text(top: int) -> str:
        return "x" * rng.choice([0, 1, 50, top // 2, top, top + 1, top * 3])

    for _ in range(300):
        embeds = []
        for _ in range(rng.choice([1, 1, 2, 10])):
            embed = discord.Embed(title=text(256) or None, description=text(4096) or None)
            for _ in range(rng.choice([0, 3, 25, 40])):
                embed.add_field(name=text(256), value=text(1024))
            embed.set_footer(text=text(2048) or None)
            if rng.random() < 0.5:
                embed.set_author(name=text(256) or "a")
            embeds.append(embed)
        kwargs = fit_message({"content": text(2000), "embeds": embeds})
        assert len(kwargs["content"]) <= 2000
        FakeDiscord._validate_embeds([e.to_dict() for e in kwargs["embeds"]])
    single = fit_embed(discord.Embed(description="d" * 5000, title="t"))
    assert single.description and len(single.description) == 4096


async def test_outputs_that_do_not_decode_fail_the_job_clearly(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    whole = png_bomb(64, 64)
    comfy.output_image = whole[: len(whole) // 2]  # a PNG header over cut data
    await generate(studio, {"prompt": "cut", "batch": 2})
    row = await finished_row(studio)
    assert row.status == "failed"
    assert row.error_message.startswith("ComfyUI's images could not be posted")
    assert not [m for m in studio.fake.messages.values() if m.attachments]


async def test_a_preview_that_is_not_an_image_is_skipped(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    comfy.preview_image = b"\xff\xd8\xff junk that claims to be a JPEG"
    comfy.step_delay = 0.1
    await generate(studio, {"prompt": "junk preview", "steps": 10})
    row = await finished_row(studio)
    assert row.status == "completed", row.error_message
    assert not any(r.files.get("files[0]", ("",))[0] == "preview.jpg"
                   for r in studio.fake.calls("PATCH", "/messages/"))


async def test_a_refused_error_reply_falls_back_to_the_plain_sentence(studio: BotEnv) -> None:
    from core.errors import GENERIC_FAILURE

    # Whatever made Discord refuse the first reply (400), the member still gets an answer.
    studio.fake.fail_once("POST", "/webhooks/", 400, 50035, "Invalid Form Body")
    interaction = await studio.fake.slash(
        "generate", {"prompt": "x", "model": "nope.safetensors"}, user=studio.fake.member)
    answer = await studio.fake.wait_for(lambda: _answered(interaction), timeout=10)
    assert answer.content == GENERIC_FAILURE
    assert len([r for r in studio.fake.calls("POST", "/webhooks/") if r.status == 400]) == 1


async def test_a_flood_of_announced_outputs_is_not_believed(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    comfy.hostile.output_count = 40  # the server says it made 40 images for a batch of 1
    await generate(studio, {"prompt": "flood"})
    row = await finished_row(studio, timeout=30)
    assert row.status == "completed", row.error_message
    fetched = [r for r in comfy.requests if r.path == "/view"]
    assert len(fetched) == 16
    posted = [m for m in studio.fake.channel_messages(studio.channel_id, include_ephemeral=False)
              if m.attachments]
    assert sum(len(m.attachments) for m in posted) == 16 + 1  # and the grid
    assert not refused_requests(studio)
