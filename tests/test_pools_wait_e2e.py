"""Jobs wait for a pool's server; packing, drain and the autostop-placement race.

The real bot through the fake Discord, the fake Vast.ai and a fake ComfyUI reached at the
instance's public port (``comfy.expose_port``; the instance's 18188 port is pointed at the
fake with FakeVast.set_network, which stays across a stop and a start).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from core.audit import SYSTEM, Actor
from core.db.models import ComfyGeneration, Server
from core.errors import ResourceBusy
from core.generation import GenerationRequest
from core.generation.placement import Placement, PoolChoice
from core.servers import ServerView
from tests.conftest import BotEnv, _answered, eventually
from tests.fakevast import FakeVast
from tests.test_generation_e2e import finished_row, generate, job_row
from tests.test_pools_e2e import _is, admin, decisions, pool_vast, rent_running, running
from tests.test_servers_vast_e2e import press, vast_env


@pytest.fixture
async def vast() -> AsyncIterator[FakeVast]:
    async with pool_vast() as fake:  # the pool tests' fake Vast
        yield fake


@contextlib.asynccontextmanager
async def own_maintenance(env: BotEnv) -> AsyncIterator[None]:
    """A server maintenance loop of the test's own, whose first round comes now (the
    bot's own loop sleeps 30 s first); cancelled on leaving."""
    loop = asyncio.create_task(
        env.services.server_ops.maintain(sync_every=600, autostop_every=30))
    try:
        yield
    finally:
        loop.cancel()


async def pool_of_one_stopped(env: BotEnv, vast: FakeVast, comfy: Any) -> ServerView:
    """Pool "gpu" holding "cold": stopped, its ComfyUI (the fake) answering once it runs."""
    await admin(env, "create", {"name": "gpu", "gpu": "RTX 4090"})
    await rent_running(env, "RTX 4090", "cold")
    server = await env.services.servers.get("cold")
    vast.set_network(int(server.provider_id or 0), ports={"18188/tcp": comfy.port})
    await admin(env, "add-server", {"name": "gpu", "server": "cold"})
    await env.slash("server", {"server": "cold"}, user=env.fake.admin, subcommand="stop")
    await eventually(lambda: _is(env, "cold", "stopped"), timeout=20)
    return server


async def generate_waiting(env: BotEnv) -> ComfyGeneration:
    interaction = await generate(env, {"prompt": "a cat"})
    reply = _answered(interaction)
    # Kept, not refused: the reply is the job's public status message.
    assert reply.embeds and not reply.ephemeral, reply.content
    return await job_row(env)


async def test_a_job_waits_for_the_pools_server_and_runs_on_it(
    fake_discord: Any, tmp_path: Path, vast: FakeVast, comfy: Any
) -> None:
    """No server runs: the job is kept (not refused), its status says it waits for the
    pool, the autoscaler starts the pool's server for it, and it runs there."""
    env = await vast_env(fake_discord, tmp_path, vast, comfy={"expose_port": True})
    try:
        server = await pool_of_one_stopped(env, vast, comfy)
        poke = env.services.generation.waiting.on_wait
        env.services.generation.waiting.on_wait = None  # the status is read first
        row = await generate_waiting(env)
        assert row.parameters["pool"] == "gpu" and row.server_id is None
        message = env.fake.messages[row.message_id]
        await env.fake.wait_for(
            lambda: "Waiting for a free server of pool 'gpu'" in str(message.embeds))
        assert poke is not None
        poke()  # as a waiting job does: the autoscaler decides now
        done = await finished_row(env, row.id, timeout=20)
        assert done.status == "completed" and done.server_id == server.id
        assert await decisions(env) == [("start", "cold", "done")]
        assert env.services.generation.waiting.count("gpu") == 0
    finally:
        await env.stop()


