"""Property tests: arbitrary JSON (and bytes) into every parser of what a ComfyUI server
sends. Each raises only its documented error, never a TypeError or RecursionError that
would end an event task or reach a member as a traceback.

The JSON is biased towards ComfyUI's own keys and message types, so most examples get
past the first shape check and exercise the field parsing behind it.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.comfy.client import ComfyClient
from core.comfy.errors import ComfyError, ComfyMalformed, ComfyValidationError
from core.comfy.events import (
    ExecutionCached,
    NodeProgress,
    PreviewEvent,
    Progress,
    ProgressState,
    Status,
    TextEvent,
    decode_binary,
    decode_message,
)
from core.comfy.responses import (
    OutputImage,
    QueueState,
    clean_object_info,
    parse_history_entry,
    parse_queue_items,
    parse_queued,
)
from core.comfy.workflows import load_api_workflow, required_models, validate_against_object_info
from core.errors import ValidationFailed
from core.workflow_store import infer_param_map
from tests.fakecomfy import FakeComfy, facts

PROFILE = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

KEYS = [
    "type", "data", "prompt_id", "node", "display_node", "value", "max", "nodes", "status",
    "exec_info", "queue_remaining", "sid", "output", "images", "filename", "subfolder",
    "executed", "traceback", "exception_message", "exception_type", "node_id", "node_type",
    "timestamp", "state", "messages", "status_str", "completed", "outputs", "client_id",
    "input", "required", "optional", "hidden", "output_node", "class_type", "inputs",
    "image_type",
]
TYPES = [
    "status", "feature_flags", "execution_start", "execution_cached", "executing", "progress",
    "progress_state", "executed", "execution_success", "execution_error",
    "execution_interrupted", "execution_unknown",
]

scalars = (
    st.none() | st.booleans() | st.integers() | st.floats()
    | st.text(max_size=12) | st.sampled_from(TYPES + ["3", "9", "p", "output"])
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), children, max_size=6),
    max_leaves=25,
)


def mostly(good: st.SearchStrategy[Any], junk: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` nine times in ten (a plain ``|`` draws the junk half the time)."""
    return st.integers(0, 9).flatmap(lambda i: junk if i == 0 else good)


# Fields with values of the right type most of the time, junk (any JSON) otherwise: so
# many messages decode, and each field's check is met by wrong types one at a time.
ids = st.sampled_from(["p", "3", "9"]) | st.integers(0, 20)
counts = st.integers(-2, 30) | st.floats(-1, 30)
images = st.lists(st.fixed_dictionaries(
    {"filename": st.text(max_size=5)},
    optional={"subfolder": st.text(max_size=3), "type": st.sampled_from(["output", "temp"])},
), max_size=3)
PLAUSIBLE = {
    "prompt_id": ids, "node": ids | st.none(), "display_node": ids, "value": counts,
    "max": counts, "sid": st.text(max_size=4), "timestamp": st.integers(0, 2**41),
    "nodes": st.lists(ids, max_size=3) | st.dictionaries(
        st.sampled_from(["3", "9"]), st.fixed_dictionaries(
            {}, optional={"value": counts, "max": counts, "state": st.text(max_size=5),
                          "node_id": ids}), max_size=2),
    "status": st.fixed_dictionaries({}, optional={"exec_info": st.fixed_dictionaries(
        {}, optional={"queue_remaining": st.integers(0, 5)})}),
    "output": st.fixed_dictionaries({}, optional={"images": images}),
    "exception_message": st.text(max_size=10), "exception_type": st.text(max_size=5),
    "node_id": ids, "node_type": st.text(max_size=5), "executed": st.lists(ids, max_size=3),
    "traceback": st.lists(st.text(max_size=5), max_size=2),
}
message_data = st.fixed_dictionaries({}, optional={
    key: mostly(value, json_values) for key, value in PLAUSIBLE.items()
})
typed_messages = st.fixed_dictionaries(
    {"type": st.sampled_from(TYPES)}, optional={"data": mostly(message_data, json_values)}
)
messages = mostly(typed_messages, json_values)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@PROFILE
@given(messages)
def test_decode_message_raises_only_malformed(message: Any) -> None:
    try:
        event = decode_message(message)
    except ComfyMalformed as exc:
        assert str(exc).startswith("ComfyUI sent a malformed ")
        return
    # What is decoded has the types the consumers rely on.
    if isinstance(event, Progress):
        assert _number(event.value) and _number(event.max)
        assert event.value >= 0 and event.max >= 0
    elif isinstance(event, Status):
        assert isinstance(event.queue_remaining, int) and event.queue_remaining >= 0
    elif isinstance(event, ProgressState):
        assert all(isinstance(n, NodeProgress) and _number(n.value) for n in event.nodes.values())
    elif isinstance(event, ExecutionCached):
        assert all(isinstance(n, str) for n in event.nodes)
    prompt_id = getattr(event, "prompt_id", None)
    assert prompt_id is None or isinstance(prompt_id, str)
    for image in getattr(event, "images", ()):
        assert isinstance(image, OutputImage) and isinstance(image.filename, str)


