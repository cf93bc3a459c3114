"""DNS rebinding: a registered name that later resolves to a link-local or metadata
address. The real ComfyUI client, over loopback sockets, through the bot's resolver."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from core.comfy.client import ComfyClient
from core.comfy.errors import ComfyError
from core.netguard import GuardedResolver
from core.services import Services
from tests.fakecomfy import FakeComfy


class DnsAnswers(AbstractResolver):
    """A DNS server whose answers the test changes, as a rebinding attacker's does."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str]] = {}
        self.asked = 0

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.asked += 1
        return [ResolveResult(hostname=host, host=address, port=port, family=socket.AF_INET,
                              proto=0, flags=socket.AI_NUMERICHOST)
                for address in self.answers[host]]

    async def close(self) -> None:
        return None


@pytest.fixture
async def dns() -> DnsAnswers:
    return DnsAnswers()


@pytest.fixture
async def guarded_http(dns: DnsAnswers) -> AsyncIterator[aiohttp.ClientSession]:
    # No keep-alive and no DNS cache: each request resolves again, as a new connection
    # after the answer's TTL would.
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(dns), force_close=True,
                                     use_dns_cache=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def test_a_name_rebound_to_the_metadata_address_is_not_connected(
    fake: FakeComfy, dns: DnsAnswers, guarded_http: aiohttp.ClientSession
) -> None:
    url = fake.url.replace("127.0.0.1", "comfy.rebind.test")
    client = ComfyClient(url, guarded_http, timeout=5.0)
    dns.answers["comfy.rebind.test"] = ["127.0.0.1"]  # what it resolved to when added
    assert (await client.system_stats()).raw
    before = len(fake.requests)

    dns.answers["comfy.rebind.test"] = ["169.254.169.254"]  # then the attacker's answer
    with pytest.raises(ComfyError, match="does not connect to"):
        await client.system_stats()
    dns.answers["comfy.rebind.test"] = ["fe80::1", "100.100.100.200"]
    with pytest.raises(ComfyError, match="does not connect to"):
        await client.system_stats()

    # A mixed answer: only the allowed address is used.
    dns.answers["comfy.rebind.test"] = ["169.254.169.254", "127.0.0.1"]
    assert (await client.system_stats()).raw
    assert len(fake.requests) == before + 1 and dns.asked == 4


async def test_the_bots_http_session_resolves_through_the_guard(services: Services) -> None:
    # 0xa9fea9fe is not an IP literal to aiohttp, so it is resolved: getaddrinfo turns it
    # into 169.254.169.254, the metadata service.
    with pytest.raises(aiohttp.ClientConnectorError, match="does not connect to"):
        await services.http.get("http://0xa9fea9fe:8188/system_stats",
                                timeout=aiohttp.ClientTimeout(total=30))