async def test_a_cancelled_waiting_job_stays_cancelled_and_a_restart_keeps_the_queue(
    fake_discord: Any, tmp_path: Path, vast: FakeVast, comfy: Any
) -> None:
    env = await vast_env(fake_discord, tmp_path, vast, comfy={"expose_port": True})
    try:
        await pool_of_one_stopped(env, vast, comfy)
        generation = env.services.generation
        generation.waiting.on_wait = None  # no scale-up here: the jobs keep waiting
        first = await generate_waiting(env)
        second = await generate_waiting(env)
        assert generation.waiting.count("gpu") == 2
        await generation.cancel(first.id, Actor(user_id=first.user_id))
        assert generation.waiting.count("gpu") == 1
        # A restart: a new service on the same database finds the waiting job again
        # (before the change it was resumed as a job whose server was removed: failed).
        from core.generation import GenerationService

        again = GenerationService(env.services.settings, env.services.sessions,
                                  env.services.servers, env.services.comfy)
        try:
            assert await again.resume_unfinished() == [second.id]
            assert again.waiting.count("gpu") == 1
        finally:
            await again.close()
        assert (await job_row(env, second.id)).status == "pending"
        # The server comes up (an admin starts it): the waiting job takes it, the
        # cancelled one stays cancelled.
        start = await env.slash("server", {"server": "cold"}, user=env.fake.admin,
                                subcommand="start")
        await press(env, start, "Start it")
        await eventually(lambda: running(env, "cold"), timeout=20)
        generation.waiting.kick()
        assert (await finished_row(env, second.id, timeout=20)).status == "completed"
        assert (await job_row(env, first.id)).status == "cancelled"
        assert len(comfy.history) == 1
    finally:
        await env.stop()


async def test_autostop_does_not_stop_a_server_a_job_was_just_placed_on(
    fake_discord: Any, tmp_path: Path, vast: FakeVast
) -> None:
    """The stop and the recording of a job agree under the server row's lock: a stop that
    finds a job refuses, a job recorded after the stop began is refused."""
    env = await vast_env(fake_discord, tmp_path, vast)
    try:
        await rent_running(env, "RTX 4090", "warm")
        server = await env.services.servers.get("warm")
        async with env.services.sessions.begin() as session:
            session.add(ComfyGeneration(server_id=server.id, user_id=7, prompt="p",
                                        status="pending", parameters={}))
        lifecycle = env.services.server_ops.lifecycle
        with pytest.raises(ResourceBusy):
            await lifecycle.stop(SYSTEM, "warm", only_if_idle=True)
        assert await running(env, "warm")
        # The other order: a stop has begun, the job chosen a moment before is refused.
        states = lifecycle._states
        assert await states.begin_stop(server.id, only_if_idle=False)
        store = env.services.generation._store
        with pytest.raises(ResourceBusy):
            await store.record(fields={"server_id": server.id, "user_id": 7, "prompt": "q",
                                       "parameters": {}}, now=dt.datetime.now(dt.UTC))
    finally:
        await env.stop()


def _view(server_id: int, price: float) -> ServerView:
    return ServerView(id=server_id, name=f"s{server_id}", provider="vast", provider_id="1",
                      status="running", status_message=None, gpu="RTX 4090",
                      price_per_hour=price, **_defaults())


def _defaults() -> dict[str, Any]:
    import dataclasses

    required = {"id", "name", "provider", "provider_id", "status", "status_message", "gpu",
                "price_per_hour"}
    return {f.name: None for f in dataclasses.fields(ServerView)
            if f.name not in required and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING}


async def test_a_burst_of_submissions_reads_the_pools_once(settings: Any) -> None:
    """Every /generate asks which pool it may wait for: the submissions that find the
    last read stale at once share one read (each read its own, a pooled connection each)."""
    placement = Placement(settings, None, None)  # type: ignore[arg-type]
    reads: list[int] = []

    async def pools() -> list[PoolChoice]:
        reads.append(1)
        await asyncio.sleep(0.01)
        return [PoolChoice("gpu", (1,))]

    placement.pools = pools
    request = GenerationRequest(actor=Actor(7), prompt="p")
    found = await asyncio.gather(*(placement.pool_for(request) for _ in range(20)))
    assert found == ["gpu"] * 20 and reads == [1]


def test_placement_packs_jobs_on_the_busiest_server_with_room(settings: Any) -> None:
    """Packing, not spreading: a server running one job takes the next (it starts when the
    first ends); an idle one is used only when the busy ones hold PACK_DEPTH jobs."""
    placement = Placement(settings, None, None)  # type: ignore[arg-type]
    a, b, c = _view(1, 0.40), _view(2, 0.30), _view(3, 0.50)
    assert placement._reserve([a, b, c], 5, {1: 1}).id == 1
    placement.release(1)
    assert placement._reserve([a, b, c], 5, {1: 2}).id == 2  # the cheapest idle one
    placement.release(2)
    assert placement._reserve([a, b, c], 5, {1: 2, 2: 3, 3: 4}).id == 1  # least loaded


