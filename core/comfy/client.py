"""An async HTTP client for one ComfyUI server.

The routes, bodies and status codes follow what a real ComfyUI 0.3.64 was recorded doing
(tests/data/comfyui-traces/, summarised in the shared reference ``comfyui.md``). Notable
facts this client relies on:

* ``POST /prompt`` accepts a client-chosen ``prompt_id`` verbatim (trace 23), so the caller
  can persist its row before queueing; ``client_id`` must be sent, otherwise no
  ``executing``/``execution_*`` WebSocket messages are sent at all (trace 14).
* A 200 from ``POST /prompt`` may still carry ``node_errors``: the prompt was queued with
  only its valid outputs (trace 08). We return them; the caller decides.
* ``GET /history/{id}`` is ``{}`` until the prompt finished; interrupted and failed
  prompts both have ``status_str: "error"`` and differ by their last status message.
* ``POST /interrupt {prompt_id}`` only interrupts if that prompt is the running one
  (trace 19); without a body it interrupts whatever runs, possibly another user's job.

The ``aiohttp.ClientSession`` is injected and shared; this class never closes it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp

from core import fastjson
from core.comfy.errors import (
    ComfyError,
    ComfyHTTPError,
    ComfyMalformed,
    ComfyNotFound,
    ComfyProtocolError,
    ComfyRedirectRefused,
    ComfyUnreachable,
    ComfyValidationError,
)
from core.comfy.limits import DEFAULT_LIMITS, MalformedLog, ResponseLimits, read_capped, read_prefix
from core.comfy.responses import (
    DeviceStats,
    OutputImage,
    PromptResult,
    QueuedPrompt,
    QueueState,
    SystemStats,
    UploadedImage,
    clean_object_info,
    parse_history_entry,
    parse_queue_items,
    parse_queued,
    parse_system_stats,
    parse_uploaded,
)

log = logging.getLogger(__name__)

# Characters that survive aiohttp's multipart encoding unchanged. aiohttp percent-encodes
# anything else in a filename, and ComfyUI then stores the literal "%20" (trace 13 shows
# "../evil.png" stored as "..%2Fevil.png"), so we pick the name ourselves.
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_upload_name(filename: str) -> str:
    """A file name that reaches ComfyUI unchanged (see ``_SAFE_NAME``)."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, "png"
    stem = _SAFE_NAME.sub("_", stem).strip("._") or "image"
    ext = _SAFE_NAME.sub("", ext) or "png"
    return f"{stem[:100]}.{ext[:10]}"


