"""A protocol-faithful loopback fake of the Vast.ai REST API for tests."""

from tests.fakevast.server import (
    BOOT_FAILURES,
    DEFAULT_API_KEY,
    FakeInstance,
    FakeVast,
    Fault,
    RecordedRequest,
    default_offers,
    make_offer,
)

__all__ = [
    "BOOT_FAILURES",
    "DEFAULT_API_KEY",
    "FakeInstance",
    "FakeVast",
    "Fault",
    "RecordedRequest",
    "default_offers",
    "make_offer",
]
