"""SSH access to GPU servers: pinned host keys, a small connection pool, commands, SFTP, tunnels.

The modules, from the bottom up (each imports only those above it):

* :mod:`~core.ssh.target` – :class:`SSHTarget` says where to go: host, port, user and the
  *pinned* host key (an OpenSSH public key line stored with the server row);
  :class:`SSHOptions`; :func:`quote_command`.
* :mod:`~core.ssh.keys` – :func:`ensure_client_key` creates the bot's own ed25519 key pair on
  first use and loads it afterwards. Its public half is what operators put into
  ``authorized_keys`` (or what we register with Vast.ai). :func:`host_key_fingerprint`.
* :mod:`~core.ssh.errors` – :class:`SSHError` and its kinds.
* :mod:`~core.ssh.connector` – :class:`SSHConnector` opens one authenticated asyncssh
  connection, pins host keys on first use (:func:`fetch_host_key`) and retries transient
  failures with backoff.
* :mod:`~core.ssh.pool` – :class:`~core.ssh.pool.ConnectionPool` keeps at most one connection
  per target (keyed by :attr:`SSHTarget.key`), replaces dead ones, closes idle ones after
  ``idle_timeout`` seconds and bounds the sessions per connection.
* :mod:`~core.ssh.capture` and :mod:`~core.ssh.run` – running one command: its line, its
  output captured line by line, stopping it by its process group.
* :mod:`~core.ssh.sftp` – small file transfers.
* :mod:`~core.ssh.tunnels` – :class:`Tunnel` / :class:`TunnelManager` give ComfyUI's port on
  the server a stable local endpoint that survives reconnects: a Unix socket only the bot's
  user can open, named by an ``http+unix://`` URL (:func:`unix_socket_path` reads it).
* :mod:`~core.ssh.client` – :class:`SSHPool`, the pool with the operations:
  :meth:`SSHPool.run`, :meth:`SSHPool.upload_bytes`, :meth:`SSHPool.download_bytes` and
  :meth:`SSHPool.forward_local`.

Remote commands are shell strings run by the user's login shell, which must be POSIX-like
(sh, bash, dash, zsh). **Every value that goes into one must pass through**
:func:`shlex.quote` (or build the whole line with :func:`quote_command`); nothing in this
package quotes for you. Secrets (download tokens) must not be part of the command line
because any user on the server can read it with ``ps``: pass them with ``secret_env=``,
which sends them over the channel's stdin (see :meth:`SSHPool.run`).

Shut down in this order: :meth:`TunnelManager.close_all`, then :meth:`SSHPool.close`.
"""

from core.ssh.capture import LineCallback
from core.ssh.client import SSHPool
from core.ssh.connector import SSHConnector, fetch_host_key
from core.ssh.errors import (
    HostKeyMismatch,
    SSHAuthError,
    SSHCommandFailed,
    SSHConnectError,
    SSHError,
    SSHFileNotFound,
    SSHTimeout,
)
from core.ssh.keys import ClientKey, ensure_client_key, host_key_fingerprint
from core.ssh.run import CommandResult
from core.ssh.target import SSHOptions, SSHTarget, quote_command
from core.ssh.tunnels import Tunnel, TunnelManager, unix_socket_path

__all__ = [
    "ClientKey",
    "CommandResult",
    "HostKeyMismatch",
    "LineCallback",
    "SSHAuthError",
    "SSHCommandFailed",
    "SSHConnectError",
    "SSHConnector",
    "SSHError",
    "SSHFileNotFound",
    "SSHOptions",
    "SSHPool",
    "SSHTarget",
    "SSHTimeout",
    "Tunnel",
    "TunnelManager",
    "ensure_client_key",
    "fetch_host_key",
    "host_key_fingerprint",
    "quote_command",
    "unix_socket_path",
]
