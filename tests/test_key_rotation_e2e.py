"""/server rotate-key: a new SSH key on every server, the old one gone, nobody locked out.

Real parts only: the bot over the fake Discord, the fake Vast over HTTP, and real SSH
servers (asyncssh and OpenSSH's sshd) that read ``~/.ssh/authorized_keys`` at each login,
as sshd does, so what the bot writes there decides who gets in.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.db.models import Server
from core.servers.keys import STATE_KEY
from core.ssh import ClientKey, SSHAuthError, SSHConnector, SSHOptions, SSHTarget
from core.vast import CreateRequest
from tests.conftest import BotEnv, _answered, bot_settings, register_ssh_server, start_bot
from tests.fakevast import FakeVast
from tests.fakevast.server import make_offer
from tests.sshserver import start_ssh_server
from tests.test_servers_vast_e2e import press

FAST = SSHOptions(connect_timeout=5.0, connect_attempts=2, backoff_base=0.05, backoff_max=0.1)


@pytest.fixture
async def vast() -> AsyncIterator[FakeVast]:
    fake = FakeVast(offers=[make_offer(101, "RTX 4090", dph_base=0.4, public_ipaddr="127.0.0.1")],
                    clock=time.time, provision_seconds=0.01, boot_seconds=0.01)
    await fake.start()
    yield fake
    await fake.stop()


def _settings(tmp_path: Path, fake_discord: Any, vast: FakeVast) -> Any:
    return bot_settings(
        tmp_path, fake_discord,
        vast={"api_key": vast.api_key, "base_url": vast.base_url, "request_timeout": 30},
        ssh={"connect_timeout": 5.0},
    )


@pytest.fixture
async def renv(fake_discord: Any, tmp_path: Path, vast: FakeVast) -> AsyncIterator[BotEnv]:
    env = await start_bot(fake_discord, _settings(tmp_path, fake_discord, vast))
    env.services.server_ops.heartbeat = None
    yield env
    await env.stop()


class Fleet:
    """Three servers: "alpha" (asyncssh) and "beta" (OpenSSH) registered with /server
    add-ssh, and "gamma", a Vast instance whose SSH is an asyncssh server."""

    def __init__(self, env: BotEnv, vast: FakeVast, tmp_path: Path) -> None:
        self.env, self.vast, self.tmp = env, vast, tmp_path
        self.ssh: dict[str, Any] = {}
        self.instance_id = 0

    def home(self, name: str) -> Path:
        return self.tmp / "homes" / name

    async def start(self) -> None:
        key = self.env.services.remote.key.public_openssh
        for name, kind in (("alpha", "asyncssh"), ("beta", "openssh"), ("gamma", "asyncssh")):
            self.home(name).mkdir(parents=True)
            self.ssh[name] = await start_ssh_server(kind, key, home=str(self.home(name)))
        await register_ssh_server(self.env, self.ssh["alpha"], name="alpha")
        await register_ssh_server(self.env, self.ssh["beta"], name="beta")
        await self._add_vast_server("gamma", self.ssh["gamma"])

    async def _add_vast_server(self, name: str, ssh: Any) -> None:
        services = self.env.services
        assert services.vast is not None
        self.instance_id = await services.vast.create_instance(
            101, CreateRequest(image="vastai/base-image", label=f"c.{name}"))
        # The instance's SSH answers where our test server listens.
        self.vast.set_network(self.instance_id, public_ipaddr="127.0.0.1",
                              ports={"22/tcp": ssh.port}, ssh_host="127.0.0.1", ssh_port=ssh.port)
        await services.vast.attach_ssh_key(self.instance_id, services.remote.key.public_openssh)
        async with services.sessions.begin() as session:
            session.add(Server(
                provider="vast", provider_id=str(self.instance_id), name=name, status="running",
                ssh_host="127.0.0.1", ssh_port=ssh.port, ssh_user=ssh.username,
                host_key=ssh.host_key_openssh, comfy_port=8188))

    def authorized(self, name: str) -> str:
        return (self.home(name) / ".ssh" / "authorized_keys").read_text()

    async def logs_in(self, name: str, key: ClientKey) -> bool:
        ssh = self.ssh[name]
        target = SSHTarget(host=ssh.host, port=ssh.port, username=ssh.username,
                           pinned_host_key=ssh.host_key_openssh)
        try:
            conn = await SSHConnector(key, FAST).connect(target)
        except SSHAuthError:
            return False
        try:
            return (await conn.run("echo in", check=True)).stdout == "in\n"
        finally:
            conn.close()

    def instance_keys(self) -> list[str]:
        inst = self.vast.instances[self.instance_id]
        return [k["public_key"] for k in inst.ssh_keys]

    def account_keys(self) -> list[str]:
        return [k["public_key"] for k in self.vast.ssh_keys if k["deleted_at"] is None]

    async def close(self) -> None:
        for server in self.ssh.values():
            await server.close()


@pytest.fixture
async def fleet(renv: BotEnv, vast: FakeVast, tmp_path: Path) -> AsyncIterator[Fleet]:
    f = Fleet(renv, vast, tmp_path)
    await f.start()
    yield f
    await f.close()


async def rotate(env: BotEnv) -> str:
    interaction = await env.slash("server", {}, user=env.fake.admin, subcommand="rotate-key")
    await press(env, interaction, "Rotate")

    def reply() -> Any:
        m = _answered(interaction)
        return m if m is not None and m.content.startswith(("New SSH key", "Something")) else None

    message = await env.fake.wait_for(reply, timeout=120)
    return str(message.content)


def _body(key: ClientKey) -> str:
    return " ".join(key.public_openssh.split()[:2])


async def test_rotation_replaces_the_key_everywhere(renv: BotEnv, fleet: Fleet) -> None:
    old = renv.services.remote.key
    assert all([await fleet.logs_in(n, old) for n in fleet.ssh])

    reply = await rotate(renv)

    new = renv.services.remote.key
    assert new.fingerprint != old.fingerprint
    assert new.fingerprint in reply and "The old key is gone everywhere." in reply
    for name in fleet.ssh:
        assert await fleet.logs_in(name, new), name
        assert not await fleet.logs_in(name, old), name
        assert _body(old) not in fleet.authorized(name)
    # Vast: the instance and the account hold the new key only.
    assert [_body_of(k) for k in fleet.instance_keys()] == [_body(new)]
    # When Vast next rewrites the instance's authorized_keys from its attached keys, the
    # bot still gets in (it attached the new key) and the old key stays out.
    fleet.vast.refresh_authorized_keys(
        fleet.instance_id, fleet.home("gamma") / ".ssh" / "authorized_keys")
    assert await fleet.logs_in("gamma", new) and not await fleet.logs_in("gamma", old)
    assert _body(new) in [_body_of(k) for k in fleet.account_keys()]
    assert _body(old) not in [_body_of(k) for k in fleet.account_keys()]
    # The bot's key file is the new key; nothing of the old one is left behind.
    path = renv.services.settings.ssh_key_path
    assert path.with_name(path.name + ".pub").read_text().strip() == new.public_openssh
    assert not path.with_name(path.name + ".old").exists()
    assert not path.with_name(path.name + ".next").exists()
    assert "last_rotated" in (await renv.services.state.get(STATE_KEY) or {})
    # And the bot still works through its pool with the new key alone.
    view = await renv.services.servers.get("beta")
    result = await renv.services.remote.pool.run(renv.services.remote.target(view), "echo ok",
                                                 timeout=30)
    assert result.stdout == "ok\n"


async def test_an_unreachable_server_keeps_both_keys_and_a_second_rotation_finishes(
    renv: BotEnv, fleet: Fleet, fake_discord: Any, tmp_path: Path, vast: FakeVast
) -> None:
    old = renv.services.remote.key
    await fleet.ssh["gamma"].close()  # the Vast instance's SSH is down

    reply = await rotate(renv)

    new = renv.services.remote.key
    assert "gamma" in reply and "keep both keys" in reply
    assert "The old key is gone everywhere." not in reply
    for name in ("alpha", "beta"):
        assert await fleet.logs_in(name, new) and not await fleet.logs_in(name, old)
    # gamma was never touched: only the old key is there, so the bot must keep it.
    assert _body(old) in fleet.authorized("gamma") and _body(new) not in fleet.authorized("gamma")
    state = await renv.services.state.get(STATE_KEY)
    assert state is not None and state["new_public"] == new.public_openssh

    # The bot restarts mid-rotation; it still holds the old key for gamma.
    await renv.stop()
    env2 = await start_bot(fake_discord, _settings(tmp_path, fake_discord, vast))
    try:
        env2.services.server_ops.heartbeat = None
        assert env2.services.remote.key.fingerprint == new.fingerprint
        await fleet.ssh["gamma"].start()  # back, on the same port and host key

        reply = await rotate(env2)

        assert "resumed" in reply and "The old key is gone everywhere." in reply
        for name in fleet.ssh:
            assert await fleet.logs_in(name, new), name
            assert not await fleet.logs_in(name, old), name
        assert [_body_of(k) for k in fleet.instance_keys()] == [_body(new)]
        assert _body(old) not in [_body_of(k) for k in fleet.account_keys()]
        path = env2.services.settings.ssh_key_path
        assert not path.with_name(path.name + ".old").exists()
    finally:
        await env2.stop()
        renv.stop = _noop  # type: ignore[method-assign]  (already stopped above)


async def _noop() -> None:
    return None


def _body_of(line: str) -> str:
    return " ".join(line.split()[:2])


async def test_only_admins_rotate_and_cancel_changes_nothing(renv: BotEnv, fleet: Fleet) -> None:
    old = renv.services.remote.key
    refused = await renv.slash(
        "server", {}, user=renv.fake.member, subcommand="rotate-key", force=True
    )
    message = await renv.fake.wait_for(lambda: _answered(refused))
    assert "New SSH key" not in message.content and "admin" in message.content.lower()
    interaction = await renv.slash("server", {}, user=renv.fake.admin, subcommand="rotate-key")
    await press(renv, interaction, "Cancel")
    message = await renv.fake.wait_for(
        lambda: (m := _answered(interaction)) is not None and "not rotated" in m.content)
    assert renv.services.remote.key.fingerprint == old.fingerprint
    assert await renv.services.state.get(STATE_KEY) is None
    assert all([await fleet.logs_in(n, old) for n in fleet.ssh])


async def test_rotate_days_rotates_from_the_maintenance_check(
    renv: BotEnv, fleet: Fleet
) -> None:
    keys = renv.services.keys
    keys._rotate_days = 30  # as if ssh.rotate_days = 30
    old = renv.services.remote.key
    assert not await keys.due()  # the key was made just now
    keys._clock = lambda: time.time() + 31 * 86400
    assert await keys.due()
    hook = renv.services.server_ops.key_check
    assert hook is not None
    await hook()  # what ServerService.maintain calls every tick
    assert renv.services.remote.key.fingerprint != old.fingerprint
    assert not await fleet.logs_in("alpha", old)
    assert not await keys.due()  # rotated "now"


async def test_a_rotation_interrupted_after_its_start_resumes_with_the_same_key(
    renv: BotEnv, fleet: Fleet, fake_discord: Any, tmp_path: Path, vast: FakeVast
) -> None:
    old = renv.services.remote.key
    await renv.services.keys._start()  # the bot dies right after saving the plan
    planned = (await renv.services.state.get(STATE_KEY) or {})["new_public"]
    await renv.stop()
    env2 = await start_bot(fake_discord, _settings(tmp_path, fake_discord, vast))
    try:
        env2.services.server_ops.heartbeat = None
        # Both keys are offered after the restart.
        offered = [k.public_openssh for k in env2.services.remote.connector.extra_keys]
        assert planned in offered
        reply = await rotate(env2)
        new = env2.services.remote.key
        assert new.public_openssh == planned
        assert "resumed" in reply and "The old key is gone everywhere." in reply
        for name in fleet.ssh:
            assert await fleet.logs_in(name, new) and not await fleet.logs_in(name, old), name
    finally:
        await env2.stop()
        renv.stop = _noop  # type: ignore[method-assign]  (already stopped above)


async def test_a_team_api_key_without_account_keys_still_rotates(
    renv: BotEnv, fleet: Fleet, vast: FakeVast
) -> None:
    """Team API keys cannot hold account keys (400 team_ssh_keys_not_supported, vast.md
    2.8): the instances get the new key attached and the rotation finishes."""
    vast.team_key = True
    old = renv.services.remote.key
    reply = await rotate(renv)
    new = renv.services.remote.key
    assert "The old key is gone everywhere." in reply
    assert [_body_of(k) for k in fleet.instance_keys()] == [_body(new)]
    assert await fleet.logs_in("gamma", new) and not await fleet.logs_in("gamma", old)
