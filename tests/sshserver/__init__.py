"""SSH servers on 127.0.0.1 for tests: an in-process asyncssh one and the real OpenSSH sshd.

Both expose ``host``, ``port``, ``username``, ``host_key_openssh``, ``connection_count()``,
``drop_connections()``, ``rotate_host_key()`` and ``start()``/``close()`` (or ``async with``),
so the same tests run against both.
"""

from tests.sshserver.asyncssh_server import AsyncSSHTestServer
from tests.sshserver.openssh_server import OpenSSHTestServer

__all__ = ["AsyncSSHTestServer", "OpenSSHTestServer"]
