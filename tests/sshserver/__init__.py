"""SSH servers on 127.0.0.1 for tests: an in-process asyncssh one and the real OpenSSH sshd.

Both expose ``host``, ``port``, ``username``, ``host_key_openssh``, ``connection_count()``,
``drop_connections()``, ``rotate_host_key()`` and ``start()``/``close()`` (or ``async with``),
so the same tests run against both.
"""

from typing import Any

import pytest

from tests.sshserver.asyncssh_server import AsyncSSHTestServer
from tests.sshserver.openssh_server import OpenSSHTestServer

__all__ = ["AsyncSSHTestServer", "OpenSSHTestServer", "start_ssh_server"]


async def start_ssh_server(kind: str, public_key: str, home: str | None = None) -> Any:
    """A started server of ``kind`` ("asyncssh" or "openssh") accepting ``public_key``;
    skips the test when OpenSSH's sshd is not installed. With ``home``, logins read
    ``home/.ssh/authorized_keys`` and commands see ``HOME=home``."""
    if kind == "openssh":
        if not OpenSSHTestServer.available():
            pytest.skip(OpenSSHTestServer.unavailable_reason())
        server: Any = OpenSSHTestServer(public_key, home=home)
    else:
        server = AsyncSSHTestServer(public_key, home=home)
    await server.start()
    return server