async def test_a_server_started_again_is_idle_from_its_start_not_its_last_job(
    fake_discord: Any, tmp_path: Path, vast: FakeVast
) -> None:
    """Its last job was two hours ago, before its stop: the idle stop counts from the
    start, else the first autostop tick stops it again before a job reaches it."""
    env = await vast_env(fake_discord, tmp_path, vast)
    try:
        await rent_running(env, "RTX 4090", "again")
        server = await env.services.servers.get("again")
        async with env.services.sessions.begin() as session:
            row = await session.get(Server, server.id)
            assert row is not None and row.running_since is not None
            row.last_used_at = row.running_since - dt.timedelta(hours=2)
            row.idle_timeout = 5
        assert await env.services.server_ops.autostop_tick() == []
        assert await running(env, "again")
    finally:
        await env.stop()


async def test_a_pool_server_holds_two_jobs_and_the_rest_go_to_the_first_free(
    fake_discord: Any, tmp_path: Path, comfy: Any
) -> None:
    """Late binding: a pool's job waits in the pool's queue rather than third in one
    ComfyUI's queue, so a server that joins (or frees up) takes it while the first one is
    still busy."""
    from tests.conftest import MODELS, add_server, bot_settings, start_bot
    from tests.fakecomfy import FakeComfy
    from tests.test_generation_e2e import generate

    env = await start_bot(fake_discord, bot_settings(
        tmp_path, fake_discord, limits={"user_concurrent_jobs": 10}))
    second = FakeComfy(models=MODELS, step_delay=0.01, output_size=(64, 64))
    await second.start()
    try:
        await add_server(env, "busy", comfy.url)
        await admin(env, "create", {"name": "p", "gpu": "RTX 4090"})
        await admin(env, "add-server", {"name": "p", "server": "busy"})
        comfy.pause_sampling()
        for i in range(4):
            await generate(env, {"prompt": f"job {i}", "steps": 3})
        await env.fake.wait_for(lambda: len(comfy.pending_prompt_ids) == 1)
        assert [(await job_row(env, i)).server_id for i in (3, 4)] == [None, None]
        await add_server(env, "fresh", second.url)
        await admin(env, "add-server", {"name": "p", "server": "fresh"})
        await env.services.autoscaler.tick()  # the maintenance round places waiting jobs
        fresh = await env.services.servers.get("fresh")
        for job_id in (3, 4):
            row = await finished_row(env, job_id)
            assert row.status == "completed" and row.server_id == fresh.id
        # Meanwhile the first still runs on "busy" and the second waits behind it there.
        assert len(comfy.pending_prompt_ids) == 1 and not comfy.history
    finally:
        comfy.resume_sampling()
        await second.stop()
        await env.stop()


def test_warm_members_hold_longer_while_sessions_keep_coming() -> None:
    """Hysteresis: the last hour's sessions set how long a warm member waits idle."""
    from core.pools.drain import HOLD_CAP, hold_minutes, needed

    now = dt.datetime(2026, 12, 7, 15, tzinfo=dt.UTC)
    # 30 sessions an hour (one every 2 minutes) of 3 jobs 10 s apart: a 6-minute hold.
    busy = [now - dt.timedelta(minutes=2 * s, seconds=10 * j)
            for s in range(30) for j in range(3)]
    assert hold_minutes(sorted(busy), now) == 6
    # Two sessions in the hour: no hold (the pool's own idle timeout applies).
    assert hold_minutes([now - dt.timedelta(minutes=50), now - dt.timedelta(minutes=5)],
                        now) == 0
    # Six sessions: 30 minutes would pass the cap, so no hold either.
    six = sorted(now - dt.timedelta(minutes=10 * s) for s in range(6))
    assert hold_minutes(six, now) == 0 and HOLD_CAP < 30
    # 24 jobs in the last 15 minutes: of 30 s, one server's worth; of 60 s, two.
    assert needed(sorted(busy), 30.0, now) == 1
    assert needed(sorted(busy), 60.0, now) == 2
    assert needed([], 30.0, now) == 0


async def test_a_burst_the_started_members_work_off_rents_nothing(
    fake_discord: Any, tmp_path: Path, vast: FakeVast
) -> None:
    """10 jobs of 60 s on one server: the two stopped members start; a rental would be up
    only after RENT_SECONDS (Vast's boot time, none measured yet), when three servers have
    left 20 s of work each, so nothing is rented (it would bill its disk on)."""
    from tests.test_pools_e2e import queue_jobs, warm_and_two_stopped

    env = await vast_env(fake_discord, tmp_path, vast)
    try:
        await warm_and_two_stopped(env, 4)
        await queue_jobs(env, "warm", 10)
        made = await env.services.autoscaler.tick()
        assert [(d.action, d.server_name) for d in made] == [("start", "cold"),
                                                             ("start", "colder")]
        assert len(vast.instances) == 3
    finally:
        await env.stop()


