"""The per-server model cache end to end: the real bot, fake Discord, a fake ComfyUI behind
a real SSH server (the bot tunnels to it), the files on that server's disk and a loopback
model source that curl downloads from.

Last use comes from real /generate jobs, and "in use" from jobs that are really running
(sampling paused in the fake ComfyUI) or queued behind them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from core.db.models import AuditLog, ComfyGeneration, ModelDownload
from core.model_files import ModelService
from core.servers import ServerView
from tests.conftest import (
    BotEnv,
    _answered,
    bot_settings,
    eventually,
    register_ssh_server,
    start_bot,
)
from tests.fakecomfy import FakeComfy
from tests.test_models import (  # noqa: F401  (fixtures)
    ModelSource,
    build_service,
    install_fixture,
    source_fixture,
)

MB = 1_000_000
# Room for three and a half 1 MB models.
LIMIT = 3_500_000
OLD = 1_500_000_000  # 2017: files older than any generation
CHECKPOINTS = ["a.safetensors", "b.safetensors", "c.safetensors", "held.safetensors",
               "queued.safetensors", "spare.safetensors", "keep.safetensors"]


@pytest.fixture
async def env(fake_discord: Any, tmp_path: Path) -> AsyncIterator[BotEnv]:
    settings = bot_settings(
        tmp_path, fake_discord,
        comfy={"http_allowlist": ["127.0.0.1"], "model_cache_size": LIMIT},
    )
    running = await start_bot(fake_discord, settings)
    yield running
    await running.stop()


@pytest.fixture
async def ssh_host(request: pytest.FixtureRequest, env: BotEnv) -> AsyncIterator[Any]:
    """asyncssh unless a test asks for both kinds (the remote scripts run in a real shell
    under either)."""
    from tests.sshserver import start_ssh_server

    server = await start_ssh_server(getattr(request, "param", "asyncssh"),
                                    env.services.remote.key.public_openssh)
    yield server
    await server.close()


@pytest.fixture
async def comfy() -> AsyncIterator[FakeComfy]:
    fake = FakeComfy(models={"checkpoints": CHECKPOINTS, "loras": ["wf-lora.safetensors"]},
                     step_delay=0.01,
                     output_size=(32, 32))
    await fake.start()
    yield fake
    fake.resume_sampling()
    await fake.stop()


@pytest.fixture
async def models(env: BotEnv, install: Path) -> AsyncIterator[ModelService]:
    service = build_service(env, install)
    env.services.models = service  # type: ignore[attr-defined]
    if "cogs.models" not in env.bot.extensions:
        await env.bot.load_extension("cogs.models")
        await env.bot.sync_commands_if_changed()
    yield service
    await service.close()


@pytest.fixture
async def box(env: BotEnv, ssh_host: Any, comfy: FakeComfy, models: ModelService) -> ServerView:
    return await register_ssh_server(env, ssh_host, comfy_port=comfy.port)


def put(install: Path, name: str, size: int = MB, mtime: float = OLD,
        folder: str = "checkpoints") -> Path:
    path = install / "models" / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(secrets.token_bytes(size))
    os.utime(path, (mtime, mtime))
    return path


def on_disk(install: Path) -> set[str]:
    return {p.name for p in (install / "models" / "checkpoints").iterdir()
            if not p.name.startswith(".")}


async def reply(env: BotEnv, interaction: Any) -> Any:
    return await env.fake.wait_for(lambda: _answered(interaction))


async def download(env: BotEnv, source: ModelSource, name: str, size: int) -> Any:
    """/models download as an admin; the reply (started or refused)."""
    source.files[name] = secrets.token_bytes(size)
    interaction = await env.slash(
        "models", {"server": "box", "url": source.url(name), "folder": "checkpoints"},
        user=env.fake.admin, subcommand="download",
    )
    return await reply(env, interaction)


async def downloaded(env: BotEnv, install: Path, name: str) -> None:
    """Until the download of ``name`` ended (reported too) and its file is there."""
    async with env.services.sessions() as session:
        download_id = (await session.execute(
            select(ModelDownload.id).where(ModelDownload.filename == name)
            .order_by(ModelDownload.id.desc()).limit(1))).scalar_one()
    view = await env.services.models.wait(download_id)  # type: ignore[attr-defined]
    assert view.status == "completed", view.error
    assert name in on_disk(install)


async def job_status(env: BotEnv, job_id: int) -> str:
    async with env.services.sessions() as session:
        stmt = select(ComfyGeneration.status).where(ComfyGeneration.id == job_id)
        return str((await session.execute(stmt)).scalar_one())


async def generate(env: BotEnv, model: str, user: Any = None) -> int:
    """/generate with ``model`` (as a member by default); the new job's id."""
    interaction = await env.slash("generate", {"prompt": f"with {model}", "model": model},
                                  user=user or env.fake.member)
    await reply(env, interaction)
    async with env.services.sessions() as session:
        stmt = select(ComfyGeneration.id).order_by(ComfyGeneration.id.desc()).limit(1)
        return int((await session.execute(stmt)).scalar_one())


