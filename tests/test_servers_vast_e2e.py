"""Renting on Vast.ai end to end: the real bot, the fake Discord and the fake Vast.ai."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from core.audit import Actor
from core.db.models import AuditLog, ServerBilling
from core.vast import OfferQuery
from tests.conftest import BotEnv, _answered, bot_settings, eventually, start_bot
from tests.fakediscord.models import iter_components
from tests.fakevast import FakeVast
from tests.fakevast.server import make_offer

ADMIN_ACTOR = Actor(user_id=1, is_admin=True)


def loopback_offers() -> list[dict[str, Any]]:
    # Loopback addresses only: nothing in the tests may reach beyond this machine.
    return [
        make_offer(101, "RTX 4090", dph_base=0.40, public_ipaddr="127.0.0.1"),
        make_offer(102, "RTX 4090", dph_base=0.50, public_ipaddr="127.0.0.1"),
        make_offer(103, "RTX 4090", dph_base=0.60, public_ipaddr="127.0.0.1"),
        make_offer(201, "RTX 3090", dph_base=0.20, public_ipaddr="127.0.0.1"),
    ]


@pytest.fixture
async def vast() -> AsyncIterator[FakeVast]:
    # Real time drives the instance life cycle (loading -> running in 0.15 s).
    fake = FakeVast(
        offers=loopback_offers(),
        clock=time.time,
        provision_seconds=0.05,
        boot_seconds=0.1,
        restart_seconds=0.1,
        timeout_hang=1.5,
    )
    await fake.start()
    yield fake
    await fake.stop()


async def vast_env(
    fake_discord: Any,
    tmp_path: Path,
    vast: FakeVast,
    *,
    vast_settings: dict[str, Any] | None = None,
    **sections: Any,
) -> BotEnv:
    env = await start_bot(
        fake_discord,
        bot_settings(
            tmp_path,
            fake_discord,
            vast={
                "api_key": vast.api_key,
                "base_url": vast.base_url,
                "request_timeout": 1,
                **(vast_settings or {}),
            },
            **sections,
        ),
    )
    ops = env.services.server_ops
    ops.poll_interval = 0.05
    ops.heartbeat = None  # the fake instances have no SSH server behind them
    ops._sleep = _fast_sleep  # backoff between retries, shortened
    return env


async def _fast_sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(min(seconds, 0.01))


@pytest.fixture
async def venv(fake_discord: Any, tmp_path: Path, vast: FakeVast) -> AsyncIterator[BotEnv]:
    env = await vast_env(fake_discord, tmp_path, vast)
    yield env
    await env.stop()


def buttons(message: Any) -> dict[str, str]:
    return {
        c.get("label"): c["custom_id"]
        for c in iter_components(message.components)
        if c.get("type") == 2 and "custom_id" in c
    }


async def press(env: BotEnv, interaction: Any, label: str, *, user: Any = None) -> Any:
    """Click the button called ``label`` on the bot's latest prompt for ``interaction``."""

    def prompt() -> Any:
        for message in reversed([*interaction.followups(), interaction.response_message()]):
            if message is not None and label in buttons(message):
                return message
        return None

    message = await env.fake.wait_for(prompt)
    return await env.fake.click(message.id, buttons(message)[label], user=user or env.fake.admin)


def channel_texts(env: BotEnv) -> list[str]:
    return [m.content for m in env.fake.channel_messages(env.channel_id, include_ephemeral=False)]


async def rent(env: BotEnv, options: dict[str, Any]) -> Any:
    interaction = await env.slash("server", options, user=env.fake.admin, subcommand="create")
    await press(env, interaction, "Rent it")
    return interaction


