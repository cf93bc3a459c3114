"""Pools of servers made from one template: create, change, list, remove, join.

A pool saves how to make a server (offer constraints, image, disk, setup profile, models
to download) and its limits (min, max, target queue wait, idle timeout, cool-down). The
:class:`~core.pools.autoscaler.Autoscaler` acts on them; this module only keeps them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import select

from core.audit import OUTCOME_OK, Actor, AuditService
from core.db.engine import SessionFactory
from core.errors import ValidationFailed
from core.pools.models import ServerPool
from core.pools.store import PoolStore
from core.pools.types import PoolView
from core.servers.registry import ServerRegistry, ServerView

# Short enough that "<pool>-<decision id>" stays a valid server name (32 characters).
POOL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")
FOLDER_RE = re.compile(r"^[a-z_]{1,32}$")
MAX_MODELS = 20

# What /pool set may change, with its bounds (inclusive).
SETTABLE: dict[str, tuple[float, float]] = {
    "min": (0, 20),
    "max": (1, 20),
    "target_wait": (5, 24 * 3600),
    "idle_timeout": (1, 7 * 24 * 60),
    "cooldown": (0, 24 * 3600),
    "max_price": (0.01, 100.0),
    "disk": (10, 2000),
}
COLUMN = {"min": "min_servers", "max": "max_servers", "disk": "disk_gb"}


@dataclass(frozen=True, slots=True)
class Template:
    gpu: str
    max_price: float | None = None
    image: str | None = None
    disk_gb: int | None = None
    profile: str | None = None
    models: tuple[str, ...] = ()


def parse_models(text: str | None) -> tuple[str, ...]:
    """``"https://…/a.safetensors loras:https://…/b.safetensors"`` -> the entries.

    Each entry is a download URL, optionally prefixed by the models folder it goes to
    (default checkpoints); the URL's host is checked against the allow-list when it is
    downloaded (core.model_files.sources), so here only the shape is checked.
    """
    entries = tuple(e for e in re.split(r"[\s,]+", text or "") if e)
    if len(entries) > MAX_MODELS:
        raise ValidationFailed(f"A pool pre-downloads at most {MAX_MODELS} models.")
    for entry in entries:
        split_model(entry)
    return entries


def split_model(entry: str) -> tuple[str, str]:
    """``"loras:https://…"`` -> ("loras", "https://…"); a bare URL goes to checkpoints."""
    folder, url = "checkpoints", entry
    head, sep, rest = entry.partition(":")
    if sep and FOLDER_RE.match(head) and rest.startswith(("https://", "http://")):
        folder, url = head, rest
    # http:// only reaches hosts in comfy.http_allowlist: the download checks that.
    if not url.startswith(("https://", "http://")) or len(url) > 2000:
        raise ValidationFailed(
            f"'{entry[:60]}' is not a model to download: give an https:// URL, "
            "optionally after a folder (loras:https://…)."
        )
    return folder, url


def validate_pool_name(name: str) -> str:
    name = name.strip().lower()
    if not POOL_NAME_RE.match(name) or name.isdigit():
        raise ValidationFailed(
            "Pool names are 1-24 characters: lowercase letters, digits and dashes, "
            "starting with a letter or digit (not digits only)."
        )
    return name


class PoolService:
    def __init__(
        self, sessions: SessionFactory, registry: ServerRegistry, audit: AuditService
    ) -> None:
        self._sessions = sessions
        self._registry = registry
        self._audit = audit
        self.store = PoolStore(sessions)

    async def create(
        self, actor: Actor, name: str, template: Template, *, min_servers: int = 0,
        max_servers: int = 2, target_wait: int = 60, idle_timeout: int = 15,
        cooldown: int = 300,
    ) -> PoolView:
        name = validate_pool_name(name)
        gpu = template.gpu.strip()
        if not gpu or len(gpu) > 64:
            raise ValidationFailed("Name the GPU model, e.g. RTX 4090.")
        values = {"min": min_servers, "max": max_servers, "target_wait": target_wait,
                  "idle_timeout": idle_timeout, "cooldown": cooldown}
        if template.max_price is not None:
            values["max_price"] = template.max_price  # type: ignore[assignment]
        if template.disk_gb is not None:
            values["disk"] = template.disk_gb
        for key, value in values.items():
            _check(key, value)
        if min_servers > max_servers:
            raise ValidationFailed("A pool's min cannot be above its max.")
        async with self._sessions.begin() as session:
            taken = (
                await session.scalars(select(ServerPool.id).where(ServerPool.name == name))
            ).first()
            if taken is not None:
                raise ValidationFailed(f"A pool called '{name}' exists already.")
            row = ServerPool(
                name=name, gpu=gpu, max_price=template.max_price, image=template.image,
                disk_gb=template.disk_gb, profile=template.profile,
                models=list(template.models), min_servers=min_servers,
                max_servers=max_servers, target_wait=target_wait, idle_timeout=idle_timeout,
                cooldown=cooldown, channel_id=actor.channel_id, created_by=actor.user_id,
            )
            session.add(row)
            await session.flush()
            view = PoolView.of(row)
        await self._audit.record(actor, "pool create", outcome=OUTCOME_OK, resource=name,
                                 details={"gpu": gpu, "max_price": template.max_price,
                                          "image": template.image, "models": list(
                                              template.models)})
        return view

    async def set(self, actor: Actor, name: str, key: str, value: float) -> PoolView:
        pool = await self.store.get(name)
        if key not in SETTABLE:
            raise ValidationFailed(
                f"'{key}' is not a pool setting; use one of {', '.join(SETTABLE)}."
            )
        _check(key, value)
        async with self._sessions.begin() as session:
            row = await session.get(ServerPool, pool.id)
            assert row is not None
            column = COLUMN.get(key, key)
            new = value if key == "max_price" else int(value)
            low = new if key == "min" else row.min_servers
            high = new if key == "max" else row.max_servers
            if low > high:
                raise ValidationFailed("A pool's min cannot be above its max.")
            setattr(row, column, new)
            view = PoolView.of(row)
        if key == "idle_timeout":  # the members' autostop follows the pool's
            for server_id in await self.store.member_ids(pool.id):
                await self.store.add_member(pool.id, server_id, view.idle_timeout)
        await self._audit.record(actor, "pool set", outcome=OUTCOME_OK, resource=pool.name,
                                 details={key: value})
        return view

    async def add_server(self, actor: Actor, name: str, server: str) -> ServerView:
        pool = await self.store.get(name)
        view = await self._registry.get(server)
        if view.status == "destroyed":
            raise ValidationFailed(f"Server '{view.name}' is destroyed.")
        await self.store.add_member(pool.id, view.id, pool.idle_timeout)
        await self._audit.record(actor, "pool add-server", outcome=OUTCOME_OK,
                                 resource=pool.name, details={"server": view.name})
        return await self._registry.get(view.id)

    async def members(self, pool: PoolView) -> list[ServerView]:
        ids = set(await self.store.member_ids(pool.id))
        return [s for s in await self._registry.list() if s.id in ids]

    async def server_pools(self) -> dict[int, str]:
        """Server id -> its pool's name, for per-pool spend (/budget)."""
        return {
            server_id: pool.name
            for pool in await self.store.pools()
            for server_id in await self.store.member_ids(pool.id)
        }

    async def remove(self, actor: Actor, name: str) -> PoolView:
        """Forget the pool; its servers stay (stop or destroy them with /server)."""
        pool = await self.store.get(name)
        await self.store.remove(pool.id)
        await self._audit.record(actor, "pool remove", outcome=OUTCOME_OK, resource=pool.name)
        return pool


def _check(key: str, value: float) -> None:
    low, high = SETTABLE[key]
    if not low <= value <= high:
        raise ValidationFailed(f"The pool's {key} must be between {low:g} and {high:g}.")
