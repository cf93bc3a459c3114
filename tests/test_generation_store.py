"""The generation store on SQLite and PostgreSQL: each transition is guarded and reports a
lost race (that it is the only writer is checked in test_architecture)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import pytest

from core.db.engine import SessionFactory, create_engine, create_session_factory, migrate
from core.db.models import GenerationStatus, Server
from core.generation.store import GenerationStore, Quota

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
STARTED = NOW - dt.timedelta(seconds=5)


@pytest.fixture
async def sessions(db_url: str) -> AsyncIterator[SessionFactory]:
    engine = create_engine(db_url)
    await migrate(engine)
    yield create_session_factory(engine)
    await engine.dispose()


async def new_job(sessions: SessionFactory, store: GenerationStore) -> tuple[int, int]:
    async with sessions.begin() as session:
        server = Server(provider="direct", name=f"s{dt.datetime.now(dt.UTC).timestamp()}",
                        status="running")
        session.add(server)
        await session.flush()
        server_id = server.id
    row = await store.record(
        fields={"server_id": server_id, "user_id": 1, "channel_id": 5, "prompt": "p",
                "parameters": {"seed": 1}},
        now=NOW,
        input_path=lambda job_id: f"/inputs/job-{job_id}.png",
    )
    return row.id, server_id


async def test_a_job_moves_through_its_legal_transitions(sessions: SessionFactory) -> None:
    store = GenerationStore(sessions)
    job_id, server_id = await new_job(sessions, store)
    row = await store.load(job_id)
    assert row is not None and row.status == "pending" and row.comfy_prompt_id
    assert row.parameters == {"seed": 1, "input_path": f"/inputs/job-{job_id}.png"}
    async with sessions() as session:
        server = await session.get(Server, server_id)
        assert server is not None and server.last_used_at == NOW and server.last_channel_id == 5
    assert await store.attach_message(job_id, 5, 77)

    queued = await store.mark_queued(job_id, 3)
    assert queued is not None and (queued.status, queued.queue_position) == ("queued", 3)
    assert queued.attempts == 1 and queued.message_id == 77
    assert await store.mark_queued(job_id, 3) is None  # only a pending job is queued

    # The start kept in memory reaches the row with the next progress save, once.
    assert await store.save_progress(job_id, 0.5, "KSampler", STARTED)
    assert await store.save_progress(job_id, 0.6, "KSampler", NOW)
    row = await store.load(job_id)
    assert row is not None and (row.status, row.queue_position) == ("running", None)
    assert row.started_at == STARTED and row.progress == 0.6

    old_prompt = row.comfy_prompt_id
    assert await store.move(job_id, server_id)
    row = await store.load(job_id)
    assert row is not None and row.status == "pending" and row.attempts == 2
    assert row.comfy_prompt_id != old_prompt
    assert (await store.mark_queued(job_id, None)) is not None

    assert await store.complete(job_id, server_id=server_id, image_urls=[{"filename": "a"}],
                                started_at=STARTED, now=NOW)
    row = await store.load(job_id)
    assert row is not None and row.status == "completed" and row.delivered_at == NOW
    # Every later write loses the race and says so.
    assert not await store.complete(job_id, server_id=None, image_urls=[], started_at=None,
                                    now=NOW)
    assert await store.finish(job_id, GenerationStatus.FAILED, "x", started_at=None,
                              now=NOW) is None
    assert not await store.move(job_id, server_id)
    assert not await store.save_progress(job_id, 0.1, None, None)
    row = await store.load(job_id)
    assert row is not None and row.status == "completed" and row.error_message is None


async def test_finish_writes_the_start_kept_in_memory(sessions: SessionFactory) -> None:
    store = GenerationStore(sessions)
    job_id, _ = await new_job(sessions, store)
    await store.mark_queued(job_id, 2)
    ended = await store.finish(job_id, GenerationStatus.CANCELLED, None, started_at=STARTED,
                               now=NOW)
    assert ended is not None
    row, server_name = ended
    assert (row.status, row.queue_position, row.started_at) == ("cancelled", None, STARTED)
    assert row.completed_at == NOW and server_name and server_name.startswith("s")
    assert await store.counts(1, NOW - dt.timedelta(minutes=1)) == (1, 0)


async def test_record_checks_the_members_quota_in_the_same_statement(
    sessions: SessionFactory,
) -> None:
    store = GenerationStore(sessions)
    quota = Quota(user_id=42, since=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1),
                  max_active=2, max_recent=3)

    async def submit() -> int | None:
        row = await store.record(
            fields={"user_id": 42, "channel_id": 5, "prompt": "q",
                    "parameters": {"seed": 7, "sizes": [1, 2]}},
            now=NOW, quota=quota)
        return None if row is None else row.id

    first, second = await submit(), await submit()
    assert first is not None and second is not None
    row = await store.load(first)
    assert row is not None and row.parameters == {"seed": 7, "sizes": [1, 2]}
    assert (row.status, row.progress, row.attempts, row.image_urls) == ("pending", 0, 0, [])
    assert row.comfy_prompt_id and row.created_at is not None
    assert await submit() is None  # two in progress: the limit
    assert await store.counts(42, quota.since) == (2, 2)  # nothing was written
    await store.finish(first, GenerationStatus.CANCELLED, None, started_at=None, now=NOW)
    assert await submit() is not None  # a slot freed: three this minute now
    await store.finish(second, GenerationStatus.CANCELLED, None, started_at=None, now=NOW)
    assert await submit() is None  # one in progress, but three started this minute
    # Another member is not counted against this one.
    other = await store.record(fields={"user_id": 43, "prompt": "o", "parameters": {}},
                               now=NOW, quota=Quota(43, quota.since, 1, 1))
    assert other is not None