async def test_offers_then_rent_then_running(venv: BotEnv, vast: FakeVast) -> None:
    interaction = await venv.slash(
        "server", {"gpu": "RTX 4090"}, user=venv.fake.admin, subcommand="offers"
    )
    listing = await venv.fake.wait_for(lambda: _answered(interaction))
    text = listing.embeds[0]["description"]
    assert "offer 101" in text and "$0." in text and "RTX 4090" in text
    click = await venv.fake.click(listing.id, buttons(listing)["Rent 1"], user=venv.fake.admin)
    # The confirmation shows the GPU, VRAM, price and the month's spend.
    confirm_prompt = await venv.fake.wait_for(
        lambda: next(
            (
                m
                for m in [*click.followups(), click.response_message()]
                if m is not None and "Rent it" in buttons(m)
            ),
            None,
        )
    )
    fields = {f["name"]: f["value"] for f in confirm_prompt.embeds[0]["fields"]}
    assert "RTX 4090" in fields["GPU"] and "GB" in fields["VRAM"]
    assert "/h" in fields["Price"] and "$0.00 spent" in fields["This month"]
    await press(venv, click, "Rent it")

    async def running() -> Any:
        servers = await venv.services.servers.list()
        return servers[0] if servers and servers[0].status == "running" else None

    server = await eventually(running, timeout=15)
    assert server.provider == "vast" and server.gpu == "RTX 4090"
    assert server.ssh_host == "127.0.0.1" and server.ssh_port
    [instance] = vast.instances.values()
    assert instance.label.startswith(f"comfyvast:{server.name}:")
    assert str(instance.id) == server.provider_id
    await venv.fake.wait_for(lambda: any("is running" in t for t in channel_texts(venv)))
    async with venv.services.sessions() as session:
        intervals = (await session.scalars(select(ServerBilling))).all()
        actions = [(a.action, a.outcome) for a in (await session.scalars(select(AuditLog)))]
    assert [i.state for i in intervals] == ["loading", "running"]
    assert ("server create", "ok") in actions


async def test_cancelled_confirmation_rents_nothing(venv: BotEnv, vast: FakeVast) -> None:
    interaction = await venv.slash(
        "server", {"gpu": "RTX 3090"}, user=venv.fake.admin, subcommand="create"
    )
    await press(venv, interaction, "Cancel")
    await venv.fake.wait_for(
        lambda: any("Nothing was rented" in (m.content or "") for m in interaction.followups())
    )
    assert vast.instances == {} and await venv.services.servers.list() == []


async def test_stop_start_destroy(venv: BotEnv, vast: FakeVast) -> None:
    await rent(venv, {"gpu": "RTX 3090", "name": "cheap"})
    await eventually(lambda: _status(venv, "cheap", "running"), timeout=15)
    instance_id = int((await venv.services.servers.get("cheap")).provider_id)

    await venv.slash("server", {"server": "cheap"}, user=venv.fake.admin, subcommand="stop")
    await eventually(lambda: _status(venv, "cheap", "stopped"))
    assert vast.instances[instance_id].actual_status == "stopped"

    start = await venv.slash(
        "server", {"server": "cheap"}, user=venv.fake.admin, subcommand="start"
    )
    await press(venv, start, "Start it")
    await eventually(lambda: _status(venv, "cheap", "running"), timeout=15)

    destroy = await venv.slash(
        "server", {"server": "cheap"}, user=venv.fake.admin, subcommand="destroy"
    )
    await press(venv, destroy, "Destroy")
    await venv.fake.wait_for(lambda: instance_id in vast.destroyed)
    await eventually(lambda: _status(venv, "cheap~1", "destroyed"))  # the row stays
    async with venv.services.sessions() as session:
        states = [
            b.state
            for b in (await session.scalars(select(ServerBilling).order_by(ServerBilling.id)))
        ]
    assert states == ["loading", "running", "stopped", "loading", "running"]


async def test_list_shows_spend_of_rented_servers_only(venv: BotEnv, vast: FakeVast) -> None:
    await rent(venv, {"gpu": "RTX 3090", "name": "cheap"})
    await eventually(lambda: _status(venv, "cheap", "running"), timeout=15)
    await venv.services.servers.add_direct(ADMIN_ACTOR, "url", "http://127.0.0.1:9")
    interaction = await venv.slash("server", {}, user=venv.fake.admin, subcommand="list")
    listing = await venv.fake.wait_for(lambda: _answered(interaction))
    lines = {
        line.split("**")[1]: line for line in listing.embeds[0]["description"].splitlines()
    }
    # The rented server has billed a fraction of a cent; a URL server never bills.
    assert "$0.00 spent" in lines["cheap"] and "(vast)" in lines["cheap"]
    assert "spent" not in lines["url"] and "(direct)" in lines["url"]
    assert listing.embeds[0]["footer"]["text"] == "This month: $0.00"


