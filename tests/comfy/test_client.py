"""ComfyClient against FakeComfy over real sockets."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import aiohttp
import pytest
from PIL import Image

from core.comfy.client import ComfyClient, safe_upload_name
from core.comfy.errors import (
    ComfyExecutionError,
    ComfyHTTPError,
    ComfyInterrupted,
    ComfyNotFound,
    ComfyUnreachable,
    ComfyValidationError,
)
from core.comfy.pool import ComfyConnection
from core.comfy.workflows import GenerationParams, build_workflow
from core.generation.follow import QueueSnapshots, node_titles
from tests.fakecomfy import FakeComfy
from tests.fakecomfy.replay import trace_prompt_bodies

MODEL = "tiny-random-sd15.safetensors"


def txt2img(**overrides: object) -> dict:
    params = {"prompt": "a cat", "model": MODEL, "width": 64, "height": 48, "steps": 3,
              "seed": 1, **overrides}
    return build_workflow(GenerationParams(**params))  # type: ignore[arg-type]


async def test_system_stats_and_health(client: ComfyClient, fake: FakeComfy) -> None:
    stats = await client.system_stats()
    assert stats.comfyui_version == "0.3.64"
    assert stats.devices[0].type == "cpu" and stats.devices[0].vram_total > 0
    assert await client.check_status() is True
    await fake.stop()
    assert await client.check_status(timeout=1.0) is False


async def test_models(client: ComfyClient) -> None:
    assert "checkpoints" in await client.list_model_folders()
    assert MODEL in await client.list_models("checkpoints")
    assert await client.list_models("loras") == []
    with pytest.raises(ComfyNotFound):
        await client.list_models("no_such_folder")


async def test_object_info(client: ComfyClient) -> None:
    everything = await client.object_info()
    assert everything["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0][-1] == MODEL
    assert list(await client.object_info("KSampler")) == ["KSampler"]
    assert await client.object_info("NoSuchNode") == {}


async def test_queue_prompt_with_own_id_and_outputs(client: ComfyClient, fake: FakeComfy) -> None:
    queued = await client.queue_prompt(txt2img(), prompt_id="bot-1")
    assert queued.prompt_id == "bot-1" and not queued.partial
    body = next(r.json for r in fake.requests if r.path == "/prompt" and r.method == "POST")
    assert body["client_id"] == client.client_id and body["prompt_id"] == "bot-1"
    await fake.wait_idle()
    outputs = await client.get_prompt_outputs("bot-1")
    assert [(o.node_id, o.type) for o in outputs] == [("9", "output")]
    data = await client.view_image(outputs[0])
    assert Image.open(io.BytesIO(data)).size == (64, 48)
    result = await client.get_prompt_result("bot-1")
    assert result is not None and result.status == "success" and result.completed


async def test_queue_positions(client: ComfyClient, fake: FakeComfy) -> None:
    fake.pause_sampling()
    first = await client.queue_prompt(txt2img(seed=1))
    await fake.wait_running(first.prompt_id, node="3")
    second = await client.queue_prompt(txt2img(seed=2))
    third = await client.queue_prompt(txt2img(seed=3))
    front = await client.queue_prompt(txt2img(seed=4), front=True)
    queue = await client.get_queue()
    assert queue.running_ids == [first.prompt_id]
    assert queue.pending_ids == [front.prompt_id, second.prompt_id, third.prompt_id]
    assert queue.position(first.prompt_id) == 0 and queue.position(third.prompt_id) == 3
    assert queue.running[0].client_id == client.client_id
    assert await client.queue_remaining() == 4
    await client.delete_from_queue([second.prompt_id])
    assert second.prompt_id not in await client.get_queue()
    await client.clear_queue()
    assert (await client.get_queue()).pending == ()
    fake.resume_sampling()
    await fake.wait_idle()


async def test_validation_error_sentence(client: ComfyClient) -> None:
    with pytest.raises(ComfyValidationError) as caught:
        await client.queue_prompt(txt2img(model="x.safetensors"))
    assert str(caught.value) == (
        "ComfyUI rejected the workflow: node 4 (CheckpointLoaderSimple): ckpt_name "
        "'x.safetensors' is not in the list of available values."
    )
    assert caught.value.error_type == "prompt_outputs_failed_validation"
    assert caught.value.node_errors["4"]["class_type"] == "CheckpointLoaderSimple"


@pytest.mark.parametrize(
    ("mutate", "sentence"),
    [
        (lambda wf: wf["3"]["inputs"].update(steps=0),
         "node 3 (KSampler): steps 0 is smaller than the minimum of 1."),
        (lambda wf: wf["3"]["inputs"].update(sampler_name="nope", scheduler="nah"),
         "node 3 (KSampler): sampler_name 'nope' is not in the list of available values "
         "(and 1 more problem)."),
        (lambda wf: wf["5"]["inputs"].pop("width"),
         "node 5 (EmptyLatentImage): required input 'width' is missing."),
        (lambda wf: wf["5"]["inputs"].update(height="tall"),
         "node 5 (EmptyLatentImage): height 'tall' is not a valid INT."),
        (lambda wf: wf["8"]["inputs"].update(samples=["4", 0]),
         "node 8 (VAEDecode): input 'samples' expects LATENT but is linked to a MODEL output."),
        (lambda wf: wf["2"].update(class_type="Nope") if "2" in wf else wf.update(
            {"2": {"class_type": "Nope", "inputs": {}}}),
         "cannot execute because node Nope does not exist (Node ID '#2')."),
    ],
)
async def test_validation_sentences(client: ComfyClient, mutate: object, sentence: str) -> None:
    workflow = txt2img()
    mutate(workflow)  # type: ignore[operator]
    with pytest.raises(ComfyValidationError) as caught:
        await client.queue_prompt(workflow)
    assert str(caught.value) == f"ComfyUI rejected the workflow: {sentence}"


async def test_partial_node_errors_are_returned(client: ComfyClient) -> None:
    body = trace_prompt_bodies("08_prompt_validation_errors")[6]  # link_to_missing_node
    queued = await client.queue_prompt(body["prompt"])
    assert queued.partial and list(queued.node_errors) == ["2"]


async def test_execution_error_sentence(client: ComfyClient, fake: FakeComfy) -> None:
    queued = await client.queue_prompt(txt2img(model="corrupt.safetensors"))
    await fake.wait_idle()
    with pytest.raises(ComfyExecutionError) as caught:
        await client.get_prompt_outputs(queued.prompt_id)
    assert str(caught.value) == (
        "ComfyUI failed while running node 4 (CheckpointLoaderSimple): "
        "Error while deserializing header: header too large."
    )
    assert caught.value.exception_type == "safetensors._safetensors_rust.SafetensorError"


async def test_save_outside_output_sentence(client: ComfyClient, fake: FakeComfy) -> None:
    queued = await client.queue_prompt(trace_prompt_bodies("09_execution_error")[0]["prompt"])
    await fake.wait_idle()
    result = await client.get_prompt_result(queued.prompt_id)
    assert result is not None and result.status == "error"
    assert [o.node_id for o in result.outputs] == ["4"]  # the preview ran before the error
    expected = r"node 3 \(SaveImage\): ERROR: Saving image outside"
    with pytest.raises(ComfyExecutionError, match=expected):
        result.raise_for_status()


async def test_interrupt_is_targeted(client: ComfyClient, fake: FakeComfy) -> None:
    fake.pause_sampling()
    running = await client.queue_prompt(txt2img(steps=50))
    await fake.wait_running(running.prompt_id, node="3")
    await client.interrupt("someone-else")
    fake.resume_sampling()
    fake.pause_sampling()
    await client.interrupt(running.prompt_id)
    fake.resume_sampling()
    await fake.wait_idle()
    result = await client.get_prompt_result(running.prompt_id)
    assert result is not None and result.status == "interrupted"
    assert result.node_id == "3" and not result.completed
    with pytest.raises(ComfyInterrupted, match="interrupted at node 3"):
        result.raise_for_status()


async def test_interrupt_of_other_prompt_keeps_running(
    client: ComfyClient, fake: FakeComfy
) -> None:
    fake.pause_sampling()
    running = await client.queue_prompt(txt2img())
    await fake.wait_running(running.prompt_id, node="3")
    await client.interrupt("not-running")
    fake.resume_sampling()
    await fake.wait_idle()
    result = await client.get_prompt_result(running.prompt_id)
    assert result is not None and result.status == "success"


async def test_upload(client: ComfyClient, fake: FakeComfy) -> None:
    data = io.BytesIO()
    Image.new("RGB", (40, 24), (1, 2, 3)).save(data, "PNG")
    first = await client.upload_image(data.getvalue(), "my photo (1).png", subfolder="discord")
    assert (first.name, first.subfolder, first.type) == ("my_photo_1.png", "discord", "input")
    assert first.load_image_value == "discord/my_photo_1.png"
    again = await client.upload_image(b"other", "my photo (1).png", subfolder="discord",
                                      overwrite=False)
    assert again.name == "my_photo_1 (1).png"
    workflow = build_workflow(GenerationParams(
        prompt="x", model=MODEL, init_image=first.load_image_value, denoise=0.5, steps=2, seed=3))
    queued = await client.queue_prompt(workflow)
    await fake.wait_idle()
    (output,) = await client.get_prompt_outputs(queued.prompt_id)
    assert Image.open(io.BytesIO(await client.view_image(output))).size == (40, 24)
    assert await client.view("my_photo_1.png", "discord", "input") == data.getvalue()


@pytest.mark.parametrize(
    ("name", "safe"),
    [("a b.png", "a_b.png"), ("../../x.jpg", "x.jpg"), ("noext", "noext.png"),
     ("é!.webp", "image.webp")],
)
def test_safe_upload_name(name: str, safe: str) -> None:
    assert safe_upload_name(name) == safe


async def test_view_missing_is_not_found(client: ComfyClient) -> None:
    with pytest.raises(ComfyNotFound):
        await client.view("nope.png")


async def test_history_listing_and_delete(client: ComfyClient, fake: FakeComfy) -> None:
    ids = [(await client.queue_prompt(txt2img(seed=s))).prompt_id for s in (1, 2, 3)]
    await fake.wait_idle()
    assert list(await client.get_history(max_items=2)) == ids[1:]
    await client.delete_history([ids[0]])
    assert await client.get_history(ids[0]) == {}
    assert await client.get_prompt_result(ids[0]) is None


async def test_http_error_injection(client: ComfyClient, fake: FakeComfy) -> None:
    fake.inject_http_error("/queue", 502, body="bad gateway")
    with pytest.raises(ComfyHTTPError) as caught:
        await client.get_queue()
    assert caught.value.status == 502 and "HTTP 502" in str(caught.value)
    assert (await client.get_queue()).running == ()


async def test_timeout_is_unreachable(fake: FakeComfy, http: aiohttp.ClientSession) -> None:
    client = ComfyClient(fake.url, http, timeout=0.2)
    fake.inject_http_error("/queue", None, delay=1.0)
    with pytest.raises(ComfyUnreachable, match="timed out"):
        await client.get_queue()


async def test_connection_refused_is_unreachable(http: aiohttp.ClientSession) -> None:
    fake = FakeComfy()
    await fake.start()
    url = fake.url
    await fake.stop()
    client = ComfyClient(url, http, timeout=1.0)
    with pytest.raises(ComfyUnreachable) as caught:
        await client.system_stats()
    assert url in str(caught.value)


async def test_free(client: ComfyClient, fake: FakeComfy) -> None:
    await client.free()
    assert fake.requests[-1].json == {"unload_models": True, "free_memory": True}


async def test_jobs_looking_at_one_queue_together_share_one_request(
    client: ComfyClient, fake: FakeComfy, stream: Any
) -> None:
    # Twenty jobs of one server ask for their place in line at once: one GET /queue
    # answers them all (ComfyUI's queue carries every waiting prompt's whole graph).
    fake.pause_sampling()
    await client.queue_prompt(txt2img(seed=1))
    queued = await client.queue_prompt(txt2img(seed=2))
    snapshots = QueueSnapshots()
    conn = ComfyConnection(1, fake.url, client, stream)
    before = len([r for r in fake.requests if r.path == "/queue"])
    queues = await asyncio.gather(*(snapshots.get(conn) for _ in range(20)))
    assert all(q.position(queued.prompt_id) == 1 for q in queues)
    assert len([r for r in fake.requests if r.path == "/queue"]) == before + 1
    # Within its time to live the copy is reused; a fresh look asks again.
    await snapshots.get(conn)
    await snapshots.get(conn, fresh=True)
    assert len([r for r in fake.requests if r.path == "/queue"]) == before + 2
    fake.resume_sampling()
    await fake.wait_idle()


def test_a_followed_job_keeps_its_nodes_titles_not_its_graph() -> None:
    # The status names the running node by its title, else its class: the follow loop
    # keeps only that map (the graph is ComfyUI's once queued).
    workflow = txt2img()
    sampler = next(k for k, n in workflow.items() if n["class_type"] == "KSampler")
    workflow[sampler]["_meta"] = {"title": "Main sampler"}
    workflow["junk"] = "not a node"  # a custom workflow's oddity is skipped
    titles = node_titles(workflow)
    assert titles[sampler] == "Main sampler"
    assert {titles[k] for k, n in workflow.items() if k not in (sampler, "junk")} == {
        n["class_type"] for k, n in workflow.items() if k not in (sampler, "junk")}
    assert "junk" not in titles and all(isinstance(v, str) for v in titles.values())
