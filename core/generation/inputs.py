"""Temporary input images (img2img): written when a job is recorded, read when it is
queued (again after a failover or a restart), deleted when the job ends.

A member can send up to 20 MB per job, so nothing here may outlive its job: the runner
discards a job's file once the job has ended, and on start-up every file of a job that
is no longer running (a crash between the end and the delete) is swept.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Collection
from pathlib import Path

from core.generation.types import InputImage

log = logging.getLogger(__name__)

# The names this module writes: job-<id><suffix>.
_NAME_RE = re.compile(r"^job-([0-9]{1,12})(\.[a-z0-9]{0,8})?$")


class InputFiles:
    """The folder of input images, one file per job that has one."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        # Files older than this process are what a sweep may remove; a file written
        # since belongs to a job being recorded right now (its row not yet visible).
        self._started = time.time()

    def save(self, job_id: int, image: InputImage) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        suffix = Path(image.filename).suffix.lower()
        if not re.fullmatch(r"\.[a-z0-9]{0,8}", suffix):
            suffix = ""  # the member chose the name: keep only a plain extension
        path = self.folder / f"job-{job_id}{suffix}"
        path.write_bytes(image.data)
        return str(path)

    async def discard(self, input_path: str | None) -> None:
        """Delete a job's input file (only ever a file inside this folder)."""
        if not input_path:
            return
        path = Path(input_path)
        if path.parent.resolve() != self.folder.resolve() or not _NAME_RE.match(path.name):
            log.warning("not deleting input %s: not one of ours", input_path)
            return
        try:
            await asyncio.to_thread(path.unlink, True)
        except OSError as exc:
            log.warning("could not delete input %s: %s", path.name, exc)

    async def sweep(self, keep_job_ids: Collection[int]) -> int:
        """Delete every input file from before this process whose job is not running."""
        return await asyncio.to_thread(self._sweep, set(keep_job_ids))

    def _sweep(self, keep: set[int]) -> int:
        if not self.folder.is_dir():
            return 0
        removed = 0
        for path in self.folder.iterdir():
            match = _NAME_RE.match(path.name)
            if match and int(match.group(1)) in keep:
                continue
            try:
                if not path.is_file() or path.stat().st_mtime > self._started:
                    continue
                path.unlink()
                removed += 1
            except OSError as exc:
                log.warning("could not sweep input %s: %s", path.name, exc)
        if removed:
            log.info("swept %d input images of ended jobs", removed)
        return removed
