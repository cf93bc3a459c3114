"""A hostile ComfyUI server behind the real bot, driven through the fake Discord.

What a member sees when the server sends junk mid-job or junk node definitions, and when
the member uploads a workflow nested thousands deep: the job still finishes, or one clear
sentence, never "Something went wrong" with a traceback in the log.
"""

from __future__ import annotations

import json
import logging

import pytest

from core.comfy.workflows import GenerationParams, build_workflow
from core.errors import GENERIC_FAILURE
from tests.conftest import BotEnv, _answered
from tests.fakecomfy import FakeComfy
from tests.test_generation_e2e import finished_row, running_job


def texts(env: BotEnv) -> list[str]:
    out: list[str] = []
    for message in env.fake.channel_messages(env.channel_id, include_ephemeral=True):
        out.append(message.content or "")
        out.extend(json.dumps(embed) for embed in message.embeds)
    return out


async def test_junk_frames_mid_job_do_not_fail_the_job(
    studio: BotEnv, comfy: FakeComfy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    row = await running_job(studio, comfy, {"prompt": "through the junk", "steps": 3})
    # Junk for this very prompt too: progress values as strings used to reach the
    # progress display and raise TypeError there.
    for ws in list(comfy._all_ws):
        await ws.send_str(json.dumps({"type": "progress", "data": {
            "value": "1", "max": "3", "prompt_id": row.comfy_prompt_id, "node": "3"}}))
        await ws.send_str(json.dumps({"type": "executed", "data": {
            "prompt_id": row.comfy_prompt_id, "node": "9", "output": {"images": "junk"}}}))
    await comfy.send_junk()
    comfy.resume_sampling()
    done = await finished_row(studio, row.id)
    assert done.status == "completed", done.error_message
    assert not any(GENERIC_FAILURE in text for text in texts(studio))
    assert not [r for r in caplog.records if r.exc_info and r.levelno >= logging.ERROR]


async def test_junk_node_definitions_give_a_clear_answer(
    studio: BotEnv, comfy: FakeComfy
) -> None:
    comfy.hostile.junk("/object_info", {**comfy.object_info(), "CLIPTextEncode": "junk",
                                        "KSampler": {"input": ["junk"]}})
    workflow = build_workflow(GenerationParams(prompt="p", model="sd15.safetensors", seed=1))
    add = await studio.slash(
        "workflow", {"name": "mine", "file": "wf.json"}, user=studio.fake.admin,
        subcommand="add",
        attachments={"file": ("wf.json", json.dumps(workflow).encode(), "application/json")},
    )
    answer = (await studio.fake.wait_for(lambda: _answered(add))).content
    assert "would reject" in answer and "unknown node type" in answer, answer
    assert await studio.services.workflows.names() == []


@pytest.mark.parametrize("text", [
    "[" * 200_000 + "]" * 200_000,
    '{"1": {"class_type": "X", "inputs": {"a": ' + "[" * 100 + "]" * 100 + "}}}",
])
async def test_a_deeply_nested_workflow_upload_is_refused_clearly(
    studio: BotEnv, text: str
) -> None:
    # Served as octet-stream: the fake Discord's request log parses JSON answers and
    # would itself hit the RecursionError (the bot does not look at the content type).
    add = await studio.slash(
        "workflow", {"name": "deep", "file": "deep.json"}, user=studio.fake.admin,
        subcommand="add",
        attachments={"file": ("deep.json", text.encode(), "application/octet-stream")},
    )
    answer = (await studio.fake.wait_for(lambda: _answered(add))).content
    assert "nested too deeply" in answer, answer
    assert await studio.services.workflows.names() == []
