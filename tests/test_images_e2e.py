"""Vast.ai's real images end to end: rent -> setup -> /generate, restarts and the watchdog.

The real bot, the fake Discord and the fake Vast.ai, whose instances are containers seen
from the inside (tests/fakevast/container.py): a real SSH server, the image's paths, its
entrypoint.sh and supervisor (Vast's ComfyUI image) or a bare CUDA image without curl and
git, and the onstart run on every boot.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

import core.providers.vast as vast_provider
import core.remote as remote_module
from core.db.models import ComfyGeneration, ServerExecution
from core.setup import DEFAULT_PROFILE_DIR, SetupService
from tests.conftest import BotEnv, _answered, bot_settings, eventually, start_bot
from tests.fakevast import FakeVast
from tests.fakevast.container import REPO_ROOT, ContainerHost, available
from tests.setup_fixtures import TEST_PROFILES, comfy_answers, free_port
from tests.test_servers_vast_e2e import _fast_sleep, _status, loopback_offers, press, rent

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

PLAIN_IMAGE = "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"


@pytest.fixture
async def cvast() -> AsyncIterator[FakeVast]:
    host = ContainerHost()
    fake = FakeVast(offers=loopback_offers(), clock=time.time, provision_seconds=0.05,
                    boot_seconds=0.1, restart_seconds=0.1, timeout_hang=1.5, containers=host)
    await fake.start()
    yield fake
    await fake.stop()
    await host.close()


@pytest.fixture
async def ienv(
    fake_discord: Any, tmp_path: Path, cvast: FakeVast, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[BotEnv]:
    # The watchdog looks at its heartbeat every 0.2 s instead of every minute.
    monkeypatch.setattr(vast_provider, "WATCHDOG_INTERVAL", 0.2)
    # A ComfyUI that never comes back fails the start in seconds, not minutes.
    monkeypatch.setattr(remote_module, "READY_TIMEOUT", 20.0)
    env = await start_bot(fake_discord, bot_settings(
        tmp_path, fake_discord,
        vast={"api_key": cvast.api_key, "base_url": cvast.base_url, "request_timeout": 5},
        # A plain image's ComfyUI port: a free one (Vast's image uses its own 18188).
        comfy={"default_port": free_port()},
    ))
    ops = env.services.server_ops
    ops.poll_interval = 0.05
    ops._sleep = _fast_sleep
    # The shipped profiles plus the test ones (plain-test: the default profile with its
    # downloads replaced by a local stand-in ComfyUI), wired in as the entry point does.
    service = SetupService(
        env.services.settings, env.services.sessions, env.services.servers,
        env.services.remote, env.services.audit,
        profile_dirs=(DEFAULT_PROFILE_DIR, TEST_PROFILES),
        params={"host_python": sys.executable, "repo_root": str(REPO_ROOT)}, tick=0.2)
    await env.services.setup.close()
    env.services.setup = service
    env.bot.get_cog("Setup").attach(service)  # type: ignore[union-attr]
    await service.startup()
    yield env
    await service.close()
    await env.stop()


async def rent_running(env: BotEnv, name: str, image: str | None = None) -> Any:
    options = {"gpu": "RTX 3090", "name": name, **({"image": image} if image else {})}
    await rent(env, options)
    await eventually(lambda: _status(env, name, "running"), timeout=20)
    return await env.services.servers.get(name)


async def setup_run(env: BotEnv, server: str, profile: str | None = None) -> Any:
    options = {"server": server, **({"profile": profile} if profile else {})}
    interaction = await env.slash("setup", options, user=env.fake.admin, subcommand="run")
    reply = await env.fake.wait_for(lambda: _answered(interaction), timeout=10)
    assert "started with profile" in reply.content, reply.content
    service: SetupService = env.services.setup

    async def finished() -> Any:
        latest = await service.latest(server)
        return latest if latest is not None and latest.finished else None

    try:
        view = await eventually(finished, timeout=60, interval=0.1)
    except AssertionError:
        latest = await service.latest(server)
        raise AssertionError(await service.log(latest.id) if latest else "no run") from None
    assert view.succeeded, (view.error, view.output_tail)
    return view


async def generate_delivers(env: BotEnv, prompt: str) -> ComfyGeneration:
    before = await setup_runs(env)
    interaction = await env.slash("generate", {"prompt": prompt, "steps": 2},
                                  user=env.fake.member)
    await env.fake.wait_for(lambda: _answered(interaction), timeout=10)

    async def done() -> Any:
        async with env.services.sessions() as session:
            row = (await session.scalars(select(ComfyGeneration).where(
                ComfyGeneration.prompt == prompt))).first()
        return row if row is not None and row.status in ("completed", "failed") else None

    row = await eventually(done, timeout=30, interval=0.1)
    assert row.status == "completed", row.error_message
    results = [m for m in env.fake.channel_messages(env.channel_id, include_ephemeral=False)
               if m.attachments and m.content.startswith("<@")]
    assert any(a.filename.endswith(".png") for m in results for a in m.attachments)
    assert await setup_runs(env) == before  # generating ran no setup
    return row


async def setup_runs(env: BotEnv) -> int:
    async with env.services.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(ServerExecution)))


async def ssh(env: BotEnv, server: str, command: str) -> Any:
    view = await env.services.servers.get(server)
    return await env.services.remote.pool.run(
        env.services.remote.target(view), command, timeout=20, check=False)


async def test_comfy_image_fast_setup_then_generate(ienv: BotEnv, cvast: FakeVast) -> None:
    server = await rent_running(ienv, "comfy")  # the configured default: vastai/comfy:<tag>
    [inst] = cvast.instances.values()
    assert inst.image == "vastai/comfy:v0.22.0-cuda-12.9-py312"
    assert (server.setup_profile, server.comfy_port, server.comfy_path) == (
        "fast", 18188, "/workspace/ComfyUI")
    container = cvast.containers.containers[inst.id]
    # The onstart handed over to the image's entrypoint.sh: the workspace was synced.
    await eventually(lambda: _exists(container.run_dir / "entrypoint.log"), timeout=10)

    view = await setup_run(ienv, "comfy")  # no profile given: the image's, fast
    assert view.profile == "fast"
    # supervisord already runs ComfyUI: the service step had nothing to do.
    assert view.skipped() == ["service"] and view.ran() == ["verify", "wait"]
    server = await ienv.services.servers.get("comfy")
    assert server.comfy_installed and server.comfy_port == 18188

    await generate_delivers(ienv, "a lighthouse on vast's image")

    # Stop and start: Vast runs only the onstart, which hands over to entrypoint.sh again,
    # and supervisord brings ComfyUI back; no setup runs.
    runs = await setup_runs(ienv)
    await stop_and_start(ienv, "comfy")
    assert container.onstart_runs == 2 and comfy_answers(18188)
    assert len((container.run_dir / "entrypoint.log").read_text().splitlines()) == 2
    assert await setup_runs(ienv) == runs
    await generate_delivers(ienv, "a lighthouse after a restart")
    # The environment for SSH sessions is 0600 and holds no secret; nothing went to
    # /etc/environment.
    env_file = container.path("/root/.comfyvast/env")
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert "CONTAINER_API_KEY" not in env_file.read_text()
    assert "WORKSPACE=/workspace" in env_file.read_text()


async def test_plain_image_default_setup_restart_without_setup(
    ienv: BotEnv, cvast: FakeVast
) -> None:
    server = await rent_running(ienv, "plain", PLAIN_IMAGE)
    assert (server.setup_profile, server.comfy_path) == ("default", "/workspace/ComfyUI")
    # A bare CUDA image: no curl and no git (the watchdog does not need them).
    result = await ssh(ienv, "plain", "command -v curl; command -v git; command -v python3")
    assert result.stdout.strip().endswith("python3") and "curl" not in result.stdout

    view = await setup_run(ienv, "plain", "plain-test")
    assert view.ran() == ["install", "start", "autostart", "wait"]
    server = await ienv.services.servers.get("plain")
    assert server.comfy_installed and server.comfy_path == "/workspace/ComfyUI"
    assert server.comfy_port == ienv.services.settings.comfy.default_port
    await generate_delivers(ienv, "a lighthouse before the restart")

    runs = await setup_runs(ienv)
    inst = cvast.instances[int(server.provider_id or 0)]
    container = cvast.containers.containers[inst.id]
    port = server.comfy_port or 0
    heartbeat = container.path(vast_provider.HEARTBEAT_FILE)
    os.utime(heartbeat, (0, 0))
    await stop_and_start(ienv, "plain", port)
    # The watchdog started again with the boot (its start touches the heartbeat).
    await eventually(lambda: _newer(heartbeat, 0), timeout=10)
    # Running in the bot means ComfyUI answers (it was asked through the tunnel), with no
    # setup run: the onstart ran the boot hook the autostart step left.
    assert comfy_answers(port)
    assert container.onstart_runs == 2
    assert await setup_runs(ienv) == runs
    await generate_delivers(ienv, "a lighthouse after the restart")


async def test_watchdog_stops_an_orphaned_plain_instance(
    ienv: BotEnv, cvast: FakeVast
) -> None:
    server = await rent_running(ienv, "orphan", PLAIN_IMAGE)
    inst = cvast.instances[int(server.provider_id or 0)]
    container = cvast.containers.containers[inst.id]
    heartbeat = container.path(vast_provider.HEARTBEAT_FILE)
    await eventually(lambda: _exists(heartbeat), timeout=10)  # the watchdog runs
    # While the bot lives, its heartbeat over SSH keeps the file fresh.
    half_an_hour_ago = time.time() - 1800
    os.utime(heartbeat, (half_an_hour_ago, half_an_hour_ago))
    await ienv.services.remote.heartbeat(server)
    assert heartbeat.stat().st_mtime > time.time() - 60

    async def stopped() -> bool:
        # The bot has been silent for two hours: its heartbeat no longer arrives. (Aged
        # again on every look: the watchdog's own start touches the file once.)
        old = time.time() - 2 * 3600
        with contextlib.suppress(FileNotFoundError):
            os.utime(heartbeat, (old, old))
        return cvast.instances[inst.id].actual_status == "stopped"

    await eventually(stopped, timeout=30, interval=0.1)
    [call] = [c for c in cvast.calls(f"PUT /api/v0/instances/{inst.id}/")
              if c.body == {"state": "stopped"}]
    assert call.status == 200 and not call.key_in_query
    assert container.namespace is None  # stopped: its processes are gone


async def stop_and_start(env: BotEnv, name: str, port: int | None = None) -> None:
    """/server stop, then /server start (confirmed); returns once the bot says running."""
    server = await env.services.servers.get(name)
    port = port or server.comfy_port or 0
    await env.slash("server", {"server": name}, user=env.fake.admin, subcommand="stop")
    await eventually(lambda: _status(env, name, "stopped"), timeout=30)
    assert not comfy_answers(port)  # every process of the instance is gone
    start = await env.slash("server", {"server": name}, user=env.fake.admin,
                            subcommand="start")
    await press(env, start, "Start it")
    await eventually(lambda: _status(env, name, "running"), timeout=30)


async def _newer(path: Path, mtime: float) -> bool:
    return path.stat().st_mtime > mtime


async def _exists(path: Path) -> bool:
    return path.exists()
