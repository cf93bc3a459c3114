"""ComfyEventStream against FakeComfy: decoding, routing, reconnects, exactly-once done."""

from __future__ import annotations

import asyncio
import io
import json
import struct

import aiohttp
import pytest
from PIL import Image

from core.comfy.client import ComfyClient
from core.comfy.errors import ComfyExecutionError, ComfyInterrupted, ComfyPromptLost
from core.comfy.events import (
    ComfyEvent,
    Disconnected,
    Executed,
    Executing,
    ExecutionCached,
    ExecutionStart,
    ExecutionSuccess,
    PreviewEvent,
    Progress,
    ProgressState,
    PromptDone,
    Reconnected,
    Status,
    TextEvent,
    decode_binary,
    decode_message,
)
from core.comfy.stream import ComfyEventStream
from core.comfy.workflows import GenerationParams, build_workflow
from tests.fakecomfy import FakeComfy, facts
from tests.fakecomfy.replay import trace_prompt_bodies

MODEL = "tiny-random-sd15.safetensors"


def txt2img(steps: int = 3, seed: int = 1, model: str = MODEL) -> dict:
    return build_workflow(GenerationParams(prompt="a cat", model=model, width=64, height=64,
                                           steps=steps, seed=seed))


async def collect(sub: object, timeout: float = 5.0) -> list[ComfyEvent]:
    events: list[ComfyEvent] = []
    async with asyncio.timeout(timeout):
        async for event in sub:  # type: ignore[attr-defined]
            events.append(event)
    return events


@pytest.mark.parametrize("listener", [False, True], ids=["prompt-only", "everything"])
async def test_simple_prompt_event_order_matches_trace(
    stream: ComfyEventStream, client: ComfyClient, listener: bool
) -> None:
    body = trace_prompt_bodies("06_prompt_success_simple")[0]
    heard: list[ComfyEvent] = []
    if listener:
        stream.add_listener(heard.append)
    sub = stream.subscribe("p-simple")
    await client.queue_prompt(body["prompt"], prompt_id="p-simple")
    events = await collect(sub)
    # The trace's messages that carry this prompt_id, in order, as event classes.
    names = {"execution_start": ExecutionStart, "execution_cached": ExecutionCached,
             "executing": Executing, "progress_state": ProgressState, "executed": Executed,
             "execution_success": ExecutionSuccess}
    recorded = [names[e["message"]["type"]] for e in facts.ws_in(
        facts.load_trace("06_prompt_success_simple")) if e["frame"] == "text"
        and e["message"]["data"].get("prompt_id")]
    # The images were all announced by ``executed``: the prompt is done at
    # execution_success, before the end-of-prompt ``executing null``.
    assert recorded[-1] is Executing and recorded[-2] is ExecutionSuccess
    if not listener:
        # ``progress_state`` is read by no one: skipped undecoded unless someone takes
        # every event (a listener here).
        assert ProgressState in recorded
        recorded = [kind for kind in recorded if kind is not ProgressState]
    else:
        assert any(isinstance(e, ProgressState) for e in heard)
    assert [type(e) for e in events] == [*recorded[:-1], PromptDone]
    done = events[-1]
    assert isinstance(done, PromptDone) and done.ok and not done.recovered
    assert sorted((o.node_id, o.type) for o in done.outputs) == [("3", "output"), ("4", "temp")]


async def test_success_without_announced_images_waits_for_the_end_signal(
    stream: ComfyEventStream, client: ComfyClient
) -> None:
    # SaveImageWebsocket announces nothing in ``executed``: only the history (written
    # before ``executing null``) can say the prompt is complete, so the end is awaited.
    workflow = txt2img(steps=2)
    save = next(k for k, n in workflow.items() if n["class_type"] == "SaveImage")
    workflow[save] = {"class_type": "SaveImageWebsocket",
                      "inputs": {"images": workflow[save]["inputs"]["images"]}}
    sub = stream.subscribe("p-ws-save")
    await client.queue_prompt(workflow, prompt_id="p-ws-save")
    events = await collect(sub)
    done = events[-1]
    assert isinstance(done, PromptDone) and done.ok and done.outputs == ()
    assert isinstance(events[-2], Executing) and events[-2].node is None
    assert any(isinstance(e, ExecutionSuccess) for e in events[:-2])


