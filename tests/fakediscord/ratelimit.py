"""Discord's rate limits as the fake enforces them: per-route buckets and the global limit.

Source for the mechanics (headers, 429 body, major parameters, global limit, invalid
requests): Discord's "Rate Limits" page, https://discord.com/developers/docs/topics/rate-limits
(discord-api-docs, docs/topics/rate-limits.md). Discord publishes no per-route numbers
("should not be hard coded"); the numbers below say where each comes from.

Model:

* A bucket is (route template, major parameter): channel_id, guild_id, or webhook_id +
  webhook_token ("top-level resources", same page). Routes of one template share a bucket
  per major parameter; another channel has its own.
* A bucket is a fixed window: the first request starts it with ``limit`` requests that
  reset together ``per`` seconds later. That is what Discord's headers describe
  (``X-RateLimit-Reset-After`` is when the whole bucket resets, not a refill rate), and
  what discord.py waits for when ``X-RateLimit-Remaining`` reaches 0.
* Successful (and non-429 error) answers carry X-RateLimit-Limit, -Remaining, -Reset
  (epoch seconds), -Reset-After (seconds, ms precision), -Bucket (a hash of the route,
  "non-inclusive of top-level resources"). A request over its bucket gets 429 with
  ``{"message", "retry_after", "global"}``, the same headers plus -Scope ``user`` and
  ``Retry-After``, and ``Via`` (Discord's answers pass through Google's front end; without
  ``Via`` discord.py takes a 429 for a Cloudflare ban and raises at once:
  /work/shared/reference/discord.md "Rate limits").
* Global: 50 requests per second per bot (documented), not counting interaction endpoints
  ("Interaction endpoints are not bound to the bot's Global Rate Limit", same page): the
  callback and the interaction webhook routes (followups, @original). Its shape is not
  documented; assumption: a fixed 1-s window like the route buckets, a 429 with
  ``"global": true``, ``X-RateLimit-Global`` and scope ``global``, as in the page's example.
* Invalid requests: 401, 403 and 429 answers (not 429s of scope ``shared``) count; past
  10,000 in 10 minutes Discord bans the IP at Cloudflare (documented). The fake counts them
  and, past the limit, answers every API request like Cloudflare's ban does (429, HTML, no
  ``Via``), for ``BAN_SECONDS``.
"""

from __future__ import annotations

import collections
import hashlib
import math
import re
import time
from dataclasses import dataclass, field

# What real Discord answers while an IP is banned for too many invalid requests; how long
# the ban lasts is not documented (community reports say about an hour: an assumption).
BAN_SECONDS = 3600.0
INVALID_WINDOW = 600.0  # documented: 10,000 invalid requests per 10 minutes
INVALID_LIMIT = 10_000
GLOBAL_PER_SECOND = 50  # documented: "All bots can make up to 50 requests per second"


@dataclass(frozen=True)
class RouteLimit:
    """``limit`` requests per ``per`` seconds in one bucket; ``source`` says where from."""

    limit: int
    per: float
    source: str


# Observed, not documented: X-RateLimit-Limit 5 with Reset-After 5 for creating and for
# editing messages in a channel, 5 per 1 s for deleting. Widely reported by library
# authors and bot developers (e.g. https://space-node.net/blog/discord-bot-api-rate-limits-
# handling-guide, the "Send Message" calculator at https://www.mambahost.com/embed/discord-
# bot/rate-limit-calculator/); discord.md's relay section uses the same 5 per 5 s.
CHANNEL_MESSAGES = RouteLimit(5, 5.0, "observed: 5 per 5 s per channel")
CHANNEL_EDITS = RouteLimit(5, 5.0, "observed: 5 per 5 s per channel")
CHANNEL_DELETES = RouteLimit(5, 1.0, "observed: 5 per 1 s per channel")
# Webhook routes (interaction followups and @original are webhook routes keyed by
# webhook_id + token): 5 per 2 s is what webhook executions report in their headers
# (community reports); that interaction webhooks use the same number is an assumption.
WEBHOOK = RouteLimit(5, 2.0, "observed for webhooks; assumed for interaction webhooks")
# Every other route: Discord has a bucket but no published number. Assumption: generous
# (the global limit's 50 per second), so only the documented global limit binds there.
DEFAULT = RouteLimit(50, 1.0, "assumption: no published number")

