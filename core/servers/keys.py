"""Rotating the bot's SSH key (``/server rotate-key``, ``ssh.rotate_days``) without locking
any server out.

A rotation runs in passes; each pass is safe to interrupt and to repeat:

1. **Start**: a new ed25519 key is written next to the current one (``<key>.next``) and
   the plan is saved in bot_state (:data:`STATE_KEY`): both public keys and, per server,
   how far it got. From now on the bot offers both keys when it connects.
2. **Install** on every running server with a shell: the new key is attached to the Vast
   instance (``POST /instances/{id}/ssh/``) and appended to ``~/.ssh/authorized_keys``
   over the current connection, then *proven* by a fresh login with the new key alone.
3. **Promote**: the new key becomes the bot's key file (the old one is kept as
   ``<key>.old``) and is registered on the Vast account; new rentals get it.
4. **Retire** on each server where the new key was proven: the old key's line is removed
   from ``authorized_keys`` (only if the new key's line is still there) and detached from
   the Vast instance.
5. **Finish** once every server is done: the old key leaves the Vast account and the disk.

A server that cannot be reached (stopped, down, refusing) keeps the old key, and the bot
keeps offering it, until a later pass (the next ``/server rotate-key``, or the maintenance
loop with ``ssh.rotate_days``) gets through. Which key file is current is decided by
comparing public keys with the saved plan, so a crash between two file operations resumes
correctly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from core.botstate import StateStore
from core.providers import has_shell
from core.remote import Remote
from core.servers import ServerRegistry, ServerView
from core.ssh import ClientKey, SSHConnector, SSHError, ensure_client_key
from core.vast import VastClient, VastError

log = logging.getLogger(__name__)

STATE_KEY = "ssh_key_rotation"
# How long a proof login or an authorized_keys edit may take, seconds.
COMMAND_TIMEOUT = 60.0
# A pending rotation is retried by the maintenance loop at most this often, seconds.
RETRY_EVERY = 3600.0
# Servers worked on at once.
PARALLEL = 8
_REASON_CHARS = 200

INSTALLED, DONE = "installed", "done"


@dataclass(frozen=True)
class RotationReport:
    """What one pass achieved. ``pending`` lists (server name, reason) of the servers that
    still hold the old key; ``finished`` is True when the old key is gone everywhere."""

    fingerprint: str
    started: bool
    done: tuple[str, ...]
    pending: tuple[tuple[str, str], ...]
    finished: bool


def _body(public_key: str) -> str:
    """"type base64" of a key line: what identifies it whatever its comment or options."""
    return " ".join(public_key.split()[:2])


def add_key_command(public_key: str) -> str:
    """Append ``public_key`` to ``~/.ssh/authorized_keys`` unless it is there already."""
    line, body = shlex.quote(public_key.strip()), shlex.quote(_body(public_key))
    return (
        'umask 077; mkdir -p "$HOME/.ssh" && f="$HOME/.ssh/authorized_keys" && touch "$f" && '
        # A last line without its newline would be glued to ours.
        'if [ -s "$f" ] && [ -n "$(tail -c 1 "$f")" ]; then printf "\\n" >> "$f"; fi && '
        f'{{ grep -qF -- {body} "$f" || printf "%s\\n" {line} >> "$f"; }}'
    )


def remove_key_command(old_key: str, keep_key: str) -> str:
    """Remove ``old_key``'s lines from ``~/.ssh/authorized_keys``, refusing (exit 3) when
    ``keep_key`` would not be left in the file, so the edit can never lock the bot out."""
    old, keep = shlex.quote(_body(old_key)), shlex.quote(_body(keep_key))
    return (
        'f="$HOME/.ssh/authorized_keys"; [ -f "$f" ] || exit 0; t="$f.comfyvast-$$"; '
        f'grep -vF -- {old} "$f" > "$t"; '
        f'if ! grep -qF -- {keep} "$t"; then rm -f "$t"; '
        'echo "the new key is not in authorized_keys" >&2; exit 3; fi; '
        # cat, not mv: the file keeps its owner, mode and inode.
        'cat "$t" > "$f"; rm -f "$t"'
    )


class KeyRotation:
    """Runs rotations for the bot's SSH identity (``remote``); one at a time."""

    def __init__(
        self,
        key_path: Path,
        state: StateStore,
        servers: ServerRegistry,
        remote: Remote,
        vast: VastClient | None,
        *,
        rotate_days: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key_path = Path(key_path)
        self.next_path = self.key_path.with_name(self.key_path.name + ".next")
        self.old_path = self.key_path.with_name(self.key_path.name + ".old")
        self._state = state
        self._servers = servers
        self._remote = remote
        self._vast = vast
        self._rotate_days = rotate_days
        self._clock = clock
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ policy

    async def due(self) -> bool:
        """Whether the maintenance loop should run a pass now (``ssh.rotate_days``)."""
        if self._rotate_days is None:
            return False
        st = await self._state.get(STATE_KEY) or {}
        now = self._clock()
        if "new_public" in st:
            return now - float(st.get("last_attempt", 0)) >= RETRY_EVERY
        last = st.get("last_rotated")
        if last is None:
            last = self.key_path.stat().st_mtime if self.key_path.exists() else now
        return now - float(last) >= self._rotate_days * 86400

    async def tick(self) -> None:
        """One maintenance check: rotate (or resume) when due."""
        if await self.due():
            report = await self.rotate()
            log.info("scheduled SSH key rotation: %d done, %d pending, finished=%s",
                     len(report.done), len(report.pending), report.finished)

    # ---------------------------------------------------------------- rotation

    async def rotate(self) -> RotationReport:
        """Start a rotation, or resume the unfinished one, and run one pass of it."""
        async with self._lock:
            st = await self._state.get(STATE_KEY) or {}
            keys = await asyncio.to_thread(self._load_keys, st) if "new_public" in st else None
            started = keys is None
            if keys is None:
                st = await self._start()
                keys = await asyncio.to_thread(self._load_keys, st)
                assert keys is not None
            new, old = keys
            st["last_attempt"] = self._clock()
            self._remote.connector.use_keys(self._remote.key, new, old)
            progress: dict[str, str] = st.setdefault("servers", {})
            errors: dict[str, str] = {}
            targets = [s for s in await self._servers.list() if has_shell(s) and s.ssh_host]
            await self._each(
                [s for s in targets if progress.get(str(s.id)) not in (INSTALLED, DONE)],
                INSTALLED, progress, errors, self._install, new)
            await self._state.set(STATE_KEY, st)
            await self._promote(st, new, old)
            await self._each(
                [s for s in targets if progress.get(str(s.id)) == INSTALLED],
                DONE, progress, errors, self._retire, st["old_public"], new)
            done = tuple(s.name for s in targets if progress.get(str(s.id)) == DONE)
            pending = tuple((s.name, errors.get(str(s.id), "not reached"))
                            for s in targets if progress.get(str(s.id)) != DONE)
            finished = not pending
            if finished:
                await self._finish(st["old_public"], new)
            else:
                await self._state.set(STATE_KEY, st)
            log.info("SSH key rotation to %s: %d servers done, %d pending%s", new.fingerprint,
                     len(done), len(pending), ", finished" if finished else "")
            return RotationReport(new.fingerprint, started, done, pending, finished)

    async def _start(self) -> dict[str, Any]:
        def make() -> ClientKey:
            for path in (self.next_path, self.next_path.with_name(self.next_path.name + ".pub")):
                path.unlink(missing_ok=True)  # left by a start that crashed before saving
            return ensure_client_key(self.next_path)

        new = await asyncio.to_thread(make)
        st: dict[str, Any] = {
            "old_public": self._remote.key.public_openssh,
            "new_public": new.public_openssh,
            "started_at": self._clock(),
            "servers": {},
        }
        await self._state.set(STATE_KEY, st)
        log.info("SSH key rotation started: %s -> %s", self._remote.key.fingerprint,
                 new.fingerprint)
        return st

    def _load_keys(self, st: dict[str, Any]) -> tuple[ClientKey, ClientKey] | None:
        """(new, old) from the files, whichever step the last pass got to; None when the
        files no longer match the saved plan (then a fresh rotation starts)."""
        current = ensure_client_key(self.key_path)
        if _body(current.public_openssh) == _body(st["new_public"]):
            new, old_path = current, self.old_path  # promoted already
        elif _body(current.public_openssh) == _body(st["old_public"]):
            if not self.next_path.exists():
                log.warning("SSH key rotation: %s is gone; starting over", self.next_path)
                return None
            new, old_path = ensure_client_key(self.next_path), None
        else:
            log.warning("SSH key rotation: the key file changed since it started; starting over")
            return None
        if old_path is None:
            return new, current
        if old_path.exists():
            old = ensure_client_key(old_path)
            if _body(old.public_openssh) == _body(st["old_public"]):
                return new, old
        # The old private key is lost: nothing can log in with it any more, so only its
        # lines are left to remove (by st["old_public"]); offer the new key twice.
        return new, new

    async def _each(self, servers: list[ServerView], reached: str, progress: dict[str, str],
                    errors: dict[str, str], step: Any, *args: Any) -> None:
        """Run ``step`` on the servers, a few at a time (an unreachable server costs its
        connect timeouts); record ``reached`` or the reason it failed."""
        limit = asyncio.Semaphore(PARALLEL)

        async def one(server: ServerView) -> None:
            async with limit:
                reason = await self._attempt(step, server, *args)
            if reason is None:
                progress[str(server.id)] = reached
            else:
                errors[str(server.id)] = reason

        await asyncio.gather(*(one(server) for server in servers))

    async def _attempt(self, step: Any, server: ServerView, *args: Any) -> str | None:
        """Run one server's step; the reason it failed, or None."""
        if not server.is_ready:
            return f"not running ({server.status})"
        try:
            await step(server, *args)
        except (SSHError, VastError, asyncssh.Error, OSError, TimeoutError, ValueError) as exc:
            log.warning("SSH key rotation: %s: %s", server.name, exc)
            return str(exc)[:_REASON_CHARS] or type(exc).__name__
        return None

    async def _install(self, server: ServerView, new: ClientKey) -> None:
        instance = self._instance_id(server)
        if instance is not None and self._vast is not None:
            # Vast rewrites authorized_keys from the instance's key set (skypilot#10730).
            await self._vast.attach_ssh_key(instance, new.public_openssh)
        target = self._remote.target(server)
        await self._remote.pool.run(target, add_key_command(new.public_openssh),
                                    timeout=COMMAND_TIMEOUT)
        # The proof: a fresh connection that has nothing but the new key.
        prover = SSHConnector(new, self._remote.connector.options)
        conn = await prover.connect(target)
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                await conn.run("true", check=True)
        finally:
            conn.close()

    async def _retire(self, server: ServerView, old_public: str, new: ClientKey) -> None:
        target = self._remote.target(server)
        await self._remote.pool.run(
            target, remove_key_command(old_public, new.public_openssh), timeout=COMMAND_TIMEOUT)
        instance = self._instance_id(server)
        if instance is not None and self._vast is not None:
            for key in await self._vast.list_instance_ssh_keys(instance):
                if _body(key.public_key) == _body(old_public):
                    await self._vast.detach_ssh_key(instance, key.id)

    async def _promote(self, st: dict[str, Any], new: ClientKey, old: ClientKey) -> None:
        """Make the new key the bot's key file, keeping the old one as ``<key>.old``."""
        if _body(self._remote.key.public_openssh) != _body(new.public_openssh):
            await asyncio.to_thread(self._swap_files)
            self._remote.key = new
            self._remote.connector.use_keys(new, old)
            log.info("SSH key %s is now the bot's key; %s kept until retired",
                     new.fingerprint, old.fingerprint)
        if self._vast is not None:
            try:
                await self._vast.add_ssh_key(new.public_openssh)
            except VastError as exc:
                # Team API keys cannot hold account keys; instances get theirs attached.
                log.warning("could not register the new SSH key on the Vast account: %s", exc)

    def _swap_files(self) -> None:
        # Copy the old key aside first: at every moment one of the files holds each key.
        for src, dst in ((self.key_path, self.old_path),
                         (_pub(self.key_path), _pub(self.old_path))):
            tmp = dst.with_name(dst.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(src.read_bytes())
            os.replace(tmp, dst)
        os.replace(_pub(self.next_path), _pub(self.key_path))
        os.replace(self.next_path, self.key_path)

    async def _finish(self, old_public: str, new: ClientKey) -> None:
        if self._vast is not None:
            try:
                for key in await self._vast.list_ssh_keys():
                    if _body(key.public_key) == _body(old_public):
                        await self._vast.delete_ssh_key(key.id)
            except VastError as exc:
                log.warning("could not remove the old SSH key from the Vast account: %s", exc)
        self._remote.connector.use_keys(new)
        for path in (self.old_path, _pub(self.old_path)):
            path.unlink(missing_ok=True)
        await self._state.set(STATE_KEY, {"last_rotated": self._clock()})
        log.info("SSH key rotation finished: %s is the only key", new.fingerprint)

    @staticmethod
    def _instance_id(server: ServerView) -> int | None:
        if server.provider != "vast" or not server.provider_id:
            return None
        try:
            return int(server.provider_id)
        except ValueError:
            return None


def _pub(path: Path) -> Path:
    return path.with_name(path.name + ".pub")
