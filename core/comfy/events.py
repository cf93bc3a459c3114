"""The ComfyUI WebSocket event stream, decoded into typed events.

One :class:`ComfyEventStream` holds one WebSocket per server at ``/ws?clientId=<id>``; the
same ``client_id`` must be sent with every ``POST /prompt``, because ComfyUI sends
``execution_*``/``executing``/``executed`` only to the prompt's own client socket (trace 14).

Facts from the recorded traces (tests/data/comfyui-traces/) this module relies on:

* For one prompt: ``status`` x2, ``execution_start``, ``execution_cached``, per node
  ``progress_state``/``executing``/[``progress`` + preview]/[``executed``]/``progress_state``,
  then ``execution_success`` | ``execution_error`` | ``execution_interrupted``, ``status``,
  and finally ``executing {node: null, prompt_id}`` -- the end-of-prompt signal, sent
  after the history entry is written. A success whose images all arrived in ``executed``
  messages is finished at ``execution_success`` already: delivery starts one message
  (and the history write) sooner.
* Binary frames start with a big-endian u32 type: 1 = ``[fmt u32][image]`` (fmt 1 JPEG,
  2 PNG) with no prompt id, 4 = ``[json_len u32][json metadata][image]`` once the client
  sent ``feature_flags {supports_preview_metadata: true}`` as its first frame, 3 = text
  (read from ComfyUI's code, never observed). Type 2 (UNENCODED_PREVIEW_IMAGE) is internal
  to the server: it is encoded into type 1 before it is sent, so it never reaches us.
* After a reconnect with the same clientId during a run the server sends ``status`` and
  ``executing {node}`` *without* prompt_id (trace 22); everything sent while we were away
  is lost, so after each reconnect the state of every tracked prompt is recovered from
  ``/queue`` and ``/history``, and a :class:`PromptDone` is synthesised for prompts that
  finished meanwhile. Each tracked prompt gets exactly one :class:`PromptDone`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import struct
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from core.comfy.client import ComfyClient
from core.comfy.errors import (
    ComfyError,
    ComfyExecutionError,
    ComfyInterrupted,
    ComfyPromptLost,
    ComfyUnreachable,
)
from core.comfy.responses import OutputImage, PromptResult, parse_images

log = logging.getLogger(__name__)

# Binary event types (comfy server.py BinaryEventTypes).
BINARY_PREVIEW_IMAGE = 1
BINARY_UNENCODED_PREVIEW_IMAGE = 2
BINARY_TEXT = 3
BINARY_PREVIEW_IMAGE_WITH_METADATA = 4
_PREVIEW_FORMATS = {1: "image/jpeg", 2: "image/png"}

# Previews are ~55-80 KB JPEGs, but SaveImageWebsocket sends full-size PNGs (trace 17).
_MAX_WS_MESSAGE = 256 * 1024 * 1024


# ---------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Status:
    queue_remaining: int
    sid: str | None = None
    prompt_id: None = None


@dataclass(frozen=True, slots=True)
class FeatureFlags:
    flags: dict[str, Any]
    prompt_id: None = None


@dataclass(frozen=True, slots=True)
class ExecutionStart:
    prompt_id: str
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class ExecutionCached:
    prompt_id: str
    nodes: tuple[str, ...]
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class Executing:
    """A node started. ``node is None`` with a prompt_id is the end of that prompt;
    ``prompt_id is None`` is the replay sent after a reconnect (trace 22)."""

    prompt_id: str | None
    node: str | None
    display_node: str | None = None


@dataclass(frozen=True, slots=True)
class NodeProgress:
    node_id: str
    value: float
    max: float
    state: str
    display_node_id: str | None = None
    parent_node_id: str | None = None
    real_node_id: str | None = None


@dataclass(frozen=True, slots=True)
class ProgressState:
    """The full per-node progress so far (not a delta)."""

    prompt_id: str
    nodes: dict[str, NodeProgress]


@dataclass(frozen=True, slots=True)
class Progress:
    prompt_id: str | None
    node: str | None
    value: int
    max: int


@dataclass(frozen=True, slots=True)
class Executed:
    prompt_id: str
    node: str
    display_node: str | None
    output: dict[str, Any]
    images: tuple[OutputImage, ...]


@dataclass(frozen=True, slots=True)
class ExecutionSuccess:
    prompt_id: str
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class ExecutionError:
    prompt_id: str
    node_id: str | None
    node_type: str | None
    exception_message: str
    exception_type: str
    executed: tuple[str, ...] = ()
    traceback: tuple[str, ...] = ()
    timestamp: int | None = None

    def to_exception(self) -> ComfyExecutionError:
        return ComfyExecutionError(
            self.node_id,
            self.node_type,
            self.exception_message,
            exception_type=self.exception_type,
            prompt_id=self.prompt_id,
        )


@dataclass(frozen=True, slots=True)
class ExecutionInterrupted:
    prompt_id: str
    node_id: str | None
    node_type: str | None
    executed: tuple[str, ...] = ()
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class PreviewEvent:
    """A preview image. Legacy type-1 frames carry no ids; we attribute them to the
    prompt/node currently running for our client, because ComfyUI sends them only to
    that prompt's socket and runs one prompt at a time."""

    prompt_id: str | None
    node_id: str | None
    image_bytes: bytes = field(repr=False)
    mime: str
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class TextEvent:
    prompt_id: str | None
    node_id: str
    text: str


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    type: str
    data: Any
    prompt_id: str | None = None


