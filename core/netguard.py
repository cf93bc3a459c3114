"""Addresses the bot never connects to, checked on every DNS answer.

Link-local addresses (169.254.0.0/16 with the cloud metadata service 169.254.169.254,
fe80::/10), other metadata services, unspecified and multicast addresses. A registered
ComfyUI URL is checked when it is added (``core.servers.own_hosts``), but a name can be
made to resolve elsewhere afterwards (DNS rebinding: a short TTL, then the metadata
address), so the bot's HTTP connections resolve names through :class:`GuardedResolver`,
which drops such addresses from every answer. IP literals are not resolved; they are
checked once, when the server is added, and cannot change.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

log = logging.getLogger(__name__)

# Metadata services at addresses that are not link-local: AWS's IPv6 one, Alibaba's.
METADATA_ADDRESSES = frozenset({
    ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200"),
})


def refused_address(address: str) -> bool:
    """Is ``address`` (an IP literal, maybe with a %scope) one the bot never connects to?

    Link-local (169.254.0.0/16 with the metadata service 169.254.169.254, fe80::/10),
    metadata, unspecified and multicast addresses, also inside IPv4-mapped IPv6. Loopback
    and private ranges stay allowed: a ComfyUI on the bot's own machine or LAN is the
    usual direct server, and the tests' fakes listen on 127.0.0.1.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_link_local or ip.is_unspecified or ip.is_multicast or ip in METADATA_ADDRESSES
    )


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver without the addresses :func:`refused_address` refuses; a name
    that resolves to nothing else fails like a name that does not resolve."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner if inner is not None else aiohttp.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if not refused_address(str(r["host"]))]
        if not allowed:
            log.warning("refused to connect to %s: it resolves only to link-local or "
                        "metadata addresses", host)
            # aiohttp shows the strerror: "Cannot connect to host ... [<this>]".
            raise OSError(errno.EACCES,
                          f"{host} resolves only to addresses the bot does not connect to")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def guarded_connector(**kwargs: Any) -> aiohttp.TCPConnector:
    """A connector for the bot's HTTP sessions (call it inside the running loop)."""
    return aiohttp.TCPConnector(resolver=GuardedResolver(), **kwargs)