async def generate_and_finish(env: BotEnv, model: str) -> None:
    job = await generate(env, model)

    async def done() -> bool:
        return await job_status(env, job) == "completed"

    await eventually(done, timeout=30)


@pytest.mark.parametrize("ssh_host", ["asyncssh", "openssh"], indirect=True)
async def test_eviction_goes_by_last_use(
    env: BotEnv, box: ServerView, source: ModelSource, install: Path
) -> None:
    for name in ("a.safetensors", "b.safetensors", "c.safetensors"):
        put(install, name)
    # a is used first, then c; b never: least recently used first is b, then a.
    await generate_and_finish(env, "a.safetensors")
    await generate_and_finish(env, "c.safetensors")

    # 3 MB + 1.2 MB passes 3.5 MB by 0.7 MB: one model must go.
    answer = await download(env, source, "new1.safetensors", 1_200_000)
    assert "Downloading **new1.safetensors**" in answer.content, answer.content
    await downloaded(env, install, "new1.safetensors")
    assert on_disk(install) == {"a.safetensors", "c.safetensors", "new1.safetensors"}

    # 3.2 MB + 1 MB: again one must go; a was used before c, and new1 just arrived.
    answer = await download(env, source, "new2.safetensors", MB)
    assert "Downloading" in answer.content, answer.content
    await downloaded(env, install, "new2.safetensors")
    assert on_disk(install) == {"c.safetensors", "new1.safetensors", "new2.safetensors"}

    async with env.services.sessions() as session:
        evicted = (await session.scalars(
            select(AuditLog.resource).where(AuditLog.action == "models evict")
            .order_by(AuditLog.id))).all()
    assert evicted == ["box/checkpoints/b.safetensors", "box/checkpoints/a.safetensors"]


async def test_a_model_a_queued_or_running_job_needs_is_never_evicted(
    env: BotEnv, box: ServerView, comfy: FakeComfy, source: ModelSource, install: Path
) -> None:
    # held and queued are the oldest files and were never used before their jobs; spare
    # was used (by its file's arrival) later than anything: without the in-use rule, the
    # least recently used order would evict held and queued first.
    put(install, "held.safetensors")
    put(install, "queued.safetensors")
    spare = put(install, "spare.safetensors", mtime=OLD + 10**9)  # 2049
    comfy.pause_sampling()
    running = await generate(env, "held.safetensors")
    # Members have one job at a time: the queued one is another person's.
    queued = await generate(env, "queued.safetensors", user=env.fake.admin)

    async def submitted() -> bool:
        return all([await job_status(env, job) in ("queued", "running")
                    for job in (running, queued)])

    await eventually(submitted, timeout=15)
    # ComfyUI runs the first (its sampler waits) and holds the second in its queue.
    async with env.services.sessions() as session:
        prompt_ids = dict((await session.execute(
            select(ComfyGeneration.id, ComfyGeneration.comfy_prompt_id))).all())
    await comfy.wait_running(prompt_ids[running], timeout=15)
    assert prompt_ids[queued] and prompt_ids[queued] not in comfy.history

    # 3 MB + 2 MB passes 3.5 MB by 1.5 MB; only spare (1 MB) may go: refused, nothing gone.
    answer = await download(env, source, "big.safetensors", 2 * MB)
    assert answer.ephemeral and "\n" not in answer.content.strip()
    assert "Not enough room in the model cache of 'box'" in answer.content, answer.content
    assert ("in use by queued or running jobs: checkpoints/held.safetensors, "
            "checkpoints/queued.safetensors") in answer.content
    assert on_disk(install) == {"held.safetensors", "queued.safetensors", "spare.safetensors"}
    assert not [s for s in source.seen if "big" in s.path and s.range is None]

    # 1.2 MB needs 0.7 MB: spare goes, although it is the most recently used file.
    answer = await download(env, source, "small.safetensors", 1_200_000)
    assert "Downloading" in answer.content, answer.content
    await downloaded(env, install, "small.safetensors")
    assert not spare.exists()
    assert {"held.safetensors", "queued.safetensors"} <= on_disk(install)

    comfy.resume_sampling()
    for job in (running, queued):
        await eventually(lambda job=job: _completed(env, job), timeout=30)


