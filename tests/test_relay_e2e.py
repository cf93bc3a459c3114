"""Status edits under contention: several jobs of one channel share Discord's edit budget
(5 edits per 5 s per channel). Real bot, fake Discord, fake ComfyUI servers, real sockets."""

from __future__ import annotations

import re
from typing import Any

from tests.conftest import MODELS, BotEnv, add_server
from tests.fakecomfy import FakeComfy
from tests.test_generation_e2e import finished_row, generate, job_row, result_messages

FINAL = ("Done", "Failed", "Cancelled")
FOOTER_JOB = re.compile(r"^Job #(\d+) ")


def _title(rec: Any) -> str:
    payload = rec.json if isinstance(rec.json, dict) else {}
    embeds = payload.get("embeds") or []
    return str(embeds[0].get("title", "")) if embeds else ""


async def test_final_states_go_before_progress_and_no_job_starves(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    # Five servers, one job each, all in one channel: four long jobs (8 s of progress)
    # spend the channel's budget while a short one and then the long ones finish.
    others = [FakeComfy(models=MODELS, step_delay=0.1, output_size=(64, 64)) for _ in range(4)]
    comfy.step_delay = 0.1
    studio.services.settings.limits.user_concurrent_jobs = 10
    studio.services.settings.limits.user_jobs_per_minute = 10
    servers = [comfy, *others]
    try:
        for n, other in enumerate(others, start=2):
            await other.start()
            await add_server(studio, f"gpu-{n}", other.url)
        for server in servers:
            server.pause_sampling()
        for n in range(4):
            await generate(studio, {"prompt": f"long {n}", "steps": 80, "seed": n})
        await generate(studio, {"prompt": "short", "steps": 12, "seed": 9})
        last = await job_row(studio)
        for server in servers:
            server.resume_sampling()
        for job_id in range(last.id - 4, last.id + 1):
            row = await finished_row(studio, job_id, timeout=60)
            assert row.status == "completed", row.error_message
        assert len(result_messages(studio)) == 5
    finally:
        for other in others:
            await other.stop()

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
