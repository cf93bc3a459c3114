"""/server add-direct, status and list on a ComfyUI URL: the real bot and fake Discord."""

from __future__ import annotations

from typing import Any

from core.audit import Actor
from tests.conftest import BotEnv, _answered, add_server


async def test_status_of_an_answering_server_shows_comfyui(studio: BotEnv) -> None:
    interaction = await studio.slash(
        "server", {"server": "gpu-1"}, user=studio.fake.admin, subcommand="status"
    )
    message = await studio.fake.wait_for(lambda: _answered(interaction))
    [embed] = message.embeds
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert embed["title"] == "Server gpu-1"
    assert fields["Provider"] == "direct" and fields["State"] == "running"
    assert fields["ComfyUI"].endswith(", answering")
    assert "MiB free" in fields["Devices"]
    assert fields["Queue"] == "0 running, 0 waiting"


async def test_status_of_a_dead_server_says_so(env: BotEnv) -> None:
    await env.services.servers.add_direct(Actor(1), "dead", "http://127.0.0.1:9")
    interaction = await env.slash(
        "server", {"server": "dead"}, user=env.fake.admin, subcommand="status"
    )
    message = await env.fake.wait_for(lambda: _answered(interaction))
    fields = {f["name"]: f["value"] for f in message.embeds[0]["fields"]}
    assert fields["ComfyUI"].startswith("not answering: ")
    assert "Devices" not in fields


async def test_add_direct_refuses_a_url_where_comfyui_does_not_answer(env: BotEnv) -> None:
    interaction = await env.slash(
        "server",
        {"name": "nothing", "url": "http://127.0.0.1:9"},
        user=env.fake.admin,
        subcommand="add-direct",
    )
    message = await env.fake.wait_for(lambda: _answered(interaction))
    assert "ComfyUI did not answer at http://127.0.0.1:9" in message.content
    assert await env.services.servers.list() == []


async def test_list_of_url_servers_shows_no_spend(env: BotEnv, comfy: Any) -> None:
    await add_server(env, "gpu-1", comfy.url)
    interaction = await env.slash("server", {}, user=env.fake.admin, subcommand="list")
    message = await env.fake.wait_for(lambda: _answered(interaction))
    [embed] = message.embeds
    assert embed["description"].startswith("**gpu-1** (direct) · running · GPU ?")
    assert "spent" not in embed["description"] and "0 job(s)" in embed["description"]
    assert embed["footer"]["text"] == "This month: $0.00"
