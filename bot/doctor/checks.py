"""The doctor's result type and its checks of the local set-up: configuration, database,
Discord token, SSH key file."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from core.config import Settings
from core.db.engine import create_engine, current_revision, migrate


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    skipped: bool = False


Check = Callable[[Settings, aiohttp.ClientSession], Awaitable[CheckResult]]


async def check_config(settings: Settings, _: aiohttp.ClientSession) -> CheckResult:
    return CheckResult("config", True, f"loaded; data directory {settings.data_dir}")


async def check_database(settings: Settings, _: aiohttp.ClientSession) -> CheckResult:
    engine = create_engine(settings.database.url)
    try:
        await asyncio.wait_for(migrate(engine), timeout=60)
        revision = await current_revision(engine)
        backend = engine.url.get_backend_name()
        return CheckResult("database", True, f"{backend} reachable, schema at revision {revision}")
    except Exception as exc:  # the doctor reports every failure as a line
        return CheckResult("database", False, f"{type(exc).__name__}: {exc}")
    finally:
        await engine.dispose()


async def check_discord(settings: Settings, http: aiohttp.ClientSession) -> CheckResult:
    token = settings.discord.token
    if token is None:
        return CheckResult("discord", False, "no token: set [discord] token or DISCORD_TOKEN")
    url = f"{settings.discord.api_base_url}/users/@me"
    try:
        async with http.get(
            url,
            headers={"Authorization": f"Bot {token.get_secret_value()}"},
            timeout=aiohttp.ClientTimeout(total=15),
        ) as resp:
            if resp.status == 200:
                data = await resp.json(content_type=None)
                return CheckResult("discord", True, f"token valid for {data.get('username')}")
            if resp.status == 401:
                return CheckResult("discord", False, "Discord refused the token (401)")
            return CheckResult("discord", False, f"unexpected HTTP {resp.status} from {url}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return CheckResult("discord", False, f"cannot reach {url}: {type(exc).__name__}")


async def check_ssh_key(settings: Settings, _: aiohttp.ClientSession) -> CheckResult:
    path = settings.ssh_key_path
    if not path.exists():
        return CheckResult("ssh key", True, f"{path} will be generated on first start", True)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        return CheckResult("ssh key", False, f"{path} is mode {mode:o}; run chmod 600 {path}")
    return CheckResult("ssh key", True, f"{path} present, mode {mode:o}")


CHECKS: list[Check] = [check_config, check_database, check_discord, check_ssh_key]
