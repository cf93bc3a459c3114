"""Fixtures for the setup and diagnostics tests: a real SSH server on 127.0.0.1 (asyncssh
in-process and OpenSSH sshd), a server row for it, and a SetupService that knows the test
profile and installs into the test's temporary directory.

Import the fixtures you use into the test module: ``bed_fixture`` provides ``bed`` and needs
``setup_ssh_fixture`` (``setup_ssh``) imported too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.audit import Actor
from core.diagnostics import Diagnostics
from core.servers import ServerView
from core.services import Services
from core.setup import DEFAULT_PROFILE_DIR, SetupService
from tests.sshserver import start_ssh_server

TEST_PROFILES = Path(__file__).parent / "data" / "profiles"
ADMIN = Actor(user_id=42, guild_id=1, channel_id=2, is_admin=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_setup_service(services: Services, install_dir: Path, **params: str) -> SetupService:
    """A SetupService over ``services`` with the test profile, installing into
    ``install_dir``, with the stand-in ComfyUI run by this interpreter."""
    return SetupService(
        services.settings, services.sessions, services.servers, services.remote,
        services.audit, profile_dirs=(DEFAULT_PROFILE_DIR, TEST_PROFILES),
        params={"install_dir": str(install_dir), "host_python": sys.executable, **params},
        tick=0.2,
    )


def stop_supervisor(install_dir: Path) -> None:
    """Kill what the start step left running (it outlives SSH sessions on purpose)."""
    state = install_dir / ".comfyvast"
    for name in ("supervisor.pid", "comfyui.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int((state / name).read_text().strip())
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of ours stays a zombie until reaped; it is not running.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


@dataclass
class SetupBed:
    services: Services
    setup: SetupService
    server: ServerView
    ssh: Any
    install_dir: Path
    comfy_port: int

    def ran(self) -> list[str]:
        """The test profile's step commands that ran, in order (from ran.log)."""
        try:
            return (self.install_dir / "ran.log").read_text().splitlines()
        except FileNotFoundError:
            return []

    def pid(self, name: str = "supervisor") -> int | None:
        try:
            return int((self.install_dir / ".comfyvast" / f"{name}.pid").read_text())
        except (OSError, ValueError):
            return None


def comfy_answers(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@pytest.fixture(name="setup_ssh", params=["asyncssh", "openssh"])
async def setup_ssh_fixture(
    request: pytest.FixtureRequest, services: Services
) -> AsyncIterator[Any]:
    """A real SSH server on loopback accepting the services' key (both kinds)."""
    server = await start_ssh_server(request.param, services.remote.key.public_openssh)
    yield server
    await server.close()


@pytest.fixture(name="bed")
async def bed_fixture(
    services: Services, setup_ssh: Any, tmp_path: Path
) -> AsyncIterator[SetupBed]:
    install_dir = tmp_path / "srv" / "ComfyUI"
    port = free_port()
    server = await services.servers.add_ssh(
        ADMIN, "box", setup_ssh.host, setup_ssh.port, setup_ssh.username,
        setup_ssh.host_key_openssh, comfy_port=port)
    setup = make_setup_service(services, install_dir)
    await setup.startup()
    services.setup = setup  # type: ignore[attr-defined]
    services.diagnostics = Diagnostics(  # type: ignore[attr-defined]
        services.servers, services.remote, setup, services.http)
    try:
        yield SetupBed(services, setup, server, setup_ssh, install_dir, port)
    finally:
        await setup.close()
        stop_supervisor(install_dir)


async def wait_until(predicate: Any, timeout: float = 10.0) -> Any:
    """Poll a sync ``predicate()`` until truthy (for state that changes on its own)."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)
