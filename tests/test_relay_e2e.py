"""Status edits under contention: jobs of one channel edited through the channel share its
edit budget (5 edits per 5 s); through their interactions' webhooks they do not. Real bot,
fake Discord, fake ComfyUI servers, real sockets."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select

import bot.job_observer
from core.db.models import ComfyGeneration
from tests.conftest import MODELS, BotEnv, add_server
from tests.fakecomfy import FakeComfy
from tests.test_generation_e2e import (
    finished_row,
    generate,
    job_row,
    result_messages,
    running_job,
)

FINAL = ("Done", "Failed", "Cancelled")
FOOTER_JOB = re.compile(r"^Job #(\d+) ")


@contextlib.asynccontextmanager
async def five_servers(studio: BotEnv, comfy: FakeComfy) -> AsyncIterator[list[FakeComfy]]:
    """``comfy`` and four more fake ComfyUIs (0.1 s a step), each a server of the bot, and
    a member allowed ten jobs at once: one job per server."""
    others = [FakeComfy(models=MODELS, step_delay=0.1, output_size=(64, 64)) for _ in range(4)]
    comfy.step_delay = 0.1
    studio.services.settings.limits.user_concurrent_jobs = 10
    studio.services.settings.limits.user_jobs_per_minute = 10
    try:
        for n, other in enumerate(others, start=2):
            await other.start()
            await add_server(studio, f"gpu-{n}", other.url)
        yield [comfy, *others]
    finally:
        for other in others:
            await other.stop()


def _title(rec: Any) -> str:
    payload = rec.json if isinstance(rec.json, dict) else {}
    embeds = payload.get("embeds") or []
    return str(embeds[0].get("title", "")) if embeds else ""


async def test_final_states_go_before_progress_and_no_job_starves(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    # Five servers, one job each, all in one channel: four long jobs (8 s of progress)
    # spend the channel's budget while a short one and then the long ones finish.
    async with five_servers(studio, comfy) as servers:
        for server in servers:
            server.pause_sampling()
        for n in range(4):
            await generate(studio, {"prompt": f"long {n}", "steps": 80, "seed": n})
        await generate(studio, {"prompt": "short", "steps": 12, "seed": 9})
        last = await job_row(studio)
        # As after a restart (or past the interactions' 15 minutes): no webhook is known, so
        # every status message is edited through the channel, in the channel's one lane.
        for job_id in range(last.id - 4, last.id + 1):
            studio.bot.relay.drop_webhook((await job_row(studio, job_id)).message_id)
        for server in servers:
            server.resume_sampling()
        for job_id in range(last.id - 4, last.id + 1):
            row = await finished_row(studio, job_id, timeout=60)
            assert row.status == "completed", row.error_message
        assert len(result_messages(studio)) == 5

    channel = f"/channels/{studio.channel_id}/messages"
    patches = [r for r in studio.fake.requests if r.method == "PATCH" and r.path.startswith(
        channel + "/")]
    # No result is posted apart: each status message became its result.
    assert not [r for r in studio.fake.requests if r.method == "POST" and r.path == channel
                and r.files]
    success = {p: t for server in servers for p, t in server.success_at.items()}
    for job_id in range(last.id - 4, last.id + 1):
        row = await job_row(studio, job_id)
        mine = [r for r in patches if r.path.endswith(f"/{row.message_id}")]
        finals = [r for r in mine if _title(r).startswith(FINAL)]
        # The result and the final state are one edit, the message's last: the image, the
        # final embed and the result buttons together.
        assert len(finals) == 1 and finals[0] is mine[-1], job_id
        result = finals[0]
        assert [name for name, _, _ in result.files.values()] == [f"comfyvast-{job_id}-1.png"]
        assert FOOTER_JOB.match(result.json["embeds"][0]["footer"]["text"]).group(1) == str(
            job_id)
        assert f"cv:reroll:{job_id}" in str(result.json["components"])
        # It is the channel's next edit after ComfyUI finished the job (one progress edit of
        # another job may already have been on its way): it does not queue behind the
        # other jobs' progress.
        done = success[row.comfy_prompt_id]
        between = [r for r in patches if done < r.time < result.time
                   and not _title(r).startswith(FINAL)]
        assert len(between) <= 1, (job_id, result.time - done, len(between))
    # Fair share: every long job's status message showed its progress more than once.
    for job_id in range(last.id - 4, last.id):
        message_id = (await job_row(studio, job_id)).message_id
        progress = [r for r in patches if r.path.endswith(f"/{message_id}")
                    and not _title(r).startswith(FINAL)]
        assert len(progress) >= 2, (job_id, len(progress))


def _webhook_edits(studio: BotEnv, message_id: int) -> list[Any]:
    return [r for r in studio.fake.message_calls("PATCH", message_id)
            if r.path.startswith("/webhooks/") and r.status == 200]


async def test_status_messages_of_one_channel_are_edited_through_their_own_webhooks(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    # Five jobs of one channel, each on its own server: through the interactions'
    # webhooks each status message has its token's bucket, so together they are edited
    # far more often than the channel's 5 edits per 5 s would allow, without a 429.
    async with five_servers(studio, comfy):
        for n in range(5):
            await generate(studio, {"prompt": f"parallel {n}", "steps": 50, "seed": n})
        last = await job_row(studio)
        rows = [await finished_row(studio, last.id - k, timeout=60) for k in range(5)]
    assert all(row.status == "completed" for row in rows)
    edits = {row.id: _webhook_edits(studio, row.message_id) for row in rows}
    for job_id, mine in edits.items():
        assert len(mine) >= 4, (job_id, len(mine))  # shown, progress, ..., the result
        gaps = [b.time - a.time for a, b in zip(mine[1:-1], mine[2:-1], strict=False)]
        assert all(g >= 0.9 for g in gaps), (job_id, gaps)  # one progress edit a second
    times = sorted(r.time for mine in edits.values() for r in mine)
    # More edits than the channel's budget allows over the whole run, had they shared it.
    channel_budget = 5 * (int((times[-1] - times[0]) / 5.0) + 1)
    assert len(times) > channel_budget, (len(times), channel_budget)
    assert not [r for r in studio.fake.requests if r.status == 429]
    assert not studio.fake.calls("PATCH", f"/channels/{studio.channel_id}/messages/")


async def test_past_the_tokens_life_the_status_moves_to_the_channels_route(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    row = await running_job(studio, comfy, {"prompt": "a long wait", "steps": 6})
    status = studio.fake.messages[row.message_id]
    assert _webhook_edits(studio, status.id)  # shown through the webhook
    # Discord refuses the interaction's webhook 15 minutes after the command (401, 50027
    # Invalid Webhook Token): the relay takes the channel's route from then on.
    real_clock = studio.fake.clock
    studio.fake.clock = lambda: real_clock() + 16 * 60
    comfy.resume_sampling()
    row = await finished_row(studio, row.id)
    assert row.status == "completed", row.error_message
    refused = [r for r in studio.fake.calls("PATCH", "/webhooks/") if r.status == 401]
    assert len(refused) == 1  # once refused, the webhook is not tried again
    after = [r for r in studio.fake.message_calls("PATCH", status.id) if r.time > refused[0].time]
    assert after and all(
        r.path == f"/channels/{studio.channel_id}/messages/{status.id}" for r in after)
    # The edit the webhook refused was not lost: the result landed through the channel.
    assert after[-1].status == 200 and after[-1].files
    assert [a.filename for a in status.attachments] == [f"comfyvast-{row.id}-1.png"]
    assert result_messages(studio) == [status]


async def _run_in_line(studio: BotEnv, comfy: FakeComfy, jobs: list[dict[str, Any]]) -> Any:
    """Submit ``jobs`` to one server while its sampler waits, so all but the first wait in
    line; then let them run (50 ms a step). The last job's row, once it completed."""
    studio.services.settings.limits.user_concurrent_jobs = 10
    studio.services.settings.limits.user_jobs_per_minute = 10
    comfy.step_delay = 0.05
    comfy.pause_sampling()
    for options in jobs:
        await generate(studio, options)
    last = await job_row(studio)
    comfy.resume_sampling()
    row = await finished_row(studio, last.id, timeout=60)
    assert row.status == "completed", row.error_message
    return row