async def _completed(env: BotEnv, job: int) -> bool:
    return await job_status(env, job) == "completed"


async def test_pinned_models_stay_and_pins_are_for_admins(
    env: BotEnv, box: ServerView, source: ModelSource, install: Path
) -> None:
    put(install, "keep.safetensors", size=2 * MB)  # the oldest
    put(install, "spare.safetensors", mtime=OLD + 100)
    options = {"server": "box", "folder": "checkpoints", "filename": "keep.safetensors"}

    for sub in ("pin", "unpin"):
        member = await reply(env, await env.slash("models", options, subcommand=sub))
        assert member.ephemeral and "for admins" in member.content
    assert await env.services.models.cache.pins.pins(box.id) == set()  # type: ignore[attr-defined]

    typo = await reply(env, await env.slash(
        "models", {**options, "filename": "kep.safetensors"}, user=env.fake.admin,
        subcommand="pin"))
    assert typo.content == "There is no checkpoints/kep.safetensors on 'box'."
    pinned = await reply(env, await env.slash("models", options, user=env.fake.admin,
                                              subcommand="pin"))
    assert pinned.content == ("Pinned `checkpoints/keep.safetensors` on **box**: the cache "
                              "will not evict it.")

    # 3 MB + 1.5 MB needs 1 MB; spare is 1 MB, so it goes and keep (older) stays.
    answer = await download(env, source, "one.safetensors", 1_500_000)
    assert "Downloading" in answer.content, answer.content
    await downloaded(env, install, "one.safetensors")
    assert on_disk(install) == {"keep.safetensors", "one.safetensors"}

    # 3.5 MB + 1.5 MB: only one.safetensors (1.5 MB) may go, keep is pinned: refused.
    answer = await download(env, source, "two.safetensors", 1_500_000 + 600_000)
    assert "pinned: checkpoints/keep.safetensors" in answer.content, answer.content
    assert on_disk(install) == {"keep.safetensors", "one.safetensors"}

    unpinned = await reply(env, await env.slash("models", options, user=env.fake.admin,
                                                subcommand="unpin"))
    assert "Unpinned `checkpoints/keep.safetensors`" in unpinned.content
    answer = await download(env, source, "two.safetensors", 1_500_000 + 600_000)
    assert "Downloading" in answer.content, answer.content
    await downloaded(env, install, "two.safetensors")
    assert "keep.safetensors" not in on_disk(install)


async def test_a_file_larger_than_the_cache_is_refused(
    env: BotEnv, box: ServerView, source: ModelSource, install: Path
) -> None:
    put(install, "a.safetensors")
    answer = await download(env, source, "huge.safetensors", LIMIT + 1)
    assert "larger than the whole model cache of 'box'" in answer.content, answer.content
    assert on_disk(install) == {"a.safetensors"}


async def test_list_shows_size_last_use_and_pin(
    env: BotEnv, box: ServerView, install: Path
) -> None:
    put(install, "a.safetensors", size=2 * MB)
    put(install, "b.safetensors")
    await generate_and_finish(env, "a.safetensors")
    await env.services.models.pin(  # type: ignore[attr-defined]
        _admin(env), "box", "checkpoints", "b.safetensors")
    listing = await reply(env, await env.slash(
        "models", {"server": "box", "folder": "checkpoints", "refresh": True},
        subcommand="list"))
    embed = listing.embeds[0]
    assert embed["description"] == "Model cache: 2.9 MB of 3.3 MB used"
    lines = embed["fields"][0]["value"].splitlines()
    a_line = next(ln for ln in lines if ln.startswith("a.safetensors"))
    b_line = next(ln for ln in lines if ln.startswith("b.safetensors"))
    assert a_line.startswith("a.safetensors · 1.9 MB · used ") and a_line.endswith(" ago")
    assert b_line == "b.safetensors · 1.0 MB · never used · pinned"


