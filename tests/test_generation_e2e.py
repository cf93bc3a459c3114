"""/generate end to end: real bot, fake Discord, fake ComfyUI, over real sockets."""

from __future__ import annotations

import gc
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import event, select

from core.db.models import ComfyGeneration
from tests.conftest import (
    MODELS,
    BotEnv,
    _answered,
    add_server,
    bot_settings,
    eventually,
    start_bot,
)
from tests.fakecomfy import FakeComfy

# The bot's latest answer to an interaction: a followup, or the edited original.
reply = _answered


async def answer(env: BotEnv, interaction: Any) -> Any:
    return await env.fake.wait_for(lambda: reply(interaction))


async def generate(env: BotEnv, options: dict[str, Any], *, user: Any = None) -> Any:
    interaction = await env.slash("generate", options, user=user or env.fake.member)
    shown = await answer(env, interaction)
    if shown.embeds and not shown.ephemeral:
        # The reply shows the job's status a moment before the job's row learns where its
        # status message is (and the job starts): wait for that too.
        async def attached() -> bool:
            async with env.services.sessions() as session:
                found = await session.scalar(select(ComfyGeneration.id).where(
                    ComfyGeneration.message_id == shown.id))
            return found is not None

        await eventually(attached)
    return interaction


async def job_row(env: BotEnv, job_id: int | None = None) -> ComfyGeneration:
    async with env.services.sessions() as session:
        stmt = select(ComfyGeneration).order_by(ComfyGeneration.id.desc())
        if job_id is not None:
            stmt = stmt.where(ComfyGeneration.id == job_id)
        return (await session.scalars(stmt)).first()


async def running_job(env: BotEnv, comfy: FakeComfy, options: dict[str, Any]) -> ComfyGeneration:
    """Generate with sampling paused; return the job's row once ComfyUI runs it."""
    comfy.pause_sampling()
    await generate(env, options)
    row = await job_row(env)
    await comfy.wait_running(row.comfy_prompt_id, timeout=10)
    return row


async def finished_row(env: BotEnv, job_id: int | None = None, timeout: float = 15.0) -> Any:
    """The job's row once it ended and its status message shows the final state."""

    async def done() -> Any:
        row = await job_row(env, job_id)
        return row if row and row.status in ("completed", "failed", "cancelled") else None

    row = await eventually(done, timeout=timeout)
    if row.message_id is not None:
        word = {"completed": "Done", "failed": "Failed", "cancelled": "Cancelled"}[row.status]
        message = env.fake.messages[row.message_id]
        await env.fake.wait_for(lambda: message.embeds[0]["title"].startswith(word))
    return row


def result_messages(env: BotEnv) -> list[Any]:
    return [
        m
        for m in env.fake.channel_messages(env.channel_id, include_ephemeral=False)
        if m.attachments and m.content.startswith("<@")
    ]


def status_message(env: BotEnv, job_id: int) -> Any:
    for message in env.fake.channel_messages(env.channel_id, include_ephemeral=False):
        if f"cv:cancel:{job_id}" in message.custom_ids() or any(
            (e.get("title") or "").endswith(f"job #{job_id}") for e in message.embeds
        ):
            return message
    raise AssertionError(f"no status message for job {job_id}")