@PROFILE
@given(json_values.map(json.dumps))
def test_decode_message_of_any_json_text(text: str) -> None:
    try:
        decode_message(json.loads(text))
    except ComfyMalformed:
        pass


frames = st.binary(max_size=64) | st.builds(
    lambda kind, second, meta, tail: struct.pack(">II", kind, second) + meta + tail,
    st.integers(0, 5),
    st.integers(0, 2**32 - 1) | st.integers(0, 80),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=16),
)


@PROFILE
@given(frames)
def test_decode_binary_raises_only_malformed(frame: bytes) -> None:
    try:
        event = decode_binary(frame, current_prompt="p", current_node="3")
    except ComfyMalformed:
        return
    assert event is None or isinstance(event, PreviewEvent | TextEvent)
    if isinstance(event, PreviewEvent):
        assert event.mime in ("image/jpeg", "image/png", "image/webp")
        assert event.prompt_id is None or isinstance(event.prompt_id, str)


history_messages = st.lists(mostly(st.tuples(
    st.sampled_from(["execution_start", "execution_error", "execution_interrupted"]),
    message_data).map(list), json_values), max_size=3)
history_entries = mostly(st.fixed_dictionaries({}, optional={
    "status": mostly(st.fixed_dictionaries({}, optional={
        "status_str": st.sampled_from(["success", "error"]), "completed": st.booleans(),
        "messages": mostly(history_messages, json_values)}), json_values),
    "outputs": mostly(st.dictionaries(ids.map(str), mostly(
        st.fixed_dictionaries({"images": images}), json_values), max_size=2), json_values),
}), st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6))


@PROFILE
@given(history_entries)
def test_history_entries_raise_only_malformed(entry: dict[str, Any]) -> None:
    try:
        result = parse_history_entry("p", entry)
    except ComfyMalformed:
        return
    assert result.status in ("success", "error", "interrupted")
    assert all(isinstance(o, OutputImage) for o in result.outputs)
    for text in (result.node_id, result.node_type, result.exception_message):
        assert text is None or isinstance(text, str)
    try:
        result.raise_for_status()
    except Exception as exc:  # noqa: BLE001 - the error must be a sentence, not a crash
        assert str(exc)


node_errors = st.dictionaries(ids.map(str), mostly(st.fixed_dictionaries({}, optional={
    "class_type": mostly(st.text(max_size=8), json_values),
    "errors": mostly(st.lists(mostly(st.fixed_dictionaries({}, optional={
        "type": st.sampled_from([
            "value_not_in_list", "required_input_missing", "value_bigger_than_max",
            "value_smaller_than_min", "invalid_input_type", "return_type_mismatch",
            "exception_during_inner_validation", "custom_validation_failed", "other"]),
        "message": mostly(st.text(max_size=8), json_values),
        "details": mostly(st.text(max_size=8), json_values),
        "extra_info": mostly(st.fixed_dictionaries({}, optional={
            "input_name": mostly(st.text(max_size=5), json_values),
            "input_config": json_values, "received_value": json_values,
            "received_type": json_values}), json_values),
    }), json_values), max_size=3), json_values),
}), json_values), max_size=3)


