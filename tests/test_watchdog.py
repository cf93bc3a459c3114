"""The dead man's switch a rented instance runs: real sh and curl against a loopback API."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
from aiohttp import web

from core.providers.vast import HEARTBEAT_FILE, onstart_script, watchdog_script

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


async def run_watchdog(tmp_path: Path, heartbeat_age_s: int, orphan_minutes: int) -> list[dict]:
    seen: list[dict] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(
            {
                "path": request.path,
                "auth": request.headers.get("Authorization"),
                "body": await request.json(),
            }
        )
        return web.json_response({"success": True})

    app = web.Application()
    app.router.add_put("/api/v0/instances/{id}/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    hb = tmp_path / "hb"
    hb.touch()
    os.utime(hb, (0, os.path.getmtime(hb) - heartbeat_age_s))
    # The real script, with its heartbeat path and sleep shortened for the test.
    script = watchdog_script(f"http://127.0.0.1:{port}/api/v0", orphan_minutes)
    script = script.replace(HEARTBEAT_FILE, str(hb)).replace("sleep 60", "sleep 0.2")
    script = script.replace(f"touch {hb}; (", "(", 1)  # keep the aged file as it is
    env = {**os.environ, "CONTAINER_API_KEY": "instance-key-123", "CONTAINER_ID": "4242"}
    proc = await asyncio.create_subprocess_shell(f"{script} echo started", env=env)
    await proc.wait()
    await asyncio.sleep(1.5)
    await asyncio.create_subprocess_shell(f"pkill -f {hb}")
    await runner.cleanup()
    return seen


async def test_stale_heartbeat_stops_the_instance(tmp_path: Path) -> None:
    seen = await run_watchdog(tmp_path, heartbeat_age_s=2 * 3600, orphan_minutes=60)
    assert seen, "the watchdog did not call the API"
    assert seen[0] == {
        "path": "/api/v0/instances/4242/",
        "auth": "Bearer instance-key-123",
        "body": {"state": "stopped"},
    }


async def test_fresh_heartbeat_does_nothing(tmp_path: Path) -> None:
    assert await run_watchdog(tmp_path, heartbeat_age_s=0, orphan_minutes=60) == []


def test_onstart_installs_the_key_single_quoted() -> None:
    script = onstart_script("ssh-ed25519 AAAAC3Nz comfyvast", "https://console.vast.ai/api/v0", 60)
    assert "echo 'ssh-ed25519 AAAAC3Nz comfyvast' >> ~/.ssh/authorized_keys" in script
    assert "touch ~/.no_auto_tmux" in script and "CONTAINER_API_KEY" in script
    assert len(script) < 4096  # Vast's limit for args + onstart