@dataclass(frozen=True, slots=True)
class Disconnected:
    reason: str
    prompt_id: None = None


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The socket is back; tracked prompts are being reconciled from /queue + /history."""

    attempts: int
    downtime: float
    prompt_id: None = None


DoneStatus = Literal["success", "error", "interrupted", "lost"]


@dataclass(frozen=True, slots=True)
class PromptDone:
    """Synthesised by the stream, exactly once per tracked prompt: the prompt is over.

    ``recovered`` is True when the outcome came from ``/history`` (or from its absence)
    instead of the live messages, e.g. because the socket was down when it finished.
    """

    prompt_id: str
    status: DoneStatus
    outputs: tuple[OutputImage, ...] = ()
    error: ComfyError | None = None
    recovered: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def raise_for_status(self) -> None:
        if self.error is not None:
            raise self.error


ComfyEvent = (
    Status
    | FeatureFlags
    | ExecutionStart
    | ExecutionCached
    | Executing
    | ProgressState
    | Progress
    | Executed
    | ExecutionSuccess
    | ExecutionError
    | ExecutionInterrupted
    | PreviewEvent
    | TextEvent
    | UnknownMessage
    | Disconnected
    | Reconnected
    | PromptDone
)
Listener = Callable[[ComfyEvent], None]

# Events that concern the connection, handed to every subscription.
_CONNECTION_EVENTS = (Disconnected, Reconnected)


# ---------------------------------------------------------------------------------------
# Decoding (pure functions)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def decode_message(message: dict[str, Any]) -> ComfyEvent:
    """Decode one text frame ``{"type":..., "data":...}``."""
    kind = str(message.get("type", ""))
    data = message.get("data")
    if not isinstance(data, dict):
        return UnknownMessage(kind, data)
    pid = _opt_str(data.get("prompt_id"))
    ts = data.get("timestamp")
    if kind == "status":
        info = (data.get("status") or {}).get("exec_info") or {}
        return Status(int(info.get("queue_remaining", 0)), _opt_str(data.get("sid")))
    if kind == "feature_flags":
        return FeatureFlags(dict(data))
    if pid is None and kind != "executing" and kind != "progress":
        return UnknownMessage(kind, data)
    if kind == "execution_start":
        return ExecutionStart(str(pid), ts)
    if kind == "execution_cached":
        return ExecutionCached(str(pid), tuple(str(n) for n in data.get("nodes") or ()), ts)
    if kind == "executing":
        return Executing(pid, _opt_str(data.get("node")), _opt_str(data.get("display_node")))
    if kind == "progress":
        return Progress(pid, _opt_str(data.get("node")), data.get("value", 0), data.get("max", 0))
    if kind == "progress_state":
        nodes = {
            str(node_id): NodeProgress(
                node_id=str(info.get("node_id", node_id)),
                value=info.get("value", 0),
                max=info.get("max", 0),
                state=str(info.get("state", "")),
                display_node_id=_opt_str(info.get("display_node_id")),
                parent_node_id=_opt_str(info.get("parent_node_id")),
                real_node_id=_opt_str(info.get("real_node_id")),
            )
            for node_id, info in (data.get("nodes") or {}).items()
            if isinstance(info, dict)
        }
        return ProgressState(str(pid), nodes)
    if kind == "executed":
        node = str(data.get("node"))
        output = data.get("output") or {}
        return Executed(
            str(pid),
            node,
            _opt_str(data.get("display_node")),
            dict(output),
            tuple(parse_images(node, output)),
        )
    if kind == "execution_success":
        return ExecutionSuccess(str(pid), ts)
    if kind == "execution_error":
        return ExecutionError(
            prompt_id=str(pid),
            node_id=_opt_str(data.get("node_id")),
            node_type=_opt_str(data.get("node_type")),
            exception_message=str(data.get("exception_message") or ""),
            exception_type=str(data.get("exception_type") or ""),
            executed=tuple(str(n) for n in data.get("executed") or ()),
            traceback=tuple(str(line) for line in data.get("traceback") or ()),
            timestamp=ts,
        )
    if kind == "execution_interrupted":
        return ExecutionInterrupted(
            prompt_id=str(pid),
            node_id=_opt_str(data.get("node_id")),
            node_type=_opt_str(data.get("node_type")),
            executed=tuple(str(n) for n in data.get("executed") or ()),
            timestamp=ts,
        )
    return UnknownMessage(kind, data, pid)


def decode_binary(
    frame: bytes, *, current_prompt: str | None = None, current_node: str | None = None
) -> PreviewEvent | TextEvent | None:
    """Decode one binary frame; None for types we do not understand."""
    if len(frame) < 8:
        return None
    (event_type,) = struct.unpack(">I", frame[:4])
    if event_type == BINARY_PREVIEW_IMAGE:
        (fmt,) = struct.unpack(">I", frame[4:8])
        mime = _PREVIEW_FORMATS.get(fmt, "application/octet-stream")
        return PreviewEvent(current_prompt, current_node, frame[8:], mime)
    if event_type == BINARY_PREVIEW_IMAGE_WITH_METADATA:
        (length,) = struct.unpack(">I", frame[4:8])
        try:
            meta = json.loads(frame[8 : 8 + length])
        except ValueError:
            return None
        if not isinstance(meta, dict):
            return None
        return PreviewEvent(
            _opt_str(meta.get("prompt_id")),
            _opt_str(meta.get("node_id")),
            frame[8 + length :],
            str(meta.get("image_type") or "image/jpeg"),
            meta,
        )
    if event_type == BINARY_TEXT:
        (length,) = struct.unpack(">I", frame[4:8])
        node_id = frame[8 : 8 + length].decode("utf-8", "replace")
        return TextEvent(current_prompt, node_id, frame[8 + length :].decode("utf-8", "replace"))
    return None


# ---------------------------------------------------------------------------------------
# Subscriptions

_CLOSED = object()


class EventSubscription:
    """Events for one prompt (or all events): ``await sub.get()`` or ``async for``.

    A prompt subscription ends after its :class:`PromptDone`; every subscription ends when
    it is closed or the stream closes.
    """

    def __init__(self, stream: ComfyEventStream, prompt_id: str | None) -> None:
        self._stream = stream
        self.prompt_id = prompt_id
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._ended = False

    def _put(self, event: Any) -> None:
        self._queue.put_nowait(event)

    async def get(self, timeout: float | None = None) -> ComfyEvent:
        """The next event; raises StopAsyncIteration once the subscription ended."""
        if self._ended:
            raise StopAsyncIteration
        if timeout is None:
            item = await self._queue.get()
        else:
            # asyncio.timeout, not wait_for: no extra task per event (this is the hot path).
            async with asyncio.timeout(timeout):
                item = await self._queue.get()
        if item is _CLOSED:
            self._ended = True
            raise StopAsyncIteration
        if isinstance(item, PromptDone) and self.prompt_id is not None:
            self._ended = True
        return item  # type: ignore[no-any-return]

    def drain(self) -> list[ComfyEvent]:
        """The events already waiting, without blocking (so a slow reader can skip stale
        progress and previews instead of replaying them one by one)."""
        items: list[ComfyEvent] = []
        while not self._ended:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if item is _CLOSED:
                self._queue.put_nowait(item)  # let the next get() see the end
                break
            items.append(item)
            if isinstance(item, PromptDone) and self.prompt_id is not None:
                self._ended = True
        return items

    async def wait_done(self, timeout: float | None = None) -> PromptDone:
        """Skip to this prompt's :class:`PromptDone`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            event = await self.get(left)
            if isinstance(event, PromptDone):
                return event

    def __aiter__(self) -> AsyncIterator[ComfyEvent]:
        return self

    async def __anext__(self) -> ComfyEvent:
        return await self.get()

    def close(self) -> None:
        self._stream._unsubscribe(self)
        self._queue.put_nowait(_CLOSED)

    async def __aenter__(self) -> EventSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True)
