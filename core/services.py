"""The service container the entry point builds once and hands to the bot and the CLI."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from sqlalchemy.ext.asyncio import AsyncEngine

from core.audit import AuditService
from core.botstate import StateStore
from core.comfy.pool import ComfyPool
from core.config import Settings
from core.db.engine import SessionFactory, create_engine, create_session_factory, migrate
from core.db.models import utcnow
from core.diagnostics import Diagnostics
from core.endpoints import EndpointResolver
from core.generation import GenerationService
from core.generation.placement import PoolChoice
from core.model_files import DEFAULT_INSTALL_DIR, ModelService
from core.netguard import guarded_connector
from core.pools import Autoscaler, PoolService
from core.pools.ready import prepare_member
from core.remote import Remote
from core.servers import ServerRegistry, ServerView
from core.servers.keys import KeyRotation
from core.servers.service import ServerService
from core.setup import SetupService
from core.stats import StatsService
from core.vast import VastClient
from core.workflow_store import WorkflowStore


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    sessions: SessionFactory
    http: aiohttp.ClientSession
    audit: AuditService
    state: StateStore
    servers: ServerRegistry
    endpoints: EndpointResolver
    comfy: ComfyPool
    generation: GenerationService
    workflows: WorkflowStore
    remote: Remote
    vast: VastClient | None
    server_ops: ServerService
    setup: SetupService
    diagnostics: Diagnostics
    models: ModelService
    keys: KeyRotation
    stats: StatsService
    pools: PoolService
    autoscaler: Autoscaler

    async def close(self) -> None:
        await self.autoscaler.close()
        await self.server_ops.close()
        await self.generation.close()
        await self.comfy.close()
        await self.setup.close()
        await self.models.close()
        await self.remote.close()
        await self.http.close()
        await self.engine.dispose()


def http_timeout(settings: Settings) -> aiohttp.ClientTimeout:
    # aiohttp's default total timeout is 300 s; every call gets a tighter bound.
    return aiohttp.ClientTimeout(total=None, connect=10, sock_read=settings.comfy.request_timeout)


async def build_services(
    settings: Settings, *, run_migrations: bool = True,
    clock: Callable[[], dt.datetime] = utcnow,
) -> Services:
    """Create the long-lived resources once: engine, sessions, one HTTP session.

    ``clock`` is "now" for every service that stamps or compares times (the real one;
    bench.costsim passes a compressed one).
    """
    engine = create_engine(settings.database.url, echo=settings.database.echo)
    if run_migrations:
        await migrate(engine)
    sessions = create_session_factory(engine)
    # No pool limit: every ComfyUI server's WebSocket holds a connection of this session's
    # pool for good (core/comfy/stream.py shares the connector), and aiohttp's default of
    # 100 left no connection for HTTP at 100 servers (found by bench.relay --scale: every
    # POST /prompt timed out waiting for the pool and the servers were marked unusable).
    http = aiohttp.ClientSession(timeout=http_timeout(settings),
                                 connector=guarded_connector(limit=0))
    audit = AuditService(sessions)
    servers = ServerRegistry(sessions, audit)
    servers.clock = clock
    remote = Remote(settings, sessions)
    endpoints = EndpointResolver(remote)
    vast = (
        VastClient(
            settings.vast.api_key,
            http,
            base_url=settings.vast.base_url,
            timeout=settings.vast.request_timeout,
        )
        if settings.vast.api_key is not None
        else None
    )
    comfy = ComfyPool(http, endpoints.resolve, request_timeout=settings.comfy.request_timeout)
    server_ops = ServerService(
        settings, sessions, servers, audit, vast,
        remote=remote, comfy_client_for=comfy.client_for,
        public_key=lambda: remote.key.public_openssh, clock=clock,
    )
    server_ops.heartbeat = remote.heartbeat
    server_ops.comfy_ready = remote.wait_comfy
    server_ops.forget_connections = comfy.drop
    state = StateStore(sessions)
    keys = KeyRotation(settings.ssh_key_path, state, servers, remote, vast,
                       rotate_days=settings.ssh.rotate_days)
    server_ops.key_check = keys.tick
    setup = SetupService(settings, sessions, servers, remote, audit)
    generation = GenerationService(settings, sessions, servers, comfy, clock=clock)

    async def install_dir(server: ServerView) -> str:
        installation = await setup.installation(server)
        return str(installation.params.get("install_dir", DEFAULT_INSTALL_DIR))

    models = ModelService(
        settings, sessions, servers, comfy, remote.pool, remote.target, audit,
        on_change=generation.catalog.invalidate, install_dir=install_dir,
    )
    # A server whose setup succeeded fetches comfy.popular_models.
    setup.when_installed(models.server_joined)
    pools = PoolService(sessions, servers, audit)
    stats = StatsService(settings, sessions, clock=clock)
    stats.pool_of = pools.server_pools  # /budget's per-pool spend
    autoscaler = Autoscaler(pools, server_ops, servers, audit)
    autoscaler.on_ready = prepare_member(setup, models)
    autoscaler.rebalance = generation.rebalancer.to
    generation.rebalancer.on_unplaced(autoscaler.note_unplaced)

    async def pool_choices() -> list[PoolChoice]:
        return [PoolChoice(p.name, tuple(await pools.store.member_ids(p.id)), p.models)
                for p in await pools.store.pools() if p.max_servers > 0]

    # A job no server has room for waits for a pool's next free server (not refused).
    generation.rebalancer.pools_from(pool_choices)
    generation.waiting.on_wait = autoscaler.poke
    autoscaler.waiting = generation.waiting.count
    autoscaler.place_waiting = generation.waiting.kick
    server_ops.pool_check = autoscaler.tick
    return Services(
        settings=settings,
        engine=engine,
        sessions=sessions,
        http=http,
        audit=audit,
        state=state,
        servers=servers,
        endpoints=endpoints,
        comfy=comfy,
        generation=generation,
        workflows=WorkflowStore(sessions, audit, servers, comfy),
        remote=remote,
        vast=vast,
        server_ops=server_ops,
        setup=setup,
        diagnostics=Diagnostics(servers, remote, setup, http),
        models=models,
        keys=keys,
        stats=stats,
        pools=pools,
        autoscaler=autoscaler,
    )
