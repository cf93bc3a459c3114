"""Own SSH hosts: registration with a pinned host key, generation through the tunnel."""

from __future__ import annotations

import os
import stat
from typing import Any

from core.ssh import unix_socket_path
from tests.conftest import MODELS, BotEnv, _answered, register_ssh_server
from tests.fakecomfy import FakeComfy
from tests.test_generation_e2e import finished_row, result_messages


async def test_add_ssh_pins_the_host_key(env: BotEnv, ssh_host: Any) -> None:
    server = await register_ssh_server(env, ssh_host)
    assert server.provider == "ssh" and server.status == "running"
    assert server.host_key == ssh_host.host_key_openssh


async def test_add_ssh_with_unknown_key_shows_the_public_key(env: BotEnv) -> None:
    from core.ssh import ensure_client_key
    from tests.sshserver import AsyncSSHTestServer

    stranger = ensure_client_key(env.services.settings.data_dir / "other" / "id_ed25519")
    server = AsyncSSHTestServer(stranger.public_openssh)
    await server.start()
    try:
        interaction = await env.slash(
            "server",
            {"name": "nope", "host": server.host, "port": server.port, "user": server.username},
            user=env.fake.admin,
            subcommand="add-ssh",
        )
        message = await env.fake.wait_for(lambda: _answered(interaction))
        assert message.ephemeral
        assert "refused the bot's key" in message.content
        assert env.services.remote.key.public_openssh in message.content
        assert await env.services.servers.list() == []
    finally:
        await server.close()


async def test_generation_through_the_ssh_tunnel(env: BotEnv, ssh_host: Any) -> None:
    comfy = FakeComfy(models=MODELS, output_size=(32, 32))
    await comfy.start()
    try:
        server = await register_ssh_server(env, ssh_host, comfy_port=comfy.port)
        interaction = await env.slash("generate", {"prompt": "over ssh"})
        await env.fake.wait_for(lambda: _answered(interaction))
        row = await finished_row(env)
        assert row.status == "completed", row.error_message
        [result] = result_messages(env)
        assert result.attachments[0].data in comfy.files["output"].values()
        # Issue 12: through the tunnel's private Unix socket (HTTP and the WebSocket).
        url = await env.services.endpoints.resolve(server)
        path = unix_socket_path(url)
        assert path is not None, url
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert comfy._sockets, "the event WebSocket did not come through the tunnel"
    finally:
        await comfy.stop()
