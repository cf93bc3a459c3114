"""Account and per-instance SSH keys."""

from __future__ import annotations

import pytest

from core.vast import SshKeysNotSupported, VastClient, VastNotFound
from tests.fakevast import FakeVast

from .conftest import SSH_KEY, comfy_request


async def test_add_ssh_key_is_idempotent(client: VastClient, fake: FakeVast) -> None:
    first = await client.add_ssh_key(SSH_KEY)
    again = await client.add_ssh_key(SSH_KEY + "\n")
    renamed = await client.add_ssh_key(SSH_KEY.replace("comfybot", "other-comment"))
    assert first == again == renamed
    assert len(fake.ssh_keys) == 1
    assert len(fake.calls("POST /api/v0/ssh/")) == 1
    assert fake.calls("POST /api/v0/ssh/")[0].body == {"ssh_key": SSH_KEY}


async def test_list_ssh_keys(client: VastClient) -> None:
    kid = await client.add_ssh_key(SSH_KEY)
    [key] = await client.list_ssh_keys()
    assert key.id == kid and key.public_key == SSH_KEY


async def test_delete_ssh_key(client: VastClient) -> None:
    kid = await client.add_ssh_key(SSH_KEY)
    await client.delete_ssh_key(kid)
    assert await client.list_ssh_keys() == []
    with pytest.raises(VastNotFound):
        await client.delete_ssh_key(kid)


async def test_team_key_cannot_register_ssh_keys(client: VastClient, fake: FakeVast) -> None:
    fake.team_key = True
    with pytest.raises(SshKeysNotSupported) as info:
        await client.add_ssh_key(SSH_KEY)
    assert info.value.code == "team_ssh_keys_not_supported"


async def test_attach_ssh_key_to_instance(client: VastClient, fake: FakeVast) -> None:
    iid = await client.create_instance(18822341, comfy_request())
    await client.attach_ssh_key(iid, SSH_KEY)
    await client.attach_ssh_key(iid, SSH_KEY)
    keys = await client.list_instance_ssh_keys(iid)  # a JSON string inside JSON
    assert [k.public_key for k in keys] == [SSH_KEY]
    assert fake.calls(f"POST /api/v0/instances/{iid}/ssh/")[0].body == {"ssh_key": SSH_KEY}


async def test_attach_to_missing_instance(client: VastClient) -> None:
    with pytest.raises(VastNotFound):
        await client.attach_ssh_key(1, SSH_KEY)


async def test_balance(client: VastClient, fake: FakeVast) -> None:
    bal = await client.balance()
    assert bal.credit == pytest.approx(fake.credit)
    assert bal.user_id == 123456