async def _status(env: BotEnv, name: str, status: str) -> bool:
    servers = await env.services.servers.list(include_destroyed=True)
    return any(s.name == name and s.status == status for s in servers)


async def test_non_admin_cannot_rent_and_is_audited(venv: BotEnv, vast: FakeVast) -> None:
    interaction = await venv.fake.slash(
        "server",
        {"gpu": "RTX 4090"},
        user=venv.fake.member,
        guild_id=venv.fake.guild.id,
        subcommand="create",
        force=True,
    )
    await interaction.wait_response()
    assert "for admins" in interaction.response_message().content
    assert vast.instances == {}
    async with venv.services.sessions() as session:
        rows = (await session.scalars(select(AuditLog))).all()
    assert [(r.action, r.outcome) for r in rows] == [("server create", "refused")]


async def test_budget_cap_refuses_with_figures(
    fake_discord: Any, tmp_path: Path, vast: FakeVast
) -> None:
    env = await vast_env(fake_discord, tmp_path, vast, costs={"monthly_budget": 0.1})
    try:
        interaction = await env.slash(
            "server", {"gpu": "RTX 4090"}, user=env.fake.admin, subcommand="create"
        )
        message = await env.fake.wait_for(lambda: _answered(interaction))
        assert "monthly budget" in message.content
        assert "$0.00 spent of $0.10" in message.content and "/h" in message.content
        assert vast.instances == {}
    finally:
        await env.stop()


async def test_offer_taken_moves_to_the_next_offer(venv: BotEnv, vast: FakeVast) -> None:
    ops = venv.services.server_ops
    plan = await ops.plan(OfferQuery(gpu_name="RTX 4090"))
    assert plan.offer.id == 101
    vast.take_offer(101)
    notes: list[str] = []

    async def progress(text: str) -> None:
        notes.append(text)

    server = await ops.rent(ADMIN_ACTOR, plan, "next", progress=progress)
    assert server.status == "running"
    assert any("101 was taken; trying offer 102" in n for n in notes)
    assert list(vast.rented_offers) == [102]


async def test_idle_server_is_warned_then_stopped(venv: BotEnv, vast: FakeVast) -> None:
    await rent(venv, {"gpu": "RTX 3090", "name": "idle"})
    await eventually(lambda: _status(venv, "idle", "running"), timeout=15)
    ops = venv.services.server_ops
    await venv.slash(
        "server", {"server": "idle", "minutes": 10}, user=venv.fake.admin, subcommand="autostop"
    )
    start = dt.datetime.now(dt.UTC)
    ops.clock = lambda: start + dt.timedelta(minutes=6)
    assert await ops.autostop_tick() == []
    warning = await venv.fake.wait_for(
        lambda: next(
            (
                m
                for m in venv.fake.channel_messages(venv.channel_id)
                if "idle" in m.content and "Keep alive" in buttons(m)
            ),
            None,
        )
    )
    # A member may not keep it alive (it costs money); an admin may.
    click = await venv.fake.click(warning.id, buttons(warning)["Keep alive"], user=venv.fake.member)
    await click.wait_response()
    click = await venv.fake.click(warning.id, buttons(warning)["Keep alive"], user=venv.fake.admin)
    await click.wait_response()
    assert "idle timer was reset" in venv.fake.messages[warning.id].content
    ops.clock = lambda: dt.datetime.now(dt.UTC) + dt.timedelta(minutes=9)
    assert await ops.autostop_tick() == []  # the keep-alive reset the timer
    ops.clock = lambda: dt.datetime.now(dt.UTC) + dt.timedelta(minutes=11)
    assert await ops.autostop_tick() == ["idle"]
    assert (await venv.services.servers.get("idle")).status == "stopped"
    await venv.fake.wait_for(
        lambda: any("was stopped: idle for 10 minutes" in t for t in channel_texts(venv))
    )


async def test_jobs_count_as_activity_not_idle(venv: BotEnv, vast: FakeVast) -> None:
    from core.db.models import ComfyGeneration

    await rent(venv, {"gpu": "RTX 3090", "name": "busy"})
    await eventually(lambda: _status(venv, "busy", "running"), timeout=15)
    server = await venv.services.servers.get("busy")
    async with venv.services.sessions.begin() as session:
        session.add(ComfyGeneration(server_id=server.id, user_id=1, prompt="p", status="queued"))
    ops = venv.services.server_ops
    ops.clock = lambda: dt.datetime.now(dt.UTC) + dt.timedelta(hours=3)
    assert await ops.autostop_tick() == []
    assert (await venv.services.servers.get("busy")).status == "running"


