"""The one retry policy: capped exponential backoff with jitter, from tenacity.

Every retry loop in the product (Vast.ai requests, SSH connects and tunnels, ComfyUI's
WebSocket reconnects, waiting for an instance to boot) takes its delays from a
:class:`Backoff`. The delays come from tenacity's wait strategies; the loops around them
stay hand-written where they must decide per failure (honour ``Retry-After``, never repeat
a create that spends money, tell an auth failure from a transient one), which tenacity's
``retry=`` predicates would spread over several callbacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tenacity import wait_exponential, wait_random_exponential
from tenacity.wait import wait_base

Jitter = Literal["full", "equal"]


@dataclass(frozen=True, slots=True)
class _Attempt:
    # The only field tenacity's wait strategies read from a RetryCallState.
    attempt_number: int


@dataclass(frozen=True)
class Backoff:
    """Delay before retry ``n`` (1-based): ``min(cap, base * 2**(n-1))``, jittered.

    ``full`` jitter draws from ``[0, ceiling]`` (clients that failed together spread out
    the most); ``equal`` jitter draws from ``[ceiling/2, ceiling]`` (never hammers a server
    that is down, still spreads).
    """

    base: float = 0.5
    cap: float = 10.0
    jitter: Jitter = "equal"

    def wait(self) -> wait_base:
        """The tenacity wait strategy, for ``AsyncRetrying(wait=...)``."""
        if self.jitter == "full":
            return wait_random_exponential(multiplier=self.base, max=self.cap)
        half = wait_exponential(multiplier=self.base / 2, max=self.cap / 2)
        return half + wait_random_exponential(multiplier=self.base / 2, max=self.cap / 2)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        return float(self.wait()(_Attempt(max(1, attempt))))  # type: ignore[arg-type]
