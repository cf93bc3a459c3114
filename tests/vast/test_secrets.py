"""The API key stays out of URLs, logs, reprs and exception messages."""

from __future__ import annotations

import logging

import aiohttp
import pytest
from pydantic import SecretStr

from core.vast import OfferQuery, VastClient, VastError
from tests.fakevast import FakeVast

from .conftest import SSH_KEY, comfy_request

SECRET = "sk-very-secret-0123456789abcdef"


@pytest.fixture
async def secret_fake() -> FakeVast:
    fake = FakeVast(api_key=SECRET, timeout_hang=60.0)  # outlasts the client timeout
    await fake.start()
    yield fake  # type: ignore[misc]
    await fake.stop()


async def test_key_never_leaks(secret_fake: FakeVast, session: aiohttp.ClientSession,
                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake = secret_fake
    seen: list[str] = []

    async def no_sleep(_: float) -> None:
        return None

    # 2 s: the injected timeout hangs until the fake stops; real answers come well within.
    client = VastClient(SecretStr(SECRET), session, base_url=fake.base_url, timeout=2.0,
                        max_retries=1, sleep=no_sleep)
    seen.append(repr(client))
    offers = await client.search_offers(OfferQuery())
    seen.append(repr(offers))
    iid = await client.create_instance(offers[0].id, comfy_request())
    fake.advance(60)
    seen.append(repr(await client.show_instance(iid)))
    seen.append(repr(await client.list_instances()))
    seen.append(repr(await client.balance()))  # the real body echoes the key
    await client.add_ssh_key(SSH_KEY)

    fake.fail_next("/bundles/", 500, count=5,
                   body={"success": False, "error": "x", "msg": f"boom {SECRET}"})
    fake.fail_next("/asks/", "timeout")
    fake.fail_next(f"/instances/{iid}/", 429, count=5)
    for call in (
        client.search_offers(OfferQuery()),
        client.create_instance(offers[1].id, comfy_request()),
        client.show_instance(iid),
    ):
        with pytest.raises(VastError) as info:
            await call
        seen += [str(info.value), repr(info.value), str(info.value.detail)]

    fake.api_key = "rotated"
    with pytest.raises(VastError) as info:
        await client.balance()
    seen += [str(info.value), repr(info.value)]

    assert caplog.records, "expected DEBUG logs from the client"
    assert SECRET not in caplog.text
    for text in seen:
        assert SECRET not in text
    for rec in fake.requests:
        assert rec.bearer and not rec.key_in_query
        assert SECRET not in rec.path and SECRET not in str(rec.query)


async def test_user_safe_message_has_no_url_or_traceback(secret_fake: FakeVast,
                                                         session: aiohttp.ClientSession) -> None:
    client = VastClient(SECRET, session, base_url=secret_fake.base_url)
    secret_fake.api_key = "other"
    with pytest.raises(VastError) as info:
        await client.balance()
    assert "http" not in str(info.value)
    assert str(info.value).endswith(".")
