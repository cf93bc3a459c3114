"""The onstart and its dead man's switch: the real scripts, run by sh and python3 against a
loopback API, with no curl on PATH (plain CUDA images have none, vast.md section 7)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from pathlib import Path

from aiohttp import web

from core.config import Settings
from core.providers.vast import (
    COMFY_IMAGE_PORT,
    HEARTBEAT_FILE,
    is_comfy_image,
    launch_plan,
    onstart_script,
    watchdog_script,
)


def no_curl_path(tmp_path: Path) -> str:
    """A PATH with python3 and sh but without curl."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # The interpreter itself (a pyenv "python3" on PATH may be a bash shim).
    (bin_dir / "python3").symlink_to(os.path.realpath(sys.executable))
    for tool in ("sh", "nohup"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


async def run_watchdog(tmp_path: Path, heartbeat_age_s: int, orphan_minutes: int) -> list[dict]:
    seen: list[dict] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append({"path": request.path, "auth": request.headers.get("Authorization"),
                     "body": await request.json()})
        return web.json_response({"success": True})

    app = web.Application()
    app.router.add_put("/api/v0/instances/{id}/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    hb = tmp_path / "hb"
    # The real script, with its heartbeat path and interval shortened for the test.
    script = watchdog_script(f"http://127.0.0.1:{port}/api/v0", orphan_minutes, interval=0.1)
    script = script.replace(HEARTBEAT_FILE, str(hb))
    env = {"PATH": no_curl_path(tmp_path), "CONTAINER_API_KEY": "instance-key-123",
           "CONTAINER_ID": "4242"}
    proc = await asyncio.create_subprocess_shell(
        f"{script.removesuffix('&').rstrip()} & echo $!", env=env,
        stdout=asyncio.subprocess.PIPE, start_new_session=True)
    out, _ = await proc.communicate()
    watchdog_pid = int(out.decode().split()[-1])
    try:
        # The boot touches the file; then the bot stays silent (the file ages).
        for _ in range(100):
            if hb.exists():
                break
            await asyncio.sleep(0.02)
        assert hb.exists(), "the watchdog did not start"
        os.utime(hb, (0, hb.stat().st_mtime - heartbeat_age_s))
        await asyncio.sleep(1.0)
    finally:
        os.kill(watchdog_pid, signal.SIGKILL)
        await runner.cleanup()
    return seen


async def test_stale_heartbeat_stops_the_instance_without_curl(tmp_path: Path) -> None:
    seen = await run_watchdog(tmp_path, heartbeat_age_s=2 * 3600, orphan_minutes=60)
    assert seen, "the watchdog did not call the API"
    assert seen[0] == {
        "path": "/api/v0/instances/4242/",
        "auth": "Bearer instance-key-123",
        "body": {"state": "stopped"},
    }


async def test_fresh_heartbeat_does_nothing(tmp_path: Path) -> None:
    assert await run_watchdog(tmp_path, heartbeat_age_s=0, orphan_minutes=60) == []


def test_onstart_installs_the_key_once_and_writes_no_world_readable_secret() -> None:
    script = onstart_script("ssh-ed25519 AAAAC3Nz comfyvast", "https://console.vast.ai/api/v0", 60)
    assert "echo 'ssh-ed25519 AAAAC3Nz comfyvast' >> ~/.ssh/authorized_keys" in script
    assert "grep -qxF 'ssh-ed25519 AAAAC3Nz comfyvast'" in script  # once, on every boot
    assert "touch ~/.no_auto_tmux" in script and "CONTAINER_API_KEY" in script
    assert "/etc/environment" not in script and "curl" not in script
    assert "umask 077" in script
    # Vast's own images start only through their entrypoint: it is the last thing run.
    assert script.rstrip().endswith("then exec entrypoint.sh; fi")
    assert len(script) < 4096  # Vast's limit for args + onstart


def test_the_image_decides_port_path_and_profile() -> None:
    settings = Settings()
    comfy = launch_plan(settings.vast.default_image, settings, "ssh-ed25519 AAAA k")
    assert is_comfy_image(settings.vast.default_image)
    assert ":latest" not in settings.vast.default_image  # Vast publishes versioned tags only
    assert (comfy.profile, comfy.comfy_port, comfy.comfy_path) == (
        "fast", COMFY_IMAGE_PORT, "/workspace/ComfyUI")
    assert "ComfyUI" in comfy.env["PORTAL_CONFIG"]
    assert "--listen 127.0.0.1 --port 18188" in comfy.env["COMFYUI_ARGS"]
    assert comfy.expose_ports == ()  # no public port: the bot tunnels over SSH
    plain = launch_plan("pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime", settings, None)
    assert (plain.profile, plain.comfy_port, plain.env) == ("default", 8188, {})


async def test_fake_vast_takes_the_instance_key_for_that_instance_only() -> None:
    """What the watchdog relies on, as the real API does (vast.md section 7)."""
    import aiohttp

    from tests.fakevast import FakeVast

    async with FakeVast() as fake, aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {fake.api_key}"}
        made = []
        for offer in list(fake.offers)[:2]:
            async with http.put(f"{fake.base_url}/asks/{offer}/", headers=headers,
                                json={"image": "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime",
                                      "disk": 20}) as resp:
                made.append((await resp.json())["new_contract"])
        mine, other = (fake.instances[i] for i in made)
        own = {"Authorization": f"Bearer {mine.instance_api_key}"}
        async with http.put(f"{fake.base_url}/instances/{other.id}/", headers=own,
                            json={"state": "stopped"}) as resp:
            assert resp.status == 401
        async with http.get(f"{fake.base_url}/instances/{mine.id}/", headers=own) as resp:
            assert resp.status == 401
        async with http.put(f"{fake.base_url}/instances/{mine.id}/", headers=own,
                            json={"state": "stopped"}) as resp:
            assert resp.status == 200
        assert mine.intended_status == "stopped" and other.intended_status == "running"
