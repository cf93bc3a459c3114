"""SSHOptions.backoff: the delays of connect retries and tunnel reconnects."""

from __future__ import annotations

from core.ssh import SSHOptions


def test_backoff_is_capped_exponential_with_equal_jitter():
    options = SSHOptions(backoff_base=0.5, backoff_max=10.0)
    backoff = options.backoff()
    for attempt in range(1, 9):
        ceiling = min(10.0, 0.5 * 2 ** (attempt - 1))
        for _ in range(50):
            # Half of each step is always waited, the rest is random, never past the cap.
            assert ceiling / 2 <= backoff.delay(attempt) <= ceiling
