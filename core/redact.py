"""Redaction: the one place that decides what of a text, a URL or a record is secret.

Used for everything the bot keeps or shows that a member or a remote server supplied:
download rows (the URL), audit details (every recorded value), log lines about
downloads. Three kinds of secret are replaced:

* query values whose name looks like a credential (``?token=``, ``api_key``, ``sig``,
  ``X-Amz-Signature``, ...), in any URL found in the text;
* user info in URLs (``https://user:pass@host/``);
* tokens recognisable by their prefix (Hugging Face ``hf_``, GitHub ``ghp_`` and
  ``github_pat_``, GitLab ``glpat-``, Slack ``xox?-``, OpenAI-style ``sk-``, Civitai has
  no prefix and is only caught as a query value).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "REDACTED"

# Query names that carry a credential (presigned S3/GCS URLs use X-Amz-Signature,
# X-Goog-Signature, X-Amz-Credential; Civitai and most APIs use token/api_key).
_SECRET_QUERY_KEY = re.compile(r"token|key|sig|auth|pass|secret|credential", re.IGNORECASE)
# Keys of a recorded mapping whose whole value is a secret. Stricter than the query
# names: "host_key" (a public key pinned for a server) stays readable.
_SECRET_FIELD = re.compile(
    r"^(?:token|access_token|api_?key|apikey|password|passwd|secret|authorization|"
    r"credentials?|cookie)$|_(?:token|secret|password)$",
    re.IGNORECASE,
)
# Tokens recognisable on their own, wherever they appear in a text.
_TOKEN_PREFIXES = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|"
    r"glpat-[A-Za-z0-9_-]{20,}|xox[abprs]-[A-Za-z0-9-]{10,}|sk-[A-Za-z0-9_-]{20,})"
)
# A URL inside free text: a scheme, then anything up to whitespace or a quote/bracket.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s<>\"'`]+")
# A credential-named ``name=value`` pair anywhere in a text: catches query strings that
# the URL pattern above does not take whole (a URL cut at a quote or backtick, a query
# pasted without its URL).
_SECRET_PAIR = re.compile(
    r"([\w.-]*(?:token|key|sig|auth|pass|secret|credential)[\w.-]*=)[^&\s#\"'<>`]+",
    re.IGNORECASE,
)
# Records deeper than this are cut (audit details are a few levels at most).
_MAX_DEPTH = 8


def redact_url(url: str) -> str:
    """``url`` with credential query values and user info replaced (else unchanged)."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(_SECRET_QUERY_KEY.search(k) for k, _ in pairs):
                query = urlencode(
                    [(k, REDACTED if _SECRET_QUERY_KEY.search(k) else v) for k, v in pairs],
                    safe="/:",
                )
        if netloc == parts.netloc and query == parts.query:
            return _TOKEN_PREFIXES.sub(REDACTED, url)
        return _TOKEN_PREFIXES.sub(
            REDACTED, urlunsplit(parts._replace(netloc=netloc, query=query))
        )
    except ValueError:  # not a URL that urlsplit can take apart: keep only the scheme
        return url.split(":", 1)[0] + ":" + REDACTED if ":" in url else REDACTED


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted and every prefixed token replaced."""
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    text = _SECRET_PAIR.sub(lambda m: m.group(1) + REDACTED, text)
    return _TOKEN_PREFIXES.sub(REDACTED, text)


def redact_value(value: Any, _depth: int = 0) -> Any:
    """A JSON-like value with every string redacted and secret-named fields replaced."""
    if _depth > _MAX_DEPTH:
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {
            str(k): (
                REDACTED
                if _SECRET_FIELD.search(str(k)) and value[k] not in (None, "")
                else redact_value(value[k], _depth + 1)
            )
            for k in value
        }
    if isinstance(value, list | tuple):
        return [redact_value(v, _depth + 1) for v in value]
    return value
