"""Files over SFTP."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from core.ssh import SSHError, SSHFileNotFound, SSHPool, SSHTarget


async def test_upload_then_download_round_trip(pool: SSHPool, target: SSHTarget, tmp_path: Path):
    data = os.urandom(200_000)
    remote = tmp_path / "sub" / "workflow.json"
    remote.parent.mkdir()
    await pool.upload_bytes(target, data, str(remote), mode=0o600)

    assert remote.read_bytes() == data
    assert stat.S_IMODE(remote.stat().st_mode) == 0o600
    assert sorted(p.name for p in remote.parent.iterdir()) == ["workflow.json"]  # no temp left
    assert await pool.download_bytes(target, str(remote), max_bytes=len(data)) == data


async def test_upload_replaces_an_existing_file(pool: SSHPool, target: SSHTarget, tmp_path: Path):
    remote = tmp_path / "f.txt"
    remote.write_text("old")
    await pool.upload_bytes(target, b"new", str(remote))
    assert remote.read_text() == "new"
    assert stat.S_IMODE(remote.stat().st_mode) == 0o644


async def test_download_refuses_files_over_the_limit(
    pool: SSHPool, target: SSHTarget, tmp_path: Path
):
    remote = tmp_path / "big.bin"
    remote.write_bytes(b"x" * 1001)
    with pytest.raises(SSHError, match="larger than 1000 bytes"):
        await pool.download_bytes(target, str(remote), max_bytes=1000)


async def test_download_of_a_missing_file(pool: SSHPool, target: SSHTarget, tmp_path: Path):
    with pytest.raises(SSHFileNotFound, match="There is no file"):
        await pool.download_bytes(target, str(tmp_path / "nope"), max_bytes=10)
