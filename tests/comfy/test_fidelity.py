"""The fake against the recorded facts: replay the real traces' requests and compare.

If one of these fails, the fake drifted from what a real ComfyUI 0.3.64 does; fix the
fake, not the expectation (tests/data/comfyui-traces/ are recordings, not opinions).
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from typing import Any

import aiohttp
import pytest

from tests.fakecomfy import FakeComfy, facts
from tests.fakecomfy.replay import record_prompt, trace_prompt_bodies, trace_shapes

SINGLE_RUNS = [
    ("06_prompt_success_simple", False),
    ("09_execution_error", False),
    ("09b_execution_error_corrupt_checkpoint", False),
    ("10_ksampler_progress_legacy_previews", False),
    ("11_ksampler_progress_preview_metadata", True),
    ("17_save_image_websocket", False),
    ("17b_save_image_websocket_preview_metadata", True),
    ("21_ksampler_batch2_preview_metadata", True),
]


@pytest.mark.parametrize(("trace", "feature_flags"), SINGLE_RUNS)
async def test_ws_stream_matches_trace(
    fake: FakeComfy, http: aiohttp.ClientSession, trace: str, feature_flags: bool
) -> None:
    body = trace_prompt_bodies(trace)[0]
    _answer, shapes, _raw = await record_prompt(http, fake.url, body, feature_flags=feature_flags)
    assert shapes == trace_shapes(trace)


async def test_no_previews_without_preview_method(http: aiohttp.ClientSession) -> None:
    trace = "18_ksampler_progress_no_previews"
    async with FakeComfy(previews=False) as fake:
        _a, shapes, _r = await record_prompt(http, fake.url, trace_prompt_bodies(trace)[0])
    assert shapes == trace_shapes(trace)
    assert not [s for s in shapes if s[0] == "binary"]


async def test_cached_rerun_matches_trace(fake: FakeComfy, http: aiohttp.ClientSession) -> None:
    trace = "07_prompt_cached_rerun"
    bodies = trace_prompt_bodies(trace)
    client_id = uuid.uuid4().hex
    async with http.ws_connect(f"{fake.url}/ws", params={"clientId": client_id}) as ws:
        await ws.receive_json()
        for index, body in enumerate(bodies):
            _a, shapes, _r = await record_prompt(http, fake.url, body, ws=ws, client_id=client_id)
            assert shapes == trace_shapes(trace, index)
    assert trace_shapes(trace, 1)[3][2] == ("1", "2", "3", "4")  # all cached on the rerun


async def test_client_prompt_id_reused_matches_trace(
    fake: FakeComfy, http: aiohttp.ClientSession
) -> None:
    trace = "23_client_supplied_prompt_id"
    bodies = trace_prompt_bodies(trace)
    for index, body in enumerate(bodies):
        answer, shapes, raw = await record_prompt(http, fake.url, body)
        assert answer["prompt_id"] == body["prompt_id"]
        assert shapes == trace_shapes(trace, index)
        assert all(m["data"].get("prompt_id", body["prompt_id"]) == body["prompt_id"] for m in raw
                   if m["type"] != "status")
    history = await (await http.get(f"{fake.url}/history/{bodies[0]['prompt_id']}")).json()
    entry = history[bodies[0]["prompt_id"]]
    recorded = facts.http_events(facts.load_trace(trace), label="history_after_reuse")[0]
    assert entry["prompt"][2] == bodies[1]["prompt"]  # the second run replaced the entry
    assert _keys(entry) == _keys(recorded["response"]["json"][bodies[0]["prompt_id"]])


async def test_without_client_id_only_broadcasts(
    fake: FakeComfy, http: aiohttp.ClientSession
) -> None:
    trace = facts.load_trace("14_prompt_without_client_id")
    recorded_types = {e["message"]["type"] for e in facts.ws_in(trace) if e["frame"] == "text"}
    body = trace_prompt_bodies("14_prompt_without_client_id")[1]
    assert "client_id" not in body
    async with http.ws_connect(f"{fake.url}/ws", params={"clientId": "observer"}) as ws:
        await ws.receive_json()
        async with http.post(f"{fake.url}/prompt", json=body) as resp:
            prompt_id = (await resp.json())["prompt_id"]
        await fake.wait_idle()
        types: set[str] = set()
        binary = 0
        while True:
            try:
                msg = await ws.receive(timeout=0.2)
            except TimeoutError:
                break
            if msg.type == aiohttp.WSMsgType.TEXT:
                types.add(msg.json()["type"])
            else:
                binary += 1
    assert types == recorded_types == {"status", "progress_state", "progress"}
    assert binary == 4  # legacy type-1 previews, one per step
    history = await (await http.get(f"{fake.url}/history/{prompt_id}")).json()
    assert history[prompt_id]["status"]["status_str"] == "success"


def _keys(value: Any) -> Any:
    """The key structure of a JSON value (values dropped), for shape comparisons."""
    if isinstance(value, dict):
        return {k: _keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_keys(v) for v in value[:1]]
    return type(value).__name__


VALIDATION_LABELS = [
    "bad_node_class", "missing_required_input", "value_bigger_than_max", "invalid_input_type",
    "value_not_in_list", "two_errors_one_node", "link_to_missing_node_only_output",
    "return_type_mismatch_only_output", "no_output_node", "no_prompt_key",
    "loadimage_missing_file", "missing_class_type", "link_to_missing_node",
    "return_type_mismatch",
]


@pytest.mark.parametrize("label", VALIDATION_LABELS)
async def test_validation_answers_match_trace(
    fake: FakeComfy, http: aiohttp.ClientSession, label: str
) -> None:
    event = facts.http_events(facts.load_trace("08_prompt_validation_errors"), label=label)[0]
    expected = event["response"]
    async with http.post(f"{fake.url}/prompt", json=event["request"]["json"]) as resp:
        assert resp.status == expected["status"]
        body = await resp.json()
    want = copy.deepcopy(expected["json"])
    if resp.status == 200:
        for value in (body, want):
            value["prompt_id"], value["number"] = "X", 0
    _normalise_sets(body)
    _normalise_sets(want)
    assert body == want


def _normalise_sets(body: dict[str, Any]) -> None:
    # ComfyUI builds these lists from Python sets: their order is random per process.
    for entry in body.get("node_errors", {}).values():
        entry["dependent_outputs"] = sorted(entry["dependent_outputs"])
        entry["errors"] = sorted(entry["errors"], key=lambda e: e["details"])
    if body.get("error", {}).get("details", "").startswith("Value"):
        body["error"]["details"] = "\n".join(sorted(body["error"]["details"].split("\n")))


async def test_malformed_json_is_a_500_like_trace(
    fake: FakeComfy, http: aiohttp.ClientSession
) -> None:
    expected = facts.http_events(facts.load_trace("08_prompt_validation_errors"),
                                 label="malformed_json_body")[0]["response"]
    async with http.post(f"{fake.url}/prompt", data=b"{this is not json",
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == expected["status"] == 500
        assert await resp.text() == expected["text"]


async def test_validation_failure_sends_nothing_and_counts(
    fake: FakeComfy, http: aiohttp.ClientSession
) -> None:
    bad = facts.http_events(facts.load_trace("08_prompt_validation_errors"),
                            label="value_not_in_list")[0]["request"]["json"]
    good = trace_prompt_bodies("06_prompt_success_simple")[0]
    before = len(fake.sent)
    async with http.post(f"{fake.url}/prompt", json=bad) as resp:
        assert resp.status == 400
    assert len(fake.sent) == before
    async with http.post(f"{fake.url}/prompt", json=good) as resp:
        assert (await resp.json())["number"] == 1  # the rejected POST used number 0


@pytest.mark.parametrize(
    ("trace", "path"),
    [("02_system_stats", "/system_stats"), ("04_models", "/models"),
     ("04_models", "/models/checkpoints"), ("04_models", "/models/no_such_folder"),
     ("05_misc_gets", "/features"), ("05_misc_gets", "/prompt"), ("05_misc_gets", "/queue"),
     ("05_misc_gets", "/embeddings"), ("03_object_info", "/object_info/KSampler"),
     ("03_object_info", "/object_info/CheckpointLoaderSimple"),
     ("03_object_info", "/object_info/NoSuchNode")],
)
async def test_get_answers_match_trace(
    fake: FakeComfy, http: aiohttp.ClientSession, trace: str, path: str
) -> None:
    expected = facts.http_events(facts.load_trace(trace), path=path, method="GET")[0]["response"]
    async with http.get(f"{fake.url}{path}") as resp:
        assert resp.status == expected["status"]
        if expected["status"] == 200:
            assert resp.headers["Content-Type"] == expected["headers"]["Content-Type"]
            assert await resp.json() == expected["json"]
        else:
            assert await resp.read() == b""


async def test_object_info_entries_match_trace(
    fake: FakeComfy, http: aiohttp.ClientSession
) -> None:
    recorded = facts.http_events(facts.load_trace("03_object_info"), path="/object_info")[0]
    entries = recorded["response"]["json"]["entries"]
    served = await (await http.get(f"{fake.url}/object_info")).json()
    for name, definition in entries.items():
        assert served[name] == definition, name


async def test_ws_handshakes_match_trace(fake: FakeComfy, http: aiohttp.ClientSession) -> None:
    trace = facts.load_trace("01_ws_connect")
    flags = [e["message"] for e in facts.ws_in(trace, "with_feature_flags")]
    async with http.ws_connect(f"{fake.url}/ws", params={"clientId": "abc"}) as ws:
        await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
        first, second = await ws.receive_json(), await ws.receive_json()
    assert first == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}},
                                                 "sid": "abc"}}
    assert second == flags[1]
    async with http.ws_connect(f"{fake.url}/ws") as ws:
        hello = await ws.receive_json()
    assert len(hello["data"]["sid"]) == 32 and int(hello["data"]["sid"], 16) >= 0


async def test_uploads_match_trace(fake: FakeComfy, http: aiohttp.ClientSession) -> None:
    trace = facts.load_trace("13_upload_image")
    png_97, png_98 = b"\x89PNG" + b"a" * 93, b"\x89PNG" + b"b" * 94

    async def upload(name: str, data: bytes | None, **fields: str) -> tuple[int, Any]:
        form = aiohttp.FormData()
        if data is not None:
            form.add_field("image", data, filename=name, content_type="image/png")
        for key, value in fields.items():
            form.add_field(key, value)
        async with http.post(f"{fake.url}/upload/image", data=form) as resp:
            return resp.status, (await resp.json() if resp.status == 200 else None)

    name = "trace_upload_effd49.png"
    cases = {
        "new_file": (name, png_97, {}),
        "same_name_same_bytes": (name, png_97, {}),
        "same_name_different_bytes": (name, png_98, {}),
        "overwrite_true": (name, png_98, {"overwrite": "true"}),
        "subfolder": (name, png_97, {"subfolder": "discord", "type": "input"}),
        "type_temp": (name, png_97, {"type": "temp"}),
        "missing_image_field": (name, None, {"overwrite": "true"}),
        "path_traversal_via_aiohttp_formdata": ("../evil.png", png_97, {}),
    }
    for label, (filename, data, fields) in cases.items():
        expected = facts.http_events(trace, label=label)[0]["response"]
        status, body = await upload(filename, data, **fields)
        assert status == expected["status"], label
        if status == 200:
            assert body == expected["json"], label


async def test_history_and_view_match_trace(fake: FakeComfy, http: aiohttp.ClientSession) -> None:
    body = trace_prompt_bodies("06_prompt_success_simple")[0]
    answer, _s, _r = await record_prompt(http, fake.url, body)
    prompt_id = answer["prompt_id"]
    recorded = facts.http_events(facts.load_trace("06_prompt_success_simple"),
                                 path=f"/history/{_trace_prompt_id('06_prompt_success_simple')}")
    got = (await (await http.get(f"{fake.url}/history/{prompt_id}")).json())[prompt_id]
    want = next(iter(recorded[0]["response"]["json"].values()))
    assert _keys(got) == _keys(want)
    assert got["prompt"][4] in (["4", "3"], ["3", "4"])
    assert [m[0] for m in got["status"]["messages"]] == [m[0] for m in want["status"]["messages"]]
    image = got["outputs"]["3"]["images"][0]
    async with http.get(f"{fake.url}/view", params=image) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "image/png"
        assert resp.headers["Content-Disposition"] == f'filename="{image["filename"]}"'
        assert (await resp.read())[:8] == b"\x89PNG\r\n\x1a\n"
    view_trace = facts.load_trace("16_view_variants")
    for label in ("missing_file", "path_traversal", "unknown_type", "no_filename"):
        request = facts.http_events(view_trace, label=label)[0]
        async with http.get(f"{fake.url}/view", params=request["request"].get("query")) as resp:
            assert resp.status == request["response"]["status"], label
    async with http.get(f"{fake.url}/view",
                        params={"filename": f"{image['filename']} [output]"}) as resp:
        assert resp.status == 200
    assert (await (await http.get(f"{fake.url}/history/unknown")).json()) == {}
    async with http.post(f"{fake.url}/history", json={"delete": [prompt_id]}) as resp:
        assert resp.status == 200 and await resp.read() == b""
    assert (await (await http.get(f"{fake.url}/history/{prompt_id}")).json()) == {}


def _trace_prompt_id(name: str) -> str:
    post = facts.http_events(facts.load_trace(name), path="/prompt", method="POST")[0]
    return str(post["response"]["json"]["prompt_id"])


async def test_reconnect_mid_run_matches_trace(
    fake: FakeComfy, http: aiohttp.ClientSession
) -> None:
    trace = facts.load_trace("22_ws_reconnect_mid_run")
    second = [e["message"] for e in facts.ws_in(trace, "second") if e["frame"] == "text"][:2]
    body = trace_prompt_bodies("22_ws_reconnect_mid_run")[0]
    fake.pause_sampling()
    client_id = uuid.uuid4().hex
    async with http.ws_connect(f"{fake.url}/ws", params={"clientId": client_id}) as ws:
        await ws.receive_json()
        await http.post(f"{fake.url}/prompt", json={**body, "client_id": client_id})
        await fake.wait_running(node="3")
    async with http.ws_connect(f"{fake.url}/ws", params={"clientId": client_id}) as ws:
        hello, replay = await ws.receive_json(), await ws.receive_json()
        fake.resume_sampling()
        assert hello["data"]["status"] == second[0]["data"]["status"]
        assert replay == second[1] == {"type": "executing", "data": {"node": "3"}}
        while True:  # the stream continues on the new socket
            msg = await ws.receive(timeout=5)
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = msg.json()
            if data["type"] == "executing" and data["data"]["node"] is None:
                break


@pytest.mark.parametrize("targeted", [False, True])
async def test_interrupt_matches_trace(
    fake: FakeComfy, http: aiohttp.ClientSession, targeted: bool
) -> None:
    name = "19_interrupt_targeted" if targeted else "12_queue_running_delete_interrupt"
    trace = facts.load_trace(name)
    body = trace_prompt_bodies(name)[0]
    expected = [s for s in trace_shapes(name) if s[0] in (
        "execution_interrupted", "status", "executing")][-3:]
    fake.pause_sampling()
    recorder = asyncio.create_task(record_prompt(http, fake.url, body))
    await fake.wait_running(node="3")
    prompt_id = fake.running_prompt_id
    await http.post(f"{fake.url}/interrupt", json={"prompt_id": "not-running"})
    payload = {"prompt_id": prompt_id} if targeted else None
    async with http.post(f"{fake.url}/interrupt", json=payload) as resp:
        assert resp.status == 200 and await resp.read() == b""
    fake.resume_sampling()
    _answer, shapes, _raw = await recorder
    # The queue count in "status" differs (trace 12 had B pending); types and keys do not.
    assert [x[:2] for x in shapes[-3:]] == [x[:2] for x in expected]
    assert shapes[-3] == expected[0]
    entry = (await (await http.get(f"{fake.url}/history/{prompt_id}")).json())[prompt_id]
    recorded = facts.http_events(trace, path=f"/history/{_trace_prompt_id(name)}")[-1]
    want = recorded["response"]["json"][_trace_prompt_id(name)]
    assert entry["status"]["status_str"] == want["status"]["status_str"] == "error"
    assert entry["outputs"] == want["outputs"] == {} and entry["meta"] == {}
    assert [m[0] for m in entry["status"]["messages"]] == [m[0] for m in want["status"]["messages"]]


async def test_queue_front_delete_clear_match_trace(
    fake: FakeComfy, http: aiohttp.ClientSession
) -> None:
    bodies = trace_prompt_bodies("20_queue_clear_and_front")
    fake.pause_sampling()
    numbers = []
    for body in bodies:
        async with http.post(f"{fake.url}/prompt", json=body) as resp:
            numbers.append((await resp.json())["number"])
        if body is bodies[0]:
            await fake.wait_running(node="3")
    assert numbers[2] < 0 < numbers[1]  # front:true -> negative number
    queue = await (await http.get(f"{fake.url}/queue")).json()
    assert [item[0] for item in queue["queue_pending"]] == [numbers[2], numbers[1]]
    assert len(queue["queue_running"][0]) == 5
    await http.post(f"{fake.url}/queue", json={"clear": True})
    queue = await (await http.get(f"{fake.url}/queue")).json()
    assert queue["queue_pending"] == [] and len(queue["queue_running"]) == 1
    info = await (await http.get(f"{fake.url}/prompt")).json()
    assert info == {"exec_info": {"queue_remaining": 1}}
    await http.post(f"{fake.url}/interrupt")
    fake.resume_sampling()
    await fake.wait_idle()
    free = {"unload_models": True, "free_memory": True}
    async with http.post(f"{fake.url}/free", json=free) as resp:
        assert resp.status == 200


async def test_origin_check(fake: FakeComfy, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{fake.url}/queue", headers={"Origin": "http://localhost:1"}) as resp:
        assert resp.status == 403