_ID = r"(\d+)"
_TOKEN = r"([^/]+)"


@dataclass(frozen=True)
class Route:
    """A route template; ``pattern`` matches the API path (without /api/v10) and its
    groups are the major parameters. ``limit`` None: no per-route bucket."""

    method: str
    template: str
    pattern: re.Pattern[str]
    limit: RouteLimit | None
    counts_global: bool = True


def _route(method: str, template: str, regex: str, limit: RouteLimit | None, *,
           counts_global: bool = True) -> Route:
    return Route(method, f"{method} {template}", re.compile(f"^{regex}$"), limit,
                 counts_global)


ROUTES: list[Route] = [
    _route("POST", "/channels/{channel_id}/messages", rf"/channels/{_ID}/messages",
           CHANNEL_MESSAGES),
    _route("PATCH", "/channels/{channel_id}/messages/{message_id}",
           rf"/channels/{_ID}/messages/\d+", CHANNEL_EDITS),
    _route("DELETE", "/channels/{channel_id}/messages/{message_id}",
           rf"/channels/{_ID}/messages/\d+", CHANNEL_DELETES),
    # The interaction callback: one per interaction (a second one is refused with 40060),
    # so a per-route bucket could never bind; not bound to the global limit (documented).
    # What headers real Discord puts on it is not documented: the fake sends none.
    _route("POST", "/interactions/{interaction_id}/{token}/callback",
           rf"/interactions/\d+/{_TOKEN}/callback", None, counts_global=False),
    # Followups and the original response: webhook routes, major parameter webhook_id +
    # token; interaction endpoints, so outside the global limit (documented).
    _route("POST", "/webhooks/{webhook_id}/{token}", rf"/webhooks/{_ID}/{_TOKEN}", WEBHOOK,
           counts_global=False),
    *[_route(m, "/webhooks/{webhook_id}/{token}/messages/{message_id}",
             rf"/webhooks/{_ID}/{_TOKEN}/messages/[^/]+", WEBHOOK, counts_global=False)
      for m in ("GET", "PATCH", "DELETE")],
]
# Any other route: its template is the path with ids replaced, major parameter the
# channel/guild/webhook id if the path starts with one.
_MAJOR = re.compile(r"^/(channels|guilds|webhooks)/(\d+)")
_IDS = re.compile(r"/\d+")


@dataclass
class _Bucket:
    remaining: int = 0
    resets_at: float = 0.0  # time.monotonic(); 0: not started


@dataclass
class Verdict:
    """What the limiter decided for one request: ``status`` 429 or None (go ahead), and the
    headers to add to the answer (and the 429's body)."""

    headers: dict[str, str] = field(default_factory=dict)
    status: int | None = None
    body: dict | None = None
    scope: str | None = None


def _hash(template: str) -> str:
    return hashlib.sha1(template.encode()).hexdigest()[:16]


def _seconds(value: float) -> str:
    # Rounded up to the millisecond: a client that waits exactly this long is not early.
    return f"{math.ceil(value * 1000) / 1000:.3f}"


