"""Vast.ai's failures as exceptions: the VastError hierarchy and the one mapping from a
failed response (status, body, headers) to it, :func:`error_from_response`, the only place
that knows Vast's error vocabulary."""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping
from typing import Any

from core.errors import ExternalServiceError, RateLimited


class VastError(ExternalServiceError):
    """A Vast.ai call failed. ``str()`` is user-safe; details live in the attributes.

    ``status`` is the HTTP status (None for transport failures), ``code`` Vast's ``error``
    field, ``detail`` Vast's ``msg`` (redacted), ``new_contract`` an instance id that the
    failed create still produced (destroy it), and ``may_have_succeeded`` is True when a
    non-idempotent call's outcome is unknown (timeout or 5xx after sending).
    """

    default_message = "Vast.ai refused the request."

    def __init__(
        self,
        message: str | None = None,
        *,
        status: int | None = None,
        code: str | None = None,
        detail: str | None = None,
        op: str = "",
        new_contract: int | None = None,
        may_have_succeeded: bool = False,
    ) -> None:
        super().__init__(message or self.default_message)
        self.status = status
        self.code = code
        self.detail = detail
        self.op = op
        self.new_contract = new_contract
        self.may_have_succeeded = may_have_succeeded

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
            f"op={self.op!r}, message={self.message!r})"
        )


class VastAuthError(VastError):
    default_message = "Vast.ai rejected the API key; check the vast.api_key setting."


class InsufficientCredit(VastError):
    default_message = "The Vast.ai account does not have enough credit for this."


class OfferUnavailable(VastError):
    default_message = "That Vast.ai offer is no longer available; search again."


class VastNotFound(VastError):
    default_message = "Vast.ai has no such instance; it may have been destroyed."


class VastRateLimited(VastError, RateLimited):
    default_message = "Vast.ai is rate-limiting us; try again shortly."

    def __init__(self, message: str | None = None, *, retry_after: float | None = None,
                 **kwargs: Any) -> None:
        if message is None and retry_after is not None:
            message = f"Vast.ai is rate-limiting us; try again in {max(1, round(retry_after))} s."
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class SearchQuotaExceeded(VastRateLimited):
    """The daily search quota is used up; it resets at UTC midnight. Never retried."""

    default_message = "The daily Vast.ai search quota is used up; it resets at midnight UTC."


class VastServerError(VastError):
    default_message = "Vast.ai had a server error; try again shortly."


class VastTimeout(VastError):
    default_message = "Vast.ai did not answer in time."


class VastConnectionError(VastError):
    default_message = "Could not reach Vast.ai."


class SshKeysNotSupported(VastError):
    """Team-scoped API keys cannot register account SSH keys; attach per instance instead."""

    default_message = "This Vast.ai key cannot register SSH keys (team keys are not supported)."


_AUTH_CODES = {"auth_error", "unauthorized", "forbidden", "not_authorized"}
_CREDIT_CODES = {"insufficient_credit", "insufficient_balance", "insufficient_funds",
                 "spend_rate_limit", "missing_billing"}
_NOT_FOUND_CODES = {"no_such_instance", "not_found", "invalid_id", "no_such_ssh_key"}
_OFFER_CODES = {"no_such_ask"}
_RATE_CODES = {"rate_limit_exceeded"}
_CREDIT_WORDS = re.compile(r"\b(credit|balance|funds)\b", re.IGNORECASE)
_AUTH_WORDS = re.compile(r"invalid user key|session expired|please log in", re.IGNORECASE)
_THRESHOLD = re.compile(r"threshold\s*=\s*([0-9]+(?:\.[0-9]+)?)")
# Vast prefixes messages with an internal code, e.g. "error 404/3603: no_such_ask ...".
_INTERNAL_PREFIX = re.compile(r"^\s*error\s+\d{3}/\d+:\s*", re.IGNORECASE)


def _parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    raw = headers.get("Retry-After")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def _throttle_hint(text: str) -> float | None:
    # "API requests too frequent: endpoint threshold=2.0": the number is the minimum
    # interval in seconds between calls to that endpoint (vast-ai/docs#61).
    match = _THRESHOLD.search(text)
    return float(match.group(1)) if match else None


def error_from_response(
    status: int | None,
    body: Any,
    *,
    text: str = "",
    headers: Mapping[str, str] | None = None,
    op: str = "",
    now: float | None = None,
) -> VastError:
    """Map one failed response (status, parsed body, raw text, headers) to a VastError.

    ``op`` names the operation ("create", "show", ...): a bare 404 means "offer gone" for
    create and "no such instance" elsewhere. Callers must pass already-redacted text.
    """
    headers = headers or {}
    now = time.time() if now is None else now
    data = body if isinstance(body, Mapping) else {}
    code = data.get("error") if isinstance(data.get("error"), str) else None
    raw_msg = data.get("msg") or data.get("message") or data.get("detail")
    if not isinstance(raw_msg, str):
        raw_msg = text if not data else ""
    detail = _INTERNAL_PREFIX.sub("", raw_msg.strip())[:300] or None
    new_contract = data.get("new_contract")
    kwargs: dict[str, Any] = {
        "status": status, "code": code, "detail": detail, "op": op,
        "new_contract": new_contract if isinstance(new_contract, int) else None,
    }
    words = f"{code or ''} {detail or ''}"

    if status == 429 or code in _RATE_CODES or code == "search_quota_exceeded":
        if code == "search_quota_exceeded":
            reset = headers.get("X-RateLimit-Reset")
            retry_after = None
            if reset:
                try:
                    retry_after = max(0.0, float(reset) - now)
                except ValueError:
                    retry_after = None
            return SearchQuotaExceeded(retry_after=retry_after, **kwargs)
        retry_after = _parse_retry_after(headers, now)
        if retry_after is None:
            retry_after = _throttle_hint(f"{text} {detail or ''}")
        return VastRateLimited(retry_after=retry_after, **kwargs)
    if code == "team_ssh_keys_not_supported":
        return SshKeysNotSupported(**kwargs)
    # Checked before offers and 404s: a credit failure on create must not look like
    # "offer gone", or the caller would burn through every offer.
    if status in (402, 411) or code in _CREDIT_CODES or (
        code not in _AUTH_CODES and status not in (401, 403)
        and _CREDIT_WORDS.search(detail or "")
    ):
        return InsufficientCredit(**kwargs)
    # A bad key is 401 on most routes but 404 on some (bundles, older routes); a scoped
    # key lacking a permission gets 403.
    if status in (401, 403) or code in _AUTH_CODES or _AUTH_WORDS.search(words):
        return VastAuthError(**kwargs)
    if code in _OFFER_CODES or (op == "create" and status in (404, 410)):
        return OfferUnavailable(**kwargs)
    if code in _NOT_FOUND_CODES or status == 404:
        if code == "no_such_ssh_key":
            return VastNotFound("Vast.ai has no such SSH key.", **kwargs)
        return VastNotFound(**kwargs)
    if status is not None and status >= 500:
        return VastServerError(f"Vast.ai had a server error (HTTP {status}); try again shortly.",
                               **kwargs)
    if code == "deprecated_endpoint":
        return VastError("Vast.ai retired the API route this client used.", **kwargs)
    message = f"Vast.ai refused the request: {detail}" if detail else None
    return VastError(message, **kwargs)
