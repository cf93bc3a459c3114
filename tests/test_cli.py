"""The command line: exit codes and sentences, the doctor's checks over real sockets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from bot.cli import main
from bot.doctor import run_checks
from tests.conftest import make_settings
from tests.fakecomfy import FakeComfy

ROOT = Path(__file__).resolve().parent.parent


def test_run_without_token_exits_2_with_a_sentence(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "COMFYVAST_CONFIG": str(tmp_path / "none.toml"),
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bot"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "No Discord bot token is set" in proc.stderr and "DISCORD_TOKEN" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_config_exits_2_naming_the_key(tmp_path: Path, capsys: Any) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[limits]\nmax_batch = 0\n")
    assert main(["--config", str(config)]) == 2
    assert "'limits.max_batch'" in capsys.readouterr().err


async def test_doctor_checks_each_system(tmp_path: Path, fake_discord: Any) -> None:
    from core.services import build_services

    comfy = FakeComfy()
    await comfy.start()
    try:
        settings = make_settings(
            tmp_path, discord={"token": fake_discord.token, "api_base_url": fake_discord.api_base}
        )
        services = await build_services(settings)
        from core.audit import Actor

        await services.servers.add_direct(Actor(1), "alive", comfy.url)
        await services.servers.add_direct(Actor(1), "dead", "http://127.0.0.1:9")
        await services.close()
        results = {r.name: r for r in await run_checks(settings)}
        assert results["database"].ok and results["discord"].ok
        assert results["ssh key"].ok  # generated at start, mode 0600
        assert results["server alive"].ok
        assert not results["server dead"].ok
        assert results["vast.ai"].skipped
    finally:
        await comfy.stop()


async def test_bot_process_runs_against_the_fake_and_stops_on_sigterm(
    tmp_path: Path, fake_discord: Any
) -> None:
    """The bot as a black box: `python -m bot` with the endpoints from its config."""
    import asyncio
    import os
    import signal

    config = tmp_path / "config.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n'
        f'[discord]\ntoken = "{fake_discord.token}"\n'
        f'api_base_url = "{fake_discord.api_base}"\ngateway_url = "{fake_discord.gateway_url}"\n'
        "guild_ready_timeout = 0.05\n"
        f'[database]\nurl = "sqlite+aiosqlite:///{tmp_path}/bot.db"\n'
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "--config", str(config), cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await fake_discord.wait_for(lambda: fake_discord.identifies, timeout=30)
        await fake_discord.wait_for(lambda: fake_discord.sync_count == 1, timeout=10)
        interaction = await fake_discord.slash("about", {}, user=fake_discord.member)
        await interaction.wait_response(timeout=10)
        assert interaction.response_message().embeds[0]["title"] == "comfyvast"
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    log = err.decode()
    assert "shutting down" in log and "stopped" in log
    assert fake_discord.token not in log  # the token never reaches the logs
