"""Moving small files over SFTP: :func:`upload_bytes` (atomic) and :func:`download_bytes`.

Both run in one session slot of the pooled connection; :class:`core.ssh.client.SSHPool`
offers them as methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

import asyncssh

from core.ssh.errors import SSHConnectError, SSHError, SSHFileNotFound, SSHTimeout
from core.ssh.pool import ConnectionPool
from core.ssh.target import SSHTarget

log = logging.getLogger(__name__)


async def upload_bytes(
    pool: ConnectionPool,
    target: SSHTarget,
    data: bytes,
    remote_path: str,
    mode: int = 0o644,
    *,
    timeout: float = 120.0,
) -> None:
    """Write ``data`` to ``remote_path`` over SFTP, atomically (temp file + rename)."""
    where = target.address
    tmp = f"{remote_path}.part-{secrets.token_hex(4)}"
    try:
        async with asyncio.timeout(timeout), pool.session(target) as conn:
            async with conn.start_sftp_client() as sftp:
                try:
                    async with sftp.open(tmp, "wb", asyncssh.SFTPAttrs(permissions=mode)) as fh:
                        await fh.write(data)
                    # The server's umask applied at creation; set the mode asked for.
                    await sftp.chmod(tmp, mode)
                    await sftp.posix_rename(tmp, remote_path)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await sftp.remove(tmp)
                    raise
    except TimeoutError:
        raise SSHTimeout(timeout, where=where) from None
    except asyncssh.SFTPError as exc:
        raise SSHError(f"Could not write {remote_path} on {where}: {exc.reason}.") from exc
    except (asyncssh.Error, OSError) as exc:
        raise SSHConnectError(f"The SSH connection to {where} failed during upload.") from exc
    log.debug("Uploaded %d bytes to %s:%s", len(data), where, remote_path)


async def download_bytes(
    pool: ConnectionPool,
    target: SSHTarget,
    remote_path: str,
    max_bytes: int,
    *,
    timeout: float = 120.0,
) -> bytes:
    """Read ``remote_path`` over SFTP; refuse files larger than ``max_bytes``."""
    where = target.address
    try:
        async with asyncio.timeout(timeout), pool.session(target) as conn:
            async with conn.start_sftp_client() as sftp:
                async with sftp.open(remote_path, "rb") as fh:
                    data = await fh.read(max_bytes + 1)
    except TimeoutError:
        raise SSHTimeout(timeout, where=where) from None
    except asyncssh.SFTPNoSuchFile as exc:
        raise SSHFileNotFound(f"There is no file {remote_path} on {where}.") from exc
    except asyncssh.SFTPError as exc:
        raise SSHError(f"Could not read {remote_path} on {where}: {exc.reason}.") from exc
    except (asyncssh.Error, OSError) as exc:
        raise SSHConnectError(f"The SSH connection to {where} failed during download.") from exc
    if len(data) > max_bytes:
        raise SSHError(f"{remote_path} on {where} is larger than {max_bytes} bytes.")
    return data
