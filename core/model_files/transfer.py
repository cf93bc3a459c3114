"""Moving the bytes: curl on the server writes the file, then a check renames it into place.

curl writes to a hidden temporary name in the target folder, which a later run resumes;
the URL and token headers reach it on stdin (``curl -K -``). The file is renamed only once
its size (and its sha256, when one was given) matches. The transfer reports progress and
says how often the caller should save it and mark the server active; what those mean is
the caller's business.
"""

from __future__ import annotations

import logging
import re
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from core.model_files.curl import CurlMeter, CurlProgress
from core.model_files.planning import Plan
from core.model_files.shell import (
    COMMAND_TIMEOUT,
    MARK,
    ServerShell,
    last_line,
    marker_int,
    marker_text,
)
from core.model_files.sources import raise_for_source_status
from core.model_files.types import DiskFull, DownloadFailed, SourceError, format_size
from core.ssh import CommandResult

log = logging.getLogger(__name__)

HASH_TIMEOUT = 1800.0
PROGRESS_DB_INTERVAL = 5.0
TOUCH_INTERVAL = 60.0
# curl gives up on a transfer slower than this many bytes/s for this many seconds.
STALL_BYTES_PER_SECOND = 1024
STALL_SECONDS = 120

_CURL_HTTP_ERROR = re.compile(r"returned error: (\d{3})")

Hook = Callable[[], Awaitable[None]]


