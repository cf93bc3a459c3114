"""Logging for the entry point: one handler, and a filter that blanks out secrets."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from core.config import Settings
from core.redact import redact_text

REDACTED = "[redacted]"


class RedactSecrets(logging.Filter):
    """Replaces any known secret value in a record's final message with a marker.

    A second line of defence: code should never log a secret in the first place.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self._redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._redact(record.exc_text)
        return True

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        # Secrets the config does not know: a member's URL with ?token=, a pasted hf_ key.
        return redact_text(text)


def secret_values(settings: Settings) -> list[str]:
    candidates = [
        settings.discord.token,
        settings.vast.api_key,
        settings.comfy.hf_token,
        settings.comfy.civitai_token,
    ]
    return [c.get_secret_value() for c in candidates if c is not None]


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    handler.addFilter(RedactSecrets(secret_values(settings)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # discord.http at DEBUG would print request bodies; keep library noise down.
    logging.getLogger("discord").setLevel(max(logging.INFO, root.level))
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
