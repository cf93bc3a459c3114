"""Async client for the Vast.ai REST API, one concern per module.

* :mod:`core.vast.errors`: the :class:`VastError` hierarchy and :func:`error_from_response`.
* :mod:`core.vast.types`: offers, the offer query, the create request, instances, keys.
* :mod:`core.vast.query`: the search filter built from an :class:`OfferQuery`.
* :mod:`core.vast.transport`: one request with auth, redaction and the retry loop.
* :mod:`core.vast.client`: :class:`VastClient`, the API calls by area.

Import from ``core.vast``; the names below are the package's public surface.
"""

from core.vast.client import LIST_PAGE_LIMIT, VastClient
from core.vast.errors import (
    InsufficientCredit,
    OfferUnavailable,
    SearchQuotaExceeded,
    SshKeysNotSupported,
    VastAuthError,
    VastConnectionError,
    VastError,
    VastNotFound,
    VastRateLimited,
    VastServerError,
    VastTimeout,
    error_from_response,
)
from core.vast.query import build_search_body
from core.vast.transport import DEFAULT_BASE_URL, MAX_HONOURED_RETRY_AFTER, USER_AGENT
from core.vast.types import (
    Balance,
    CreateRequest,
    Instance,
    JsonDict,
    Offer,
    OfferQuery,
    RunType,
    SshKey,
)

__all__ = [
    "DEFAULT_BASE_URL", "LIST_PAGE_LIMIT", "MAX_HONOURED_RETRY_AFTER", "USER_AGENT",
    "Balance", "CreateRequest", "InsufficientCredit", "Instance", "JsonDict", "Offer",
    "OfferQuery", "OfferUnavailable", "RunType", "SearchQuotaExceeded", "SshKey",
    "SshKeysNotSupported", "VastAuthError", "VastClient", "VastConnectionError", "VastError",
    "VastNotFound", "VastRateLimited", "VastServerError", "VastTimeout", "build_search_body",
    "error_from_response",
]
