"""The SSH failures: :class:`SSHError` and its kinds. ``str()`` of each is a user-safe sentence."""

from __future__ import annotations

from core.errors import ExternalServiceError
from core.ssh.target import address


class SSHError(ExternalServiceError):
    """Base for every SSH failure; ``str()`` is a user-safe sentence."""


class SSHConnectError(SSHError):
    """The server could not be reached, or the connection was lost."""


class SSHAuthError(SSHError):
    """The server refused the bot's key."""


class HostKeyMismatch(SSHError):
    """The server presented a host key other than the pinned one."""

    def __init__(self, host: str, port: int, pinned_fingerprint: str | None = None) -> None:
        super().__init__(
            f"The SSH host key of {address(host, port)} changed since it was pinned; "
            "if the server was reinstalled on purpose, re-register it to pin the new key, "
            "otherwise someone may be intercepting the connection."
        )
        self.host = host
        self.port = port
        self.pinned_fingerprint = pinned_fingerprint


class SSHCommandFailed(SSHError):
    """A remote command exited with a non-zero status."""

    def __init__(self, exit_status: int, stderr_tail: str, *, where: str = "the server") -> None:
        sentence = f"The command on {where} failed with exit status {exit_status}."
        if stderr_tail:
            sentence += f"\nLast lines of its error output:\n{stderr_tail}"
        super().__init__(sentence)
        self.exit_status = exit_status
        self.stderr_tail = stderr_tail


class SSHTimeout(SSHError):
    """A remote command ran longer than its timeout and was stopped."""

    def __init__(self, timeout: float, *, where: str = "the server") -> None:
        super().__init__(
            f"The command on {where} did not finish within {timeout:g} seconds and was stopped."
        )
        self.timeout = timeout


class SSHFileNotFound(SSHError):
    """A remote file asked for over SFTP does not exist."""