def _admin(env: BotEnv) -> Any:
    from core.audit import Actor

    return Actor(user_id=int(env.fake.admin.id), is_admin=True)


def test_the_services_fetch_popular_models_when_a_setup_succeeds(env: BotEnv) -> None:
    # core/services.py wires the hook the join test below wires by hand (it swaps in a
    # SetupService with the test profile and a ModelService on the test's install dir).
    runner = env.services.setup._runner  # type: ignore[attr-defined]
    assert env.services.models.server_joined in runner.on_installed


async def test_popular_models_arrive_when_a_server_joins(
    fake_discord: Any, tmp_path: Path, source: ModelSource
) -> None:
    from tests.setup_fixtures import free_port, make_setup_service, stop_supervisor
    from tests.sshserver import AsyncSSHTestServer

    source.files["pop.safetensors"] = pop = secrets.token_bytes(300_000)
    source.files["have.safetensors"] = b"never fetched"
    settings = bot_settings(tmp_path, fake_discord, comfy={
        "http_allowlist": ["127.0.0.1"], "model_cache_size": LIMIT,
        "popular_models": [
            f"checkpoints/pop.safetensors={source.url('pop.safetensors')}",
            f"loras/have.safetensors={source.url('have.safetensors')}",
        ],
    })
    env = await start_bot(fake_discord, settings)
    ssh = AsyncSSHTestServer(env.services.remote.key.public_openssh)
    await ssh.start()
    install_dir = tmp_path / "srv" / "ComfyUI"
    setup = make_setup_service(env.services, install_dir)
    models = build_service(env, install_dir)
    setup.when_installed(models.server_joined)
    try:
        await register_ssh_server(env, ssh, comfy_port=free_port())
        have = put(install_dir, "have.safetensors", size=10, folder="loras")
        await setup.startup()
        had = have.read_bytes()
        assert not (install_dir / "models" / "checkpoints" / "pop.safetensors").exists()
        execution = await setup.run(_admin(env), "box", "test")
        assert execution.succeeded, execution.error

        target = install_dir / "models" / "checkpoints" / "pop.safetensors"

        async def arrived() -> bool:
            return target.exists()

        await eventually(arrived, timeout=30)
        await models.close()  # waits for the join task
        assert target.read_bytes() == pop
        assert have.read_bytes() == had  # already there: not fetched again
        assert not [s for s in source.seen if "have" in s.path]
    finally:
        await models.close()
        await setup.close()
        stop_supervisor(install_dir)
        await ssh.close()
        await env.stop()


def test_a_malformed_popular_model_stops_the_bot_at_start(tmp_path: Path) -> None:
    from core.config import Settings
    from core.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="folder/file=https://"):
        Settings(comfy={"popular_models": ["sd_xl.safetensors"]})  # type: ignore[arg-type]


async def test_downloads_under_way_count_with_their_full_size(
    env: BotEnv, box: ServerView, source: ModelSource, install: Path
) -> None:
    put(install, "a.safetensors")
    source.rate = 1_000_000  # the 2 MB file takes about two seconds
    source.files["slow.safetensors"] = secrets.token_bytes(2 * MB)
    first = await reply(env, await env.slash(
        "models", {"server": "box", "url": source.url("slow.safetensors", "slow"),
                   "folder": "checkpoints"}, user=env.fake.admin, subcommand="download"))
    assert "Downloading" in first.content, first.content
    # While slow is only partly on disk: 1 MB + 2 MB promised + 1 MB passes 3.5 MB.
    second = await download(env, source, "b.safetensors", MB)
    assert "Downloading" in second.content, second.content
    await downloaded(env, install, "slow.safetensors")
    await downloaded(env, install, "b.safetensors")
    assert on_disk(install) == {"slow.safetensors", "b.safetensors"}
    total = sum(p.stat().st_size for p in (install / "models" / "checkpoints").iterdir())
    assert total <= LIMIT