async def test_happy_path_progress_edits_and_png_upload(studio: BotEnv, comfy: FakeComfy) -> None:
    comfy.step_delay = 0.15
    interaction = await generate(
        studio,
        {"prompt": "a lighthouse at dusk", "steps": 8, "width": 512, "height": 512, "seed": 1234},
    )
    queued = reply(interaction)
    row = await finished_row(studio)
    assert row.status == "completed", row.error_message
    # The reply to the command is the job's status message, public; it moved through
    # states and became the result.
    status = status_message(studio, row.id)
    assert queued.id == status.id and not queued.ephemeral
    # Every edit went through the interaction's webhook (the token's own rate-limit
    # bucket), none through the channel's.
    patches = studio.fake.message_calls("PATCH", status.id)
    assert len(patches) >= 3 and all(r.path.startswith("/webhooks/") for r in patches)
    assert not studio.fake.calls("PATCH", f"/channels/{studio.channel_id}/messages/")
    titles = [e["embeds"][0]["title"] for e in status.edits if e.get("embeds")]
    assert any(t.startswith("Generating") for t in titles)
    progress_texts = " ".join(
        f["value"]
        for e in status.edits
        for emb in e.get("embeds", [])
        for f in emb.get("fields", [])
    )
    assert "/8" in progress_texts and "%" in progress_texts
    assert status.embeds[0]["title"] == f"Done · job #{row.id}"
    assert f"cv:cancel:{row.id}" not in status.custom_ids()  # no Cancel button once finished
    # The preview is gone from the final state: the result's image replaced it.
    assert [a.filename for a in status.attachments] == [f"comfyvast-{row.id}-1.png"]
    # Previews were shown while it ran: downscaled JPEGs attached to the status message.
    previews = [
        files["files[0]"][2]
        for files in (r.files for r in patches)
        if files.get("files[0]", ("",))[0] == "preview.jpg"
    ]
    assert previews, "no preview was shown"
    thumb = Image.open(io.BytesIO(previews[-1]))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256
    # The result: the status message itself, with the user named, the exact PNG ComfyUI
    # produced and the seed in the embed.
    [result] = result_messages(studio)
    assert result.id == status.id
    assert result.content == f"<@{studio.fake.member.id}>"
    # The exact bytes ComfyUI produced, under a name the bot chose (never ComfyUI's).
    [produced] = comfy.files["output"].values()
    [attachment] = result.attachments
    assert attachment.filename == f"comfyvast-{row.id}-1.png"
    assert produced == attachment.data
    assert Image.open(io.BytesIO(attachment.data)).size == (64, 64)
    fields = {f["name"]: f["value"] for f in result.embeds[0]["fields"]}
    assert fields["Seed"] == "1234" and fields["Model"] == "sd15.safetensors"
    assert sorted(result.custom_ids()) == sorted(
        [f"cv:reroll:{row.id}", f"cv:vary:{row.id}", f"cv:upscale:{row.id}"]
    )
    # What was queued is the built-in graph with the user's values.
    [workflow] = comfy.prompts.values()
    sampler = workflow["3"]["inputs"]
    assert (sampler["seed"], sampler["steps"]) == (1234, 8)
    assert workflow["6"]["inputs"]["text"] == "a lighthouse at dusk"