class RateLimits:
    """The fake's rate limiter. Knobs for tests: ``enabled`` (all off), ``global_limit``
    (None: no global limit), ``override(template, limit, per)`` (e.g. loosen one route),
    ``factor`` (multiplies every bucket's limit), ``ban`` (model the Cloudflare ban),
    ``invalid_limit`` (invalid requests in 10 minutes before the ban).
    Counters: ``answered_429`` (every 429 the fake answered, including injected ones),
    ``invalid`` (401/403/429 answers, the ones Discord counts toward a ban),
    ``invalid_in_window()``, ``banned_until``."""

    def __init__(self, *, enabled: bool = True, clock: object = time.time) -> None:
        self.enabled = enabled
        self.global_limit: int | None = GLOBAL_PER_SECOND
        self.factor = 1.0
        self.ban = True
        self.invalid_limit = INVALID_LIMIT
        self.clock = clock  # epoch seconds for X-RateLimit-Reset
        self._overrides: dict[str, RouteLimit] = {}
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._global = _Bucket()
        self._invalid_times: collections.deque[float] = collections.deque()
        self.answered_429 = 0
        self.invalid = 0
        self.banned_until = 0.0
        self.bans = 0

    # -- knobs -------------------------------------------------------------------------
    def override(self, template: str, limit: int, per: float) -> None:
        """Set one route's bucket, by template as in ``ROUTES`` (e.g.
        ``"POST /channels/{channel_id}/messages"``)."""
        self._overrides[template] = RouteLimit(limit, per, "override")

    def reset(self) -> None:
        """Forget every bucket's state (not the counters)."""
        self._buckets.clear()
        self._global = _Bucket()

    # -- the decision --------------------------------------------------------------------
    def route_of(self, method: str, path: str) -> tuple[str, str, RouteLimit | None, bool]:
        """(template, major parameter, limit, counts toward global) of a request."""
        for route in ROUTES:
            if route.method == method:
                match = route.pattern.match(path)
                if match:
                    limit = self._overrides.get(route.template, route.limit)
                    return route.template, ":".join(match.groups()), limit, route.counts_global
        template = f"{method} {_IDS.sub('/{id}', path)}"
        major = _MAJOR.match(path)
        limit = self._overrides.get(template, DEFAULT)
        return template, major.group(2) if major else "", limit, True

    def check(self, method: str, path: str, *, authenticated: bool) -> Verdict:
        """Spend one request of the route's bucket (and of the global limit), or say 429."""
        if not self.enabled:
            return Verdict()
        now = time.monotonic()
        template, major, limit, counts_global = self.route_of(method, path)
        if counts_global and authenticated and self.global_limit is not None:
            glob = self._global
            if now >= glob.resets_at:
                glob.remaining, glob.resets_at = self.global_limit, now + 1.0
            if glob.remaining <= 0:
                wait = glob.resets_at - now
                return Verdict(
                    headers={"Via": "1.1 google", "Retry-After": str(math.ceil(wait)),
                             "X-RateLimit-Global": "true", "X-RateLimit-Scope": "global"},
                    status=429, scope="global",
                    body={"message": "You are being rate limited.",
                          "retry_after": float(_seconds(wait)), "global": True})
        if limit is None:
            if counts_global and authenticated and self.global_limit is not None:
                self._global.remaining -= 1
            return Verdict()
        size = max(1, int(limit.limit * self.factor))
        bucket = self._buckets.setdefault((template, major), _Bucket())
        if now >= bucket.resets_at:
            bucket.remaining, bucket.resets_at = size, now + limit.per
        wait = bucket.resets_at - now
        headers = {
            "X-RateLimit-Limit": str(size),
            "X-RateLimit-Reset": f"{self.clock() + wait:.3f}",  # type: ignore[operator]
            "X-RateLimit-Reset-After": _seconds(wait),
            "X-RateLimit-Bucket": _hash(template),
        }
        if bucket.remaining <= 0:
            headers.update({"X-RateLimit-Remaining": "0", "X-RateLimit-Scope": "user",
                            "Retry-After": str(math.ceil(wait)), "Via": "1.1 google"})
            return Verdict(headers=headers, status=429, scope="user", body={
                "message": "You are being rate limited.",
                "retry_after": float(_seconds(wait)), "global": False})
        bucket.remaining -= 1
        if counts_global and authenticated and self.global_limit is not None:
            self._global.remaining -= 1
        headers["X-RateLimit-Remaining"] = str(bucket.remaining)
        return Verdict(headers=headers)

    # -- invalid requests ----------------------------------------------------------------
    def answered(self, status: int, scope: str | None) -> None:
        """Count an answer: 429s, and invalid requests toward the Cloudflare ban."""
        if status == 429:
            self.answered_429 += 1
        if status not in (401, 403, 429) or scope == "shared":
            return  # documented: shared-scope 429s are not counted against the bot
        self.invalid += 1
        now = time.monotonic()
        times = self._invalid_times
        times.append(now)
        while times and times[0] <= now - INVALID_WINDOW:
            times.popleft()
        if self.ban and len(times) > self.invalid_limit and now >= self.banned_until:
            self.banned_until = now + BAN_SECONDS
            self.bans += 1

    def invalid_in_window(self) -> int:
        now = time.monotonic()
        return sum(1 for t in self._invalid_times if t > now - INVALID_WINDOW)

    def banned(self) -> bool:
        return self.enabled and time.monotonic() < self.banned_until