async def test_an_idle_server_stops_when_its_timeout_passes_not_at_the_next_round(
    fake_discord: Any, tmp_path: Path, vast: FakeVast
) -> None:
    """The maintenance round is every 30 s; a server whose idle timeout passes between two
    rounds stops then (the loop wakes for it), not up to 30 s of GPU billing later."""
    env = await vast_env(fake_discord, tmp_path, vast)
    try:
        await rent_running(env, "RTX 4090", "idle")
        server = await env.services.servers.get("idle")
        # Idle for 57 s of a 1-minute timeout: due 3 s from now.
        async with env.services.sessions.begin() as session:
            await session.execute(update(Server).where(Server.id == server.id).values(
                idle_timeout=1, running_since=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=57),
                last_used_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=57)))
        began = time.monotonic()
        async with own_maintenance(env):
            await eventually(lambda: _is(env, "idle", "stopped"), timeout=15)
        # Stopped about when due (3 s), long before the next 30-s round.
        assert time.monotonic() - began < 15
        inst = vast.instances[int(server.provider_id or 0)]
        assert inst.actual_status == "stopped"
    finally:
        await env.stop()


async def test_a_stopped_server_s_comfyui_connection_is_closed(
    fake_discord: Any, tmp_path: Path, vast: FakeVast, comfy: Any
) -> None:
    """A stop closes the bot's WebSocket to the server's ComfyUI. Kept, its stream retried
    the stopped instance with a backoff growing to 10 s, and after the next start a job
    waited for the stream's next try (in bench.costsim, jobs failed as "it stopped
    answering")."""
    env = await vast_env(fake_discord, tmp_path, vast, comfy={"expose_port": True})
    try:
        await rent_running(env, "RTX 4090", "warm")
        server = await env.services.servers.get("warm")
        vast.set_network(int(server.provider_id or 0), ports={"18188/tcp": comfy.port})
        # Started again: the row learns the new port mapping.
        await env.services.server_ops.stop(SYSTEM, "warm")
        await env.services.server_ops.start(SYSTEM, "warm")
        row = await generate_row(env)
        assert (await finished_row(env, row.id, timeout=20)).status == "completed"
        assert comfy._sockets  # the bot's event stream
        await env.services.server_ops.stop(SYSTEM, "warm")
        # The fake ComfyUI is outside the instance and keeps running; the bot hangs up.
        async def hung_up() -> bool:
            return not comfy._sockets

        await eventually(hung_up, timeout=5)
        # Stopped outside the bot (outbid): the sync finds it stopped and hangs up too.
        await env.services.server_ops.start(SYSTEM, "warm")
        again = await generate_row(env)
        assert (await finished_row(env, again.id, timeout=20)).status == "completed"
        assert comfy._sockets
        vast.interrupt(int(server.provider_id or 0))
        await env.services.server_ops.sync()
        assert await _is(env, "warm", "stopped")
        await eventually(hung_up, timeout=5)
    finally:
        await env.stop()


async def generate_row(env: BotEnv) -> ComfyGeneration:
    interaction = await generate(env, {"prompt": "a cat"})
    reply = _answered(interaction)
    assert reply.embeds, reply.content
    return await job_row(env)


def test_only_one_warm_member_holds_through_a_gap() -> None:
    """The session rate's hold goes to the most recently used warm member only; the other
    warm ones keep the pool's idle timeout, the surplus drains; with a ``min`` member
    running, none holds (the next session has that one)."""
    import dataclasses

    from core.pools.drain import DRAIN_MINUTES, idle_stops
    from core.pools.types import PoolView

    now = dt.datetime(2026, 12, 7, 15, tzinfo=dt.UTC)
    pool = PoolView(id=1, name="gpu", gpu="RTX 4090", max_price=None, image=None,
                    disk_gb=None, profile=None, models=(), min_servers=0, max_servers=4,
                    target_wait=60, idle_timeout=5, cooldown=60, channel_id=None)
    a, b, c = (dataclasses.replace(_view(i, 0.40), last_used_at=now - dt.timedelta(minutes=i))
               for i in (1, 2, 3))
    assert all(s.is_ready for s in (a, b, c))
    # Two servers' worth of recent work, a 12-minute hold: a (used last) holds, b is warm.
    assert idle_stops(pool, [c, b, a], busy=2, hold=12) == {1: 12, 2: 5, 3: DRAIN_MINUTES}
    # A hold shorter than the pool's idle timeout does not shorten it.
    assert idle_stops(pool, [a, b], busy=2, hold=0) == {1: 5, 2: 5}
    # min 1: the cheapest never stops and nobody holds.
    cheap = dataclasses.replace(_view(4, 0.30), last_used_at=now - dt.timedelta(hours=1))
    assert idle_stops(dataclasses.replace(pool, min_servers=1), [a, b, cheap], busy=3,
                      hold=12) == {4: 0, 1: 5, 2: 5}


