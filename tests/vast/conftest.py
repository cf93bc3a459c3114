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
    server = FakeVast(timeout_hang=3.0)
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


@pytest.fixture
def client(fake: FakeVast, session: aiohttp.ClientSession, sleeps: list[float]) -> VastClient:
    async def record_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(0)

    return VastClient(fake.api_key, session, base_url=fake.base_url, timeout=0.5,
                      max_retries=3, backoff_base=0.01, sleep=record_sleep)


def comfy_request(label: str = "comfybot:g1:u2:req3", **kw: object) -> CreateRequest:
    params: dict[str, object] = {
        "image": "vastai/base-image:@vastai-automatic-tag", "disk_gb": 60, "label": label,
        "onstart": "touch ~/.no_auto_tmux; env >> /etc/environment",
        "env": {"COMFY_PORT": "8188"}, "expose_ports": [8188],
    }
    params.update(kw)
    return CreateRequest(**params)  # type: ignore[arg-type]
