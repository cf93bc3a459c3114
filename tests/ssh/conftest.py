"""Fixtures for the SSH layer: a client key and a server of each kind."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.ssh import ClientKey, SSHConnector, SSHOptions, SSHPool, SSHTarget, ensure_client_key
from tests.sshserver import AsyncSSHTestServer, OpenSSHTestServer

SSHServer = AsyncSSHTestServer | OpenSSHTestServer

# Short timings keep the directory fast; the behaviour is the same as with the defaults.
FAST = SSHOptions(
    connect_timeout=5.0,
    keepalive_interval=5.0,
    connect_attempts=3,
    backoff_base=0.05,
    backoff_max=0.2,
    idle_timeout=30.0,
)


@pytest.fixture
def ssh_key(tmp_path: Path) -> ClientKey:
    return ensure_client_key(tmp_path / "keys" / "id_ed25519")


@pytest.fixture(params=["asyncssh", "openssh"])
async def ssh_server(
    request: pytest.FixtureRequest, ssh_key: ClientKey
) -> AsyncIterator[SSHServer]:
    server: SSHServer
    if request.param == "openssh":
        if not OpenSSHTestServer.available():
            pytest.skip(OpenSSHTestServer.unavailable_reason())
        server = OpenSSHTestServer(ssh_key.public_openssh)
    else:
        server = AsyncSSHTestServer(ssh_key.public_openssh)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
def target(ssh_server: SSHServer) -> SSHTarget:
    """The server, with its host key pinned as if it had been registered earlier."""
    return SSHTarget(
        host=ssh_server.host,
        port=ssh_server.port,
        username=ssh_server.username,
        pinned_host_key=ssh_server.host_key_openssh,
        server_id=1,
    )


@pytest.fixture
def connector(ssh_key: ClientKey) -> SSHConnector:
    return SSHConnector(ssh_key, FAST)


@pytest.fixture
async def pool(connector: SSHConnector) -> AsyncIterator[SSHPool]:
    pool = SSHPool(connector)
    try:
        yield pool
    finally:
        await pool.close()


def process_cmdlines() -> list[bytes]:
    """argv of every process on this machine (the test servers run here), NUL-separated."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.append((entry / "cmdline").read_bytes())
            except OSError:
                continue
    return found