def test_a_server_on_its_way_counts_with_the_work_it_does_before_a_new_one() -> None:
    """A session's third job comes a cool-down after its first started a server (65-s
    cold starts, 30-s jobs, target 60 s): that server is nearly up and works the three
    jobs off before another could come, so none starts. Just decided, it would not."""
    from core.pools.autoscaler import Load, _wanted
    from core.pools.types import PoolView

    pool = PoolView(id=1, name="gpu", gpu="RTX 4090", max_price=None, image=None,
                    disk_gb=None, profile=None, models=(), min_servers=0, max_servers=4,
                    target_wait=60, idle_timeout=5, cooldown=60, channel_id=None)
    nearly_up = Load(ready=0, coming=1, queued=3, job_seconds=30.0, coming_in=(5.0,))
    assert _wanted(pool, nearly_up, boot=65.0) == 0  # the one on its way is enough
    just_started = Load(ready=0, coming=1, queued=3, job_seconds=30.0, coming_in=(65.0,))
    assert _wanted(pool, just_started, boot=65.0) == 2
    # A server on its way that is up only after a new one would be does no work first.
    rental = Load(ready=0, coming=1, queued=3, job_seconds=30.0, coming_in=(170.0,))
    assert _wanted(pool, rental, boot=65.0) == 2
    # Ready servers as before: 5 jobs on one ready server, 150 - 65 = 85 s left > 60 s.
    assert _wanted(pool, Load(ready=1, coming=0, queued=5, job_seconds=30.0), 65.0) == 2


async def test_a_member_that_became_surplus_drains_in_the_same_round(
    fake_discord: Any, tmp_path: Path, vast: FakeVast
) -> None:
    """The pools' tick sets each member's idle stop before the autostop runs: a member
    idle for 3 minutes under the pool's 15 that no recent demand needs drains (2 minutes)
    and stops in that round, not a 30-s round later."""
    env = await vast_env(fake_discord, tmp_path, vast)
    try:
        await admin(env, "create", {"name": "gpu", "gpu": "RTX 4090"})
        await rent_running(env, "RTX 4090", "spare")
        await admin(env, "add-server", {"name": "gpu", "server": "spare"})
        server = await env.services.servers.get("spare")
        assert server.idle_timeout == 15  # the pool's
        ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=3)
        async with env.services.sessions.begin() as session:
            await session.execute(update(Server).where(Server.id == server.id).values(
                running_since=ago, last_used_at=ago))
        async with own_maintenance(env):
            await eventually(lambda: _is(env, "spare", "stopped"), timeout=10)
        assert vast.instances[int(server.provider_id or 0)].actual_status == "stopped"
    finally:
        await env.stop()


async def test_a_job_that_waits_too_long_for_its_pool_fails_with_the_reason(
    fake_discord: Any, tmp_path: Path, vast: FakeVast, comfy: Any
) -> None:
    """The pool cannot get a server (nobody starts one here): past comfy.job_timeout the
    waiting job fails, its status says why, and it leaves the pool's queue."""
    env = await vast_env(fake_discord, tmp_path, vast, comfy={"expose_port": True})
    try:
        await pool_of_one_stopped(env, vast, comfy)
        waiting = env.services.generation.waiting
        waiting.on_wait = None  # no scale-up: the job keeps waiting
        waiting.timeout = 0.5
        row = await generate_waiting(env)
        assert waiting.count("gpu") == 1
        await asyncio.sleep(0.6)
        waiting.kick()  # as the autoscaler's tick does every round
        done = await finished_row(env, row.id, timeout=10)
        assert done.status == "failed"
        assert done.error_message.startswith("No server of pool 'gpu' was free within 1 minute")
        assert waiting.count("gpu") == 0 and len(comfy.history) == 0
        message = env.fake.messages[row.message_id]
        await env.fake.wait_for(lambda: "No server of pool 'gpu'" in str(message.embeds))
    finally:
        await env.stop()