async def test_flaky_vast_never_rents_twice(venv: BotEnv, vast: FakeVast) -> None:
    """With 30% of calls failing, every operation completes and no request rents twice."""
    ops = venv.services.server_ops
    vast.fail_ratio(0.3, seed=7)
    names = [f"flaky-{i}" for i in range(3)]  # one per RTX 4090 offer
    failures: list[str] = []
    for name in names:
        for _ in range(5):  # the service retries what is safe; a user may press again
            try:
                plan = await ops.plan(OfferQuery(gpu_name="RTX 4090", limit=10))
                await ops.rent(ADMIN_ACTOR, plan, name)
                break
            except Exception as exc:  # noqa: BLE001 - a failed search is safe to repeat
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                if any(
                    s.name == name for s in await venv.services.servers.list(include_destroyed=True)
                ):
                    break
        servers = await venv.services.servers.list(include_destroyed=True)
        assert await _status(venv, name, "running"), (failures, servers)
    labels = [i.label for i in [*vast.instances.values(), *vast.destroyed.values()]]
    assert len(labels) == len(set(labels)) == len(names)
    for name in names:
        await ops.stop(ADMIN_ACTOR, name)
        await ops.start(ADMIN_ACTOR, name)
        await ops.destroy(ADMIN_ACTOR, name)
    assert len(vast.destroyed) == len(names) and vast.instances == {}


async def test_key_registered_with_the_account_once(venv: BotEnv, vast: FakeVast) -> None:
    public = venv.services.remote.key.public_openssh
    await eventually(lambda: _has_key(vast, public))
    assert await venv.services.server_ops.register_key()
    assert [k["public_key"].split()[:2] for k in vast.ssh_keys].count(public.split()[:2]) == 1


async def _has_key(vast: FakeVast, public: str) -> bool:
    return any(k["public_key"].split()[:2] == public.split()[:2] for k in vast.ssh_keys)


async def test_sync_reconciles_with_vast(venv: BotEnv, vast: FakeVast) -> None:
    ops = venv.services.server_ops
    for name in ("gone", "paused"):
        plan = await ops.plan(OfferQuery(gpu_name="RTX 4090"))
        await ops.rent(ADMIN_ACTOR, plan, name)
    gone = int((await venv.services.servers.get("gone")).provider_id)
    paused = int((await venv.services.servers.get("paused")).provider_id)
    del vast.instances[gone]  # destroyed outside the bot
    vast.interrupt(paused)  # outbid: stopped by Vast
    await ops.sync()
    assert await _status(venv, "gone", "destroyed")
    assert await _status(venv, "paused", "stopped")
    # A listing error is not "no instances": nothing changes.
    await ops.start(ADMIN_ACTOR, "paused")
    vast.fail_next("/instances", 500, count=20)
    await ops.sync()
    assert await _status(venv, "paused", "running")


async def test_lifetime_cap_stops_the_server(
    fake_discord: Any, tmp_path: Path, vast: FakeVast
) -> None:
    env = await vast_env(fake_discord, tmp_path, vast, costs={"max_hours": 2})
    try:
        ops = env.services.server_ops
        await ops.rent(ADMIN_ACTOR, await ops.plan(OfferQuery(gpu_name="RTX 3090")), "capped")
        ops.clock = lambda: dt.datetime.now(dt.UTC) + dt.timedelta(hours=2, minutes=1)
        assert await ops.autostop_tick() == ["capped"]
        assert await _status(env, "capped", "stopped")
    finally:
        await env.stop()


def message_with(env: BotEnv, *needles: str) -> Any:
    """The bot's channel message containing every one of ``needles`` (None while none)."""
    for message in env.fake.channel_messages(env.channel_id, include_ephemeral=False):
        if all(n in (message.content or "") for n in needles):
            return message
    return None


