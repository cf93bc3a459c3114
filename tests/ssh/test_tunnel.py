"""Forwarding a private Unix socket to ComfyUI's port, surviving a dropped connection."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from core.ssh import SSHPool, SSHTarget, TunnelManager, unix_socket_path
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
    path = unix_socket_path(url)
    assert path is not None, url
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.UnixConnector(path=path)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        async with session.get("http://localhost/system_stats") as resp:
            resp.raise_for_status()
            return await resp.json()


async def test_tunnel_forwards_and_comes_back_after_a_drop(
    ssh_server: SSHServer, pool: SSHPool, target: SSHTarget, comfy_port: int
):
    tunnel = await pool.forward_local(target, remote_port=comfy_port)
    try:
        url = tunnel.url
        assert url.startswith("http+unix://%2F")
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


# Connects to the socket given as argv[1]; exit 0 when it could, 13 when refused by permission.
_CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    sys.exit(13)
s.sendall(b"GET /system_stats HTTP/1.0\\r\\n\\r\\n")
sys.stdout.write(s.recv(200).decode(errors="replace"))
"""


def _connect_as(user: str | None, path: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-c", _CONNECT, path]
    if user is not None:
        entry = pwd.getpwnam(user)
        argv = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


async def test_the_tunnel_socket_is_private_to_the_bot(
    pool: SSHPool, target: SSHTarget, comfy_port: int
):
    """Issue 12: ComfyUI has no login, so only the bot's user may reach the tunnel."""
    tunnel = await pool.forward_local(target, remote_port=comfy_port)
    try:
        path = tunnel.socket_path
        assert path is not None
        assert str(path) == unix_socket_path(tunnel.url)
        info, dir_info = path.lstat(), path.parent.lstat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert stat.S_IMODE(dir_info.st_mode) == 0o700
        assert info.st_uid == dir_info.st_uid == os.geteuid()
        assert len(str(path)) < 100  # sun_path holds 108 bytes

        # The bot's own user gets through ...
        own = await asyncio.to_thread(_connect_as, None, str(path))
        assert own.returncode == 0 and "200 OK" in own.stdout, own
        if os.geteuid() == 0 and shutil.which("setpriv"):
            # ... another user does not (root passes permission checks, so only then).
            other = await asyncio.to_thread(_connect_as, "nobody", str(path))
            assert other.returncode == 13, other  # PermissionError, not some other failure
            assert "200 OK" not in other.stdout
        else:
            assert os.geteuid() != 0  # permissions, checked above, keep others out
        assert tunnel.url.count(":") == 1  # no TCP port anywhere in the endpoint
    finally:
        await tunnel.close()
    assert not path.exists() and not path.parent.exists()
