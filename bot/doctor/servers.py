"""Doctor checks for the Vast.ai account and each registered server."""

from __future__ import annotations

import asyncio

import aiohttp

from bot.doctor.checks import CheckResult
from core.comfy.client import ComfyClient
from core.config import Settings
from core.db.engine import create_engine, create_session_factory
from core.servers import ServerRegistry
from core.vast import VastClient, VastError


async def server_checks(settings: Settings, http: aiohttp.ClientSession) -> list[CheckResult]:
    results: list[CheckResult] = []
    if settings.vast.api_key is None:
        results.append(
            CheckResult("vast.ai", True, "no API key configured (renting disabled)", skipped=True)
        )
    else:
        client = VastClient(
            settings.vast.api_key,
            http,
            base_url=settings.vast.base_url,
            timeout=settings.vast.request_timeout,
            max_retries=1,
        )
        try:
            balance = await client.balance()
            results.append(CheckResult("vast.ai", True, f"key valid; credit ${balance.credit:.2f}"))
        except VastError as exc:
            results.append(CheckResult("vast.ai", False, str(exc)))
    engine = create_engine(settings.database.url)
    try:
        registry = ServerRegistry(create_session_factory(engine), None)  # type: ignore[arg-type]
        try:
            servers = await registry.list()
        except Exception as exc:  # the database check already reported why
            return [*results, CheckResult("servers", False, f"cannot list servers: {exc}")]
        for server in servers:
            name = f"server {server.name}"
            if server.status != "running":
                results.append(CheckResult(name, True, f"{server.status}; not checked", True))
            elif server.comfy_url:
                ok = await ComfyClient(server.comfy_url, http, timeout=10).check_status()
                results.append(
                    CheckResult(
                        name,
                        ok,
                        f"ComfyUI at {server.comfy_url} "
                        + ("answers" if ok else "does not answer"),
                    )
                )
            elif server.ssh_host:
                results.append(await _tcp_check(name, server.ssh_host, server.ssh_port or 22))
    finally:
        await engine.dispose()
    return results


async def _tcp_check(name: str, host: str, port: int) -> CheckResult:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=10)
        writer.close()
        return CheckResult(name, True, f"SSH port {host}:{port} reachable")
    except (OSError, TimeoutError) as exc:
        return CheckResult(name, False, f"SSH port {host}:{port} unreachable ({exc})")