async def test_the_job_is_recorded_with_its_status_message_in_one_write(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    """Submission writes the job's row once, with the reply that becomes its status
    message (Discord names it when the command is acknowledged): no second write attaches
    it. On SQLite no read of the server comes before the insert either: the insert's own
    condition checks that the server runs (there are no row locks to take)."""
    engine = studio.services.sessions.kw["bind"].sync_engine
    statements: list[tuple[str, Any]] = []

    def executed(_conn: Any, _cursor: Any, sql: str, params: Any, *_: Any) -> None:
        statements.append((sql, params))

    event.listen(engine, "before_cursor_execute", executed)
    try:
        interaction = await generate(studio, {"prompt": "a cat", "steps": 2})
        row = await finished_row(studio)
    finally:
        event.remove(engine, "before_cursor_execute", executed)
    assert row.status == "completed", row.error_message
    assert row.message_id == reply(interaction).id == interaction.original_message_id
    [inserted] = [p for sql, p in statements if sql.startswith("INSERT INTO comfy_generations")]
    assert row.message_id in inserted
    assert not [sql for sql, _ in statements if "SET channel_id" in sql]
    server_read = "SELECT servers.status FROM servers WHERE servers.id = ?".split()
    assert not [sql for sql, _ in statements if sql.split() == server_read]


async def test_edits_are_coalesced_to_about_one_per_second(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    comfy.step_delay = 0.03  # ~33 progress events per second
    await generate(studio, {"prompt": "fast steps", "steps": 60})
    row = await finished_row(studio)
    assert row.status == "completed"
    status = status_message(studio, row.id)
    # The first edit shows the status in the interaction's reply (it was "thinking").
    patches = studio.fake.message_calls("PATCH", status.id)[1:]
    times = [r.time for r in patches]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(patches) < 10  # 60 steps did not become 60 edits
    # All but the final edit respect the one-second interval (small scheduling slack).
    assert all(g >= 0.9 for g in gaps[:-1]), gaps


async def test_model_not_on_any_server_is_refused_privately(studio: BotEnv) -> None:
    interaction = await generate(studio, {"prompt": "x", "model": "missing.safetensors"})
    refusal = reply(interaction)
    assert refusal.ephemeral
    assert "missing.safetensors" in refusal.content
    assert await job_row(studio) is None


async def test_bad_size_is_refused_before_anything_happens(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    interaction = await generate(studio, {"prompt": "x", "width": 500})
    assert "multiple of 8" in reply(interaction).content
    assert comfy.prompts == {}


async def test_comfy_validation_error_names_the_node(studio: BotEnv, comfy: FakeComfy) -> None:
    await generate(studio, {"prompt": "warm up"})  # caches the model list
    await finished_row(studio)
    comfy.models["checkpoints"].remove("sdxl.safetensors")  # gone after the cache was filled
    await generate(studio, {"prompt": "x", "model": "sdxl.safetensors"})
    row = await finished_row(studio)
    assert row.status == "failed"
    assert "node 4 (CheckpointLoaderSimple)" in row.error_message
    status = status_message(studio, row.id)
    assert "CheckpointLoaderSimple" in str(status.embeds[0])


async def test_execution_error_is_one_sentence(studio: BotEnv, comfy: FakeComfy) -> None:
    comfy.fail_node("KSampler", "CUDA out of memory")
    await generate(studio, {"prompt": "too big"})
    row = await finished_row(studio)
    assert row.status == "failed"
    assert "KSampler" in row.error_message and "CUDA out of memory" in row.error_message
    assert result_messages(studio) == []


async def test_cancel_by_requester_but_not_by_someone_else(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    row = await running_job(studio, comfy, {"prompt": "long one", "steps": 30})
    status = status_message(studio, row.id)

    async def progressed() -> bool:
        return len(status.edits) > 1

    await eventually(progressed)
    # Progress edits leave the components alone; the button shown with the status (the
    # first edit of the interaction's reply) stays.
    assert "components" in status.edits[0]
    assert all("components" not in e for e in status.edits[1:])
    assert f"cv:cancel:{row.id}" in status.custom_ids()
    other = studio.fake.add_user("mallory", guild_id=studio.fake.guild.id)
    click = await studio.fake.click(status.id, f"cv:cancel:{row.id}", user=other)
    await answer(studio, click)
    assert "Only the person" in reply(click).content
    assert not (await studio.services.generation.get(row.id)).finished
    click = await studio.fake.click(status.id, f"cv:cancel:{row.id}", user=studio.fake.member)
    comfy.resume_sampling()
    row = await finished_row(studio, row.id)
    assert row.status == "cancelled"
    assert any(r.path == "/interrupt" for r in comfy.requests)
    await answer(studio, click)
    assert "cancelled" in reply(click).content


async def test_a_running_job_keeps_no_copy_of_its_row(studio: BotEnv, comfy: FakeComfy) -> None:
    """Found at 2,000 jobs in flight: each job's task kept the row submission had written
    (an ORM object of ~4 KB) while it waited and ran. It keeps only what an attempt
    needs, and a finished job leaves nothing in the runner's per-job maps."""
    row = await running_job(studio, comfy, {"prompt": "held", "steps": 30})
    runner = studio.services.generation._runner
    assert row.id in runner._tasks and row.id not in runner._first

    # ComfyUI can start the prompt while the runner's write of "queued" is still in
    # flight, and that write holds its own row until it returns: a brief copy is fine,
    # one that stays while the job runs is what this test catches.
    async def no_copy_held() -> bool:
        gc.collect()
        return not [o for o in gc.get_objects()
                    if isinstance(o, ComfyGeneration) and o is not row and o.id == row.id]

    await eventually(no_copy_held, timeout=3, interval=0.1)
    comfy.resume_sampling()
    assert (await finished_row(studio, row.id)).status == "completed"

    async def task_ended() -> bool:
        return row.id not in runner._tasks

    await eventually(task_ended)
    assert runner._first == {}


async def test_a_running_job_handles_its_steps_a_few_times_a_second(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    """The follow loop settles between steps (a status shows about one a second), so a
    job of 80 steps of 10 ms wakes a few times, not for each step."""
    import time

    from core.comfy.events import Progress

    follower = studio.services.generation._runner._follower
    handled: list[tuple[float, int]] = []
    on_event = follower.on_event

    async def counting(job_id: int, event: Any, titles: Any, live: Any) -> None:
        if isinstance(event, Progress):
            handled.append((time.monotonic(), event.value))
        await on_event(job_id, event, titles, live)

    follower.on_event = counting  # type: ignore[method-assign]
    await generate(studio, {"prompt": "many steps", "steps": 80})
    row = await finished_row(studio)
    assert row.status == "completed"
    steps = [step for _, step in handled]
    assert len(steps) >= 2 and steps == sorted(steps), steps
    # Woken for a step at most every 0.2 s (a loaded machine only spaces them more); the
    # next node's start wakes it at once, with the sampler's last step.
    gaps = [b - a for (a, _), (b, _) in zip(handled, handled[1:], strict=False)]
    assert sum(gap < 0.15 for gap in gaps) <= 1, gaps


def reachable(root: object, depth: int = 4) -> list[object]:
    """Objects reachable from ``root`` within ``depth`` references (a bound method, its
    closure cells, what they hold)."""
    seen: dict[int, object] = {}
    frontier = [root]
    for _ in range(depth):
        nxt = []
        for obj in frontier:
            for ref in gc.get_referents(obj):
                if id(ref) not in seen and not isinstance(ref, type):
                    seen[id(ref)] = ref
                    nxt.append(ref)
        frontier = nxt
    return list(seen.values())


async def test_the_relay_keeps_no_interaction_while_a_job_runs(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    """The relay edits a status through its interaction's webhook for 15 minutes: what it
    keeps for that is the token, not the Interaction (its payload and state: ~2,000 of
    them at 2,000 jobs in flight). The edits still arrive through the webhook."""
    import discord

    row = await running_job(studio, comfy, {"prompt": "light", "steps": 30})
    route = studio.bot.relay.webhook_of(row.message_id)
    assert route is not None
    held = [o for o in reachable(route.edit) if isinstance(o, discord.Interaction)]
    assert held == []
    status = status_message(studio, row.id)
    before = len(status.edits)
    comfy.resume_sampling()
    assert (await finished_row(studio, row.id)).status == "completed"
    assert len(status.edits) > before
    assert any(r.path.startswith("/webhooks/") for r in studio.fake.calls("PATCH", "/webhooks/"))


async def test_reroll_queues_same_prompt_with_new_seed(studio: BotEnv, comfy: FakeComfy) -> None:
    await generate(studio, {"prompt": "a fox", "seed": 7})
    first = await finished_row(studio)
    [result] = result_messages(studio)
    click = await studio.fake.click(result.id, f"cv:reroll:{first.id}", user=studio.fake.member)
    await answer(studio, click)
    second = await finished_row(studio, first.id + 1)
    assert second.status == "completed"
    assert second.prompt == "a fox" and second.parameters["seed"] != 7
    assert second.parameters["parent_id"] == first.id
    assert len(result_messages(studio)) == 2


async def test_websocket_dropped_mid_run_still_delivers_once(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    row = await running_job(studio, comfy, {"prompt": "resilient", "steps": 5})
    await comfy.drop_websockets(abrupt=True)
    comfy.resume_sampling()
    row = await finished_row(studio, row.id)
    assert row.status == "completed"
    assert len(result_messages(studio)) == 1


async def test_rate_limit_on_concurrent_jobs(
    fake_discord: Any, tmp_path: Path, comfy: FakeComfy
) -> None:
    env = await start_bot(
        fake_discord, bot_settings(tmp_path, fake_discord, limits={"user_concurrent_jobs": 1})
    )
    try:
        await add_server(env, "gpu-1", comfy.url)
        comfy.pause_sampling()
        await generate(env, {"prompt": "one"})
        second = await generate(env, {"prompt": "two"})
        assert "already have 1 job" in reply(second).content
        comfy.resume_sampling()
        assert (await finished_row(env)).prompt == "one"
    finally:
        await env.stop()


async def test_oversize_image_is_reencoded_under_the_limit(
    fake_discord: Any, tmp_path: Path
) -> None:
    # Noise does not compress: a 2048x2048 PNG of it is ~12.6 MB, over the 10 MiB limit
    # of a guild without boosts.
    import os

    noise = Image.frombytes("RGB", (2048, 2048), os.urandom(2048 * 2048 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, "PNG", compress_level=1)
    big = buffer.getvalue()
    limit = 10 * 1024 * 1024
    assert len(big) > limit
    comfy = FakeComfy(models=MODELS, output_image=big)
    await comfy.start()
    env = await start_bot(fake_discord, bot_settings(tmp_path, fake_discord))
    try:
        await add_server(env, "gpu-1", comfy.url)
        await generate(env, {"prompt": "noise"})
        row = await finished_row(env, timeout=30)
        assert row.status == "completed", row.error_message
        [result] = result_messages(env)
        [attachment] = result.attachments
        assert attachment.size <= limit < len(big)
        assert Image.open(io.BytesIO(attachment.data)).size[0] >= 400
    finally:
        await env.stop()
        await comfy.stop()


async def test_bot_restarted_mid_run_delivers_exactly_once(
    fake_discord: Any, tmp_path: Path, comfy: FakeComfy
) -> None:
    settings = bot_settings(tmp_path, fake_discord)
    first = await start_bot(fake_discord, settings)
    await add_server(first, "gpu-1", comfy.url)
    row = await running_job(first, comfy, {"prompt": "survive a restart", "steps": 4})
    await first.stop()  # the bot goes away mid-run
    comfy.resume_sampling()
    await comfy.wait_idle()  # ...and ComfyUI finishes while nobody listens
    second = await start_bot(fake_discord, settings)
    try:
        row = await finished_row(second, row.id)
        assert row.status == "completed"
        assert len(result_messages(second)) == 1
        assert len(comfy.prompts) == 1  # resumed from history, not queued again
        # The buttons on the result work for the new process (persistent custom ids).
        [result] = result_messages(second)
        click = await fake_discord.click(result.id, f"cv:reroll:{row.id}", user=fake_discord.member)
        await answer(second, click)
        assert (await finished_row(second, row.id + 1)).status == "completed"
    finally:
        await second.stop()


# "running": nothing is written between ComfyUI's success and the post, so a crash right
# after the post leaves the row running. "uploading": rows left by earlier versions.
@pytest.mark.parametrize("crashed_as", ["running", "uploading"])
async def test_restart_while_delivering_does_not_post_twice(
    fake_discord: Any, tmp_path: Path, comfy: FakeComfy, crashed_as: str
) -> None:
    settings = bot_settings(tmp_path, fake_discord)
    first = await start_bot(fake_discord, settings)
    await add_server(first, "gpu-1", comfy.url)
    await generate(first, {"prompt": "posted once"})
    row = await finished_row(first)
    await first.stop()
    # Simulate a crash after the result was posted but before the row said so.
    from core.db.engine import create_engine, create_session_factory

    engine = create_engine(settings.database.url)
    async with create_session_factory(engine).begin() as session:
        stored = await session.get(ComfyGeneration, row.id)
        stored.status = crashed_as
        stored.delivered_at = stored.completed_at = None
    await engine.dispose()
    second = await start_bot(fake_discord, settings)
    try:
        row = await finished_row(second, row.id)
        assert row.status == "completed"
        assert len(result_messages(second)) == 1
    finally:
        await second.stop()


async def test_failover_to_a_second_server(studio: BotEnv, comfy: FakeComfy) -> None:
    studio.services.settings.comfy.failover_after = 1.5
    backup = FakeComfy(models=MODELS, step_delay=0.01, output_size=(64, 64))
    await backup.start()
    try:
        await add_server(studio, "gpu-2", backup.url)
        comfy.pause_sampling()
        await generate(studio, {"prompt": "move me"})
        row = await job_row(studio)
        first = await studio.services.servers.get(row.server_id)
        assert first.name == "gpu-1"  # both idle: the first registered wins
        await comfy.wait_running(row.comfy_prompt_id, timeout=10)
        await comfy.stop()  # the server dies mid-run
        row = await finished_row(studio, row.id, timeout=60)
        assert row.status == "completed", row.error_message
        assert (await studio.services.servers.get(row.server_id)).name == "gpu-2"
        assert row.attempts == 2
        assert len(result_messages(studio)) == 1
        assert len(backup.prompts) == 1
        status = studio.fake.messages[row.message_id]
        assert any("moved to 'gpu-2'" in str(e) for e in status.edits)
    finally:
        await backup.stop()


async def test_progress_outlives_the_interaction_token(studio: BotEnv, comfy: FakeComfy) -> None:
    import time

    row = await running_job(studio, comfy, {"prompt": "a long render", "steps": 3})
    later = time.time() + 16 * 60  # the interaction token is now expired
    studio.fake.clock = lambda: later
    comfy.resume_sampling()
    row = await finished_row(studio, row.id)
    assert row.status == "completed"
    assert len(result_messages(studio)) == 1


async def test_discord_rate_limit_on_edits_is_ridden_out(studio: BotEnv, comfy: FakeComfy) -> None:
    # The status message is shown by editing the interaction's reply, and the result is
    # another edit of it: a 429 on each, through the interaction's webhook.
    studio.fake.rate_limit_once("PATCH", "/messages/@original", retry_after=0.2)
    studio.fake.rate_limit_once("PATCH", "/messages/@original", retry_after=0.3, skip=1)
    await generate(studio, {"prompt": "through 429s", "steps": 4})
    row = await finished_row(studio)
    assert row.status == "completed"
    statuses = [r.status for r in studio.fake.requests if r.method in ("PATCH", "POST")]
    assert statuses.count(429) == 2
    assert len(result_messages(studio)) == 1
    # Each refused request was sent again, as it was, after the wait.
    calls = [r for r in studio.fake.requests if r.method == "PATCH"]
    refused = [n for n, r in enumerate(calls) if r.status == 429]
    for n in refused:
        again = next(r for r in calls[n + 1 :] if r.json == calls[n].json)
        assert again.status == 200 and again.time - calls[n].time >= 0.2


async def test_cancel_a_waiting_job_dequeues_it_only(studio: BotEnv, comfy: FakeComfy) -> None:
    comfy.pause_sampling()
    await generate(studio, {"prompt": "first", "steps": 3})
    await generate(studio, {"prompt": "second", "steps": 3})
    first = await job_row(studio, 1)
    second = await job_row(studio, 2)
    await comfy.wait_running(first.comfy_prompt_id, timeout=10)
    await studio.fake.wait_for(lambda: second.comfy_prompt_id in comfy.pending_prompt_ids)
    click = await studio.fake.click(status_message(studio, 2).id, "cv:cancel:2",
                                    user=studio.fake.member)
    await answer(studio, click)
    assert (await finished_row(studio, 2)).status == "cancelled"
    assert second.comfy_prompt_id not in comfy.pending_prompt_ids
    assert not any(r.path == "/interrupt" for r in comfy.requests)  # the running one is safe
    comfy.resume_sampling()
    assert (await finished_row(studio, 1)).status == "completed"
