"""/setup end to end: the real bot, the fake Discord, a real SSH server (both kinds)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.diagnostics import Diagnostics
from core.setup import SetupService
from tests.conftest import BotEnv, _answered, register_ssh_server
from tests.fakediscord.models import iter_components
from tests.setup_fixtures import free_port, make_setup_service, stop_supervisor


@pytest.fixture
async def studio(env: BotEnv, ssh_host: Any, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """The bot with a registered SSH server and a SetupService that knows the test profile
    (and makes its flaky step fail once), wired in as the entry point will."""
    install_dir = tmp_path / "srv" / "ComfyUI"
    await register_ssh_server(env, ssh_host, comfy_port=free_port())
    service = make_setup_service(env.services, install_dir, flaky="yes")
    env.services.setup = service  # type: ignore[attr-defined]
    env.services.diagnostics = Diagnostics(  # type: ignore[attr-defined]
        env.services.servers, env.services.remote, service, env.services.http)
    cog = env.bot.get_cog("Setup")
    if cog is None:
        await env.bot.load_extension("cogs.setup")
        await env.bot.sync_commands_if_changed()
    else:
        cog.attach(service)  # type: ignore[attr-defined]
        await service.startup()
    try:
        yield {"service": service, "install_dir": install_dir}
    finally:
        await service.close()
        stop_supervisor(install_dir)


def buttons(message: Any) -> dict[str, str]:
    return {c.get("label"): c["custom_id"] for c in iter_components(message.components)
            if c.get("type") == 2 and "custom_id" in c}


async def setup_command(env: BotEnv, sub: str, options: dict[str, Any], user: Any = None) -> Any:
    return await env.slash("setup", options, user=user or env.fake.admin, subcommand=sub)


async def final_status(env: BotEnv, service: SetupService, execution_id: int) -> Any:
    """The run's status message once its final state (with the log) has landed."""
    view = await service.get(execution_id)
    assert view.message_id is not None
    message = env.fake.messages[view.message_id]
    await env.fake.wait_for(lambda: bool(message.attachments), timeout=20)
    return message


async def test_setup_run_shows_progress_fails_then_resumes_with_logs(
    env: BotEnv, studio: dict[str, Any]
) -> None:
    service: SetupService = studio["service"]
    choices = await env.fake.autocomplete("setup", {"server": "box"}, "profile",
                                          user=env.fake.admin, subcommand="run")
    assert "test" in [c["value"] for c in choices]

    first = await setup_command(env, "run", {"server": "box", "profile": "test"})
    reply = await env.fake.wait_for(lambda: _answered(first))
    assert reply.ephemeral and "Setup #1 of **box** started with profile test" in reply.content
    failed = await final_status(env, service, 1)
    assert not failed.ephemeral and failed.channel_id == env.channel_id
    embed = failed.embeds[0]
    assert embed["title"] == "Setup failed on box at step 3/6"
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert "Step 3/6 (flaky) failed with exit status 3" in fields["Error"]
    assert "something went wrong on purpose" in fields["Error"]  # the stderr tail
    assert "❌ 3. flaky" in embed["description"] and "✅ 1. prepare" in embed["description"]
    [log] = failed.attachments
    assert log.filename == "setup-1.log"
    assert b"flaky: something went wrong on purpose" in log.data
    assert len(failed.edits) >= 1  # posted first, then edited (progress, final state)

    second = await setup_command(env, "run", {"server": "box", "profile": "test"})
    await env.fake.wait_for(lambda: _answered(second))
    done = await final_status(env, service, 2)
    embed = done.embeds[0]
    assert embed["title"] == "ComfyUI is ready on box"
    assert "⏭️ 1. prepare · already done" in embed["description"]
    assert "✅ 3. flaky · done" in embed["description"]
    assert "4 step(s) ran, 2 were already done" in embed["fields"][0]["value"]
    assert b"==> [6/6] wait: done" in done.attachments[0].data

    status = await setup_command(env, "status", {"server": "box"})
    message = await env.fake.wait_for(lambda: _answered(status))
    assert message.ephemeral and message.embeds[0]["title"] == "ComfyUI is ready on box"

    logs = await setup_command(env, "logs", {"execution": 1})
    message = await env.fake.wait_for(lambda: _answered(logs))
    assert message.ephemeral and "Log of setup #1 on **box** (failed)" in message.content
    assert b"something went wrong on purpose" in message.attachments[0].data


async def test_setup_reset_asks_the_invoker_first(env: BotEnv, studio: dict[str, Any]) -> None:
    install_dir: Path = studio["install_dir"]
    install_dir.mkdir(parents=True)
    (install_dir / "main.py").write_text("# installed\n")

    cancelled = await setup_command(env, "reset", {"server": "box", "profile": "test"})
    prompt = await env.fake.wait_for(lambda: _answered(cancelled))
    assert prompt.ephemeral and f"deletes {install_dir}" in prompt.content
    assert set(buttons(prompt)) == {"Reset", "Cancel"}
    stranger = await env.fake.click(prompt.id, buttons(prompt)["Reset"], user=env.fake.member)
    refused = await env.fake.wait_for(lambda: _answered(stranger))
    assert "Only the person who ran the command" in refused.content
    await env.fake.click(prompt.id, buttons(prompt)["Cancel"], user=env.fake.admin)
    await env.fake.wait_for(
        lambda: any("Nothing was reset" in m.content for m in cancelled.followups()))
    assert install_dir.exists()

    confirmed = await setup_command(env, "reset", {"server": "box", "profile": "test"})
    prompt = await env.fake.wait_for(lambda: _answered(confirmed))
    await env.fake.click(prompt.id, buttons(prompt)["Reset"], user=env.fake.admin)
    done = await env.fake.wait_for(
        lambda: next((m for m in confirmed.followups() if "Reset **box**" in m.content), None))
    assert "Run /setup run to install again" in done.content
    assert not install_dir.exists()


async def test_unanswered_reset_changes_nothing(env: BotEnv, studio: dict[str, Any]) -> None:
    env.bot.get_cog("Setup").confirm_timeout = 0.3  # type: ignore[union-attr]
    install_dir: Path = studio["install_dir"]
    install_dir.mkdir(parents=True)
    interaction = await setup_command(env, "reset", {"server": "box", "profile": "test"})
    await env.fake.wait_for(
        lambda: any("Nothing was reset" in m.content for m in interaction.followups()))
    prompt = interaction.response_message()
    assert "No answer in time" in prompt.content and buttons(prompt) == {}
    assert install_dir.exists()


async def test_server_diagnose_through_discord(env: BotEnv, studio: dict[str, Any]) -> None:
    group = env.bot.tree.get_command("server")
    if getattr(group, "get_command", lambda _: None)("diagnose") is None:
        pytest.skip("/server diagnose is not wired into cogs/servers.py yet")
    service: SetupService = studio["service"]
    from core.audit import Actor

    await service.run(Actor(user_id=1), "box", "test")  # fails once (flaky)
    assert (await service.run(Actor(user_id=1), "box", "test")).succeeded
    interaction = await env.slash("server", {"server": "box"}, user=env.fake.admin,
                                  subcommand="diagnose")
    message = await env.fake.wait_for(lambda: _answered(interaction), timeout=15)
    assert message.ephemeral
    embed = message.embeds[0]
    assert embed["title"] == "box: all checks passed"
    names = [f["name"] for f in embed["fields"]]
    assert names[:3] == ["✅ Reachability", "✅ SSH login", "✅ ComfyUI port"]