async def test_a_place_in_line_is_shown_less_often_than_progress(
    studio: BotEnv, comfy: FakeComfy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Six jobs on one server: while the first ones run, the last waits in line and its
    # place changes with each job that ends. Its status is edited at most every
    # QUEUED_INTERVAL while it waits; once it runs, every relay interval.
    monkeypatch.setattr(bot.job_observer, "QUEUED_INTERVAL", 2.0)
    studio.bot.relay.interval = 0.3
    row = await _run_in_line(studio, comfy, [
        {"prompt": f"in line {n}", "steps": 40, "seed": n} for n in range(6)])
    edits = _webhook_edits(studio, row.message_id)[1:-1]  # between the first show and the result
    waiting = [r for r in edits if _title(r).startswith("Queued")]
    running = [r for r in edits if _title(r).startswith("Generating")]
    assert len(waiting) >= 2 and running, [_title(r) for r in edits]
    # Its place changed while it waited (five jobs ended ahead of it), shown 2 s apart...
    assert len({str(r.json["embeds"][0]) for r in waiting}) >= 2
    gaps = [b.time - a.time for a, b in zip(waiting, waiting[1:], strict=False)]
    assert all(g >= 1.95 for g in gaps), gaps
    # ...and as it ran its progress was shown at the relay's pace.
    gaps = [b.time - a.time for a, b in zip(running, running[1:], strict=False)]
    assert len(running) >= 2 and all(g >= 0.25 for g in gaps), gaps


async def test_places_in_line_and_previews_share_bot_wide_budgets(
    studio: BotEnv, comfy: FakeComfy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Eight jobs on one server, the first long, the rest short. Places in line share a
    # budget of 1 edit per second across every waiting job, so a waiting job is shown at
    # most every (jobs waiting) s, whatever QUEUED_INTERVAL allows; the previews of running
    # jobs share 1 thumbnail per second, so a running job's progress is edited at the
    # relay's pace while its preview image is replaced at most once a second.
    monkeypatch.setattr(bot.job_observer, "QUEUED_INTERVAL", 0.2)
    monkeypatch.setattr(bot.job_observer, "QUEUED_EDITS_PER_SECOND", 1.0)
    monkeypatch.setattr(bot.job_observer, "PREVIEWS_PER_SECOND", 1.0)
    studio.bot.relay.interval = 0.2
    await _run_in_line(studio, comfy, [
        {"prompt": f"budget {n}", "steps": 6 if n else 60, "seed": n} for n in range(8)])
    async with studio.services.sessions() as session:
        rows = list(await session.scalars(
            select(ComfyGeneration).order_by(ComfyGeneration.id).limit(8)))
    # The short jobs end one after another, a third of a second apart: each end moves
    # every job behind it a place up. Shown to the member at most once a second each:
    gaps = []
    for job in rows:
        edits = _webhook_edits(studio, job.message_id)
        gaps += [b.time - a.time for a, b in zip(edits, edits[1:], strict=False)
                 if _title(b).startswith("Queued")]
    assert len(gaps) >= 3, gaps
    assert min(gaps) >= 0.95, gaps
    # The first job ran 60 steps (3 s): progress edits every relay interval, each new
    # thumbnail (a multipart edit with a file) at least a second after the previous.
    running = [r for r in _webhook_edits(studio, rows[0].message_id)
               if _title(r).startswith("Generating")]
    thumbs = [r.time for r in running if r.files]
    assert len(running) >= 6 and len(thumbs) >= 2, (len(running), len(thumbs))
    assert len(thumbs) < len(running)
    gaps = [b - a for a, b in zip(thumbs, thumbs[1:], strict=False)]
    assert min(gaps) >= 0.95, gaps
