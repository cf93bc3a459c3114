"""The status message becomes the result (issue 13): one edit carries the image, the final
embed and the result buttons. Real bot, fake Discord, fake ComfyUI, real sockets."""

from __future__ import annotations

from typing import Any

import pytest

import bot.job_observer
import bot.pings
from tests.conftest import BotEnv, eventually
from tests.fakecomfy import FakeComfy
from tests.test_generation_e2e import (
    finished_row,
    generate,
    job_row,
    result_messages,
    running_job,
    status_message,
)


def _posts(env: BotEnv) -> list[Any]:
    return [r for r in env.fake.requests
            if r.method == "POST" and r.path == f"/channels/{env.channel_id}/messages"]


async def test_the_result_and_the_final_state_are_one_edit(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    await generate(studio, {"prompt": "one edit", "steps": 3, "seed": 5})
    row = await finished_row(studio)
    assert row.status == "completed", row.error_message
    status = status_message(studio, row.id)
    patches = studio.fake.message_calls("PATCH", status.id)
    finals = [r for r in patches if r.json["embeds"][0]["title"].startswith("Done")]
    # One edit, the last one: multipart, with the image ComfyUI made, the final embed
    # pointing at it, the result buttons instead of Cancel, and no ping.
    assert len(finals) == 1 and finals[0] is patches[-1]
    final = finals[0]
    [(name, _ctype, data)] = final.files.values()
    assert name == f"comfyvast-{row.id}-1.png"
    assert data == next(iter(comfy.files["output"].values()))
    assert final.json["attachments"] == [{"id": 0, "filename": name}]
    embed = final.json["embeds"][0]
    assert embed["title"] == f"Done · job #{row.id}"
    assert embed["image"]["url"] == f"attachment://{name}"
    assert {f["name"]: f["value"] for f in embed["fields"]}["Seed"] == "5"
    ids = str(final.json["components"])
    assert f"cv:reroll:{row.id}" in ids and f"cv:cancel:{row.id}" not in ids
    assert final.json["allowed_mentions"]["parse"] == []
    # Nothing was posted to the channel: the status message is the interaction's reply,
    # no separate result, no ping (the job took far less than NOTIFY_AFTER).
    assert _posts(studio) == []
    assert not [r for r in studio.fake.calls("POST", "/webhooks/")
                if r.message_id in (m.id for m in result_messages(studio))
                or "is ready" in str(r.json)]
    assert [m.id for m in result_messages(studio)] == [status.id]
    assert row.message_id == status.id and row.delivered_at is not None


async def test_a_deleted_status_message_gets_the_result_as_a_new_post(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    row = await running_job(studio, comfy, {"prompt": "deleted meanwhile", "steps": 3})
    studio.fake.messages[row.message_id].deleted = True  # a moderator removed it
    comfy.resume_sampling()

    async def ended() -> Any:
        found = await job_row(studio, row.id)
        return found if found.status == "completed" else None

    row = await eventually(ended, timeout=15)
    [result] = result_messages(studio)
    assert result.id != row.message_id
    assert result.content == f"<@{studio.fake.member.id}>"
    assert [a.filename for a in result.attachments] == [f"comfyvast-{row.id}-1.png"]
    assert result.embeds[0]["title"] == f"Done · job #{row.id}"
    # A new post pings (an edit could not).
    [post] = [r for r in _posts(studio) if r.files]
    assert post.json["allowed_mentions"]["parse"] == ["users"]


async def test_a_long_job_pings_its_member_once_the_result_is_shown(
    studio: BotEnv, comfy: FakeComfy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bot.job_observer, "NOTIFY_AFTER", 0.0)  # every job is "long"
    await generate(studio, {"prompt": "worth waiting for", "steps": 2})
    row = await finished_row(studio)
    assert row.status == "completed", row.error_message

    def ping() -> Any:
        return next((m for m in studio.fake.channel_messages(studio.channel_id)
                     if m.content.startswith(f"<@{studio.fake.member.id}> job #")), None)

    note = await studio.fake.wait_for(ping)
    assert note.content == f"<@{studio.fake.member.id}> job #{row.id} is ready."
    # A followup of the member's interaction (the token's bucket, not the channel's
    # message budget), which pings the member and no one else.
    status = studio.fake.messages[row.message_id]
    assert note.interaction_id == status.interaction_id and not note.ephemeral
    assert _posts(studio) == []
    [post] = [r for r in studio.fake.calls("POST", "/webhooks/") if "is ready" in str(r.json)]
    assert [int(u) for u in post.json["allowed_mentions"]["users"]] == [studio.fake.member.id]
    assert not post.files


def _pings(env: BotEnv) -> list[Any]:
    return [m for m in env.fake.channel_messages(env.channel_id)
            if m.content.startswith(f"<@{env.fake.member.id}> job")]


async def test_a_members_run_of_long_jobs_pings_once(
    studio: BotEnv, comfy: FakeComfy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three long jobs of one member in one channel: one ping, from the last to land,
    # naming all three (each would have been its own ping, a request each).
    monkeypatch.setattr(bot.job_observer, "NOTIFY_AFTER", 0.0)
    studio.services.settings.limits.user_concurrent_jobs = 5
    ids = []
    comfy.pause_sampling()  # all three in flight before the first lands
    for n in range(3):
        await generate(studio, {"prompt": f"run {n}", "steps": 3, "seed": n})
        ids.append((await job_row(studio)).id)
    comfy.resume_sampling()
    for job_id in ids:
        assert (await finished_row(studio, job_id)).status == "completed"
    [note] = await studio.fake.wait_for(lambda: _pings(studio) or None)
    assert note.content == (f"<@{studio.fake.member.id}> jobs #{ids[0]}, #{ids[1]} "
                            f"and #{ids[2]} are ready.")
    assert len(_pings(studio)) == 1


async def test_a_ready_result_is_not_held_back_by_a_long_job(
    studio: BotEnv, comfy: FakeComfy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A short job lands while the member's long one still runs: its ping waits at most
    # PING_HOLD for the long one, then goes alone; the long one pings when it lands.
    monkeypatch.setattr(bot.job_observer, "NOTIFY_AFTER", 0.0)
    monkeypatch.setattr(bot.pings, "PING_HOLD", 1.0)
    studio.services.settings.limits.user_concurrent_jobs = 5
    comfy.step_delay = 0.05
    await generate(studio, {"prompt": "short", "steps": 2, "seed": 1})
    short = await job_row(studio)
    await generate(studio, {"prompt": "long", "steps": 120, "seed": 2})
    long = await job_row(studio)
    assert (await finished_row(studio, short.id)).status == "completed"
    [note] = await studio.fake.wait_for(lambda: _pings(studio) or None)
    assert note.content == f"<@{studio.fake.member.id}> job #{short.id} is ready."
    assert (await job_row(studio, long.id)).status in ("queued", "running")  # not done
    assert (await finished_row(studio, long.id, timeout=60)).status == "completed"
    await studio.fake.wait_for(lambda: len(_pings(studio)) == 2 or None)
    assert _pings(studio)[1].content == f"<@{studio.fake.member.id}> job #{long.id} is ready."