class Transfer:
    """One download's curl run(s) and the check after them, on the plan's server.

    ``on_progress`` gets every meter reading; ``on_checkpoint`` is called at most every
    :data:`PROGRESS_DB_INTERVAL` seconds (save the progress) and ``on_keepalive`` at most
    every :data:`TOUCH_INTERVAL` seconds (a long download is activity).
    """

    def __init__(
        self, shell: ServerShell, plan: Plan, download_id: int, *, timeout: float,
        on_progress: Callable[[CurlProgress], Awaitable[None]],
        on_checkpoint: Hook, on_keepalive: Hook,
    ) -> None:
        self._shell = shell
        self.plan = plan
        self._id = download_id
        self._timeout = timeout
        self._on_progress = on_progress
        self._on_checkpoint = on_checkpoint
        self._on_keepalive = on_keepalive

    async def fetch(self) -> None:
        """Run curl until the temporary file is complete; raise what went wrong."""
        plan = self.plan
        resume = plan.partial_bytes > 0
        result = await self._curl(plan, resume=resume)
        if resume and result.exit_status in (33, 36):
            # The source cannot resume (no range support): start over from the beginning.
            log.info("download %d: source cannot resume; starting over", self._id)
            await self._shell.run(plan.server, f"rm -f -- {shlex.quote(plan.temp_path)}",
                                  timeout=COMMAND_TIMEOUT)
            plan = replace(plan, partial_bytes=0)
            result = await self._curl(plan, resume=False)
        if result.exit_status != 0:
            await self._raise_for_exit(plan, result)

    async def _curl(self, plan: Plan, *, resume: bool) -> CommandResult:
        meter = CurlMeter(offset=plan.partial_bytes if resume else 0,
                          expected_total=plan.bytes_total)
        last_db = last_touch = time.monotonic()

        async def on_line(stream: str, line: str) -> None:
            nonlocal last_db, last_touch
            if stream != "stderr":
                return
            progress = meter.feed(line)
            if progress is None:
                return
            await self._on_progress(progress)
            if time.monotonic() - last_db >= PROGRESS_DB_INTERVAL:
                last_db = time.monotonic()
                await self._on_checkpoint()
            if time.monotonic() - last_touch >= TOUCH_INTERVAL:
                last_touch = time.monotonic()
                await self._on_keepalive()

        args = [
            "curl", "-K", "-", "--fail", "--location", "--max-redirs", "10",
            "--proto", plan.proto, "--proto-redir", plan.proto,
            "--retry", "3", "--retry-delay", "2", "--connect-timeout", "30",
            "--speed-limit", str(STALL_BYTES_PER_SECOND), "--speed-time", str(STALL_SECONDS),
            "-o", plan.temp_path,
        ]
        if resume:
            args += ["-C", "-"]
        script = " ".join(shlex.quote(a) for a in args)
        return await self._shell.run(
            plan.server, script, timeout=self._timeout, check=False,
            input=plan.curl_config(), on_line=on_line,
        )

    async def _raise_for_exit(self, plan: Plan, result: CommandResult) -> None:
        code = result.exit_status
        reason = last_line(result.stderr)
        where = f"'{plan.server.name}'"
        if code == 22:
            match = _CURL_HTTP_ERROR.search(result.stderr)
            raise_for_source_status(int(match.group(1)) if match else 400)
        if code == 23:
            # Out of space (or a write error): the partial file only takes space now.
            await self._shell.run(plan.server, f"rm -f -- {shlex.quote(plan.temp_path)}",
                                  timeout=COMMAND_TIMEOUT, check=False)
            raise DiskFull(f"Writing the file on {where} failed (is the disk full?); the "
                           "partial file was removed.")
        if code == 28:
            raise DownloadFailed("The download stalled or timed out; run the command again to "
                                 "resume it.")
        if code in (18, 56, 92):
            raise DownloadFailed("The source closed the connection early; run the command "
                                 "again to resume the download.")
        if code in (6, 7, 35, 60):
            raise SourceError(f"The server {where} could not reach the source: {reason}.")
        raise DownloadFailed(f"curl on {where} failed with exit status {code}"
                             + (f": {reason}." if reason else "."))

    async def verify_and_rename(self) -> tuple[int, str | None]:
        """Size and (optionally) sha256 checks, then the rename, in one remote script;
        returns the file's size and sha256 (None when none was asked for)."""
        plan = self.plan
        size_check = ""
        if plan.bytes_total is not None:
            size_check = (f'[ "$size" = {plan.bytes_total} ] || '
                          f"{{ echo {MARK}short; exit 0; }}; ")
        hash_check = ""
        if plan.sha256:
            hash_check = (
                'sha=$( (sha256sum -- "$tmp" 2>/dev/null || shasum -a 256 "$tmp") '
                '| cut -c1-64); '
                f'echo "{MARK}sha $sha"; '
                f'[ "$sha" = {shlex.quote(plan.sha256)} ] || '
                f'{{ rm -f -- "$tmp"; echo {MARK}badsha; exit 0; }}; '
            )
        script = (
            f"tmp={shlex.quote(plan.temp_path)}; final={shlex.quote(plan.final_path)}; "
            f'size=$(wc -c < "$tmp") || exit 3; size=$((size + 0)); '
            f'echo "{MARK}size $size"; {size_check}{hash_check}'
            # Never replace a file that appeared meanwhile (someone copied it by hand).
            f'if [ -e "$final" ]; then echo {MARK}exists; exit 0; fi; '
            f'mv -- "$tmp" "$final" && echo {MARK}moved'
        )
        result = await self._shell.run(plan.server, script, timeout=HASH_TIMEOUT)
        out = result.stdout
        size = marker_int(out, "size") or 0
        digest = marker_text(out, "sha")
        if f"{MARK}short" in out:
            raise DownloadFailed(
                f"The download is incomplete ({format_size(size)} of "
                f"{format_size(plan.bytes_total or 0)}); run the command again to resume it."
            )
        if f"{MARK}badsha" in out:
            raise DownloadFailed(
                f"The file's sha256 is {digest or 'unknown'}, not the expected {plan.sha256}; "
                "it was deleted."
            )
        if f"{MARK}exists" in out:
            raise DownloadFailed(
                f"{plan.folder}/{plan.filename} appeared on the server during the download; "
                "the new copy was kept under a temporary name."
            )
        if f"{MARK}moved" not in out:
            raise DownloadFailed("The downloaded file could not be moved into place.")
        return size, digest