@PROFILE
@given(st.sampled_from([200, 400]), st.fixed_dictionaries({}, optional={
    "node_errors": mostly(node_errors, json_values), "error": json_values,
    "prompt_id": mostly(st.text(max_size=5), json_values), "number": json_values}))
def test_prompt_answers_raise_only_documented_errors(status: int, data: dict[str, Any]) -> None:
    try:
        queued = parse_queued(status, data)
    except ComfyValidationError as exc:
        assert str(exc).startswith("ComfyUI rejected the workflow")
        assert all(isinstance(p, str) for p in exc.problems()) and isinstance(exc.error_type, str)
        return
    except ComfyMalformed:
        return
    assert status == 200 and isinstance(queued.prompt_id, str)
    if queued.partial:
        str(ComfyValidationError(queued.node_errors, None))


queue_rows = st.lists(
    st.lists(json_values, max_size=6) | json_values, max_size=6
) | json_values


@PROFILE
@given(queue_rows, queue_rows)
def test_queue_rows_never_raise(running: Any, pending: Any) -> None:
    skipped: list[str] = []
    state = QueueState(
        running=parse_queue_items(running, lambda kind, _p: skipped.append(kind)),
        pending=parse_queue_items(pending),
    )
    assert all(isinstance(item.prompt_id, str) for item in (*state.running, *state.pending))
    assert state.position("p") is None or state.position("p") >= 0
    assert set(skipped) <= {"queue row"}


definitions = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), json_values,
                              max_size=5)
object_infos = st.dictionaries(
    st.sampled_from(["KSampler", "SaveImage", "CheckpointLoaderSimple", "X"]),
    definitions | json_values, max_size=4,
)
REAL_INFO = facts.object_info_entries()


@PROFILE
@given(object_infos, st.dictionaries(st.sampled_from(["1", "2", "3"]), json_values, max_size=3))
def test_object_info_and_workflows_never_raise_unexpectedly(
    info: dict[str, Any], workflow_json: dict[str, Any]
) -> None:
    cleaned = clean_object_info({**REAL_INFO, **info})
    try:
        workflow = load_api_workflow(json.dumps(workflow_json))
    except ValidationFailed:
        return
    problems = validate_against_object_info(workflow, cleaned)
    assert all(isinstance(p, str) for p in problems)
    required_models(workflow)
    infer_param_map(workflow)


@PROFILE
@given(st.text(max_size=200) | json_values.map(json.dumps))
def test_workflow_uploads_raise_only_validation_errors(text: str) -> None:
    try:
        load_api_workflow(text)
    except ValidationFailed:
        pass


# --------------------------------------------------------------------------- over a socket

answers = st.one_of(
    json_values,
    st.fixed_dictionaries({"p": history_entries}),
    st.fixed_dictionaries({"queue_running": queue_rows, "queue_pending": queue_rows}),
    object_infos,
    st.fixed_dictionaries({"exec_info": json_values}),
)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[asyncio.AbstractEventLoop, FakeComfy, ComfyClient]]:
    """One FakeComfy and one real client for every example (a loop of their own, since
    Hypothesis calls the test synchronously)."""
    loop = asyncio.new_event_loop()
    fake = FakeComfy()
    loop.run_until_complete(fake.start())

    async def session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    http = loop.run_until_complete(session())
    yield loop, fake, ComfyClient(fake.url, http, timeout=30.0, get_retries=0)
    loop.run_until_complete(http.close())
    loop.run_until_complete(fake.stop())
    loop.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers)
def test_the_client_raises_only_comfy_errors_for_any_answer(
    served: tuple[asyncio.AbstractEventLoop, FakeComfy, ComfyClient], body: Any
) -> None:
    loop, fake, client = served
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "/queue": client.get_queue,
        "/history/p": lambda: client.get_prompt_result("p"),
        "/object_info": client.object_info,
        "/system_stats": client.system_stats,
        "/prompt": client.queue_remaining,
        "/models": client.list_model_folders,
        "/features": client.features,
    }
    for path, call in calls.items():
        fake.hostile.junk_json = {path: body}
        try:
            loop.run_until_complete(call())
        except ComfyError as exc:
            assert str(exc)