async def test_start_stuck_in_scheduling_keeps_the_instance(
    fake_discord: Any, tmp_path: Path, vast: FakeVast
) -> None:
    """Issue 11: a start waiting for its GPU stops waiting and says so; nothing is destroyed,
    and the message follows the instance when Vast.ai finally starts it."""
    env = await vast_env(fake_discord, tmp_path, vast, vast_settings={"start_timeout": 0.5})
    try:
        await rent(env, {"gpu": "RTX 3090", "name": "sched"})
        await eventually(lambda: _status(env, "sched", "running"), timeout=15)
        instance_id = int((await env.services.servers.get("sched")).provider_id)
        await env.slash("server", {"server": "sched"}, user=env.fake.admin, subcommand="stop")
        await eventually(lambda: _status(env, "sched", "stopped"))

        vast.hold_gpu(instance_id)  # someone else rents the GPU meanwhile
        start = await env.slash(
            "server", {"server": "sched"}, user=env.fake.admin, subcommand="start"
        )
        await press(env, start, "Start it")
        message = await env.fake.wait_for(
            lambda: message_with(
                env, "Starting **sched**", "waiting for the GPU to be free", "kept with its disk"
            ),
            timeout=15,
        )
        assert "did not start within" in message.content
        assert instance_id in vast.instances and instance_id not in vast.destroyed
        assert not vast.calls(f"DELETE /api/v0/instances/{instance_id}/")
        assert vast.instances[instance_id].actual_status == "scheduling"
        view = await env.services.servers.get("sched")
        assert view.status == "starting" and "GPU to be free" in (view.status_message or "")

        vast.release_gpu(instance_id)

        async def synced_running() -> bool:
            # Each sync follows the start again (a loaded machine may need more than one).
            await env.services.server_ops.sync()
            return await _status(env, "sched", "running")

        await eventually(synced_running, timeout=15, interval=0.2)
        await env.fake.wait_for(
            lambda: message_with(env, "Starting **sched**", "✅ **sched** is running"),
            timeout=15,
        )
        assert len(vast.instances) == 1 and not vast.destroyed
    finally:
        await env.stop()


@pytest.mark.parametrize("daemon_error", [True, False])
async def test_missing_image_tag_is_destroyed_with_the_reason(
    fake_discord: Any, tmp_path: Path, vast: FakeVast, daemon_error: bool
) -> None:
    """Issue 11: a first boot that cannot pull its image (an error in status_msg, or
    loading past vast.image_pull_timeout) is destroyed, and the admin reads why."""
    image = "vastai/comfy:no-such-tag"
    vast.remove_image(image)
    if not daemon_error:
        vast.missing_image_message = None  # only "pulling" forever: the timeout decides
    env = await vast_env(
        fake_discord, tmp_path, vast, vast_settings={"image_pull_timeout": 0.5}
    )
    try:
        await rent(env, {"gpu": "RTX 3090", "name": "notag", "image": image})
        needle = "could not pull" if daemon_error else "did not load within"
        message = await env.fake.wait_for(
            lambda: message_with(env, "Renting **notag**", needle), timeout=15
        )
        assert image in message.content and "destroyed so it does not bill" in message.content
        assert "check the image name and tag" in message.content
        if daemon_error:
            assert "manifest unknown" in message.content
        (instance_id,) = vast.destroyed
        assert vast.destroyed[instance_id].image == image and vast.instances == {}
        view = await env.services.servers.get("notag")
        assert view.status == "error" and image in (view.status_message or "")
    finally:
        await env.stop()


async def test_a_server_that_ran_is_never_destroyed_by_a_failed_start(
    venv: BotEnv, vast: FakeVast
) -> None:
    """A restart that fails (the container exits) is reported; the disk is kept."""
    await rent(venv, {"gpu": "RTX 3090", "name": "kept"})
    await eventually(lambda: _status(venv, "kept", "running"), timeout=15)
    instance_id = int((await venv.services.servers.get("kept")).provider_id)
    ops = venv.services.server_ops
    await ops.stop(ADMIN_ACTOR, "kept")
    await ops.start(ADMIN_ACTOR, "kept")  # comes back
    await ops.stop(ADMIN_ACTOR, "kept")
    vast.instances[instance_id].boot_failure = "exited"
    with pytest.raises(Exception, match="kept with its disk"):
        await ops.start(ADMIN_ACTOR, "kept")
    assert instance_id in vast.instances and not vast.destroyed