async def test_a_model_a_running_custom_workflow_names_is_never_evicted(
    env: BotEnv, box: ServerView, comfy: FakeComfy, source: ModelSource, install: Path
) -> None:
    import json

    from core.comfy.workflows import GenerationParams, LoraSpec, build_workflow

    # The workflow's own LoRA loader names wf-lora; the job's parameters do not.
    workflow = build_workflow(GenerationParams(
        prompt="placeholder", model="held.safetensors", steps=3, seed=1,
        loras=(LoraSpec("wf-lora.safetensors", 0.8),)))
    add = await env.slash(
        "workflow", {"name": "mine", "file": "wf.json"}, user=env.fake.admin,
        subcommand="add",
        attachments={"file": ("wf.json", json.dumps(workflow).encode(), "application/json")})
    assert "Added workflow **mine**" in (await reply(env, add)).content
    put(install, "wf-lora.safetensors", folder="loras")  # the oldest file
    put(install, "held.safetensors", mtime=OLD + 50)
    put(install, "spare.safetensors", mtime=OLD + 10**9)
    comfy.pause_sampling()
    interaction = await env.slash("generate", {"prompt": "mine", "workflow": "mine"},
                                  user=env.fake.member)
    await reply(env, interaction)
    async with env.services.sessions() as session:
        job, prompt_id = (await session.execute(
            select(ComfyGeneration.id, ComfyGeneration.comfy_prompt_id)
            .order_by(ComfyGeneration.id.desc()).limit(1))).one()
    await comfy.wait_running(prompt_id, timeout=15)

    # 3 MB + 1.2 MB needs 0.7 MB: not wf-lora nor held (the job's), so spare goes.
    answer = await download(env, source, "small.safetensors", 1_200_000)
    assert "Downloading" in answer.content, answer.content
    await downloaded(env, install, "small.safetensors")
    assert (install / "models" / "loras" / "wf-lora.safetensors").exists()
    assert on_disk(install) == {"held.safetensors", "small.safetensors"}
    comfy.resume_sampling()
    await eventually(lambda: _completed(env, job), timeout=30)


async def test_ensure_models_reports_each_model_and_goes_through_the_cache(
    env: BotEnv, box: ServerView, models: ModelService, source: ModelSource, install: Path
) -> None:
    # What pools call for their models: one outcome per entry, never an exception.
    put(install, "keep.safetensors", size=3 * MB)
    await models.pin(_admin(env), "box", "checkpoints", "keep.safetensors")
    source.files["big.safetensors"] = secrets.token_bytes(MB)
    source.files["tiny.safetensors"] = tiny = secrets.token_bytes(1000)
    outcomes = await models.ensure_models(box, [
        "checkpoints/keep.safetensors=" + source.url("keep.safetensors"),
        "checkpoints/big.safetensors=" + source.url("big.safetensors"),
        "loras/tiny.safetensors=" + source.url("tiny.safetensors"),
        "no spec",
    ])
    assert outcomes["checkpoints/keep.safetensors"] == "present"
    assert "pinned: checkpoints/keep.safetensors" in outcomes["checkpoints/big.safetensors"]
    assert outcomes["loras/tiny.safetensors"] == "completed"
    assert "folder/file=https://" in outcomes["no spec"]
    assert (install / "models" / "loras" / "tiny.safetensors").read_bytes() == tiny
    assert on_disk(install) == {"keep.safetensors"}


async def test_a_download_of_unknown_size_is_trimmed_after_it_arrived(
    env: BotEnv, box: ServerView, source: ModelSource, install: Path
) -> None:
    for i, name in enumerate(("a.safetensors", "b.safetensors", "c.safetensors")):
        put(install, name, mtime=OLD + i)
    source.files["chunked.safetensors"] = secrets.token_bytes(800_000)
    answer = await reply(env, await env.slash(
        "models", {"server": "box", "url": source.url("chunked.safetensors", "nosize"),
                   "folder": "checkpoints"}, user=env.fake.admin, subcommand="download"))
    assert "Downloading" in answer.content, answer.content
    # Nothing could be made room for before (the size was unknown): 3.8 MB arrive ...
    await downloaded(env, install, "chunked.safetensors")
    # ... and the oldest model went right after, so the folder is under the limit again.
    assert on_disk(install) == {"b.safetensors", "c.safetensors", "chunked.safetensors"}
    total = sum(p.stat().st_size for p in (install / "models" / "checkpoints").iterdir())
    assert total <= LIMIT
