"""The ComfyUI WebSocket event stream: one reconnecting socket per server, fanned out.

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
* After a reconnect with the same clientId during a run the server sends ``status`` and
  ``executing {node}`` *without* prompt_id (trace 22); everything sent while we were away
  is lost, so after each reconnect the state of every tracked prompt is recovered from
  ``/queue`` and ``/history`` (:mod:`core.comfy.tracking`), and a :class:`PromptDone` is
  synthesised for prompts that finished meanwhile. Each tracked prompt gets exactly one
  :class:`PromptDone`.

The message types and their decoding live in :mod:`core.comfy.events`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import aiohttp

from core import fastjson
from core.comfy.client import ComfyClient
from core.comfy.errors import ComfyMalformed, ComfyUnreachable
from core.comfy.events import (
    ComfyEvent,
    Disconnected,
    Executing,
    ExecutionStart,
    FeatureFlags,
    Listener,
    PromptDone,
    Reconnected,
    Status,
    decode_binary,
    decode_message,
)
from core.comfy.limits import DEFAULT_LIMITS, MalformedLog, ResponseLimits, no_redirects_trace
from core.comfy.subscriptions import EventFanout, EventSubscription
from core.comfy.tracking import PromptTracker
from core.retry import Backoff
from core.tasks import TaskRegistry

log = logging.getLogger(__name__)

# How ComfyUI's ``progress_state`` frames begin. Its server sends
# ``{"type": event, "data": data}`` with aiohttp's ``send_json`` (json.dumps' separators);
# the compact form is accepted too. Each one carries every node's state so far, and a
# sampler sends one per step beside its ``progress`` (comfyui.md, "Text frames"): half of
# a running server's text frames, and the larger half. Nothing in the bot reads them (the
# steps come in ``progress``), so unless someone takes every event they are skipped
# undecoded; a junk frame that only starts like one concerned no one either.
_UNREAD_FRAMES = ('{"type": "progress_state"', '{"type":"progress_state"')


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
        limits: ResponseLimits = DEFAULT_LIMITS,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self._session = session
        base, cap = reconnect_backoff
        # Equal jitter: at least half the ceiling, so retries never hammer the server.
        self._reconnect = Backoff(base=base, cap=cap, jitter="equal")
        self._client = client or ComfyClient(self.base_url, session, client_id=client_id)
        self._connect_timeout = connect_timeout
        self._heartbeat = heartbeat
        # While prompts are tracked, /queue + /history are checked this often even when
        # connected: ComfyUI drops a socket from its table if an *older* socket with the
        # same clientId closes after the new one registered, and then sends us nothing.
        self._poll_interval = poll_interval
        self._preview_metadata = preview_metadata
        # Previews are ~55-80 KB JPEGs, but SaveImageWebsocket sends full-size PNGs
        # (trace 17): the cap is the one for images (core.comfy.limits).
        self._max_ws_message = limits.ws_message
        self._malformed = MalformedLog(log, self.base_url)
        # The handshake's own session (sharing the connection pool): aiohttp's ws_connect
        # follows redirects and takes no allow_redirects, so this session refuses them.
        self._ws_session: aiohttp.ClientSession | None = None

        self._tasks = TaskRegistry(f"ComfyUI events {self.base_url}")
        self._tracker = PromptTracker(
            self._client, self._tasks, base_url=self.base_url, client_id=client_id,
            lost_grace=lost_grace, on_done=self._prompt_done, on_running=self._prompt_running,
        )
        self._fanout = EventFanout(on_last_unsubscribed=self._tracker.forget)
        self._runner: asyncio.Task[None] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._connected = asyncio.Event()
        self._closing = False
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
            self._runner = self._tasks.spawn(self._run(), name="comfy-events:ws-runner")
            self._tasks.spawn(self._poll_loop(), name="comfy-events:poll")
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
        await self._tasks.close(timeout=5.0)
        if self._ws_session is not None:
            await self._ws_session.close()  # not the shared connector: connector_owner=False
        self._connected.clear()
        self._fanout.close()
        self._tracker.clear()

    async def __aenter__(self) -> ComfyEventStream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- subscriptions -------------------------------------------------------------------

    def subscribe(self, prompt_id: str, *, latest_only: bool = False) -> EventSubscription:
        """Events of one prompt, ending with exactly one :class:`PromptDone`.

        Subscribe *before* queueing (with your own prompt_id) so no message is missed.
        ``latest_only``: for a reader that shows only the newest progress and preview, at
        most one event of each such kind (progress, progress state, preview, text...) waits
        unread: a newer one replaces it, and once the prompt's end is queued the unread
        ones are dropped (such a reader skips to the end). Every other event is kept, in
        order.
        """
        sub = self._fanout.subscribe(prompt_id, latest_only=latest_only)
        self._tracker.track(prompt_id)
        return sub

    def subscribe_all(self) -> EventSubscription:
        """Every event, for every prompt, plus connection events."""
        return self._fanout.subscribe_all()

    def add_listener(self, listener: Listener) -> None:
        """A synchronous callback for every event; exceptions are logged, not raised."""
        self._fanout.add_listener(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._fanout.remove_listener(listener)

    def untrack(self, prompt_id: str) -> None:
        """Stop tracking a prompt (e.g. its POST /prompt failed validation)."""
        self._tracker.forget(prompt_id)
        self._fanout.end_prompt(prompt_id)

    # -- connection ----------------------------------------------------------------------

    def _handshake_session(self) -> aiohttp.ClientSession:
        if self._ws_session is None:
            self._ws_session = aiohttp.ClientSession(
                connector=self._session.connector,
                connector_owner=False,
                trace_configs=[no_redirects_trace()],
            )
        return self._ws_session

    async def _run(self) -> None:
        url = f"{self.base_url}/ws"
        attempt = 0
        lost_at: float | None = None
        while not self._closing:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    ws = await self._handshake_session().ws_connect(
                        url,
                        params={"clientId": self.client_id},
                        heartbeat=self._heartbeat,
                        max_msg_size=self._max_ws_message,
                        timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                    )
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                # ``attempt`` counts failures since the last connect; Backoff is 1-based.
                delay = self._reconnect.delay(attempt + 1)
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
                    self._fanout.dispatch(Reconnected(attempt, downtime))
                attempt = 0
                reason = await self._read(ws) or reason
                if ws.exception() is not None:
                    reason = f"error: {ws.exception()}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                reason = f"error: {type(exc).__name__}"
            except Exception as exc:  # noqa: BLE001 - the runner must outlive any bug
                # _read contains what a message can cause; this is the last guard that
                # keeps the server's only event task alive.
                self._malformed.report("connection state", repr(exc), exc_info=exc)
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
            self._tracker.mark_gap()
            log.warning("ComfyUI WebSocket %s disconnected (%s)", self.base_url, reason)
            self._fanout.dispatch(Disconnected(reason))
            await asyncio.sleep(self._reconnect.delay(1))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> str | None:
        """Read until the socket ends. A malformed frame is logged (once per kind) and
        skipped; it never ends the connection. Returns why the socket failed, if it did."""
        first_status = True
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                if msg.data.startswith(_UNREAD_FRAMES) and not self._fanout.takes_everything:
                    continue
                event = self._decode_text(msg.data)
                if event is None:
                    continue
                try:
                    self._handle(event)
                except Exception as exc:  # noqa: BLE001 - one message never ends the socket
                    self._malformed.report(f"{type(event).__name__} event", repr(exc), exc_info=exc)
                    continue
                if first_status and isinstance(event, Status):
                    # The first status arrives after the server registered our socket, so
                    # from here on nothing is missed: reconcile what happened meanwhile.
                    first_status = False
                    if self._tracker:
                        self._tasks.spawn(self._tracker.reconcile("connected"),
                                          name="comfy-events:reconcile")
            elif msg.type == aiohttp.WSMsgType.BINARY:
                try:
                    decoded = decode_binary(
                        msg.data, current_prompt=self._current_prompt,
                        current_node=self._current_node,
                    )
                except ComfyMalformed as exc:
                    self._malformed.report(exc.kind, exc.problem)
                    continue
                if decoded is None:
                    self._malformed.report("binary frame", "unknown frame type")
                    continue
                self._fanout.dispatch(decoded)
            elif msg.type == aiohttp.WSMsgType.ERROR:
                # e.g. a frame over the cap: aiohttp closes with 1009 and we reconnect.
                return f"error: {msg.data}"
        return None

    def _decode_text(self, text: str) -> ComfyEvent | None:
        try:
            return decode_message(fastjson.loads(text))
        except (ValueError, RecursionError):
            self._malformed.report("text frame", "not JSON")
        except ComfyMalformed as exc:
            self._malformed.report(exc.kind, exc.problem)
        return None

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
        self._fanout.dispatch(event)
        self._tracker.on_event(event)

    def _prompt_done(self, done: PromptDone) -> None:
        self._fanout.dispatch(done)
        self._fanout.drop_prompt(done.prompt_id)

    def _prompt_running(self, prompt_id: str) -> None:
        if self._current_prompt is None:
            self._current_prompt = prompt_id

    async def reconcile(self) -> None:
        """Check every tracked prompt against /queue and /history now."""
        await self._tracker.reconcile("requested")

    async def _poll_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self._poll_interval)
            if not self._tracker:
                continue
            try:
                await self._tracker.reconcile("poll")
            except Exception as exc:  # noqa: BLE001 - the loop outlives one bad answer
                self._malformed.report("poll answer", repr(exc), exc_info=exc)
