"""Connecting: pinned host keys, trust on first use, retries and what is not retried."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.ssh import (
    HostKeyMismatch,
    SSHAuthError,
    SSHConnectError,
    SSHConnector,
    SSHPool,
    SSHTarget,
    ensure_client_key,
    fetch_host_key,
)
from tests.ssh.conftest import FAST, SSHServer


async def test_first_contact_pins_the_key_and_a_rotated_key_is_refused(
    ssh_server: SSHServer, ssh_key
):
    learned: list[tuple[SSHTarget, str]] = []

    async def remember(target: SSHTarget, key: str) -> None:
        learned.append((target, key))

    connector = SSHConnector(ssh_key, FAST, on_host_key_learned=remember)
    unpinned = SSHTarget(ssh_server.host, ssh_server.port, ssh_server.username, server_id=7)
    pool = SSHPool(connector)
    try:
        assert (await pool.run(unpinned, "echo hi", timeout=10)).stdout == "hi\n"
        assert [key for _, key in learned] == [ssh_server.host_key_openssh]
        assert learned[0][0].server_id == 7
        old_key = ssh_server.host_key_openssh

        await ssh_server.rotate_host_key()
        ssh_server.drop_connections()
        await asyncio.sleep(0.1)

        # Pinned in the connector (this process) and in the database (the caller's copy).
        for target in (unpinned, dataclasses.replace(unpinned, pinned_host_key=old_key)):
            with pytest.raises(HostKeyMismatch) as info:
                await pool.run(target, "echo hi", timeout=10)
            assert str(info.value).startswith(
                f"The SSH host key of {ssh_server.host}:{ssh_server.port} changed since it "
                "was pinned;"
            )
        assert len(learned) == 1
    finally:
        await pool.close()


async def test_fetch_host_key_learns_then_checks(ssh_server: SSHServer):
    key = await fetch_host_key(ssh_server.host, ssh_server.port, timeout=5)
    assert key == ssh_server.host_key_openssh
    assert await fetch_host_key(ssh_server.host, ssh_server.port, pinned=key) == key

    await ssh_server.rotate_host_key()
    with pytest.raises(HostKeyMismatch, match="changed since it was pinned"):
        await fetch_host_key(ssh_server.host, ssh_server.port, pinned=key)


async def test_host_key_mismatch_is_not_retried(ssh_server: SSHServer, connector: SSHConnector):
    # Any other ed25519 public key will do as a wrong pin: use the client's own.
    other = SSHTarget(
        ssh_server.host,
        ssh_server.port,
        ssh_server.username,
        pinned_host_key=connector.client_key.public_openssh,
    )
    before = ssh_server.connection_count()
    with pytest.raises(HostKeyMismatch):
        await connector.connect(other)
    await asyncio.sleep(0.1)  # let sshd write its log line
    assert ssh_server.connection_count() - before == 1


async def test_auth_failure_is_not_retried(
    ssh_server: SSHServer, target: SSHTarget, tmp_path: Path
):
    stranger = ensure_client_key(tmp_path / "stranger" / "id_ed25519")
    connector = SSHConnector(stranger, FAST)
    before = ssh_server.connection_count()
    with pytest.raises(SSHAuthError) as info:
        await connector.connect(target)
    await asyncio.sleep(0.1)
    assert ssh_server.connection_count() - before == 1
    assert "did not accept the bot's key" in str(info.value)
    assert "PRIVATE" not in str(info.value)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_connection_refused_is_retried_with_backoff(
    connector: SSHConnector, caplog: pytest.LogCaptureFixture
):
    port = _closed_port()
    target = SSHTarget(
        "127.0.0.1", port, "root", pinned_host_key=connector.client_key.public_openssh
    )
    caplog.set_level(logging.WARNING, logger="core.ssh")
    started = time.monotonic()
    with pytest.raises(SSHConnectError) as info:
        await connector.connect(target)
    elapsed = time.monotonic() - started

    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == FAST.connect_attempts - 1
    # Equal jitter: at least half of each exponential step is always waited.
    assert elapsed >= sum(FAST.backoff_base * 2**i / 2 for i in range(len(retries)))
    assert str(info.value) == (
        f"Could not connect to 127.0.0.1:{port} over SSH after {FAST.connect_attempts} "
        "attempts: connection refused."
    )


@pytest.fixture
async def slamming_server() -> AsyncIterator[tuple[int, list[int]]]:
    """Accepts TCP connections and closes them at once, counting them."""
    accepted: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()
        await server.wait_closed()


async def test_dropped_handshakes_are_retried_then_reported(
    connector: SSHConnector, slamming_server: tuple[int, list[int]]
):
    port, accepted = slamming_server
    target = SSHTarget(
        "127.0.0.1", port, "root", pinned_host_key=connector.client_key.public_openssh
    )
    with pytest.raises(SSHConnectError, match=f"after {FAST.connect_attempts} attempts"):
        await connector.connect(target)
    assert len(accepted) == FAST.connect_attempts
