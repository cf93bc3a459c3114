"""More of /generate through the real client: img2img, LoRA, workflows, buttons, lookups."""

from __future__ import annotations

import io
import json

from PIL import Image

from core.comfy.workflows import GenerationParams, build_workflow
from tests.conftest import BotEnv, _answered
from tests.fakecomfy import FakeComfy
from tests.test_generation_e2e import finished_row, generate, job_row, reply, result_messages


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


async def test_img2img_uploads_the_attachment(studio: BotEnv, comfy: FakeComfy) -> None:
    source = png(64, 64)
    interaction = await studio.slash(
        "generate",
        {"prompt": "repaint", "image": "photo.png", "denoise": 0.4},
        attachments={"image": ("photo.png", source, "image/png")},
    )
    await studio.fake.wait_for(lambda: _answered(interaction))
    row = await finished_row(studio)
    assert row.status == "completed", row.error_message
    [workflow] = comfy.prompts.values()
    assert workflow["10"]["class_type"] == "LoadImage"
    assert workflow["3"]["inputs"]["denoise"] == 0.4
    uploaded = workflow["10"]["inputs"]["image"]
    assert source in comfy.files["input"].values(), uploaded


async def test_lora_is_chained_into_the_graph(studio: BotEnv, comfy: FakeComfy) -> None:
    await generate(
        studio, {"prompt": "detailed", "lora": "detail.safetensors", "lora_strength": 0.7}
    )
    row = await finished_row(studio)
    assert row.status == "completed", row.error_message
    [workflow] = comfy.prompts.values()
    assert workflow["20"]["class_type"] == "LoraLoader"
    assert workflow["20"]["inputs"]["strength_model"] == 0.7
    assert workflow["3"]["inputs"]["model"] == ["20", 0]


async def test_unknown_lora_is_refused(studio: BotEnv) -> None:
    interaction = await generate(studio, {"prompt": "x", "lora": "nope.safetensors"})
    assert "nope.safetensors" in reply(interaction).content


async def test_batch_gets_a_grid_and_every_image(studio: BotEnv, comfy: FakeComfy) -> None:
    await generate(studio, {"prompt": "four", "batch": 4})
    row = await finished_row(studio)
    [result] = result_messages(studio)
    names = [a.filename for a in result.attachments]
    assert names[0] == "grid.png" and len(names) == 5
    assert Image.open(io.BytesIO(result.attachments[0].data)).size == (128, 128)
    assert result.embeds[0]["image"]["url"].endswith("grid.png")
    assert row.image_urls and len(row.image_urls) == 4


async def test_variations_queue_four_seeds(studio: BotEnv, comfy: FakeComfy) -> None:
    await generate(studio, {"prompt": "a boat", "seed": 1})
    first = await finished_row(studio)
    [result] = result_messages(studio)
    # With the default limit of 2 jobs at once, 4 variations are refused up front.
    click = await studio.fake.click(result.id, f"cv:vary:{first.id}", user=studio.fake.member)
    await studio.fake.wait_for(lambda: _answered(click))
    refusal = _answered(click)
    assert "needs 4 job slots" in refusal.content and refusal.ephemeral
    # The public "thinking..." reply is gone: the refusal is private, the channel sees nothing.
    assert studio.fake.messages[click.original_message_id].deleted
    assert (await job_row(studio)).id == first.id  # nothing was queued
    studio.services.settings.limits.user_concurrent_jobs = 4
    click = await studio.fake.click(result.id, f"cv:vary:{first.id}", user=studio.fake.member)
    await studio.fake.wait_for(lambda: _answered(click))
    rows = [await finished_row(studio, first.id + k) for k in range(1, 5)]
    assert all(r.status == "completed" and r.prompt == "a boat" for r in rows)
    assert len({r.parameters["seed"] for r in rows} | {1}) == 5
    # Four public status messages: the click's reply, then three of its followups.
    statuses = [studio.fake.messages[r.message_id] for r in rows]
    assert statuses[0].id == click.original_message_id
    assert all(m.interaction_id == click.id and not m.ephemeral for m in statuses)
    assert len({m.id for m in statuses}) == 4


