"""Fixtures for the ComfyUI client tests: a FakeComfy on loopback and real clients."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from core.comfy.client import ComfyClient
from core.comfy.stream import ComfyEventStream
from tests.fakecomfy import FakeComfy


@pytest.fixture
async def fake() -> AsyncIterator[FakeComfy]:
    server = FakeComfy()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def client(fake: FakeComfy, http: aiohttp.ClientSession) -> ComfyClient:
    return ComfyClient(fake.url, http, timeout=5.0)


@pytest.fixture
async def stream(
    fake: FakeComfy, http: aiohttp.ClientSession, client: ComfyClient
) -> AsyncIterator[ComfyEventStream]:
    events = ComfyEventStream(
        fake.url,
        http,
        client.client_id,
        reconnect_backoff=(0.02, 0.2),
        client=client,
        poll_interval=0.5,
        lost_grace=1.0,
    )
    await events.start(timeout=5.0)
    yield events
    await events.close()
