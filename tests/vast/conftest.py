"""Fixtures: a real VastClient talking to a FakeVast over loopback sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from core.vast import CreateRequest, VastClient
from tests.fakevast import FakeVast

SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9mYWtlZmFrZWZha2VmYWtlZmFrZWZha2VmYWtl comfybot"


@pytest.fixture
async def fake() -> AsyncIterator[FakeVast]:
    # An injected "timeout" hangs until the server stops (capped at a minute), so it
    # outlasts any client timeout however busy the machine is.
    server = FakeVast(timeout_hang=60.0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def sleeps() -> list[float]:
    """Every backoff delay the client asked for, in order (no real waiting)."""
    return []


# A client timeout must never be shorter than a loaded fake's answer (issue 12: 0.5 s was
# missed on a busy machine). Plain tests use a generous one; only the tests that inject a
# "timeout" take ``timeout_client``, whose clock runs out while the fake hangs on purpose.
CLIENT_TIMEOUT = 30.0
TIMEOUT_CLIENT_TIMEOUT = 2.0


def _client(fake: FakeVast, session: aiohttp.ClientSession, sleeps: list[float],
            timeout: float) -> VastClient:
    async def record_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(0)

    return VastClient(fake.api_key, session, base_url=fake.base_url, timeout=timeout,
                      max_retries=3, backoff_base=0.01, sleep=record_sleep)


@pytest.fixture
def client(fake: FakeVast, session: aiohttp.ClientSession, sleeps: list[float]) -> VastClient:
    return _client(fake, session, sleeps, CLIENT_TIMEOUT)


@pytest.fixture
def timeout_client(fake: FakeVast, session: aiohttp.ClientSession,
                   sleeps: list[float]) -> VastClient:
    """For tests of injected timeouts (2 s; answers under load come well within it)."""
    return _client(fake, session, sleeps, TIMEOUT_CLIENT_TIMEOUT)


def comfy_request(label: str = "comfybot:g1:u2:req3", **kw: object) -> CreateRequest:
    params: dict[str, object] = {
        "image": "vastai/base-image:@vastai-automatic-tag", "disk_gb": 60, "label": label,
        "onstart": "touch ~/.no_auto_tmux; env >> /etc/environment",
        "env": {"COMFY_PORT": "8188"}, "expose_ports": [8188],
    }
    params.update(kw)
    return CreateRequest(**params)  # type: ignore[arg-type]
