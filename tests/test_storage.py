"""Storage on SQLite and on a real PostgreSQL server: migrations, models, services."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import event, inspect, select, text, update
from sqlalchemy.exc import IntegrityError

from core.audit import OUTCOME_OK, OUTCOME_REFUSED, Actor, AuditService
from core.botstate import StateStore
from core.db.engine import (
    RollbackOnClose,
    SessionFactory,
    create_engine,
    create_session_factory,
    current_revision,
    migrate,
)
from core.db.models import (
    AuditLog,
    Base,
    ComfyGeneration,
    ComfyWorkflow,
    ModelDownload,
    Server,
    ServerBilling,
    ServerExecution,
    SetupScript,
)
from core.generation.store import GenerationStore
from core.overview import overview

EXPECTED_TABLES = {
    "servers",
    "setup_scripts",
    "server_executions",
    "comfy_workflows",
    "comfy_generations",
    "model_downloads",
    "audit_log",
    "server_billing",
    "bot_state",
    "model_pins",
    # 0004_pools (core/pools/models.py)
    "server_pools",
    "pool_members",
    "pool_decisions",
}


@pytest.fixture
async def sessions(db_url: str) -> AsyncIterator[SessionFactory]:
    engine = create_engine(db_url)
    await migrate(engine)
    yield create_session_factory(engine)
    await engine.dispose()


async def test_migrations_create_every_table_and_are_idempotent(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        await migrate(engine)
        await migrate(engine)  # a second start applies nothing and does not fail
        async with engine.connect() as conn:
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        assert EXPECTED_TABLES <= tables
        assert set(Base.metadata.tables) == EXPECTED_TABLES
        # Migrated to the newest script: the one no other script revises.
        from alembic.script import ScriptDirectory

        from core.db.engine import MIGRATIONS_DIR
        heads = ScriptDirectory(str(MIGRATIONS_DIR)).get_heads()
        assert len(heads) == 1 and await current_revision(engine) == heads[0]
        assert heads[0] != "0001"  # 0002 added the servers' ComfyUI columns
    finally:
        await engine.dispose()


async def test_migration_matches_the_models(db_url: str) -> None:
    """The migration and the models agree column for column (no forgotten revision)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = create_engine(db_url)
    try:
        await migrate(engine)
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata)
            )
        assert diff == []
    finally:
        await engine.dispose()


async def test_rows_round_trip_with_aware_timestamps_and_json(sessions: SessionFactory) -> None:
    when = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
    async with sessions.begin() as s:
        server = Server(
            provider="vast",
            provider_id="4242",
            name="gpu-1",
            gpu="RTX 4090",
            gpu_count=1,
            price_per_hour=0.45,
            status="running",
            last_used_at=when,
        )
        s.add(server)
        await s.flush()
        script = SetupScript(name="default", steps=[{"name": "clone", "run": "git clone"}])
        wf = ComfyWorkflow(
            name="wf",
            workflow={"3": {"class_type": "KSampler"}},
            param_map={"seed": [["3", "seed"]]},
        )
        s.add_all([script, wf])
        await s.flush()
        s.add_all(
            [
                ServerExecution(server_id=server.id, script_id=script.id, total_steps=3),
                ComfyGeneration(
                    server_id=server.id,
                    workflow_id=wf.id,
                    user_id=2**62 + 7,
                    prompt="a cat",
                    parameters={"steps": 20, "seed": 2**40},
                    image_urls=["a.png", "b.png"],
                ),
                ModelDownload(
                    server_id=server.id,
                    url="https://x/y.safetensors",
                    folder="checkpoints",
                    filename="y.safetensors",
                    bytes_total=2**35,
                ),
                ServerBilling(
                    server_id=server.id, state="running", price_per_hour=0.45, started_at=when
                ),
            ]
        )
    async with sessions() as s:
        server = (await s.scalars(select(Server).where(Server.name == "gpu-1"))).one()
        assert server.last_used_at == when and server.last_used_at.tzinfo is not None
        assert server.created_at.tzinfo is not None
        gen = (await s.scalars(select(ComfyGeneration))).one()
        assert gen.user_id == 2**62 + 7
        assert gen.parameters == {"steps": 20, "seed": 2**40}
        assert gen.image_urls == ["a.png", "b.png"]
        assert (await s.scalars(select(ModelDownload))).one().bytes_total == 2**35
        assert (await s.scalars(select(ServerExecution))).one().status == "pending"


async def test_server_names_are_unique(sessions: SessionFactory) -> None:
    async with sessions.begin() as s:
        s.add(Server(provider="direct", name="box", comfy_url="http://127.0.0.1:8188"))
    with pytest.raises(IntegrityError):
        async with sessions.begin() as s:
            s.add(Server(provider="direct", name="box", comfy_url="http://127.0.0.1:8189"))


async def test_naive_datetimes_are_refused(sessions: SessionFactory) -> None:
    with pytest.raises(Exception, match="naive"):
        async with sessions.begin() as s:
            s.add(Server(provider="ssh", name="naive", last_used_at=dt.datetime(2026, 1, 1)))


