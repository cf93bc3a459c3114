"""The server service's retry delays: the exponential ceiling ±50%, as they always were."""

from __future__ import annotations

from core.servers.context import CREATE_BACKOFF, IDEMPOTENT_BACKOFF, spread


def test_idempotent_calls_wait_the_ceiling_plus_or_minus_half() -> None:
    for attempt in range(1, 8):
        ceiling = min(2.0 ** (attempt - 1), 20.0)
        delays = [spread(IDEMPOTENT_BACKOFF, attempt) for _ in range(200)]
        assert all(0.5 * ceiling <= d <= 1.5 * ceiling for d in delays)
        assert max(delays) - min(delays) > 0.5 * ceiling  # spread out, not fixed


def test_create_retries_cap_at_ten_seconds() -> None:
    for attempt in range(1, 8):
        ceiling = min(2.0 ** (attempt - 1), 10.0)
        delays = [spread(CREATE_BACKOFF, attempt) for _ in range(200)]
        assert all(0.5 * ceiling <= d <= 1.5 * ceiling for d in delays)