async def test_previews_with_metadata(stream: ComfyEventStream, client: ComfyClient) -> None:
    sub = stream.subscribe("p-prev")
    await client.queue_prompt(txt2img(steps=3), prompt_id="p-prev")
    events = await collect(sub)
    previews = [e for e in events if isinstance(e, PreviewEvent)]
    progress = [e for e in events if isinstance(e, Progress)]
    assert len(previews) == 3 and [p.value for p in progress] == [1, 2, 3]
    assert all(p.prompt_id == "p-prev" and p.node_id == "3" for p in previews)
    assert previews[0].mime == "image/jpeg" and previews[0].metadata is not None
    assert Image.open(io.BytesIO(previews[0].image_bytes)).size == (512, 512)
    # With metadata negotiated the frame precedes its progress message (trace 11).
    first = events.index(previews[0])
    assert isinstance(events[first + 1], Progress)


async def test_legacy_previews_are_attributed(
    fake: FakeComfy, http: aiohttp.ClientSession, client: ComfyClient
) -> None:
    async with ComfyEventStream(fake.url, http, client.client_id, client=client,
                                preview_metadata=False) as legacy:
        sub = legacy.subscribe("p-legacy")
        await client.queue_prompt(txt2img(steps=2), prompt_id="p-legacy")
        events = await collect(sub)
    previews = [e for e in events if isinstance(e, PreviewEvent)]
    assert [(p.prompt_id, p.node_id, p.metadata) for p in previews] == [
        ("p-legacy", "3", None)] * 2
    first = events.index(previews[0])
    assert isinstance(events[first - 1], Progress)  # type 1 follows its progress (trace 10)


async def test_execution_error_done(stream: ComfyEventStream, client: ComfyClient) -> None:
    sub = stream.subscribe("p-err")
    await client.queue_prompt(txt2img(model="corrupt.safetensors"), prompt_id="p-err")
    done = await sub.wait_done(5)
    assert done.status == "error" and isinstance(done.error, ComfyExecutionError)
    assert done.error.node_id == "4"
    with pytest.raises(ComfyExecutionError, match="node 4 \\(CheckpointLoaderSimple\\)"):
        done.raise_for_status()


async def test_interrupt_done(stream: ComfyEventStream, client: ComfyClient,
                              fake: FakeComfy) -> None:
    fake.pause_sampling()
    sub = stream.subscribe("p-int")
    await client.queue_prompt(txt2img(steps=30), prompt_id="p-int")
    await fake.wait_running("p-int", node="3")
    await client.interrupt("p-int")
    fake.resume_sampling()
    done = await sub.wait_done(5)
    assert done.status == "interrupted" and isinstance(done.error, ComfyInterrupted)


async def test_drop_mid_run_reconnects_and_completes_once(
    stream: ComfyEventStream, client: ComfyClient, fake: FakeComfy
) -> None:
    fake.pause_sampling()
    sub = stream.subscribe("p-drop")
    everything = stream.subscribe_all()
    await client.queue_prompt(txt2img(steps=4), prompt_id="p-drop")
    await fake.wait_running("p-drop", node="3")
    await fake.drop_websockets()
    await stream.wait_connected(5)
    fake.resume_sampling()
    events = await collect(sub)
    assert any(isinstance(e, Disconnected) for e in events)
    assert any(isinstance(e, Reconnected) for e in events)
    dones = [e for e in events if isinstance(e, PromptDone)]
    assert len(dones) == 1 and dones[0].ok
    assert [o.node_id for o in dones[0].outputs] == ["9"]
    await stream.reconcile()  # a later reconcile must not produce a second completion
    await asyncio.sleep(0.6)  # and neither must the periodic poll (0.5 s in the fixture)
    everything.close()
    seen = [e async for e in everything]
    assert len([e for e in seen if isinstance(e, PromptDone)]) == 1


async def test_completion_while_disconnected_recovered_from_history(
    stream: ComfyEventStream, client: ComfyClient, fake: FakeComfy
) -> None:
    fake.pause_sampling()
    sub = stream.subscribe("p-away")
    await client.queue_prompt(txt2img(steps=2), prompt_id="p-away")
    await fake.wait_running("p-away", node="3")
    fake.refuse_websockets = True
    await fake.drop_websockets(abrupt=True)
    fake.resume_sampling()
    await fake.wait_idle()  # finished while nobody listened
    await asyncio.sleep(0.05)
    fake.refuse_websockets = False
    done = await sub.wait_done(5)
    assert done.ok and done.recovered
    assert [o.node_id for o in done.outputs] == ["9"]


async def test_error_while_disconnected_recovered(
    stream: ComfyEventStream, client: ComfyClient, fake: FakeComfy
) -> None:
    fake.pause_sampling()
    fake.fail_node("8", "boom")
    sub = stream.subscribe("p-away-err")
    await client.queue_prompt(txt2img(steps=2), prompt_id="p-away-err")
    await fake.wait_running("p-away-err", node="3")
    fake.refuse_websockets = True
    await fake.drop_websockets()
    fake.resume_sampling()
    await fake.wait_idle()
    fake.refuse_websockets = False
    done = await sub.wait_done(5)
    assert done.status == "error" and done.recovered
    assert str(done.error) == "ComfyUI failed while running node 8 (VAEDecode): boom."