async def test_audit_service_records_and_lists(sessions: SessionFactory) -> None:
    audit = AuditService(sessions)
    actor = Actor(user_id=11, guild_id=22, channel_id=33)
    await audit.record(
        actor, "server create", outcome=OUTCOME_OK, resource="gpu-1", details={"offer": 5}
    )
    await audit.record(actor, "audit", outcome=OUTCOME_REFUSED)
    entries = await audit.recent(10)
    assert [(e.action, e.outcome) for e in entries] == [
        ("audit", OUTCOME_REFUSED),
        ("server create", OUTCOME_OK),
    ]
    async with sessions() as s:
        row = (await s.scalars(select(AuditLog).where(AuditLog.resource == "gpu-1"))).one()
        assert (row.user_id, row.guild_id, row.channel_id, row.details) == (
            11,
            22,
            33,
            {"offer": 5},
        )


async def test_state_store_upserts(sessions: SessionFactory) -> None:
    store = StateStore(sessions)
    assert await store.get("k") is None
    await store.set("k", {"hash": "a"})
    await store.set("k", {"hash": "b"})
    assert await store.get("k") == {"hash": "b"}


async def test_overview_counts_servers_and_jobs(sessions: SessionFactory) -> None:
    async with sessions.begin() as s:
        s.add_all(
            [
                Server(provider="direct", name="a", status="running"),
                Server(provider="vast", name="b", status="stopped"),
                Server(provider="vast", name="c", status="destroyed"),
            ]
        )
        for status in ("pending", "queued", "running", "completed", "failed"):
            s.add(ComfyGeneration(user_id=1, prompt="p", status=status))
    stats = await overview(sessions)
    assert (stats.servers_total, stats.servers_running) == (2, 1)
    assert (stats.jobs_waiting, stats.jobs_running, stats.queue_length) == (2, 1, 3)


async def test_a_writer_cancelled_mid_statement_does_not_keep_the_lock(tmp_path: Path) -> None:
    """Found by the fuzz test (a job's Cancel button cancels its runner mid-UPDATE): the
    cancelled connection is invalidated and closed, and SQLite's close left it a zombie
    holding the write lock, so the next writer failed with "database is locked". Each
    round cancels writers at a random point; a write must then get through."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/cancel.db", busy_timeout=2.0)
    invalidated: list[object] = []
    event.listen(engine.sync_engine.pool, "invalidate", lambda *_a: invalidated.append(1))
    sessions = create_session_factory(engine)
    rng = random.Random(7)
    try:
        await migrate(engine)
        async with sessions.begin() as s:
            s.add_all(ComfyGeneration(user_id=i, prompt="p", status="pending") for i in range(5))

        async def write_forever(user_id: int) -> None:
            while True:
                async with sessions.begin() as s:
                    await s.execute(
                        update(ComfyGeneration).where(ComfyGeneration.user_id == user_id)
                        .values(progress=ComfyGeneration.progress + 0.01)
                        .returning(ComfyGeneration.id)
                    )

        for _ in range(25):
            writers = [asyncio.create_task(write_forever(i)) for i in range(5)]
            await asyncio.sleep(rng.uniform(0.001, 0.02))
            for task in writers:
                task.cancel()
            await asyncio.wait(writers)
            async with sessions.begin() as s:  # "database is locked" after 2 s without the fix
                await s.execute(update(ComfyGeneration).values(error_message="ok"))
        # The rounds did cancel writers in the middle of a statement.
        assert invalidated
    finally:
        await engine.dispose()


async def test_a_connection_is_rolled_back_on_return_only_with_a_transaction_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rollback is a trip to the connection's thread (aiosqlite): the pool's usual
    ROLLBACK on return made one more per write after its commit. It is still made when a
    transaction was left open below SQLAlchemy (it would keep SQLite's write lock)."""
    rollbacks: list[int] = []
    original = RollbackOnClose.rollback

    def counted(self: RollbackOnClose) -> None:
        rollbacks.append(1)
        original(self)

    monkeypatch.setattr(RollbackOnClose, "rollback", counted)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/reset.db")
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (x INTEGER)"))
        rollbacks.clear()  # the first connection's set-up rolls back once
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO t VALUES (1)"))
        assert rollbacks == []
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            await raw.driver_connection.execute("INSERT INTO t VALUES (2)")
        assert rollbacks == [1]
        async with engine.begin() as conn:  # not blocked, and the open insert was undone
            assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 1
    finally:
        await engine.dispose()


async def test_a_burst_of_job_writes_takes_turns_instead_of_timing_out(tmp_path: Path) -> None:
    """Found by the 2,000-job benchmark: hundreds of jobs writing their rows at once on
    SQLite waited in its busy handler (holding the pool's connections) until some gave up
    with "database is locked". Through the store they take turns at the write gate."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/burst.db", busy_timeout=0.5)
    sessions = create_session_factory(engine)
    store = GenerationStore(sessions)
    now = dt.datetime.now(dt.UTC)
    try:
        await migrate(engine)

        async def one_job(user_id: int) -> str:
            row = await store.record(fields={"user_id": user_id, "prompt": "p"}, now=now)
            assert row is not None
            await store.attach_message(row.id, 1, 1000 + row.id)
            assert await store.mark_queued(row.id, 3) is not None
            for step in range(1, 4):
                assert await store.save_progress(row.id, step / 4, "KSampler", now)
            assert await store.complete(row.id, server_id=None, image_urls=[],
                                        started_at=now, now=now)
            return "done"

        outcomes = await asyncio.gather(*(one_job(n) for n in range(300)),
                                        return_exceptions=True)
        failures = [o for o in outcomes if o != "done"]
        assert not failures, failures[:3]
        async with sessions() as s:
            done = await s.scalars(select(ComfyGeneration.status))
            assert set(done) == {"completed"}
    finally:
        await engine.dispose()
