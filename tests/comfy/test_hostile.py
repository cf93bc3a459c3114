"""A hostile ComfyUI server, through the real client and stream over loopback sockets.

The fake's hostile modes (tests/fakecomfy/hostile.py) send junk frames, junk rows and
definitions, redirects to an internal URL and answers far over the caps. The bot skips
or refuses each, and the connection keeps delivering healthy jobs.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import tracemalloc
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from core.comfy.client import ComfyClient
from core.comfy.errors import (
    ComfyMalformed,
    ComfyRedirectRefused,
    ComfyResponseTooLarge,
)
from core.comfy.events import (
    Disconnected,
    Executing,
    PreviewEvent,
    Progress,
    ProgressState,
    PromptDone,
)
from core.comfy.limits import DEFAULT_LIMITS, MiB, ResponseLimits
from core.comfy.stream import ComfyEventStream
from core.comfy.subscriptions import MAX_PENDING
from core.comfy.workflows import (
    GenerationParams,
    build_workflow,
    load_api_workflow,
    validate_against_object_info,
)
from core.errors import ValidationFailed
from tests.fakecomfy import FakeComfy
from tests.fakecomfy.hostile import JUNK_TEXT_FRAMES, HitRecorder
from tests.fakecomfy.images import latent_preview_jpeg

MODEL = "tiny-random-sd15.safetensors"


def txt2img(steps: int = 2) -> dict:
    return build_workflow(GenerationParams(prompt="a cat", model=MODEL, width=64, height=64,
                                           steps=steps, seed=1))


SAMPLER = next(k for k, n in txt2img().items() if n["class_type"] == "KSampler")


async def until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait for ``check()``; generous, because only failures take this long."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met")
        await asyncio.sleep(0.02)


async def healthy_job(stream: ComfyEventStream, client: ComfyClient, prompt_id: str) -> PromptDone:
    sub = stream.subscribe(prompt_id)
    await client.queue_prompt(txt2img(), prompt_id=prompt_id)
    return await sub.wait_done(20)


@pytest.fixture
async def recorder() -> HitRecorder:
    server = HitRecorder()
    await server.start()
    yield server  # type: ignore[misc]
    await server.stop()


# --------------------------------------------------------------------------- junk messages


async def test_junk_frames_are_skipped_and_the_same_socket_still_delivers(
    stream: ComfyEventStream, client: ComfyClient, fake: FakeComfy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="core.comfy.stream")
    await fake.send_junk()
    await fake.send_junk()  # twice: logged once per kind, not per message
    ws_before = sum(r.path == "/ws" for r in fake.requests)
    done = await healthy_job(stream, client, "p-after-junk")
    # Delivered live over the same socket, not recovered by the poll loop after the
    # event task died (what one {"status": "junk"} used to do).
    assert done.ok and not done.recovered and done.outputs
    assert stream.connected and sum(r.path == "/ws" for r in fake.requests) == ws_before
    kinds = [r.args[1] for r in caplog.records if "malformed" in r.getMessage()]
    assert len(kinds) == len(set(kinds)) and len(kinds) >= 8
    assert "status message" in kinds and "progress message" in kinds
    assert "text frame" in kinds and "preview frame" in kinds and "binary frame" in kinds
    assert len(JUNK_TEXT_FRAMES) > len(kinds)  # many messages, one line per kind


async def test_a_frame_over_the_cap_reconnects_and_jobs_still_deliver(
    fake: FakeComfy, http: aiohttp.ClientSession, client: ComfyClient
) -> None:
    limits = ResponseLimits(ws_message=1 * MiB)
    async with ComfyEventStream(fake.url, http, client.client_id, client=client,
                                reconnect_backoff=(0.02, 0.2), limits=limits) as stream:
        events = stream.subscribe_all()
        sockets = list(fake._all_ws)
        for ws in sockets:
            await ws.send_bytes(struct.pack(">II", 1, 1) + b"\xff" * (2 * MiB))
        event = await events.get(20)
        while not isinstance(event, Disconnected):
            event = await events.get(20)
        assert "exceeds limit 1048576" in event.reason
        await stream.wait_connected(20)
        done = await healthy_job(stream, client, "p-after-big-frame")
        assert done.ok and done.outputs


async def test_a_flood_of_progress_and_previews_waits_in_a_bounded_queue(
    stream: ComfyEventStream, client: ComfyClient, fake: FakeComfy
) -> None:
    """A server sending progress and previews faster than the reader takes them: the
    subscription keeps at most MAX_PENDING events (it used to keep every one, each preview
    up to the frame cap), the newest progress and the end of the prompt are not lost."""
    flood = 3 * MAX_PENDING
    seen: list[Progress] = []
    stream.add_listener(
        lambda e: seen.append(e) if isinstance(e, Progress) and e.prompt_id == "p-flood" else None
    )
    fake.pause_sampling()
    sub = stream.subscribe("p-flood")
    await client.queue_prompt(txt2img(), prompt_id="p-flood")
    await fake.flood_progress("p-flood", flood, latent_preview_jpeg(8, 8))
    await until(lambda: any(e.value == flood for e in seen))  # the stream read them all
    assert sub.pending <= MAX_PENDING and sub.shed >= flood
    fake.resume_sampling()
    events = []
    async for event in sub:  # the reader catches up
        events.append(event)
    flooded = [e for e in events if isinstance(e, Progress) and e.max == flood]
    assert flooded and flooded[-1].value == flood  # the newest progress was kept
    assert isinstance(events[-1], PromptDone) and events[-1].ok and events[-1].outputs


async def test_a_reader_behind_holds_only_the_newest_progress_and_preview(
    stream: ComfyEventStream, client: ComfyClient, fake: FakeComfy
) -> None:
    """A job's follow loop shows only the newest progress and preview: its subscription
    keeps one of each unread (a preview is ~65 KB; at 2,000 jobs those queued were most
    of the bot's memory), every other event in order, and drops what is left unread of
    them when the prompt's end arrives (the reader skips to it)."""
    seen: list = []
    stream.add_listener(lambda e: seen.append(e) if e.prompt_id == "p-newest" else None)
    fake.pause_sampling()
    sub = stream.subscribe("p-newest", latest_only=True)
    await client.queue_prompt(txt2img(), prompt_id="p-newest")
    await fake.flood_progress("p-newest", 6, latent_preview_jpeg(8, 8))
    await until(lambda: sum(isinstance(e, PreviewEvent) for e in seen) == 6)
    waiting = sub.drain()  # the reader wakes up six steps late
    sent = [e for e in seen if isinstance(e, PreviewEvent)]
    previews = [e for e in waiting if isinstance(e, PreviewEvent)]
    assert len(previews) == 1 and previews[0] is sent[-1]
    assert [e.value for e in waiting if isinstance(e, Progress)] == [6]
    assert sub.shed == len(seen) - len(waiting) >= 5 + 5  # all but the newest of each
    newest_only = (PreviewEvent, Progress, ProgressState)
    before = [e for e in seen if not isinstance(e, newest_only)]
    assert [e for e in waiting if not isinstance(e, newest_only)] == before
    # Behind again while the prompt runs to its end: only the end and the other events.
    mark = len(seen)
    fake.resume_sampling()
    await until(lambda: any(isinstance(e, PromptDone) for e in seen))
    events = sub.drain()
    ran = seen[mark : next(i for i, e in enumerate(seen) if isinstance(e, PromptDone)) + 1]
    assert any(isinstance(e, newest_only) for e in ran)  # it did send progress meanwhile
    assert events == [e for e in ran if not isinstance(e, newest_only)]
    assert isinstance(events[-1], PromptDone) and events[-1].ok and events[-1].outputs


async def test_settle_waits_through_progress_and_returns_at_the_prompts_end(
    stream: ComfyEventStream, client: ComfyClient, fake: FakeComfy
) -> None:
    """A reader that settles wakes once for a burst of steps and previews (they replace
    each other while it waits), and at once when anything else arrives: here the end."""
    fake.pause_sampling()
    sub = stream.subscribe("p-settle", latest_only=True)
    await client.queue_prompt(txt2img(), prompt_id="p-settle")
    await fake.wait_running("p-settle", node=SAMPLER, timeout=10)
    await until(lambda: any(isinstance(e, Executing) and e.node == SAMPLER
                            for e in sub.drain()))  # the reader handled all before it
    settling = asyncio.create_task(sub.settle(30))
    await fake.flood_progress("p-settle", 20, latent_preview_jpeg(8, 8))
    await asyncio.sleep(0.3)
    assert not settling.done()  # only progress and previews came: still waiting
    waiting = sub.drain()
    assert {type(e) for e in waiting} <= {Progress, PreviewEvent}
    assert [e.value for e in waiting if isinstance(e, Progress)] == [20]
    started = time.monotonic()
    fake.resume_sampling()
    await asyncio.wait_for(settling, 10)
    assert time.monotonic() - started < 5  # woken by what followed, not by its 30 s
    done = await sub.wait_done(timeout=10)
    assert done.ok


async def test_settle_returns_at_once_when_something_else_waits(
    stream: ComfyEventStream, client: ComfyClient, fake: FakeComfy
) -> None:
    fake.pause_sampling()
    sub = stream.subscribe("p-settled", latest_only=True)
    await client.queue_prompt(txt2img(), prompt_id="p-settled")
    await fake.wait_running("p-settled", timeout=10)
    await asyncio.wait_for(sub.settle(30), 1)  # the prompt's start is waiting unread
    sub.drain()
    settling = asyncio.create_task(sub.settle(30))
    await asyncio.sleep(0.1)
    assert not settling.done()
    sub.close()
    await asyncio.wait_for(settling, 1)  # closed while it waited
    fake.resume_sampling()


async def test_junk_queue_rows_do_not_stop_the_poll_loop(
    stream: ComfyEventStream, client: ComfyClient, fake: FakeComfy
) -> None:
    valid = [0, "p-queued", {}, {"client_id": client.client_id}, ["9"]]
    fake.hostile.junk("/queue", {
        "queue_running": [["x", "p-junk"], "junk", [1], [None, None], [True, "p"], {}],
        "queue_pending": [valid, [float("nan"), "p-nan"], [1e300, "p-big"], [2, ["p"]]],
    })
    state = await client.get_queue()
    assert state.running == () and state.pending_ids == ["p-queued"]
    stream.subscribe("p-queued")  # tracked and "queued": the poll loop keeps asking
    polls = sum(r.path == "/queue" for r in fake.requests)
    # The loop polls every 0.5 s here; it used to die on the first junk row.
    await until(lambda: sum(r.path == "/queue" for r in fake.requests) >= polls + 3)


async def test_a_junk_history_entry_ends_the_prompt_with_a_clear_error(
    stream: ComfyEventStream, client: ComfyClient, fake: FakeComfy
) -> None:
    fake.hostile.junk("/queue", {"queue_running": [], "queue_pending": []})
    fake.hostile.junk("/history/p-junk", {"p-junk": {"status": "junk", "outputs": []}})
    with pytest.raises(ComfyMalformed, match="malformed history entry"):
        await client.get_prompt_result("p-junk")
    sub = stream.subscribe("p-junk")
    await stream.reconcile()
    done = await sub.wait_done(20)
    assert done.status == "error" and isinstance(done.error, ComfyMalformed)
    fake.hostile.junk("/history/p-list", ["not", "an", "object"])
    with pytest.raises(ComfyMalformed):
        await client.get_history("p-list")


async def test_object_info_definitions_of_the_wrong_shape_are_dropped(
    client: ComfyClient, fake: FakeComfy
) -> None:
    real = fake.object_info()
    fake.hostile.junk("/object_info", {
        **real,
        "Bad1": "junk",
        "Bad2": {"input": "junk"},
        "Bad3": {"input": {"required": {"x": []}}},
        "Bad4": {"input": {"optional": ["x"]}, "output": []},
        "Bad5": {"output": "IMAGE"},
    })
    info = await client.object_info()
    assert "KSampler" in info and not any(name.startswith("Bad") for name in info)
    workflow = txt2img()
    workflow["50"] = {"class_type": "Bad1", "inputs": {}}
    problems = validate_against_object_info(workflow, info)
    assert problems == ["node 50: unknown node type 'Bad1'"]
    fake.hostile.junk("/object_info", ["junk"])
    with pytest.raises(ComfyMalformed):
        await client.object_info()


async def test_other_answers_of_the_wrong_shape_are_one_clear_error(
    client: ComfyClient, fake: FakeComfy
) -> None:
    fake.hostile.junk("/models", {"checkpoints": 1})
    fake.hostile.junk("/features", [1])
    fake.hostile.junk("/system_stats", {"system": "x", "devices": [{"vram_total": "9"}, 3]})
    fake.hostile.junk("/prompt", {"exec_info": {"queue_remaining": "7"}})
    for call in (client.list_model_folders, client.features, client.queue_remaining):
        with pytest.raises(ComfyMalformed):
            await call()
    stats = await client.system_stats()
    assert stats.devices[0].vram_total == 0 and stats.comfyui_version == ""


def test_deeply_nested_workflows_are_refused_clearly() -> None:
    with pytest.raises(ValidationFailed, match="nested too deeply"):
        load_api_workflow("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValidationFailed, match="nested too deeply"):
        load_api_workflow('{"1": {"class_type": "X", "inputs": {"a": ' + "[" * 40 + "]" * 40
                          + "}}}")
    deep_but_valid = {"1": {"class_type": "X", "inputs": {"a": [[[1]]]}}}
    assert load_api_workflow(str(deep_but_valid).replace("'", '"')) == deep_but_valid


# --------------------------------------------------------------------------- redirects


@pytest.mark.parametrize("status", [302, 307])
async def test_redirects_to_an_internal_url_are_not_followed(
    client: ComfyClient, fake: FakeComfy, recorder: HitRecorder, status: int
) -> None:
    for path in ("/object_info", "/view", "/history", "/queue"):
        fake.hostile.redirect(path, f"{recorder.url}/latest/meta-data{path}", status)
    calls: list[Callable[[], Awaitable[object]]] = [
        client.object_info, lambda: client.view("a.png"), lambda: client.get_history("p"),
        lambda: client.get_history(), client.get_queue,
    ]
    for call in calls:
        with pytest.raises(ComfyRedirectRefused, match="does not follow redirects"):
            await call()
    assert recorder.hits == []


async def test_the_websocket_handshake_is_not_redirected(
    fake: FakeComfy, http: aiohttp.ClientSession, client: ComfyClient, recorder: HitRecorder
) -> None:
    fake.hostile.redirect("/ws", f"{recorder.url}/internal-ws")
    stream = ComfyEventStream(fake.url, http, client.client_id, client=client,
                              reconnect_backoff=(0.02, 0.2))
    await stream.start(wait=False)
    try:
        await until(lambda: sum(r.path == "/ws" for r in fake.requests) >= 3)
        assert recorder.hits == [] and not stream.connected
        # Once the server stops redirecting, the same stream connects.
        fake.hostile.redirects.clear()
        await stream.wait_connected(20)
    finally:
        await stream.close()
    # The shared session was not closed with the stream's handshake session.
    assert not http.closed and (await client.system_stats()).devices


# --------------------------------------------------------------------------- sizes


async def test_a_300_mib_view_costs_at_most_the_cap(client: ComfyClient, fake: FakeComfy) -> None:
    fake.hostile.huge_answer("/view", 300 * MiB)  # chunked: no Content-Length to go by
    tracemalloc.start()
    try:
        with pytest.raises(ComfyResponseTooLarge, match="larger than 64 MiB"):
            await client.view("big.png")
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < DEFAULT_LIMITS.view + 16 * MiB
    assert fake.hostile.huge_sent < 150 * MiB  # the client hung up, it did not drain
    fake.hostile.huge.clear()
    # The client (and its session) stay usable.
    assert (await client.view("example.png", type="input")).startswith(b"\x89PNG")


async def test_a_declared_oversize_answer_is_refused_before_reading(
    client: ComfyClient, fake: FakeComfy
) -> None:
    fake.hostile.huge_answer("/history", 300 * MiB, declared=True)
    with pytest.raises(ComfyResponseTooLarge, match="/history/p"):
        await client.get_history("p")
    assert fake.hostile.huge_sent < 150 * MiB
    fake.hostile.huge.clear()
    assert await client.get_history("p") == {}


async def test_json_answers_have_their_own_smaller_cap(
    client: ComfyClient, fake: FakeComfy
) -> None:
    fake.hostile.huge_answer("/queue", DEFAULT_LIMITS.json + MiB)
    with pytest.raises(ComfyResponseTooLarge):
        await client.get_queue()
    fake.hostile.huge.clear()
    assert (await client.get_queue()).running == ()