async def test_a_create_that_never_reached_vast_is_marked_failed(
    venv: BotEnv, vast: FakeVast
) -> None:
    """A row left ``creating`` by a dead process whose label Vast.ai does not know, once
    the create can no longer land, is marked failed and its message says why; a late
    instance carrying that given-up label is destroyed (it would bill unknown)."""
    from core.db.models import Server
    from core.servers.pending import MessageRef

    ops = venv.services.server_ops
    status = await venv.bot.get_partial_messageable(venv.channel_id).send("⏳ Renting **lost**…")
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    async with venv.services.sessions.begin() as session:
        row = Server(provider="vast", name="lost", request_label="comfyvast:lost:0badc0de",
                     status="creating", created_at=long_ago)
        session.add(row)
        await session.flush()
        await ops._ctx.pending.add(
            session, row.id, "create", MessageRef(venv.channel_id, status.id, status.content)
        )
    await ops.sync()
    view = await venv.services.servers.get("lost")
    assert view.status == "error" and "nothing was rented" in (view.status_message or "")
    await venv.fake.wait_for(lambda: message_with(venv, "Renting **lost**", "❌", "nothing was"))

    # The create landed after all (say, Vast was slow): the instance is nobody's, destroy it.
    offer = vast.offers[201]
    late = vast._new_instance(offer, {"label": "comfyvast:lost:0badc0de", "image": "x"}, 20.0,
                              {}, "ssh", [], bid=None)
    stranger = vast._new_instance(vast.offers[102], {"label": "comfyvast:other:1", "image": "x"},
                                  20.0, {}, "ssh", [], bid=None)
    await ops.sync()
    assert late.id in vast.destroyed
    assert stranger.id in vast.instances  # not a label this bot handed out: left alone

    # A second instance under the label of a settled rental (a double create) goes too;
    # the rental's own instance stays.
    await ops.rent(ADMIN_ACTOR, await ops.plan(OfferQuery(gpu_name="RTX 4090")), "real")
    real = await venv.services.servers.get("real")
    async with venv.services.sessions() as session:
        real_label = (await session.get(Server, real.id)).request_label
    double = vast._new_instance(vast.offers[103], {"label": real_label, "image": "x"},
                                20.0, {}, "ssh", [], bid=None)
    await ops.sync()
    assert double.id in vast.destroyed and int(real.provider_id) in vast.instances


async def test_pull_errors_never_destroy_a_server_that_ran_before(
    fake_discord: Any, tmp_path: Path, vast: FakeVast
) -> None:
    """The missing-image rule is for first boots only: a restart that sits in loading with
    a pull error is reported and kept, like any slow start."""
    env = await vast_env(
        fake_discord, tmp_path, vast,
        vast_settings={"image_pull_timeout": 0.2, "start_timeout": 0.8},
    )
    try:
        ops = env.services.server_ops
        await ops.rent(ADMIN_ACTOR, await ops.plan(OfferQuery(gpu_name="RTX 3090")), "ran")
        instance_id = int((await env.services.servers.get("ran")).provider_id)
        await ops.stop(ADMIN_ACTOR, "ran")
        vast.remove_image(vast.instances[instance_id].image)  # the tag is gone since
        with pytest.raises(Exception, match="kept with its disk") as info:
            await ops.start(ADMIN_ACTOR, "ran")
        assert "loading" in str(info.value)
        assert instance_id in vast.instances and not vast.destroyed
        assert (await env.services.servers.get("ran")).status == "starting"
    finally:
        await env.stop()


async def test_an_exposed_comfy_image_records_its_public_port(
    fake_discord: Any, tmp_path: Path, vast: FakeVast
) -> None:
    """With comfy.expose_port, Vast's ComfyUI image (ComfyUI on 18188) is reached at the
    public port Vast maps for 18188 (found by bench.costsim: the bot looked for 8188)."""
    env = await vast_env(fake_discord, tmp_path, vast, comfy={"expose_port": True})
    try:
        await rent(env, {"gpu": "RTX 4090"})

        async def running() -> Any:
            servers = await env.services.servers.list()
            return servers[0] if servers and servers[0].status == "running" else None

        server = await eventually(running, timeout=15)
        [instance] = vast.instances.values()
        assert "-p 18188:18188" in instance.env
        assert server.comfy_url == f"http://127.0.0.1:{instance.ports['18188/tcp']}"
    finally:
        await env.stop()