class _Tracked:
    prompt_id: str
    since: float
    seen: bool = False  # seen in the queue or in a message: it was really submitted
    gap: bool = False  # the socket was down while it was live: live data is incomplete
    outputs: list[OutputImage] = field(default_factory=list)
    terminal: ExecutionSuccess | ExecutionError | ExecutionInterrupted | None = None
    done: bool = False


# ---------------------------------------------------------------------------------------


class ComfyEventStream:
    """One reconnecting WebSocket to a ComfyUI server, fanned out to subscribers."""

    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        client_id: str,
        *,
        reconnect_backoff: tuple[float, float] = (0.5, 10.0),
        client: ComfyClient | None = None,
        connect_timeout: float = 10.0,
        heartbeat: float = 20.0,
        poll_interval: float = 30.0,
        lost_grace: float = 30.0,
        preview_metadata: bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self._session = session
        self._backoff = reconnect_backoff
        self._client = client or ComfyClient(self.base_url, session, client_id=client_id)
        self._connect_timeout = connect_timeout
        self._heartbeat = heartbeat
        # While prompts are tracked, /queue + /history are checked this often even when
        # connected: ComfyUI drops a socket from its table if an *older* socket with the
        # same clientId closes after the new one registered, and then sends us nothing.
        self._poll_interval = poll_interval
        self._lost_grace = lost_grace
        self._preview_metadata = preview_metadata

        self._subs: dict[str, list[EventSubscription]] = {}
        self._all_subs: list[EventSubscription] = []
        self._listeners: list[Listener] = []
        self._tracked: dict[str, _Tracked] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._reconcile_lock = asyncio.Lock()
        self._current_prompt: str | None = None
        self._current_node: str | None = None
        self.queue_remaining: int | None = None
        self.server_features: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"ComfyEventStream({self.base_url!r}, connected={self.connected})"

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def client(self) -> ComfyClient:
        return self._client

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, *, wait: bool = True, timeout: float = 10.0) -> None:
        """Start the background connection. With ``wait`` block until the first connect;
        on timeout raise :class:`ComfyUnreachable` (the stream keeps trying)."""
        if self._runner is None:
            self._runner = self._spawn(self._run(), "ws-runner")
            self._spawn(self._poll_loop(), "poll")
        if wait:
            await self.wait_connected(timeout)

    async def wait_connected(self, timeout: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError as exc:
            raise ComfyUnreachable(self.base_url, "no WebSocket connection") from exc

    async def close(self) -> None:
        """Stop reconnecting, close the socket, end every subscription."""
        self._closing = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5.0)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        self._connected.clear()
        for sub in [*self._all_subs, *(s for subs in self._subs.values() for s in subs)]:
            sub._put(_CLOSED)
        self._subs.clear()
        self._all_subs.clear()
        self._tracked.clear()

    async def __aenter__(self) -> ComfyEventStream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"comfy-events:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error(
                "ComfyUI event task %s for %s failed",
                task.get_name(),
                self.base_url,
                exc_info=exc,
            )

    # -- subscriptions -------------------------------------------------------------------

    def subscribe(self, prompt_id: str) -> EventSubscription:
        """Events of one prompt, ending with exactly one :class:`PromptDone`.

        Subscribe *before* queueing (with your own prompt_id) so no message is missed.
        """
        sub = EventSubscription(self, prompt_id)
        self._subs.setdefault(prompt_id, []).append(sub)
        self._tracked.setdefault(prompt_id, _Tracked(prompt_id, time.monotonic()))
        return sub

    def subscribe_all(self) -> EventSubscription:
        """Every event, for every prompt, plus connection events."""
        sub = EventSubscription(self, None)
        self._all_subs.append(sub)
        return sub

    def add_listener(self, listener: Listener) -> None:
        """A synchronous callback for every event; exceptions are logged, not raised."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def untrack(self, prompt_id: str) -> None:
        """Stop tracking a prompt (e.g. its POST /prompt failed validation)."""
        self._tracked.pop(prompt_id, None)
        for sub in self._subs.pop(prompt_id, []):
            sub._put(_CLOSED)

    def _unsubscribe(self, sub: EventSubscription) -> None:
        if sub.prompt_id is None:
            with contextlib.suppress(ValueError):
                self._all_subs.remove(sub)
            return
        subs = self._subs.get(sub.prompt_id, [])
        with contextlib.suppress(ValueError):
            subs.remove(sub)
        if not subs:
            self._subs.pop(sub.prompt_id, None)
            self._tracked.pop(sub.prompt_id, None)

    def _dispatch(self, event: ComfyEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("ComfyUI event listener %r failed", listener)
        for sub in list(self._all_subs):
            sub._put(event)
        if isinstance(event, _CONNECTION_EVENTS):
            for subs in list(self._subs.values()):
                for sub in subs:
                    sub._put(event)
            return
        prompt_id = getattr(event, "prompt_id", None)
        if prompt_id is not None:
            for sub in list(self._subs.get(prompt_id, ())):
                sub._put(event)

    # -- connection ----------------------------------------------------------------------

    def _delay(self, attempt: int) -> float:
        base, cap = self._backoff
        ceiling = min(cap, base * (2**attempt))
        # "Equal jitter": at least half the ceiling, so retries never hammer the server.
        return ceiling / 2 + random.random() * ceiling / 2  # noqa: S311

    async def _run(self) -> None:
        url = f"{self.base_url}/ws"
        attempt = 0
        lost_at: float | None = None
        while not self._closing:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    ws = await self._session.ws_connect(
                        url,
                        params={"clientId": self.client_id},
                        heartbeat=self._heartbeat,
                        max_msg_size=_MAX_WS_MESSAGE,
                        timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                    )
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                delay = self._delay(attempt)
                attempt += 1
                log.log(
                    logging.INFO if attempt == 1 else logging.DEBUG,
                    "ComfyUI WebSocket %s unavailable (%s); retry %d in %.1fs",
                    self.base_url,
                    type(exc).__name__,
                    attempt,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            self._ws = ws
            reason = "closed by server"
            try:
                if self._preview_metadata:
                    # Must be the first frame we send (ComfyUI ignores it otherwise).
                    await asyncio.wait_for(
                        ws.send_json(
                            {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
                        ),
                        5.0,
                    )
                self._connected.set()
                if lost_at is not None:
                    downtime = time.monotonic() - lost_at
                    log.info(
                        "ComfyUI WebSocket %s reconnected after %.1fs", self.base_url, downtime
                    )
                    self._dispatch(Reconnected(attempt, downtime))
                attempt = 0
                await self._read(ws)
                if ws.exception() is not None:
                    reason = f"error: {type(ws.exception()).__name__}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                reason = f"error: {type(exc).__name__}"
            finally:
                self._ws = None
                self._connected.clear()
                if not ws.closed:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(ws.close(), 5.0)
            if self._closing:
                break
            lost_at = time.monotonic()
            for tracked in self._tracked.values():
                tracked.gap = True
            log.warning("ComfyUI WebSocket %s disconnected (%s)", self.base_url, reason)
            self._dispatch(Disconnected(reason))
            await asyncio.sleep(self._delay(0))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        first_status = True
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                try:
                    raw = json.loads(msg.data)
                except ValueError:
                    log.warning("ComfyUI %s sent a text frame that is not JSON", self.base_url)
                    continue
                if not isinstance(raw, dict):
                    continue
                event = decode_message(raw)
                self._handle(event)
                if first_status and isinstance(event, Status):
                    # The first status arrives after the server registered our socket, so
                    # from here on nothing is missed: reconcile what happened meanwhile.
                    first_status = False
                    if self._tracked:
                        self._spawn(self._reconcile("connected"), "reconcile")
            elif msg.type == aiohttp.WSMsgType.BINARY:
                decoded = decode_binary(
                    msg.data, current_prompt=self._current_prompt, current_node=self._current_node
                )
                if decoded is None:
                    log.debug("ComfyUI %s sent an unknown binary frame", self.base_url)
                    continue
                self._dispatch(decoded)
            elif msg.type == aiohttp.WSMsgType.ERROR:
                break

    # -- tracking ------------------------------------------------------------------------

    def _handle(self, event: ComfyEvent) -> None:
        if isinstance(event, Status):
            self.queue_remaining = event.queue_remaining
        elif isinstance(event, FeatureFlags):
            self.server_features = event.flags
        elif isinstance(event, ExecutionStart):
            self._current_prompt, self._current_node = event.prompt_id, None
        elif isinstance(event, Executing):
            if event.node is None:
                if event.prompt_id == self._current_prompt:
                    self._current_prompt = self._current_node = None
            else:
                if event.prompt_id is not None:
                    self._current_prompt = event.prompt_id
                self._current_node = event.node
        self._dispatch(event)
        tracked = self._tracked.get(event.prompt_id) if event.prompt_id else None
        if tracked is None or tracked.done:
            return
        tracked.seen = True
        if isinstance(event, ExecutionStart):
            # A fresh run (a reused prompt_id starts over): from here we see everything.
            tracked.outputs.clear()
            tracked.terminal = None
            tracked.gap = False
        elif isinstance(event, Executed):
            tracked.outputs.extend(event.images)
        elif isinstance(event, ExecutionSuccess | ExecutionError | ExecutionInterrupted):
            tracked.terminal = event
            if isinstance(event, ExecutionSuccess) and tracked.outputs and not tracked.gap:
                # Every ``executed`` came before this: the images are known and saved, so
                # results need not wait for the history write that the end signal follows.
                self._finish_live(tracked)
        elif isinstance(event, Executing) and event.node is None:
            if tracked.terminal is not None and not tracked.gap:
                self._finish_live(tracked)
            else:
                # We missed part of the run; the history entry is written before this
                # message is sent, so it is complete now.
                self._spawn(self._resolve_from_history(tracked.prompt_id), "resolve")

    def _finish_live(self, tracked: _Tracked) -> None:
        terminal = tracked.terminal
        if isinstance(terminal, ExecutionError):
            done = PromptDone(tracked.prompt_id, "error", tuple(tracked.outputs),
                              terminal.to_exception())
        elif isinstance(terminal, ExecutionInterrupted):
            done = PromptDone(
                tracked.prompt_id,
                "interrupted",
                tuple(tracked.outputs),
                ComfyInterrupted(tracked.prompt_id, terminal.node_id, terminal.node_type),
            )
        else:
            done = PromptDone(tracked.prompt_id, "success", tuple(tracked.outputs))
        self._finish(tracked, done)

    def _finish(self, tracked: _Tracked, done: PromptDone) -> None:
        if tracked.done:
            return
        tracked.done = True
        self._tracked.pop(tracked.prompt_id, None)
        self._dispatch(done)
        self._subs.pop(tracked.prompt_id, None)

    def _finish_from_result(self, tracked: _Tracked, result: PromptResult) -> None:
        error: ComfyError | None = None
        if result.status == "error":
            error = ComfyExecutionError(
                result.node_id,
                result.node_type,
                result.exception_message or "",
                exception_type=result.exception_type or "",
                prompt_id=result.prompt_id,
            )
        elif result.status == "interrupted":
            error = ComfyInterrupted(result.prompt_id, result.node_id, result.node_type)
        self._finish(
            tracked, PromptDone(tracked.prompt_id, result.status, result.outputs, error, True)
        )

    async def _resolve_from_history(self, prompt_id: str) -> None:
        tracked = self._tracked.get(prompt_id)
        if tracked is None or tracked.done:
            return
        try:
            result = await self._client.get_prompt_result(prompt_id)
        except ComfyError as exc:
            log.warning("Could not read the history of prompt %s: %s", prompt_id, exc)
            return  # the next reconnect or poll tick tries again
        if result is not None:
            self._finish_from_result(tracked, result)

    async def _reconcile(self, reason: str) -> None:
        """Compare every tracked prompt with /queue and /history (see module docstring)."""
        async with self._reconcile_lock:
            pending = [t for t in self._tracked.values() if not t.done]
            if not pending:
                return
            try:
                queue = await self._client.get_queue()
            except ComfyError as exc:
                log.warning("Reconcile (%s) of %s failed: %s", reason, self.base_url, exc)
                return
            mine = [item for item in queue.running if item.client_id == self.client_id]
            if mine and self._current_prompt is None:
                self._current_prompt = mine[0].prompt_id
            now = time.monotonic()
            for tracked in pending:
                if tracked.done:
                    continue
                if tracked.prompt_id in queue:
                    tracked.seen = True
                    continue
                try:
                    result = await self._client.get_prompt_result(tracked.prompt_id)
                except ComfyError as exc:
                    log.warning("Reconcile (%s) of %s failed: %s", reason, self.base_url, exc)
                    return
                if tracked.done:
                    continue
                if result is not None:
                    log.info(
                        "Prompt %s finished (%s) while unobserved; recovered from history",
                        tracked.prompt_id,
                        result.status,
                    )
                    self._finish_from_result(tracked, result)
                elif tracked.seen or now - tracked.since > self._lost_grace:
                    log.warning("Prompt %s is gone from %s", tracked.prompt_id, self.base_url)
                    self._finish(
                        tracked,
                        PromptDone(
                            tracked.prompt_id,
                            "lost",
                            (),
                            ComfyPromptLost(tracked.prompt_id),
                            True,
                        ),
                    )

    async def reconcile(self) -> None:
        """Check every tracked prompt against /queue and /history now."""
        await self._reconcile("requested")

    async def _poll_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self._poll_interval)
            if self._tracked:
                await self._reconcile("poll")