class ComfyClient:
    """HTTP calls to one ComfyUI server; every call has a timeout and raises ComfyError."""

    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        *,
        timeout: float = 30.0,
        client_id: str | None = None,
        get_retries: int = 1,
        limits: ResponseLimits = DEFAULT_LIMITS,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.limits = limits
        self.malformed = MalformedLog(log, self.base_url)
        self._session = session
        self._timeout = timeout
        # The same id must be used for ?clientId= on the WebSocket (see ComfyEventStream).
        self.client_id = client_id or uuid.uuid4().hex
        self._get_retries = max(0, get_retries)

    def __repr__(self) -> str:
        return f"ComfyClient({self.base_url!r})"

    # -- low level -----------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        data: Any = None,
        timeout: float | None = None,
        ok: tuple[int, ...] = (200,),
        max_bytes: int | None = None,
    ) -> tuple[int, bytes, str]:
        """Send one request; return (status, body, content type). Maps transport errors.

        Redirects are refused and the body is read against ``max_bytes`` (default: the
        JSON cap), see :mod:`core.comfy.limits`."""
        cap = self.limits.json if max_bytes is None else max_bytes
        url = self.base_url + path
        limit = aiohttp.ClientTimeout(total=timeout if timeout is not None else self._timeout)
        # Only GETs are retried: they are idempotent, and a lost POST /prompt must never
        # be sent twice.
        attempts = 1 + (self._get_retries if method == "GET" else 0)
        for attempt in range(attempts):
            try:
                async with self._session.request(
                    method, url, params=params, json=json_body, data=data, timeout=limit,
                    allow_redirects=False,
                ) as resp:
                    ctype = resp.headers.get("Content-Type", "")
                    status = resp.status
                    if 300 <= status < 400:
                        resp.close()
                        raise ComfyRedirectRefused(method, path, status)
                    if status in ok:
                        body = await read_capped(resp, cap, path)
                    else:
                        body = await read_prefix(resp, self.limits.error_body)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
                refused = (isinstance(exc, aiohttp.ClientConnectorError)
                           and exc.os_error.errno == errno.EACCES)
                if refused:  # core.netguard: the name resolves only to refused addresses
                    reason = str(exc.os_error.strerror)
                if attempt + 1 < attempts and not (refused or isinstance(exc, TimeoutError)):
                    log.debug("GET %s failed (%s), retrying", path, reason)
                    # Not a core.retry.Backoff: one quick re-send of a GET whose pooled
                    # connection was dropped, after a short fixed pause in [0.1, 0.3] s
                    # that neither of Backoff's jitter kinds spans.
                    await asyncio.sleep(0.1 + random.random() * 0.2)  # noqa: S311
                    continue
                raise ComfyUnreachable(self.base_url, reason) from exc
            if status not in ok:
                self._raise_for_status(method, path, status, body)
            return status, body, ctype
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _raise_for_status(method: str, path: str, status: int, body: bytes) -> None:
        text = body.decode("utf-8", "replace")
        if status == 404:
            raise ComfyNotFound(method, path, status, text)
        raise ComfyHTTPError(method, path, status, text)

    @staticmethod
    def _json(body: bytes, path: str) -> Any:
        try:
            return fastjson.loads(body)
        except (ValueError, RecursionError) as exc:
            # RecursionError: JSON nested thousands deep is no ComfyUI answer either.
            message = f"ComfyUI sent a response to {path} that is not JSON."
            raise ComfyProtocolError(message) from exc

    def _json_object(self, body: bytes, path: str) -> dict[str, Any]:
        data = self._json(body, path)
        if not isinstance(data, dict):
            raise ComfyMalformed(f"answer to {path}", "not a JSON object")
        return data

    async def _get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        _status, body, _ctype = await self._request("GET", path, params=params)
        return self._json(body, path)

    async def _get_object(
        self, path: str, params: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        _status, body, _ctype = await self._request("GET", path, params=params)
        return self._json_object(body, path)

    async def _get_names(self, path: str) -> list[str]:
        raw = await self._get_json(path)
        if not isinstance(raw, list):
            raise ComfyMalformed(f"answer to {path}", "not a list")
        return [x for x in raw if isinstance(x, str)]

    # -- server --------------------------------------------------------------------------

    async def system_stats(self) -> SystemStats:
        raw = await self._get_json("/system_stats")
        if not isinstance(raw, dict):
            raise ComfyProtocolError("ComfyUI sent /system_stats in an unexpected shape.")
        return parse_system_stats(raw)

    async def check_status(self, *, timeout: float = 5.0) -> bool:
        """True if the server answers ``/system_stats``; never raises."""
        try:
            await self._request("GET", "/system_stats", timeout=timeout)
        except ComfyError as exc:
            log.debug("ComfyUI at %s is not healthy: %s", self.base_url, exc)
            return False
        return True

    async def features(self) -> dict[str, Any]:
        return await self._get_object("/features")

    async def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        """All node definitions, or one (``{}`` if ComfyUI does not know the class)."""
        path = "/object_info" if node_class is None else f"/object_info/{node_class}"
        # The full object_info is ~500 KB and takes ~100 ms to build on the server.
        _s, body, _c = await self._request(
            "GET", path, timeout=max(self._timeout, 60.0), max_bytes=self.limits.object_info
        )
        # Node definitions that are not objects (or have junk inputs) are dropped here, so
        # workflow checks only ever see the shapes ComfyUI documents.
        return clean_object_info(self._json_object(body, path), self.malformed.report)

    async def list_model_folders(self) -> list[str]:
        return await self._get_names("/models")

    async def list_models(self, folder: str) -> list[str]:
        """Files in one model folder; :class:`ComfyNotFound` if the folder is unknown."""
        return await self._get_names(f"/models/{folder}")

    async def free(self, *, unload_models: bool = True, free_memory: bool = True) -> None:
        body = {"unload_models": unload_models, "free_memory": free_memory}
        await self._request("POST", "/free", json_body=body)

    # -- prompts -------------------------------------------------------------------------

    async def queue_prompt(
        self,
        workflow: Mapping[str, Any],
        *,
        prompt_id: str | None = None,
        front: bool = False,
        extra_data: Mapping[str, Any] | None = None,
    ) -> QueuedPrompt:
        """Queue an API-format workflow. Raises :class:`ComfyValidationError` on a 400."""
        body: dict[str, Any] = {
            "prompt": dict(workflow),
            "client_id": self.client_id,
            "prompt_id": prompt_id or str(uuid.uuid4()),
        }
        if extra_data:
            body["extra_data"] = dict(extra_data)
        if front:
            body["front"] = True
        status, raw, _ctype = await self._request(
            "POST", "/prompt", json_body=body, ok=(200, 400)
        )
        queued = parse_queued(status, self._json_object(raw, "/prompt"))
        if queued.partial:
            log.warning(
                "ComfyUI queued prompt %s without its invalid outputs: %s",
                queued.prompt_id,
                ComfyValidationError(queued.node_errors, None),
            )
        return queued

    async def queue_remaining(self) -> int:
        data = await self._get_object("/prompt")
        info = data.get("exec_info")
        remaining = info.get("queue_remaining", 0) if isinstance(info, dict) else None
        if not isinstance(remaining, int) or isinstance(remaining, bool) or remaining < 0:
            raise ComfyMalformed("answer to /prompt", "no queue_remaining count")
        return remaining

    async def get_queue(self) -> QueueState:
        data = await self._get_object("/queue")
        # Junk rows are skipped (and logged once), the rest of the queue still counts.
        report = self.malformed.report
        return QueueState(
            running=parse_queue_items(data.get("queue_running"), report),
            pending=parse_queue_items(data.get("queue_pending"), report),
        )

    async def delete_from_queue(self, prompt_ids: Iterable[str]) -> None:
        """Remove pending prompts; a running prompt is untouched (use :meth:`interrupt`)."""
        await self._request("POST", "/queue", json_body={"delete": list(prompt_ids)})

    async def clear_queue(self) -> None:
        await self._request("POST", "/queue", json_body={"clear": True})

    async def interrupt(self, prompt_id: str | None) -> None:
        """Interrupt ``prompt_id`` if it is the running prompt; ``None`` interrupts
        whatever runs (possibly someone else's prompt)."""
        body = {"prompt_id": prompt_id} if prompt_id else None
        await self._request("POST", "/interrupt", json_body=body)

    async def get_history(
        self, prompt_id: str | None = None, max_items: int | None = None
    ) -> dict[str, Any]:
        if prompt_id is not None:
            return await self._get_object(f"/history/{prompt_id}")
        params = {"max_items": str(max_items)} if max_items is not None else None
        return await self._get_object("/history", params=params)

    async def delete_history(self, prompt_ids: Iterable[str]) -> None:
        await self._request("POST", "/history", json_body={"delete": list(prompt_ids)})

    async def get_prompt_result(self, prompt_id: str) -> PromptResult | None:
        """The finished prompt's result, or None while it is queued/running/unknown."""
        history = await self.get_history(prompt_id)
        entry = history.get(prompt_id)
        if entry is None:
            return None
        if not isinstance(entry, dict):
            raise ComfyMalformed("history entry", "not a JSON object")
        return parse_history_entry(prompt_id, entry)

    async def get_prompt_outputs(self, prompt_id: str) -> list[OutputImage]:
        """Images of a finished prompt ([] while it runs). Raises if the prompt failed."""
        result = await self.get_prompt_result(prompt_id)
        if result is None:
            return []
        result.raise_for_status()
        return list(result.outputs)

    # -- files ---------------------------------------------------------------------------

    async def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        params = {"filename": filename, "subfolder": subfolder, "type": type}
        _s, body, _c = await self._request(
            "GET", "/view", params=params, timeout=max(self._timeout, 60.0),
            max_bytes=self.limits.view,
        )
        return body

    async def view_image(self, image: OutputImage) -> bytes:
        return await self.view(image.filename, image.subfolder, image.type)

    async def upload_image(
        self,
        data: bytes,
        filename: str,
        *,
        overwrite: bool = True,
        subfolder: str = "",
        type: str = "input",
    ) -> UploadedImage:
        """Upload an input image. Without ``overwrite`` ComfyUI keeps the name for
        identical bytes and renames to ``name (1).ext`` otherwise (trace 13)."""
        name = safe_upload_name(filename)
        form = aiohttp.FormData()
        form.add_field("image", data, filename=name, content_type=_mime_for(name))
        if overwrite:
            form.add_field("overwrite", "true")
        if subfolder:
            form.add_field("subfolder", subfolder)
        form.add_field("type", type)
        _s, body, _c = await self._request(
            "POST", "/upload/image", data=form, timeout=max(self._timeout, 120.0)
        )
        return parse_uploaded(self._json_object(body, "/upload/image"))


def _mime_for(name: str) -> str:
    ext = name.rsplit(".", 1)[-1].lower()
    return {"jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}.get(ext, "image/png")


# The boundary types are re-exported: they are what this client's methods return.
__all__ = [
    "ComfyClient", "DeviceStats", "OutputImage", "PromptResult", "QueuedPrompt", "QueueState",
    "SystemStats", "UploadedImage", "safe_upload_name",
]
