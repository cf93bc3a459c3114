"""`python -m bot doctor`: one line per check, non-zero exit when any check fails.

``checks`` holds the result type and the local checks, ``servers`` the checks of the
Vast.ai account and of each registered server; this module runs them all.
"""

from __future__ import annotations

import sys

import aiohttp

from bot.doctor.checks import CHECKS, Check, CheckResult
from bot.doctor.servers import server_checks
from core.config import Settings
from core.services import http_timeout

__all__ = ["CHECKS", "Check", "CheckResult", "run_checks", "run_doctor", "server_checks"]


async def run_checks(settings: Settings, checks: list[Check] | None = None) -> list[CheckResult]:
    async with aiohttp.ClientSession(timeout=http_timeout(settings)) as http:
        results: list[CheckResult] = []
        for check in checks or CHECKS:
            results.append(await check(settings, http))
        # Then the per-provider and per-server checks (Vast.ai key, each server).
        for extra in await server_checks(settings, http):
            results.append(extra)
    return results


async def run_doctor(settings: Settings) -> int:
    results = await run_checks(settings)
    for result in results:
        mark = "skip" if result.skipped else ("ok" if result.ok else "FAIL")
        print(f"[{mark:>4}] {result.name}: {result.detail}")
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"{len(failed)} check(s) failed.", file=sys.stderr)
        return 1
    print("All checks passed.")
    return 0
