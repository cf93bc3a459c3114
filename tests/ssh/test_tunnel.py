"""Local port forwarding to ComfyUI's port, surviving a dropped connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from core.ssh import SSHPool, SSHTarget, TunnelManager
from tests.ssh.conftest import SSHServer


@pytest.fixture
async def comfy_port() -> AsyncIterator[int]:
    """A stand-in for ComfyUI listening on 127.0.0.1 (on "the server")."""

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"system": {"comfyui_version": "test"}})

    app = web.Application()
    app.router.add_get("/system_stats", stats)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def _get(url: str) -> dict:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(url + "/system_stats") as resp:
            resp.raise_for_status()
            return await resp.json()


async def test_tunnel_forwards_and_comes_back_after_a_drop(
    ssh_server: SSHServer, pool: SSHPool, target: SSHTarget, comfy_port: int
):
    tunnel = await pool.forward_local(target, remote_port=comfy_port)
    try:
        url = tunnel.url
        assert url.startswith("http://127.0.0.1:")
        assert (await _get(url))["system"]["comfyui_version"] == "test"

        assert tunnel.connections_made == 1
        ssh_server.drop_connections()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while tunnel.connections_made < 2:
            assert loop.time() < deadline, "the tunnel did not reconnect"
            await asyncio.sleep(0.02)
        await tunnel.wait_connected(5)

        assert tunnel.url == url
        assert (await _get(url))["system"]["comfyui_version"] == "test"
    finally:
        await tunnel.close()
    assert tunnel.closed


async def test_tunnel_manager_keeps_one_url_per_server(
    pool: SSHPool, target: SSHTarget, comfy_port: int
):
    manager = TunnelManager(pool)
    try:
        first = await manager.get(target, comfy_port)
        second = await manager.get(target, comfy_port)
        assert first is second
        assert (await _get(await manager.url(target, comfy_port)))["system"]
        await manager.close(target)
        assert first.closed
        third = await manager.get(target, comfy_port)
        assert third is not first
    finally:
        await manager.close_all()