async def test_restart_loses_prompt(
    stream: ComfyEventStream, client: ComfyClient, fake: FakeComfy
) -> None:
    fake.pause_sampling()
    sub = stream.subscribe("p-lost")
    await client.queue_prompt(txt2img(steps=5), prompt_id="p-lost")
    await fake.wait_running("p-lost", node="3")
    await fake.restart(downtime=0.1)
    fake.resume_sampling()
    done = await sub.wait_done(5)
    assert done.status == "lost" and isinstance(done.error, ComfyPromptLost)
    assert stream.connected


async def test_prompt_subscribed_before_queueing_is_not_lost(
    stream: ComfyEventStream, client: ComfyClient
) -> None:
    sub = stream.subscribe("p-later")
    await stream.reconcile()  # not queued yet: must not be declared lost
    await client.queue_prompt(txt2img(), prompt_id="p-later")
    done = await sub.wait_done(5)
    assert done.ok


async def test_listener_and_close(stream: ComfyEventStream, client: ComfyClient) -> None:
    seen: list[ComfyEvent] = []
    stream.add_listener(seen.append)
    stream.add_listener(lambda _e: 1 / 0)  # a failing listener is logged, not fatal
    everything = stream.subscribe_all()
    sub = stream.subscribe("p-l")
    await client.queue_prompt(txt2img(steps=1), prompt_id="p-l")
    await sub.wait_done(5)
    assert any(isinstance(e, Status) for e in seen)
    assert any(isinstance(e, PromptDone) for e in seen)
    dangling = stream.subscribe("never-queued")
    await stream.close()
    assert not stream.connected
    assert [e async for e in dangling] == []
    rest = [e async for e in everything]
    assert rest and isinstance(rest[0], Status)


async def test_untrack_after_validation_error(
    stream: ComfyEventStream, client: ComfyClient
) -> None:
    sub = stream.subscribe("p-bad")
    with pytest.raises(Exception, match="rejected"):
        await client.queue_prompt(txt2img(model="missing.safetensors"), prompt_id="p-bad")
    stream.untrack("p-bad")
    assert [e async for e in sub] == []


async def test_start_times_out_when_server_is_gone(http: aiohttp.ClientSession) -> None:
    fake = FakeComfy()
    await fake.start()
    url = fake.url
    await fake.stop()
    events = ComfyEventStream(url, http, "x", reconnect_backoff=(0.01, 0.05))
    with pytest.raises(Exception, match="unreachable"):
        await events.start(timeout=0.3)
    await events.close()


def test_decode_binary_frames() -> None:
    jpeg = b"\xff\xd8\xff\xe0rest"
    legacy = decode_binary(struct.pack(">II", 1, 1) + jpeg, current_prompt="p", current_node="3")
    assert legacy == PreviewEvent("p", "3", jpeg, "image/jpeg")
    png = decode_binary(struct.pack(">II", 1, 2) + b"\x89PNG")
    assert isinstance(png, PreviewEvent) and png.mime == "image/png" and png.prompt_id is None
    pid = "94bfa3ad-75f2-4395-b941-12239abbe58d"
    meta = {"node_id": "3", "prompt_id": pid, "display_node_id": "3", "parent_node_id": None,
            "real_node_id": "3", "image_type": "image/png"}
    blob = json.dumps(meta).encode()
    assert len(blob) == 165  # as recorded in trace 17b (166 with "image/jpeg", trace 11)
    framed = decode_binary(struct.pack(">II", 4, len(blob)) + blob + b"\x89PNG")
    assert framed == PreviewEvent(pid, "3", b"\x89PNG", "image/png", meta)
    text = decode_binary(struct.pack(">II", 3, 2) + b"12hello", current_prompt="p")
    assert text == TextEvent("p", "12", "hello")
    assert decode_binary(struct.pack(">II", 2, 0)) is None
    assert decode_binary(b"\x00") is None


def test_decode_every_recorded_text_message() -> None:
    """Every text frame in every trace decodes into a typed event (none unknown)."""
    for path in sorted(facts.TRACE_DIR.glob("[0-9]*.json")):
        trace = facts.load_trace(path.stem)
        for event in facts.ws_in(trace):
            if event["frame"] == "text":
                decoded = decode_message(event["message"])
                assert type(decoded).__name__ != "UnknownMessage", (path.name, event["message"])
