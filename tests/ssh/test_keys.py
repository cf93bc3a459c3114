"""The bot's client key and command quoting."""

from __future__ import annotations

import shlex
import stat
from pathlib import Path

import pytest

from core.ssh import (
    ClientKey,
    SSHCommandFailed,
    SSHPool,
    SSHTarget,
    ensure_client_key,
    quote_command,
)


def test_client_key_is_generated_private_and_reloaded(tmp_path: Path):
    path = tmp_path / "secrets" / "ssh" / "id_ed25519"
    key = ensure_client_key(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert key.public_openssh.startswith("ssh-ed25519 ")
    assert (
        path.with_name("id_ed25519.pub").read_text().split()[:2] == (key.public_openssh.split()[:2])
    )
    again = ensure_client_key(path)
    assert again.public_openssh == key.public_openssh
    assert again.fingerprint == key.fingerprint


def test_client_key_repr_hides_the_private_key(tmp_path: Path):
    path = tmp_path / "id_ed25519"
    key = ensure_client_key(path)
    private_body = "".join(path.read_text().splitlines()[1:-1])
    text = repr(key) + str(key)
    assert "PRIVATE" not in text
    assert private_body[:20] not in text
    assert key.fingerprint in repr(key)


def test_loose_permissions_are_tightened(tmp_path: Path):
    path = tmp_path / "id_ed25519"
    ensure_client_key(path)
    path.chmod(0o644)
    ensure_client_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_quote_command_round_trips_through_the_shell_lexer():
    argv = ["printf", "%s", "a;rm -rf ~", "$(id)", "it's", ""]
    assert shlex.split(quote_command(argv)) == argv


async def test_removing_the_old_key_never_leaves_the_new_one_out(
    pool: SSHPool, target: SSHTarget, ssh_key: ClientKey, tmp_path: Path
) -> None:
    """core.servers.keys: the edit refuses (exit 3, file untouched) unless the key that
    should stay is in authorized_keys, so a rotation cannot lock the bot out."""
    from core.servers.keys import add_key_command, remove_key_command

    home = tmp_path / "home"
    keys = home / ".ssh" / "authorized_keys"
    other = ensure_client_key(tmp_path / "other" / "id_ed25519")
    env = {"HOME": str(home)}
    keys.parent.mkdir(parents=True)
    keys.write_text("ssh-rsa AAAAB3Nzaunrelated user@laptop")  # no final newline
    await pool.run(target, add_key_command(ssh_key.public_openssh), timeout=30, env=env)
    await pool.run(target, add_key_command(ssh_key.public_openssh), timeout=30, env=env)
    assert keys.read_text() == f"ssh-rsa AAAAB3Nzaunrelated user@laptop\n{ssh_key.public_openssh}\n"

    before = keys.read_text()
    with pytest.raises(SSHCommandFailed) as info:
        await pool.run(target, remove_key_command(ssh_key.public_openssh, other.public_openssh),
                       timeout=30, env=env)
    assert info.value.exit_status == 3
    assert keys.read_text() == before

    await pool.run(target, add_key_command(other.public_openssh), timeout=30, env=env)
    await pool.run(target, remove_key_command(ssh_key.public_openssh, other.public_openssh),
                   timeout=30, env=env)
    assert keys.read_text() == f"ssh-rsa AAAAB3Nzaunrelated user@laptop\n{other.public_openssh}\n"