async def test_upscale_uses_the_servers_upscale_model(studio: BotEnv, comfy: FakeComfy) -> None:
    await generate(studio, {"prompt": "small"})
    first = await finished_row(studio)
    [result] = result_messages(studio)
    click = await studio.fake.click(result.id, f"cv:upscale:{first.id}", user=studio.fake.member)
    await studio.fake.wait_for(lambda: _answered(click))
    up = await finished_row(studio, first.id + 1)
    assert up.status == "completed", up.error_message
    sent = list(comfy.prompts.values())[-1]
    assert {n["class_type"] for n in sent.values()} == {
        "LoadImage",
        "UpscaleModelLoader",
        "ImageUpscaleWithModel",
        "SaveImage",
    }
    assert sent["2"]["inputs"]["model_name"] == "4x-ultra.pth"
    upscaled = result_messages(studio)[-1]
    assert "Upscale" not in str(upscaled.components)  # no upscale of an upscale


async def test_custom_workflow_add_and_generate(studio: BotEnv, comfy: FakeComfy) -> None:
    workflow = build_workflow(
        GenerationParams(prompt="placeholder", model="sd15.safetensors", steps=3, seed=1)
    )
    data = json.dumps(workflow).encode()
    add = await studio.slash(
        "workflow",
        {"name": "mine", "file": "wf.json"},
        user=studio.fake.admin,
        subcommand="add",
        attachments={"file": ("wf.json", data, "application/json")},
    )
    answer = await studio.fake.wait_for(lambda: _answered(add))
    assert "Added workflow **mine**" in answer.content and "prompt→6.text" in answer.content
    await generate(studio, {"prompt": "through my workflow", "workflow": "mine", "seed": 42})
    row = await finished_row(studio)
    assert row.status == "completed", row.error_message
    sent = list(comfy.prompts.values())[-1]
    assert sent["6"]["inputs"]["text"] == "through my workflow"
    assert sent["3"]["inputs"]["seed"] == 42
    listing = await studio.slash("workflow", user=studio.fake.admin, subcommand="list")
    assert "mine" in listing.response_message().embeds[0]["description"]


async def test_workflow_with_unknown_node_is_refused(studio: BotEnv) -> None:
    bad = {
        "1": {"class_type": "NoSuchNode", "inputs": {"text": "x"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "p", "clip": ["1", 0]}},
    }
    add = await studio.slash(
        "workflow",
        {"name": "bad", "file": "bad.json", "params": "prompt=2.text"},
        user=studio.fake.admin,
        subcommand="add",
        attachments={"file": ("bad.json", json.dumps(bad).encode(), "application/json")},
    )
    answer = await studio.fake.wait_for(lambda: _answered(add))
    assert "would reject" in answer.content and "NoSuchNode" in answer.content
    assert await studio.services.workflows.names() == []


async def test_model_autocomplete_filters_past_25(studio: BotEnv, comfy: FakeComfy) -> None:
    comfy.models["checkpoints"] = [f"model-{i:03d}.safetensors" for i in range(60)]
    studio.services.generation.catalog.invalidate(1)
    choices = await studio.fake.autocomplete(
        "generate", {"prompt": "x", "model": "model-04"}, "model", user=studio.fake.member
    )
    assert [c["value"] for c in choices] == [f"model-04{i}.safetensors" for i in range(10)]
    choices = await studio.fake.autocomplete(
        "generate", {"prompt": "x", "model": ""}, "model", user=studio.fake.member
    )
    assert len(choices) == 25


async def test_progress_and_history(studio: BotEnv, comfy: FakeComfy) -> None:
    await generate(studio, {"prompt": "look me up"})
    row = await finished_row(studio)
    progress = await studio.slash("progress", {"generation": row.id})
    embed = progress.response_message().embeds[0]
    assert embed["title"] == f"Done · job #{row.id}"
    history = await studio.slash("history", {"limit": 5})
    assert "look me up" in history.response_message().embeds[0]["description"]
    missing = await studio.slash("progress", {"generation": 999})
    assert "no generation #999" in missing.response_message().content
