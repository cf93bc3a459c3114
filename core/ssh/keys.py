"""The bot's own SSH key pair (:func:`ensure_client_key`) and key fingerprints."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

log = logging.getLogger(__name__)


@dataclass(frozen=True, repr=False)
class ClientKey:
    """The bot's SSH key pair. Its repr shows the path and fingerprint, never the private key."""

    path: Path
    public_openssh: str
    _private: asyncssh.SSHKey = field(compare=False)

    @property
    def fingerprint(self) -> str:
        return self._private.get_fingerprint()

    @property
    def private_key(self) -> asyncssh.SSHKey:
        """The private key, for authenticating connections (never log or render it)."""
        return self._private

    def __repr__(self) -> str:
        return f"ClientKey(path={str(self.path)!r}, fingerprint={self.fingerprint!r})"


def ensure_client_key(path: Path, *, comment: str = "comfyvast") -> ClientKey:
    """Load the private key at ``path``, generating an ed25519 pair there on first use.

    The private key is written with mode 0600 (created that way, so it is never readable by
    others even for a moment) in a directory created 0700; the public key goes next to it as
    ``<name>.pub``. Blocking file I/O: call it at start-up, not from a busy event loop.
    """
    path = Path(path)
    pub_path = path.with_name(path.name + ".pub")
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it meanwhile; load theirs below
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(key.export_private_key("openssh"))
            pub_path.write_bytes(key.export_public_key("openssh"))
            log.info("Generated SSH client key %s (%s)", path, key.get_fingerprint())
    key = asyncssh.read_private_key(path)
    if path.stat().st_mode & 0o077:
        # ssh(1) refuses such keys; we tighten instead so a copied file keeps working.
        log.warning("SSH client key %s was readable by others; setting mode 0600", path)
        path.chmod(0o600)
    public = key.export_public_key("openssh").decode().strip()
    if not pub_path.exists():
        pub_path.write_text(public + "\n")
    return ClientKey(path=path, public_openssh=public, _private=key)


def host_key_fingerprint(public_openssh: str) -> str:
    """The ``SHA256:...`` fingerprint of an OpenSSH public key line, for humans and logs."""
    return asyncssh.import_public_key(public_openssh).get_fingerprint()
