"""FakeComfy: an aiohttp server that speaks ComfyUI 0.3.64's HTTP + WebSocket protocol.

It reproduces the recorded traces (tests/data/comfyui-traces/): the same routes, bodies,
status codes, WebSocket message types, keys, order and routing rules (execution messages
only to the prompt's client socket, progress/previews broadcast when there is none),
validation errors, the classic output cache, the queue and interrupts. Nodes do not
compute anything: a KSampler sleeps ``step_delay`` per step and outputs are real PNGs of
the requested size.

Fault injection for tests: :meth:`drop_websockets`, :meth:`stop`/:meth:`start`/
:meth:`restart` on the same port, :meth:`inject_http_error`, :meth:`fail_node`,
:meth:`pause_sampling`, ``refuse_websockets``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import posixpath
import random
import re
import struct
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from tests.fakecomfy import facts, images
from tests.fakecomfy.engine import ExecutionList, Prompt, Validator, is_link, signatures
from tests.fakecomfy.hostile import HostileModes, flood_progress, send_junk

log = logging.getLogger(__name__)

OUTPUT_DIR = "/opt/ComfyUI/output"  # as in the traces' rewritten paths
_ANNOTATION = re.compile(r"^(.*) \[(input|output|temp)\]$")


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    json: Any = None


@dataclass
class SentMessage:
    """A WebSocket message the fake sent; ``sid`` None means broadcast."""

    sid: str | None
    type: str
    data: Any
    # time.monotonic() when it was sent: benchmarks measure how stale a status became.
    at: float = field(default_factory=time.monotonic)


@dataclass
class HttpFault:
    path: str
    method: str | None
    status: int | None
    body: str
    delay: float
    times: int  # -1: forever


@dataclass
class _Item:
    number: float
    prompt_id: str
    prompt: Prompt
    extra_data: dict[str, Any]
    outputs: list[str]

    def as_list(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclass
class _CacheEntry:
    values: list[Any]
    ui: dict[str, Any] | None


class _Interrupted(Exception):
    def __init__(self, node_id: str, node_type: str) -> None:
        super().__init__(node_id)
        self.node_id, self.node_type = node_id, node_type


class _NodeFailed(Exception):
    def __init__(self, message: str, exception_type: str, traceback: list[str]) -> None:
        super().__init__(message)
        self.message, self.exception_type, self.traceback = message, exception_type, traceback


@dataclass
class _Run:
    item: _Item
    client_id: str | None
    registry: dict[str, dict[str, Any]] = field(default_factory=dict)
    values: dict[str, list[Any]] = field(default_factory=dict)
    ui_outputs: dict[str, Any] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    messages: list[list[Any]] = field(default_factory=list)
    sigs: dict[str, str] = field(default_factory=dict)


def _now_ms() -> int:
    return int(time.time() * 1000)


class FakeComfy:
    """A loopback ComfyUI. ``await fake.start()``; ``fake.url``; ``await fake.stop()``."""

    def __init__(
        self,
        *,
        models: Mapping[str, Iterable[str]] | None = None,
        corrupt_models: Iterable[str] = ("corrupt.safetensors",),
        step_delay: float = 0.0,
        sample_seconds: float | None = None,
        node_delay: float = 0.0,
        previews: bool = True,
        preview_metadata_supported: bool = True,
        output_image: bytes | None = None,
        output_size: tuple[int, int] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        socket_table_quirk: bool = True,
    ) -> None:
        recorded = facts.recorded_models()
        self.models: dict[str, list[str]] = {folder: [] for folder in recorded}
        if models is None:
            self.models.update(recorded)
        else:
            self.models.update({k: list(v) for k, v in models.items()})
        self.corrupt_models = set(corrupt_models)
        self.step_delay = step_delay
        # A KSampler's whole run, spread over its steps against one deadline (so a busy
        # event loop's lateness does not add up step by step): a GPU's time per image,
        # for bench.costsim. None: ``step_delay`` per step.
        self.sample_seconds = sample_seconds
        self.node_delay = node_delay
        # False = a server started without --preview-method: no binary frames (trace 18).
        self.previews = previews
        # False = an older ComfyUI that ignores feature_flags and only sends type-1 frames.
        self.preview_metadata_supported = preview_metadata_supported
        self.output_image = output_image
        self.output_size = output_size
        # Bytes sent as every preview frame instead of the latent preview (hostile servers:
        # a real one sends whatever its preview method encodes).
        self.preview_image: bytes | None = None
        self.refuse_websockets = False
        # What a stranger's server sends instead of ComfyUI's answers (tests/fakecomfy/hostile).
        self.hostile = HostileModes()
        # ComfyUI pops sid from its socket table when *any* socket of that sid closes,
        # even if a newer one replaced it. Kept by default because the real server does.
        self.socket_table_quirk = socket_table_quirk
        self.host = host
        self._port = port

        self.requests: list[RecordedRequest] = []
        self.prompts: dict[str, Prompt] = {}
        self.sent: list[SentMessage] = []
        # prompt id -> time.monotonic() when its execution_success was sent (benchmarks).
        self.success_at: dict[str, float] = {}
        self.failures: dict[str, tuple[str, str]] = {}
        self._faults: list[HttpFault] = []

        self._entries = facts.object_info_entries()
        self._stats = facts.system_stats()
        self._features = facts.server_features()
        self._temp_suffix = "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
        self.files: dict[str, dict[str, bytes]] = {"input": {}, "output": {}, "temp": {}}
        self.files["input"]["example.png"] = images.png(32, 32, (90, 120, 200))
        self._reset_state()
        self._gate = asyncio.Event()
        self._gate.set()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._worker: asyncio.Task[None] | None = None
        self._sockets: dict[str, web.WebSocketResponse] = {}
        self._socket_flags: dict[str, dict[str, Any]] = {}
        self._all_ws: dict[web.WebSocketResponse, Any] = {}

    def _reset_state(self) -> None:
        self._number = 0
        self._pending: list[_Item] = []
        self._running: _Item | None = None
        self.history: dict[str, dict[str, Any]] = {}
        self._cache: dict[str, _CacheEntry] = {}
        self._interrupt_flag = False
        self._client_id: str | None = None  # server.client_id: last prompt's client
        self._last_node_id: str | None = None
        self._wake = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        if self._runner is not None:
            return
        app = web.Application(middlewares=[self._middleware], client_max_size=110 * 1024 * 1024)
        self._routes(app)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self._port, reuse_address=True)
        await self._site.start()
        server = getattr(self._site, "_server", None)
        if self._port == 0 and server is not None and server.sockets:
            self._port = server.sockets[0].getsockname()[1]
        self._worker = asyncio.create_task(self._work(), name="fakecomfy-worker")
        self._wake.set()

    async def stop(self) -> None:
        """The server goes away: sockets closed, the running prompt is lost."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
            self._worker = None
        if self._running is not None:
            self._running = None
        await self.drop_websockets()
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = self._site = None

    async def restart(self, *, keep_state: bool = False, downtime: float = 0.0) -> None:
        """Stop and start on the same port. A real restart loses queue, history and cache
        (they live in memory) but keeps files; ``keep_state`` keeps queue and history."""
        await self.stop()
        if not keep_state:
            self._reset_state()
        if downtime:
            await asyncio.sleep(downtime)
        await self.start()

    async def __aenter__(self) -> FakeComfy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- fault injection -----------------------------------------------------------------

    async def drop_websockets(self, *, abrupt: bool = False) -> None:
        """Close every WebSocket (``abrupt``: reset the TCP connection, no close frame)."""
        for ws, transport in list(self._all_ws.items()):
            if abrupt and transport is not None:
                transport.abort()
            else:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(code=WSCloseCode.GOING_AWAY), 2.0)
        for _ in range(200):  # let the handlers run their finally blocks
            if not self._all_ws:
                break
            await asyncio.sleep(0.005)

    def inject_http_error(self, path: str, status: int | None = 500, *, method: str | None = None,
                          body: str = "", delay: float = 0.0, times: int = 1) -> None:
        """Answer the next ``times`` requests to ``path`` with ``status`` (None: only
        delay, then handle normally; use a long delay to provoke client timeouts)."""
        self._faults.append(HttpFault(path, method, status, body, delay, times))

    async def send_junk(self) -> None:
        """Every junk WebSocket frame of tests/fakecomfy/hostile to every open socket."""
        await send_junk(list(self._all_ws))

    async def flood_progress(self, prompt_id: str, count: int, preview: bytes) -> None:
        """``count`` progress messages and previews for one prompt to every open socket."""
        await flood_progress(list(self._all_ws), prompt_id, count, preview)

    def fail_node(self, node: str, message: str = "CUDA out of memory",
                  exception_type: str = "torch.OutOfMemoryError") -> None:
        """Make a node (by id or class_type) raise while it runs."""
        self.failures[node] = (message, exception_type)

    def pause_sampling(self) -> None:
        """Samplers block before their next step until :meth:`resume_sampling`."""
        self._gate.clear()

    def resume_sampling(self) -> None:
        self._gate.set()

    # -- state helpers for tests ---------------------------------------------------------

    @property
    def running_prompt_id(self) -> str | None:
        return self._running.prompt_id if self._running else None

    @property
    def pending_prompt_ids(self) -> list[str]:
        return [i.prompt_id for i in sorted(self._pending, key=lambda i: (i.number, i.prompt_id))]

    async def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self._running is not None or self._pending:
            if time.monotonic() > deadline:
                raise TimeoutError("FakeComfy did not become idle")
            await asyncio.sleep(0.005)

    async def wait_running(self, prompt_id: str | None = None, *, node: str | None = None,
                           timeout: float = 10.0) -> None:
        """Until ``prompt_id`` (any if None) runs, optionally until ``node`` executes."""
        deadline = time.monotonic() + timeout
        while True:
            running = self._running
            if running is not None and (prompt_id is None or running.prompt_id == prompt_id) and (
                node is None or self._last_node_id == node
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("prompt did not start")
            await asyncio.sleep(0.002)

    def add_input_file(self, name: str, data: bytes) -> None:
        self.files["input"][name] = data

    # -- HTTP plumbing -------------------------------------------------------------------

    def _routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/ws", self._ws_handler)
        r.add_get("/system_stats", self._system_stats)
        r.add_get("/features", self._json_getter(lambda: self._features))
        r.add_get("/embeddings", self._json_getter(lambda: self.models.get("embeddings", [])))
        r.add_get("/extensions", self._json_getter(lambda: []))
        r.add_get("/models", self._json_getter(lambda: list(self.models)))
        r.add_get("/models/{folder}", self._models)
        r.add_get("/object_info", self._object_info)
        r.add_get("/object_info/{node_class}", self._object_info_one)
        r.add_get("/prompt", self._json_getter(lambda: {"exec_info": self._exec_info()}))
        r.add_post("/prompt", self._post_prompt)
        r.add_get("/queue", self._get_queue)
        r.add_post("/queue", self._post_queue)
        r.add_post("/interrupt", self._interrupt)
        r.add_post("/free", self._empty_ok)
        r.add_get("/history", self._get_history)
        r.add_get("/history/{prompt_id}", self._get_history_one)
        r.add_post("/history", self._post_history)
        r.add_get("/view", self._view)
        r.add_post("/upload/image", self._upload)

    @staticmethod
    def _json_getter(make: Any) -> Any:
        async def handler(_request: web.Request) -> web.Response:
            return web.json_response(make())

        return handler

    async def _empty_ok(self, _request: web.Request) -> web.Response:
        return web.Response(status=200)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body: Any = None
        if request.method == "POST" and request.content_type == "application/json":
            raw = await request.read()
            with contextlib.suppress(ValueError):
                body = json.loads(raw) if raw else None
        self.requests.append(
            RecordedRequest(request.method, request.path, dict(request.query), body))
        origin = request.headers.get("Origin")
        if origin is not None:
            # ComfyUI refuses cross-origin requests even for GET (403), see comfyui.md.
            host = request.headers.get("Host", "").lower()
            netloc = re.sub(r"^[a-z]+://", "", origin.lower()).split("/")[0]
            if netloc != host:
                return web.Response(status=403)
        hostile = await self.hostile.answer(request)
        if hostile is not None:
            return hostile
        for fault in list(self._faults):
            if fault.times == 0 or not request.path.startswith(fault.path):
                continue
            if fault.method is not None and fault.method != request.method:
                continue
            if fault.times > 0:
                fault.times -= 1
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.status is not None:
                return web.Response(status=fault.status, text=fault.body)
            break
        response: web.StreamResponse = await handler(request)
        return response

    # -- simple GETs ---------------------------------------------------------------------

    async def _system_stats(self, _request: web.Request) -> web.Response:
        return web.json_response(self._stats)

    async def _models(self, request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        if folder not in self.models:
            return web.Response(status=404)
        return web.json_response(list(self.models[folder]))

    def object_info(self) -> dict[str, Any]:
        """Node definitions with combos filled from the current models and inputs."""
        info = copy.deepcopy(self._entries)
        combos = {
            ("CheckpointLoaderSimple", "ckpt_name"): self.models.get("checkpoints", []),
            ("LoraLoader", "lora_name"): self.models.get("loras", []),
            ("UpscaleModelLoader", "model_name"): self.models.get("upscale_models", []),
            ("LoadImage", "image"): sorted(n for n in self.files["input"] if "/" not in n),
        }
        for (class_type, name), values in combos.items():
            spec = info.get(class_type, {}).get("input", {}).get("required", {}).get(name)
            if spec is not None:
                spec[0] = list(values)
        return info

    async def _object_info(self, _request: web.Request) -> web.Response:
        return web.json_response(self.object_info())

    async def _object_info_one(self, request: web.Request) -> web.Response:
        name = request.match_info["node_class"]
        info = self.object_info()
        return web.json_response({name: info[name]} if name in info else {})

    # -- queue ---------------------------------------------------------------------------

    def _exec_info(self) -> dict[str, int]:
        return {"queue_remaining": len(self._pending) + (1 if self._running else 0)}

    async def _queue_updated(self) -> None:
        await self._send("status", {"status": {"exec_info": self._exec_info()}}, None)

    def _input_exists(self, value: str) -> bool:
        match = _ANNOTATION.match(value)
        kind = "input"
        if match:
            value, kind = match.group(1), match.group(2)
        return value in self.files[kind]

    async def _post_prompt(self, request: web.Request) -> web.Response:
        json_data = await request.json()  # not JSON -> aiohttp's own 500, as in trace 08
        if "number" in json_data:
            number: float = float(json_data["number"])
        else:
            number = self._number
            if json_data.get("front"):
                number = -number
            self._number += 1  # counts rejected prompts too
        if "prompt" not in json_data:
            error = {"type": "no_prompt", "message": "No prompt provided",
                     "details": "No prompt provided", "extra_info": {}}
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt = json_data["prompt"]
        submitted = copy.deepcopy(prompt)
        prompt_id = str(json_data.get("prompt_id", uuid.uuid4()))
        validation = Validator(self.object_info(), self._input_exists).validate(prompt)
        if not validation.ok:
            return web.json_response(
                {"error": validation.error, "node_errors": validation.node_errors}, status=400)
        extra_data = dict(json_data.get("extra_data") or {})
        if "client_id" in json_data:
            extra_data["client_id"] = json_data["client_id"]
        self.prompts[prompt_id] = submitted
        self._pending.append(_Item(number, prompt_id, prompt, extra_data, validation.good_outputs))
        await self._queue_updated()
        self._wake.set()
        return web.json_response(
            {"prompt_id": prompt_id, "number": number, "node_errors": validation.node_errors})

    async def _get_queue(self, _request: web.Request) -> web.Response:
        pending = sorted(self._pending, key=lambda i: (i.number, i.prompt_id))
        return web.json_response({
            "queue_running": [self._running.as_list()] if self._running else [],
            "queue_pending": [i.as_list() for i in pending],
        })

    async def _post_queue(self, request: web.Request) -> web.Response:
        data = await request.json()
        if data.get("clear"):
            self._pending.clear()
            await self._queue_updated()
        for prompt_id in data.get("delete", []) or []:
            for item in list(self._pending):
                if item.prompt_id == prompt_id:
                    self._pending.remove(item)
                    await self._queue_updated()
                    break
        return web.Response(status=200)

    async def _interrupt(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
        except ValueError:
            data = {}
        prompt_id = (data or {}).get("prompt_id")
        if prompt_id:
            if self._running is not None and self._running.prompt_id == prompt_id:
                self._interrupt_flag = True
        else:
            self._interrupt_flag = True
        return web.Response(status=200)

    # -- history -------------------------------------------------------------------------

    async def _get_history(self, request: web.Request) -> web.Response:
        items = list(self.history.items())
        if "max_items" in request.query:
            items = items[-int(request.query["max_items"]):]
        return web.json_response(dict(items))

    async def _get_history_one(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = self.history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def _post_history(self, request: web.Request) -> web.Response:
        data = await request.json()
        if data.get("clear"):
            self.history.clear()
        for prompt_id in data.get("delete", []) or []:
            self.history.pop(prompt_id, None)
        return web.Response(status=200)

    # -- files ---------------------------------------------------------------------------

    async def _view(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        if "filename" not in query:
            return web.Response(status=404)
        filename = query["filename"]
        kind: str | None = None
        match = _ANNOTATION.match(filename)
        if match:
            filename, kind = match.group(1), match.group(2)
        if not filename or filename.startswith("/") or ".." in filename:
            return web.Response(status=400)
        kind = kind or query.get("type", "output")
        if kind not in self.files:
            return web.Response(status=400)
        subfolder = query.get("subfolder", "")
        if ".." in subfolder.split("/") or subfolder.startswith("/"):
            return web.Response(status=403)
        key = posixpath.join(subfolder, posixpath.basename(filename)) if subfolder else filename
        data = self.files[kind].get(key)
        if data is None:
            return web.Response(status=404)
        headers = {"Content-Disposition": f'filename="{posixpath.basename(filename)}"'}
        preview = query.get("preview")
        channel = query.get("channel")
        if preview or channel:
            fmt, _, quality = (preview or "png").partition(";")
            body, ctype = await asyncio.to_thread(
                images.transcode, data, fmt, int(quality or 90), channel)
            return web.Response(body=body, content_type=ctype, headers=headers)
        ctype = "image/png" if key.endswith(".png") else (
            "image/jpeg" if key.endswith((".jpg", ".jpeg")) else "application/octet-stream")
        headers["ETag"] = '"' + hashlib.sha256(data).hexdigest()[:16] + f'-{len(data):x}"'
        headers["Accept-Ranges"] = "bytes"
        return web.Response(body=data, content_type=ctype, headers=headers)

    async def _upload(self, request: web.Request) -> web.Response:
        post = await request.post()
        image = post.get("image")
        overwrite = post.get("overwrite")
        kind = str(post.get("type") or "input")
        if kind not in self.files:
            kind = "input"
        if not isinstance(image, web.FileField):
            return web.Response(status=400)
        filename = image.filename
        if not filename:
            return web.Response(status=400)
        subfolder = str(post.get("subfolder", ""))
        path = posixpath.normpath(posixpath.join("/root", subfolder, filename))
        if not path.startswith("/root/"):
            return web.Response(status=400)
        data = image.file.read()
        store = self.files[kind]
        stem, ext = posixpath.splitext(filename)
        duplicate = False
        key = posixpath.join(subfolder, filename) if subfolder else filename
        if overwrite not in ("true", "1"):
            index = 1
            while key in store:
                if hashlib.sha256(store[key]).digest() == hashlib.sha256(data).digest():
                    duplicate = True
                    break
                filename = f"{stem} ({index}){ext}"
                key = posixpath.join(subfolder, filename) if subfolder else filename
                index += 1
        if not duplicate:
            store[key] = data
        return web.json_response({"name": filename, "subfolder": subfolder, "type": kind})

    # -- WebSocket -----------------------------------------------------------------------

    async def _ws_handler(self, request: web.Request) -> web.StreamResponse:
        if self.refuse_websockets:
            return web.Response(status=503)
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        sid = request.query.get("clientId", "")
        if sid:
            self._sockets.pop(sid, None)  # reusing a clientId replaces the old socket
        else:
            sid = uuid.uuid4().hex
        self._sockets[sid] = ws
        self._socket_flags[sid] = {}
        self._all_ws[ws] = request.transport
        try:
            hello = {"status": {"exec_info": self._exec_info()}, "sid": sid}
            await self._send("status", hello, sid)
            if self._client_id == sid and self._last_node_id is not None:
                # Reconnect during our run: the current node, without prompt_id (trace 22).
                await self._send("executing", {"node": self._last_node_id}, sid)
            first = True
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    continue
                if (first and isinstance(data, dict) and data.get("type") == "feature_flags"
                        and self.preview_metadata_supported):
                    self._socket_flags[sid] = dict(data.get("data") or {})
                    await self._send("feature_flags", self._features, sid)
                first = False
        finally:
            if self.socket_table_quirk or self._sockets.get(sid) is ws:
                self._sockets.pop(sid, None)
                self._socket_flags.pop(sid, None)
            self._all_ws.pop(ws, None)
        return ws

    def _targets(self, sid: str | None) -> list[web.WebSocketResponse]:
        if sid is None:
            return list(self._sockets.values())
        ws = self._sockets.get(sid)
        return [ws] if ws is not None else []

    async def _send(self, event: str, data: Any, sid: str | None) -> None:
        self.sent.append(SentMessage(sid, event, copy.deepcopy(data)))
        text = json.dumps({"type": event, "data": data})
        for ws in self._targets(sid):
            with contextlib.suppress(Exception):
                await ws.send_str(text)

    async def _send_binary(self, payload: bytes, sid: str | None, summary: dict[str, Any]) -> None:
        self.sent.append(SentMessage(sid, "binary", summary))
        for ws in self._targets(sid):
            with contextlib.suppress(Exception):
                await ws.send_bytes(payload)

    def _supports_metadata(self, sid: str | None) -> bool:
        return bool(sid is not None and self._socket_flags.get(sid, {}).get(
            "supports_preview_metadata"))

    async def _send_image(self, run: _Run, node_id: str, data: bytes, mime: str, *,
                          first: bool) -> None:
        """One preview/websocket image, in the order the traces show around ``progress``:
        type 4 *before* it (``first``), type 1 after it."""
        sid = run.client_id
        if self._supports_metadata(sid):
            if first:
                meta = {"node_id": node_id, "prompt_id": run.item.prompt_id,
                        "display_node_id": node_id, "parent_node_id": None,
                        "real_node_id": node_id, "image_type": mime}
                blob = json.dumps(meta).encode("utf-8")
                await self._send_binary(struct.pack(">II", 4, len(blob)) + blob + data, sid,
                                        {"event_type": 4, "metadata": meta})
        elif not first:
            fmt = 2 if mime == "image/png" else 1
            await self._send_binary(struct.pack(">II", 1, fmt) + data, sid,
                                    {"event_type": 1, "format": fmt})

    # -- execution -----------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            item = min(self._pending, key=lambda i: (i.number, i.prompt_id))
            self._pending.remove(item)
            self._running = item
            await self._queue_updated()
            try:
                entry = await self._execute(item)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("FakeComfy failed to execute %s", item.prompt_id)
                entry = None
            self._running = None
            if entry is not None:
                self.history[item.prompt_id] = entry
            await self._queue_updated()
            if self._client_id is not None:
                await self._send("executing", {"node": None, "prompt_id": item.prompt_id},
                                 self._client_id)

    async def _message(self, run: _Run, event: str, data: dict[str, Any], broadcast: bool) -> None:
        data = {**data, "timestamp": _now_ms()}
        run.messages.append([event, data])
        if run.client_id is not None or broadcast:
            await self._send(event, data, run.client_id)

    async def _progress_state(self, run: _Run) -> None:
        await self._send("progress_state",
                         {"prompt_id": run.item.prompt_id, "nodes": copy.deepcopy(run.registry)},
                         run.client_id)

    def _registry_entry(self, run: _Run, node_id: str, value: Any, maximum: Any) -> dict[str, Any]:
        entry = run.registry.get(node_id)
        if entry is None:
            entry = run.registry[node_id] = {
                "value": value, "max": maximum, "state": "pending", "node_id": node_id,
                "prompt_id": run.item.prompt_id, "display_node_id": node_id,
                "parent_node_id": None, "real_node_id": node_id}
        return entry

    async def _finish_progress(self, run: _Run, node_id: str) -> None:
        entry = self._registry_entry(run, node_id, 0, 1)
        entry["state"], entry["value"] = "finished", entry["max"]
        await self._progress_state(run)

    def _signature_extra(self, _node_id: str, node: dict[str, Any]) -> str:
        # LoadImage's IS_CHANGED is the file hash: a re-upload under the same name re-runs.
        if node.get("class_type") == "LoadImage":
            name = str(node.get("inputs", {}).get("image", ""))
            data = self.files["input"].get(_ANNOTATION.sub(r"\1", name), b"")
            return hashlib.sha256(data).hexdigest()
        return ""

    async def _execute(self, item: _Item) -> dict[str, Any]:
        prompt = item.prompt
        run = _Run(item, item.extra_data.get("client_id"))
        self._client_id = run.client_id
        self._interrupt_flag = False  # ComfyUI resets the flag when a prompt starts
        info = self.object_info()
        sigs = run.sigs = signatures(prompt, self._signature_extra)
        await self._message(run, "execution_start", {"prompt_id": item.prompt_id}, False)
        cached = [n for n in prompt if sigs[n] in self._cache]
        await self._message(run, "execution_cached",
                            {"nodes": cached, "prompt_id": item.prompt_id}, False)

        def is_output(node_id: str) -> bool:
            return bool(info[prompt[node_id]["class_type"]].get("output_node"))

        plan = ExecutionList(prompt, is_output, lambda n: sigs[n] in self._cache)
        for out in item.outputs:
            plan.add_node(out)
        status_str, completed = "success", True
        try:
            while (node_id := plan.next_node()) is not None:
                await self._execute_node(run, node_id, sigs[node_id], info)
                plan.complete(node_id)
        except _Interrupted as exc:
            status_str, completed = "error", False
            await self._message(run, "execution_interrupted", {
                "prompt_id": item.prompt_id, "node_id": exc.node_id, "node_type": exc.node_type,
                "executed": list(run.executed)}, True)
        except _NodeFailed as exc:
            status_str, completed = "error", False
            failed = self._last_node_id or ""
            await self._message(run, "execution_error", {
                "prompt_id": item.prompt_id, "node_id": failed,
                "node_type": prompt[failed]["class_type"], "executed": list(run.executed),
                "exception_message": f"{exc.message}\n", "exception_type": exc.exception_type,
                "traceback": exc.traceback,
                "current_inputs": {k: [repr(v) if is_link(v) else v]
                                   for k, v in prompt[failed].get("inputs", {}).items()},
                "current_outputs": list(prompt)}, False)
        else:
            self.success_at[item.prompt_id] = time.monotonic()
            await self._message(run, "execution_success", {"prompt_id": item.prompt_id}, False)
        finally:
            # The classic cache only keeps what the last prompt used.
            keep = set(sigs.values())
            self._cache = {k: v for k, v in self._cache.items() if k in keep}
            self._last_node_id = None
        return {
            "prompt": item.as_list(),
            "outputs": run.ui_outputs,
            "status": {"status_str": status_str, "completed": completed,
                       "messages": run.messages},
            "meta": {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n}
                     for n in run.ui_outputs},
        }

    async def _execute_node(self, run: _Run, node_id: str, sig: str, info: dict[str, Any]
                            ) -> None:
        node = run.item.prompt[node_id]
        class_type = node["class_type"]
        hit = self._cache.get(sig)
        if hit is not None:
            run.values[node_id] = hit.values
            if run.client_id is not None:
                await self._send("executed", {
                    "node": node_id, "display_node": node_id,
                    "output": hit.ui, "prompt_id": run.item.prompt_id}, run.client_id)
                if hit.ui is not None:
                    run.ui_outputs[node_id] = hit.ui
            await self._finish_progress(run, node_id)
            return
        entry = self._registry_entry(run, node_id, 0.0, 1.0)
        entry.update(value=0.0, max=1.0, state="running")
        await self._progress_state(run)
        self._last_node_id = node_id
        if run.client_id is not None:
            await self._send("executing", {"node": node_id, "display_node": node_id,
                                           "prompt_id": run.item.prompt_id}, run.client_id)
        if self._interrupt_flag:
            raise _Interrupted(node_id, class_type)
        if self.node_delay:
            await asyncio.sleep(self.node_delay)
        failure = self.failures.get(node_id) or self.failures.get(class_type)
        if failure is not None:
            raise _NodeFailed(failure[0], failure[1], [])
        inputs = {k: (self._value(run, v[0])[v[1]] if is_link(v) else v)
                  for k, v in node.get("inputs", {}).items()}
        values, ui = await self._run_node(run, node_id, class_type, inputs, info)
        if ui:
            run.ui_outputs[node_id] = ui
            if run.client_id is not None:
                await self._send("executed", {"node": node_id, "display_node": node_id,
                                              "output": ui, "prompt_id": run.item.prompt_id},
                                 run.client_id)
        await self._finish_progress(run, node_id)
        run.values[node_id] = values
        run.executed.append(node_id)
        self._cache[sig] = _CacheEntry(values, ui or None)

    def _value(self, run: _Run, node_id: str) -> list[Any]:
        """Outputs of a node of this run; cached nodes did not run, so read the cache."""
        if node_id not in run.values:
            run.values[node_id] = self._cache[run.sigs[node_id]].values
        return run.values[node_id]

    # -- node behaviours -----------------------------------------------------------------

    async def _run_node(self, run: _Run, node_id: str, class_type: str, inputs: dict[str, Any],
                        info: dict[str, Any]) -> tuple[list[Any], dict[str, Any] | None]:
        outputs = info[class_type].get("output") or []
        if class_type == "CheckpointLoaderSimple":
            if inputs["ckpt_name"] in self.corrupt_models:
                err = facts.corrupt_checkpoint_error()
                raise _NodeFailed(err["exception_message"].rstrip("\n"), err["exception_type"],
                                  err["traceback"])
            return [("MODEL", inputs["ckpt_name"]), ("CLIP",), ("VAE",)], None
        if class_type == "EmptyLatentImage":
            return [_picture("LATENT", inputs["width"], inputs["height"], inputs["batch_size"],
                             (128, 128, 128))], None
        if class_type == "EmptyImage":
            color = int(inputs["color"])
            rgb = ((color >> 16) & 255, (color >> 8) & 255, color & 255)
            return [_picture("IMAGE", inputs["width"], inputs["height"], inputs["batch_size"],
                             rgb)], None
        if class_type in ("KSampler", "KSamplerAdvanced"):
            latent = dict(inputs["latent_image"])
            seed = inputs.get("seed", inputs.get("noise_seed", 0))
            await self._sample(run, node_id, class_type, int(inputs["steps"]), latent)
            latent["color"] = images.color_for(seed)
            return [latent], None
        if class_type in ("VAEDecode", "VAEEncode"):
            source = dict(inputs.get("samples") or inputs.get("pixels") or {})
            source["kind"] = outputs[0]
            return [source], None
        if class_type == "LoadImage":
            name = _ANNOTATION.sub(r"\1", str(inputs["image"]))
            size = await asyncio.to_thread(images.image_size, self.files["input"].get(name, b""))
            width, height = size or (64, 64)
            return [_picture("IMAGE", width, height, 1, (100, 100, 100)), ("MASK",)], None
        if class_type == "ImageInvert":
            picture = dict(inputs["image"])
            picture["color"] = tuple(255 - c for c in picture["color"])
            return [picture], None
        if class_type == "ImageUpscaleWithModel":  # a 4x model, as most are
            picture = dict(inputs["image"])
            picture["width"], picture["height"] = picture["width"] * 4, picture["height"] * 4
            return [picture], None
        if class_type == "ImageScale":
            picture = dict(inputs["image"])
            picture["width"] = int(inputs["width"]) or picture["width"]
            picture["height"] = int(inputs["height"]) or picture["height"]
            return [picture], None
        if class_type == "SaveImage":
            pictures = inputs["images"]
            if self.hostile.output_count is not None:
                pictures = dict(pictures, batch=self.hostile.output_count)
            return [], {"images": await self._save_images(pictures,
                                                          str(inputs["filename_prefix"]))}
        if class_type == "PreviewImage":
            return [], {"images": await self._save_images(
                inputs["images"], f"ComfyUI_temp_{self._temp_suffix}", kind="temp")}
        if class_type == "SaveImageWebsocket":
            await self._websocket_images(run, node_id, inputs["images"])
            return [], None
        # Anything else: pass the first picture through to matching output types.
        picture = next((v for v in inputs.values() if isinstance(v, dict) and "kind" in v), None)
        return [dict(picture, kind=t) if picture and t in ("IMAGE", "LATENT") else (t,)
                for t in outputs], None

    async def _sample(self, run: _Run, node_id: str, class_type: str, steps: int,
                      latent: dict[str, Any]) -> None:
        preview = None
        if self.previews and self.preview_image is not None:
            preview = self.preview_image
        elif self.previews:
            preview = await asyncio.to_thread(
                images.latent_preview_jpeg, latent["width"] // 8, latent["height"] // 8)
        began = time.monotonic()
        for step in range(1, steps + 1):
            await self._gate.wait()
            if self.sample_seconds is not None:
                await asyncio.sleep(began + self.sample_seconds * step / steps - time.monotonic())
            elif self.step_delay:
                await asyncio.sleep(self.step_delay)
            if self._interrupt_flag:  # checked in the progress hook, once per step
                raise _Interrupted(node_id, class_type)
            entry = self._registry_entry(run, node_id, step, steps)
            entry.update(value=step, max=steps, state="running")
            await self._progress_state(run)
            if preview is not None:
                await self._send_image(run, node_id, preview, "image/jpeg", first=True)
            await self._send("progress", {"value": step, "max": steps,
                                          "prompt_id": run.item.prompt_id, "node": node_id},
                             run.client_id)
            if preview is not None:
                await self._send_image(run, node_id, preview, "image/jpeg", first=False)

    async def _picture_bytes(self, picture: dict[str, Any]) -> bytes:
        if self.output_image is not None:
            return self.output_image
        width, height = self.output_size or (int(picture["width"]), int(picture["height"]))
        return await asyncio.to_thread(images.png, width, height, tuple(picture["color"]))

    async def _websocket_images(self, run: _Run, node_id: str, picture: dict[str, Any]) -> None:
        count = int(picture["batch"])
        data = await self._picture_bytes(picture)
        for index in range(count):
            entry = self._registry_entry(run, node_id, index, count)
            entry.update(value=index, max=count, state="running")
            await self._progress_state(run)
            await self._send_image(run, node_id, data, "image/png", first=True)
            await self._send("progress", {"value": index, "max": count,
                                          "prompt_id": run.item.prompt_id, "node": node_id},
                             run.client_id)
            await self._send_image(run, node_id, data, "image/png", first=False)

    async def _save_images(self, picture: dict[str, Any], prefix: str, kind: str = "output"
                           ) -> list[dict[str, str]]:
        subfolder, name = posixpath.split(prefix)
        full = posixpath.normpath(posixpath.join(OUTPUT_DIR, subfolder))
        common = posixpath.commonpath((OUTPUT_DIR, full))
        if common != OUTPUT_DIR:
            template = facts.save_image_error()
            raise _NodeFailed(
                "**** ERROR: Saving image outside the output folder is not allowed."
                f"\n full_output_folder: {full}\n         output_dir: {OUTPUT_DIR}"
                f"\n         commonpath: {common}",
                template["exception_type"], template["traceback"])
        subfolder = posixpath.relpath(full, OUTPUT_DIR) if full != OUTPUT_DIR else ""
        store = self.files[kind]
        pattern = re.compile(re.escape(name) + r"_(\d{5})_\.png$")
        counters = [int(m.group(1)) for key in store
                    if posixpath.dirname(key) == subfolder
                    and (m := pattern.match(posixpath.basename(key)))]
        counter = max(counters, default=0) + 1
        data = await self._picture_bytes(picture)
        saved = []
        for _ in range(int(picture["batch"])):
            filename = f"{name}_{counter:05}_.png"
            store[posixpath.join(subfolder, filename) if subfolder else filename] = data
            saved.append({"filename": filename, "subfolder": subfolder, "type": kind})
            counter += 1
        return saved


def _picture(kind: str, width: Any, height: Any, batch: Any, color: tuple[int, ...]
             ) -> dict[str, Any]:
    return {"kind": kind, "width": int(width), "height": int(height), "batch": int(batch),
            "color": tuple(color)}
