"""The service layer's exception hierarchy.

Every error a user may see derives from :class:`ComfyVastError`, whose ``str()`` is one
plain sentence that is safe to show in Discord: no secrets, no tracebacks. Structured
fields carry the details for logs and tests.
"""

from __future__ import annotations

# What a member is told when something failed that is not theirs to fix; the traceback
# goes to the log.
GENERIC_FAILURE = "Something went wrong; it has been logged."


class ComfyVastError(Exception):
    """Base class: ``str(err)`` is a user-safe sentence."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(ComfyVastError):
    """The configuration is missing or invalid."""


class NotFound(ComfyVastError):
    """A named resource (server, generation, workflow, ...) does not exist."""


class ValidationFailed(ComfyVastError):
    """User input was rejected before anything changed."""


class ResourceBusy(ComfyVastError):
    """Another operation holds the lock on this resource."""


class PermissionDenied(ComfyVastError):
    """The caller may not do this."""


class BudgetExceeded(ComfyVastError):
    """An action would spend more than the configured budget allows."""


class RateLimited(ComfyVastError):
    """The caller (or we, towards an external API) must slow down."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ExternalServiceError(ComfyVastError):
    """An external system (Vast.ai, ComfyUI, an SSH host) failed or is unreachable."""
