"""/stats, /budget and the metrics endpoint through the real bot, the fake Discord (which
enforces Discord's message and embed limits) and a real socket."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BotEnv, _answered, bot_settings, start_bot
from tests.stats_fixtures import NOW, seed


async def _seed(env: BotEnv) -> None:
    await seed(env.services.sessions, guild=env.fake.guild.id,
               users=(env.fake.member.id, env.fake.admin.id))
    env.services.stats.clock = lambda: NOW


async def _reply(env: BotEnv, interaction: Any) -> Any:
    # After a deferral Discord turns the first follow-up into the original response.
    return await env.fake.wait_for(lambda: _answered(interaction), timeout=30)


def _png(message: Any, name: str) -> Image.Image:
    [attachment] = message.attachments
    assert attachment.filename == name
    image = Image.open(io.BytesIO(attachment.data))
    image.load()
    assert image.format == "PNG"
    return image


def _fields(message: Any) -> dict[str, str]:
    return {f["name"]: f["value"] for f in message.embeds[0].get("fields", [])}


async def test_stats_for_a_member_and_for_an_admin(env: BotEnv) -> None:
    await _seed(env)
    asked = await env.slash("stats", {"period": "day"}, user=env.fake.member)
    reply = await _reply(env, asked)
    assert reply.ephemeral
    embed = reply.embeds[0]
    assert "8** jobs" in embed["description"] and "8 images" in embed["description"]
    fields = _fields(reply)
    assert fields["Success rate"] == "67 %" and fields["Error rate"] == "33 %"
    assert fields["Queue wait p50 / p95"] == "15.0s / 37.5s"
    assert fields["Run time p50 / p95"] == "10m 0s / 10m 0s"
    assert "2× ComfyUI on port N refused job N" in fields["Errors by cause"]
    assert "**alpha**: 3 %" in fields["Server utilisation (busy share of billed time)"]
    assert "Per user" not in fields  # members see the team's numbers, not each other's
    assert embed["image"]["url"].endswith("stats.png")
    assert _png(reply, "stats.png").size == (800, 450)

    asked = await env.slash("stats", {"period": "day"}, user=env.fake.admin)
    fields = _fields(await _reply(env, asked))
    users = fields["Per user"]
    assert f"<@{env.fake.member.id}>: 4 jobs, 2 done, 2 failed, 4 images" in users
    assert f"<@{env.fake.admin.id}>: 4 jobs, 2 done, 0 failed, 4 images" in users


async def test_stats_on_an_empty_guild_still_answers(env: BotEnv) -> None:
    asked = await env.slash("stats", {}, user=env.fake.member)
    reply = await _reply(env, asked)
    assert "**0** jobs" in reply.embeds[0]["description"]
    assert _fields(reply)["Success rate"] == "–"
    _png(reply, "stats.png")


async def test_budget_for_an_admin_and_refused_to_a_member(env: BotEnv) -> None:
    await _seed(env)
    env.services.settings.costs.monthly_budget = 150.0
    asked = await env.slash("budget", {}, user=env.fake.admin)
    reply = await _reply(env, asked)
    embed = reply.embeds[0]
    assert embed["title"] == "Budget, March 2026"
    assert "Month to date: **$96.48** of $150.00" in embed["description"]
    assert "Billing now: $0.520/h" in embed["description"]
    assert "Forecast to month end at this rate: **$302.40**" in embed["description"]
    assert "Remaining: $53.52" in embed["description"]
    assert "passes the budget" in embed["description"]
    servers = _fields(reply)["Per server (month, rate now)"]
    assert "**alpha**: $66.00, $0.500/h" in servers and "**beta**: $30.48, $0.020/h" in servers
    _png(reply, "budget.png")

    refused = await env.slash("budget", {}, user=env.fake.member, force=True)
    message = refused.response_message()
    assert message.ephemeral and not message.attachments
    assert "for admins" in (message.content or "") + str(message.embeds)


async def test_metrics_endpoint_serves_prometheus_text_and_stops(
    fake_discord: Any, tmp_path: Path
) -> None:
    settings = bot_settings(
        tmp_path, fake_discord, metrics={"enabled": True, "host": "127.0.0.1", "port": 0}
    )
    env = await start_bot(fake_discord, settings)
    stopped = False
    try:
        await _seed(env)
        port = env.bot.metrics_port
        assert port
        url = f"http://127.0.0.1:{port}/metrics"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            async with http.get(url) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain; version=")
                text = await response.text()
            families = {f.name: f for f in text_string_to_metric_families(text)}
            jobs = {s.labels["state"]: s.value for s in families["comfyvast_jobs"].samples}
            assert jobs["completed"] == 6 and jobs["queued"] == 1
            assert {"comfyvast_servers", "comfyvast_queue_wait_seconds",
                    "comfyvast_run_seconds", "comfyvast_spend_dollars",
                    "comfyvast_spend_month_dollars"} <= set(families)
            await env.stop()
            stopped = True
            # Closing the bot closes the port: nothing listens any more.
            with pytest.raises(aiohttp.ClientConnectionError):
                async with http.get(url):
                    pass
    finally:
        if not stopped:
            await env.stop()


async def test_metrics_are_off_unless_enabled(env: BotEnv) -> None:
    assert env.bot.metrics is None and env.bot.metrics_port is None


async def test_a_taken_metrics_port_costs_the_metrics_not_the_bot(
    fake_discord: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        settings = bot_settings(
            tmp_path, fake_discord, metrics={"enabled": True, "port": port}
        )
        env = await start_bot(fake_discord, settings)
        try:
            assert env.bot.metrics is None and env.bot.metrics_port is None
            assert f"cannot listen on 127.0.0.1:{port}" in caplog.text
            asked = await env.slash("stats", {}, user=env.fake.member)
            _png(await _reply(env, asked), "stats.png")  # the bot still answers
        finally:
            await env.stop()
    finally:
        taken.close()


async def test_member_text_in_the_reply_is_escaped_and_fits(env: BotEnv) -> None:
    """Forty servers with 64-character names and thirty distinct failure causes carrying
    mentions and markdown: the reply stays within Discord's embed limits (the fake refuses
    anything over them) and pings nobody."""
    import datetime as dt

    from core.db.models import ComfyGeneration, Server, ServerBilling

    start = NOW - dt.timedelta(hours=2)
    async with env.services.sessions.begin() as s:
        servers = [Server(provider="ssh", name=f"{i:02d}" + "x" * 62, price_per_hour=1.0)
                   for i in range(40)]
        s.add_all(servers)
        await s.flush()
        s.add_all(ServerBilling(server_id=sv.id, state="running", price_per_hour=1.0,
                                started_at=start) for sv in servers)
        s.add_all(
            ComfyGeneration(
                server_id=servers[0].id, user_id=env.fake.member.id,
                guild_id=env.fake.guild.id, prompt="p", status="failed", created_at=start,
                started_at=start, completed_at=start,
                error_message=f"@everyone `{chr(65 + i)}` **boom** <@{env.fake.admin.id}> "
                + "y" * 200,
            )
            for i in range(30)
        )
    env.services.stats.clock = lambda: NOW
    env.services.settings.costs.monthly_budget = 10.0
    for name, user in (("stats", env.fake.admin), ("budget", env.fake.admin)):
        reply = await _reply(env, await env.slash(name, {}, user=user))
        text = str(reply.embeds)
        assert "@everyone" not in text and f"<@{env.fake.admin.id}>" not in text
        assert "… and 30 more" in text
        _png(reply, f"{name}.png")


async def test_stats_read_what_a_real_generation_wrote(studio: BotEnv) -> None:
    """A job through the real pipeline (fake ComfyUI over a socket) shows up in /stats with
    the columns the generation store writes: times, images, guild."""
    from core.db.models import ComfyGeneration
    from tests.conftest import eventually

    env = studio
    asked = await env.slash("generate", {"prompt": "a lighthouse", "batch": 2},
                            user=env.fake.member)
    await env.fake.wait_for(lambda: _answered(asked))

    async def completed() -> bool:
        from sqlalchemy import select

        async with env.services.sessions() as session:
            status = await session.scalar(select(ComfyGeneration.status))
        return status == "completed"

    await eventually(completed, timeout=30)
    reply = await _reply(env, await env.slash("stats", {"period": "day"}, user=env.fake.member))
    embed = reply.embeds[0]
    assert "**1** jobs, 1 completed" in embed["description"]
    assert "2 images" in embed["description"]
    fields = _fields(reply)
    assert fields["Success rate"] == "100 %"
    wait_p50, _ = fields["Queue wait p50 / p95"].split(" / ")
    run_p50, _ = fields["Run time p50 / p95"].split(" / ")
    assert wait_p50 != "–" and run_p50 != "–"
    _png(reply, "stats.png")
