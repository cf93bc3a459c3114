"""The pool: one connection per target, replaced when dead, closed when idle."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from core.ssh import SSHConnectError, SSHConnector, SSHPool, SSHTarget
from tests.ssh.conftest import FAST, SSHServer


async def _settled_count(server: SSHServer) -> int:
    await asyncio.sleep(0.1)  # sshd logs from another process
    return server.connection_count()


async def test_repeated_and_concurrent_work_share_one_connection(
    ssh_server: SSHServer, pool: SSHPool, target: SSHTarget
):
    before = await _settled_count(ssh_server)
    for _ in range(3):
        await pool.run(target, "true", timeout=10)
    await asyncio.gather(*(pool.run(target, "sleep 0.2", timeout=10) for _ in range(5)))
    assert await _settled_count(ssh_server) - before == 1
    assert pool.open_connections == 1


async def test_idle_connection_is_closed_and_reopened_on_demand(
    ssh_server: SSHServer, connector: SSHConnector, target: SSHTarget
):
    connector.options = dataclasses.replace(FAST, idle_timeout=0.3)
    pool = SSHPool(connector)
    try:
        before = await _settled_count(ssh_server)
        await pool.run(target, "true", timeout=10)
        assert pool.open_connections == 1
        await asyncio.sleep(0.7)
        assert pool.open_connections == 0
        if hasattr(ssh_server, "open_connections"):
            assert ssh_server.open_connections == 0
        await pool.run(target, "true", timeout=10)
        assert await _settled_count(ssh_server) - before == 2
    finally:
        await pool.close()


async def test_dropped_connection_is_replaced(
    ssh_server: SSHServer, pool: SSHPool, target: SSHTarget
):
    await pool.run(target, "true", timeout=10)
    ssh_server.drop_connections()
    await asyncio.sleep(0.2)
    assert (await pool.run(target, "echo back", timeout=10)).stdout == "back\n"


async def test_drop_during_a_command_raises_connect_error(
    ssh_server: SSHServer, pool: SSHPool, target: SSHTarget
):
    started = asyncio.Event()
    task = asyncio.create_task(
        pool.run(target, "echo go; sleep 3", timeout=10, on_line=lambda *_: started.set())
    )
    await asyncio.wait_for(started.wait(), 5)
    ssh_server.drop_connections()
    with pytest.raises(SSHConnectError, match="was lost while a command was running"):
        await asyncio.wait_for(task, 5)


async def test_changed_target_gets_a_new_connection(
    ssh_server: SSHServer, pool: SSHPool, target: SSHTarget
):
    before = await _settled_count(ssh_server)
    await pool.run(target, "true", timeout=10)
    # Same server id, re-registered under another name for the host: not the old connection.
    moved = dataclasses.replace(target, host="localhost")
    await pool.run(moved, "true", timeout=10)
    assert await _settled_count(ssh_server) - before == 2
    assert pool.open_connections == 1
