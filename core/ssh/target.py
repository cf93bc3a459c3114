"""Where to connect and how: :class:`SSHTarget`, :class:`SSHOptions`, quoting a command line.

Pure values with no I/O; every other module of the package builds on them.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from core.retry import Backoff


def address(host: str, port: int) -> str:
    """``host:port`` for logs and messages, with IPv6 literals bracketed."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class SSHTarget:
    """Where to connect. ``key`` identifies it in pools: the server id when there is one."""

    host: str
    port: int = 22
    username: str = "root"
    # OpenSSH public key line ("ssh-ed25519 AAAA..."); None means trust on first use.
    pinned_host_key: str | None = field(default=None, repr=False)
    server_id: int | str | None = None

    @property
    def key(self) -> str:
        if self.server_id is not None:
            return f"server:{self.server_id}"
        return f"{self.username}@{self.address}"

    @property
    def address(self) -> str:
        return address(self.host, self.port)


@dataclass(frozen=True)
class SSHOptions:
    """Timeouts, keepalives, retry and pool settings (the ``[ssh]`` config section)."""

    connect_timeout: float = 15.0
    # Keepalives notice a silently dead connection (e.g. a rebooted instance) within
    # interval * count_max seconds, so the pool and tunnels replace it.
    keepalive_interval: float = 15.0
    keepalive_count_max: int = 3
    connect_attempts: int = 4
    backoff_base: float = 0.5
    backoff_max: float = 10.0
    idle_timeout: float = 300.0
    # OpenSSH allows 10 sessions per connection by default (MaxSessions); stay below it.
    max_sessions_per_connection: int = 8

    def backoff(self) -> Backoff:
        """The delays between connect attempts and between a tunnel's reconnects.

        Equal jitter: half of each delay is fixed so retries really do back off, the other
        half is random so many clients that failed together do not come back together.
        """
        return Backoff(self.backoff_base, self.backoff_max, jitter="equal")


def quote_command(argv: list[str]) -> str:
    """Join ``argv`` into a shell command line with every element quoted (``shlex.join``)."""
    return shlex.join(argv)
