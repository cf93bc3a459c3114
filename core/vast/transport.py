"""The HTTP transport under :class:`~core.vast.client.VastClient`: authentication,
redaction of the key, JSON decoding, error mapping and the retry loop.

Only idempotent calls are retried (GETs, start/stop/destroy, attaching a key). Renting
(``PUT /asks/{id}/``) is never retried: a lost response may still have rented a GPU, so
the caller must look the instance up by label before trying again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from pydantic import SecretStr

from core.retry import Backoff
from core.vast.errors import (
    SearchQuotaExceeded,
    VastConnectionError,
    VastRateLimited,
    VastServerError,
    VastTimeout,
    error_from_response,
)
from core.vast.types import JsonDict

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://console.vast.ai/api/v0"
USER_AGENT = "comfyvast/0.1 (+aiohttp)"
# Retry-After (or a throttle threshold) above this is not worth sleeping through inside
# one call: we raise VastRateLimited and let the caller decide.
MAX_HONOURED_RETRY_AFTER = 60.0

Sleep = Callable[[float], Awaitable[Any]]


def _derive_urls(base_url: str) -> tuple[str, str]:
    base = base_url.rstrip("/")
    match = re.search(r"/api/v\d+$", base)
    root = base[: match.start()] if match else base
    v0 = base if match else f"{root}/api/v0"
    return v0, f"{root}/api/v1"


class VastTransport:
    """Sends one Vast.ai request with retries; :class:`VastClient` adds the API calls."""

    def __init__(
        self,
        api_key: SecretStr | str,
        session: aiohttp.ClientSession,
        *,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._api_key = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)
        self._session = session
        self._v0, self._v1 = _derive_urls(base_url)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_retries = max(0, max_retries)
        # Full jitter keeps several bot processes from retrying in lockstep.
        self._retry_backoff = Backoff(base=backoff_base, cap=backoff_max, jitter="full")
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"VastClient(base_url={self._v0!r})"

    @property
    def base_url(self) -> str:
        return self._v0

    def _redact(self, text: str) -> str:
        key = self._api_key.get_secret_value()
        return text.replace(key, "***") if key else text

    def _backoff(self, attempt: int, hint: float | None) -> float:
        # ``attempt`` is 0-based here; Backoff counts retries from 1.
        delay = self._retry_backoff.delay(attempt + 1)
        if hint is not None:
            delay = max(delay, hint)
        return delay

    async def _request(
        self,
        method: str,
        path: str,
        *,
        op: str,
        json_body: JsonDict | None = None,
        params: Mapping[str, str] | None = None,
        idempotent: bool,
        v1: bool = False,
    ) -> Any:
        url = f"{self._v1 if v1 else self._v0}{path}"
        headers = {
            "Authorization": f"Bearer {self._api_key.get_secret_value()}",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        if method != "GET" and json_body is None:
            json_body = {}  # the API wants a JSON body on PUT/POST/DELETE, even empty
        attempts = 1 + (self._max_retries if idempotent else 0)
        for attempt in range(attempts):
            last = attempt == attempts - 1
            started = time.monotonic()
            try:
                async with self._session.request(
                    method, url, json=json_body, params=params, headers=headers,
                    timeout=self._timeout, allow_redirects=False,
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
                    resp_headers = {k: v for k, v in resp.headers.items()}
            except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
                log.warning("vast %s %s timed out after %.1fs (attempt %d/%d)",
                            method, path, time.monotonic() - started, attempt + 1, attempts)
                if last:
                    raise VastTimeout(op=op, may_have_succeeded=not idempotent) from exc
                await self._sleep(self._backoff(attempt, None))
                continue
            except aiohttp.ClientError as exc:
                # Connection refused/reset: for a create we cannot know whether the
                # request reached Vast before the connection died.
                log.warning("vast %s %s failed: %s (attempt %d/%d)", method, path,
                            type(exc).__name__, attempt + 1, attempts)
                if last:
                    # Refused before connecting means the request never left us.
                    sent = not isinstance(exc, aiohttp.ClientConnectorError)
                    raise VastConnectionError(
                        op=op, may_have_succeeded=sent and not idempotent
                    ) from exc
                await self._sleep(self._backoff(attempt, None))
                continue

            text = self._redact(raw.decode("utf-8", errors="replace"))
            try:
                # 429s are often text/plain; never trust Content-Type.
                data = json.loads(text) if text.strip() else None
            except ValueError:
                data = None
            log.debug("vast %s %s -> %d in %.2fs", method, path, status,
                      time.monotonic() - started)

            if 200 <= status < 300:
                if isinstance(data, Mapping) and data.get("success") is False:
                    # A 200 with success:false is a failure (SDK and dstack agree).
                    raise error_from_response(status, data, text=text,
                                              headers=resp_headers, op=op)
                if data is None and text.strip():
                    raise VastServerError("Vast.ai sent a response we could not read.",
                                          status=status, op=op)
                return data

            err = error_from_response(status, data, text=text, headers=resp_headers, op=op)
            transient = isinstance(err, VastServerError) and status in (500, 502, 503, 504)
            transient = transient or (
                isinstance(err, VastRateLimited) and not isinstance(err, SearchQuotaExceeded)
            )
            if not idempotent and isinstance(err, VastServerError):
                # A 5xx on create may come after the rental was committed.
                err.may_have_succeeded = True
            hint = err.retry_after if isinstance(err, VastRateLimited) else None
            if not transient or last or (hint is not None and hint > MAX_HONOURED_RETRY_AFTER):
                if transient:
                    log.warning("vast %s %s -> %d, giving up after %d attempt(s)",
                                method, path, status, attempt + 1)
                raise err
            delay = min(self._backoff(attempt, hint), MAX_HONOURED_RETRY_AFTER)
            log.info("vast %s %s -> %d (%s), retrying in %.2fs (attempt %d/%d)", method, path,
                     status, err.code or type(err).__name__, delay, attempt + 1, attempts)
            await self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover
