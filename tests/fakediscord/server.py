"""A protocol-faithful fake Discord (REST API v10 + Gateway) on 127.0.0.1, for tests only.

See /work/shared/reference/discord.md for what discord.py 2.7 sends and expects.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import mimetypes
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from .models import (
    ADMINISTRATOR,
    ALL_PERMISSIONS,
    BOT_PERMISSIONS,
    DEFAULT_MEMBER_PERMISSIONS,
    FLAG_EPHEMERAL,
    FLAG_IS_COMPONENTS_V2,
    FLAG_LOADING,
    FLAG_SUPPRESS_EMBEDS,
    FLAG_SUPPRESS_NOTIFICATIONS,
    TIER_FILESIZE,
    VIEW_CHANNEL,
    Attachment,
    Channel,
    Guild,
    Interaction,
    Message,
    Recorded,
    Role,
    SnowflakeGenerator,
    User,
    iso_now,
    iter_components,
)
from .ratelimit import RateLimits

API_PREFIX = "/api/v10"
ACK_DEADLINE = 3.0
TOKEN_LIFETIME = 15 * 60.0
HEARTBEAT_INTERVAL_MS = 41250

INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12

_NAME_RE = re.compile(r"^[-_\w]{1,32}$")
_REC_KEY = web.RequestKey("rec", Recorded)
_UNAUTHENTICATED = re.compile(r"^(/interactions/\d+/[^/]+/callback|/webhooks/\d+/[^/]+(/.*)?)$")


class ApiError(Exception):
    """Raised inside handlers; turned into a Discord-style JSON error response."""

    def __init__(self, status: int, code: int, message: str, errors: dict | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status = status
        self.body: dict[str, Any] = {"message": message, "code": code}
        if errors:
            self.body["errors"] = errors
        self.headers = headers or {}


def _form_error(path: str, code: str, message: str) -> ApiError:
    errors: dict[str, Any] = {"_errors": [{"code": code, "message": message}]}
    for part in reversed(path.split(".")):
        errors = {part: errors}
    return ApiError(400, 50035, "Invalid Form Body", errors)


def json_response(data: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    # Content-Type must be exactly "application/json" (discord.py compares the string).
    return web.Response(body=json.dumps(data).encode(), status=status,
                        content_type="application/json", headers=headers)


class _Cut(Exception):
    """A rule's verdict: drop the connection instead of answering."""


@dataclass
class _Rule:
    method: str
    fragment: str
    skip: int
    times: int
    respond: Callable[[], Exception]


@dataclass(eq=False)
class _Session:
    id: str
    intents: int
    identify: dict
    shard: list | None = None
    seq: int = 0
    log: list[dict] = field(default_factory=list)
    conn: web.WebSocketResponse | None = None
    dead: bool = False


class FakeDiscord:
    """Fake Discord REST API + Gateway. Use ``await start()`` / ``await stop()``."""

    # set by the ``fake_discord`` pytest fixture
    guild: Guild
    admin: User
    member: User

    def __init__(self, *, token: str = "fake-token", clock: Callable[[], float] = time.time,
                 attachment_size_limit: int = 10 * 1024 * 1024,
                 rate_limits: bool = True) -> None:
        self.token = token
        self.clock = clock
        # Discord's per-route buckets and global limit (see .ratelimit); tests loosen them
        # with ``fake.ratelimits.override(...)``/``.factor`` or turn them off (``enabled``).
        self.ratelimits = RateLimits(enabled=rate_limits, clock=clock)
        self.attachment_size_limit = attachment_size_limit
        self.snowflake = SnowflakeGenerator()
        self.application_id = self.snowflake()
        self.bot_user_id = self.application_id  # modern apps: bot user id == application id
        self.owner_id = self.snowflake()
        self.bot_username = "comfyvast"

        self.guilds: dict[int, Guild] = {}
        self.channels: dict[int, Channel] = {}
        self.users: dict[int, User] = {}
        self.messages: dict[int, Message] = {}
        self.attachments: dict[int, Attachment] = {}
        self.interactions: dict[int, Interaction] = {}
        self._by_token: dict[str, Interaction] = {}  # the webhook routes find them by token
        self.requests: list[Recorded] = []
        self.unknown_routes: list[str] = []
        self.commands: dict[int | None, dict[str, dict]] = {}
        self.sync_count = 0
        self._command_ids: dict[tuple, int] = {}
        self._rules: list[_Rule] = []

        # gateway observation
        self.gateway_connects: list[dict[str, str]] = []
        self.identifies: list[dict] = []
        self.resumes: list[dict] = []
        self.heartbeats = 0
        self.presence_updates: list[dict] = []
        self._sessions: dict[str, _Session] = {}
        self._sockets: set[web.WebSocketResponse] = set()
        self._server_closed: set[web.WebSocketResponse] = set()

        self._watched: list[tuple[str, asyncio.Task]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.base_url}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=1024 * 1024 * 1024)
        self._add_routes(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        for ws in list(self._sockets):
            self._server_closed.add(ws)
            await ws.close(code=1001, message=b"fake discord stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ world building
    def add_guild(self, name: str = "Test Guild", *, filesize_limit_tier: int = 0) -> Guild:
        gid = self.snowflake()
        channel_id = self.snowflake()
        guild = Guild(id=gid, name=name, channel_id=channel_id, owner_id=self.owner_id,
                      premium_tier=filesize_limit_tier)
        guild.roles[gid] = Role(gid, "@everyone", DEFAULT_MEMBER_PERMISSIONS, 0)
        bot_role = Role(self.snowflake(), self.bot_username, BOT_PERMISSIONS, 1, managed=True)
        guild.roles[bot_role.id] = bot_role
        guild.bot_role_id = bot_role.id
        self.guilds[gid] = guild
        self.channels[channel_id] = Channel(channel_id, gid, "general", 0, 0)
        guild.channel_ids.append(channel_id)
        return guild

    def add_channel(self, guild_id: int, name: str, *,
                    overwrites: list[dict[str, Any]] | None = None) -> int:
        """A text channel; ``overwrites`` as Discord's overwrite objects (ids as ints or
        strings, allow/deny as ints), e.g. deny VIEW_CHANNEL to @everyone (id = guild id)."""
        guild = self.guilds[guild_id]
        cid = self.snowflake()
        normal = [{"id": str(o["id"]), "type": int(o.get("type", 0)),
                   "allow": str(o.get("allow", 0)), "deny": str(o.get("deny", 0))}
                  for o in overwrites or []]
        self.channels[cid] = Channel(cid, guild_id, name, 0, len(guild.channel_ids),
                                     overwrites=normal)
        guild.channel_ids.append(cid)
        return cid

    def add_role(self, guild_id: int, name: str, permissions: int = 0) -> int:
        guild = self.guilds[guild_id]
        rid = self.snowflake()
        guild.roles[rid] = Role(rid, name, permissions, len(guild.roles))
        return rid

    def add_user(self, username: str, *, guild_id: int, roles: tuple | list = (),
                 permissions: int = DEFAULT_MEMBER_PERMISSIONS) -> User:
        """A guild member. ``permissions`` is the base (what @everyone grants this user); the
        member's effective permissions add those of ``roles`` (ADMINISTRATOR implies all)."""
        guild = self.guilds[guild_id]
        for rid in roles:
            assert rid in guild.roles, f"role {rid} is not a role of guild {guild_id}"
        user = User(self.snowflake(), username, guild_id, tuple(roles), permissions)
        self.users[user.id] = user
        return user

    def member_permissions(self, user: User, guild_id: int | None = None) -> int:
        gid = guild_id or user.guild_id
        guild = self.guilds.get(gid) if gid else None
        if guild is None:
            return 0
        if user.id == guild.owner_id:
            return ALL_PERMISSIONS
        perms = user.permissions
        for rid in user.roles:
            role = guild.roles.get(rid)
            if role is not None:
                perms |= role.permissions
        if perms & ADMINISTRATOR:
            return ALL_PERMISSIONS
        return perms

    def channel_permissions(self, user: User, channel_id: int) -> int:
        """The member's permissions in a channel: base, then the @everyone overwrite, the
        role overwrites together, the member's own overwrite; ADMINISTRATOR and the owner
        bypass them (Discord's "Permission Overwrites" algorithm,
        https://discord.com/developers/docs/topics/permissions#permission-overwrites)."""
        channel = self.channels.get(channel_id)
        if channel is None or channel.guild_id is None:
            return self.member_permissions(user)
        perms = self.member_permissions(user, channel.guild_id)
        if perms == ALL_PERMISSIONS:
            return perms
        by_id = {(int(o["id"]), int(o["type"])): o for o in channel.overwrites}
        everyone = by_id.get((channel.guild_id, 0))
        if everyone is not None:
            perms = (perms & ~int(everyone["deny"])) | int(everyone["allow"])
        allow = deny = 0
        for rid in user.roles:
            role = by_id.get((rid, 0))
            if role is not None:
                allow |= int(role["allow"])
                deny |= int(role["deny"])
        perms = (perms & ~deny) | allow
        own = by_id.get((user.id, 1))
        if own is not None:
            perms = (perms & ~int(own["deny"])) | int(own["allow"])
        return perms

    def filesize_limit(self, guild_id: int | None) -> int:
        guild = self.guilds.get(guild_id) if guild_id else None
        tier = guild.premium_tier if guild else 0
        return max(self.attachment_size_limit, TIER_FILESIZE[tier]) if tier >= 2 else (
            self.attachment_size_limit)

    # ------------------------------------------------------------------ payload builders
    def bot_user_payload(self) -> dict:
        return {"id": str(self.bot_user_id), "username": self.bot_username,
                "discriminator": "0", "global_name": None, "avatar": None, "bot": True,
                "public_flags": 0, "avatar_decoration_data": None, "primary_guild": None,
                "collectibles": None}

    def _me_payload(self) -> dict:
        return {**self.bot_user_payload(), "flags": 0, "verified": True, "mfa_enabled": False,
                "email": None, "locale": "en-US", "premium_type": 0, "banner": None,
                "accent_color": None, "bio": ""}

    def _owner_payload(self) -> dict:
        return {"id": str(self.owner_id), "username": "owner", "discriminator": "0",
                "global_name": "Owner", "avatar": None, "public_flags": 0}

    def member_payload(self, user: User, guild_id: int | None = None, *,
                       with_permissions: bool = True) -> dict:
        data = {
            "user": user.payload(), "roles": [str(r) for r in user.roles], "nick": None,
            "avatar": None, "banner": None, "joined_at": user.joined_at, "premium_since": None,
            "deaf": False, "mute": False, "pending": False, "flags": 0,
            "communication_disabled_until": None, "unusual_dm_activity_until": None,
        }
        if with_permissions:
            data["permissions"] = str(self.member_permissions(user, guild_id))
        return data

    def _bot_member_payload(self, guild: Guild) -> dict:
        return {"user": self.bot_user_payload(), "roles": [str(guild.bot_role_id)], "nick": None,
                "avatar": None, "joined_at": guild.joined_at, "premium_since": None,
                "deaf": False, "mute": False, "pending": False, "flags": 0,
                "communication_disabled_until": None}

    def guild_payload(self, guild: Guild, *, gateway: bool = False, intents: int = 0) -> dict:
        data: dict[str, Any] = {
            "id": str(guild.id), "name": guild.name, "icon": None, "splash": None,
            "discovery_splash": None, "banner": None, "description": None,
            "owner_id": str(guild.owner_id), "region": None, "afk_channel_id": None,
            "afk_timeout": 300, "verification_level": 0, "default_message_notifications": 0,
            "explicit_content_filter": 0, "mfa_level": 0, "nsfw_level": 0, "nsfw": False,
            "roles": [r.payload() for r in guild.roles.values()], "emojis": [], "stickers": [],
            "features": [], "application_id": None, "system_channel_id": str(guild.channel_id),
            "system_channel_flags": 0, "rules_channel_id": None,
            "public_updates_channel_id": None, "safety_alerts_channel_id": None,
            "vanity_url_code": None, "premium_tier": guild.premium_tier,
            "premium_subscription_count": 0, "preferred_locale": "en-US",
            "max_members": 500000, "max_video_channel_users": 25,
            "max_stage_video_channel_users": 50, "premium_progress_bar_enabled": False,
            "incidents_data": None,
        }
        if gateway:
            members = [self._bot_member_payload(guild)]
            if intents & INTENT_GUILD_MEMBERS:
                members += [self.member_payload(u, guild.id, with_permissions=False)
                            for u in self.users.values() if u.guild_id == guild.id]
            data.update({
                "unavailable": False, "large": False, "lazy": True, "joined_at": guild.joined_at,
                "member_count": 1 + sum(1 for u in self.users.values()
                                        if u.guild_id == guild.id),
                "members": members,
                "channels": [self.channels[c].payload() for c in guild.channel_ids],
                "threads": [], "presences": [], "voice_states": [], "stage_instances": [],
                "guild_scheduled_events": [], "soundboard_sounds": [], "embedded_activities": [],
            })
        return data

    def message_payload(self, msg: Message, *, gateway: bool = False) -> dict:
        data = msg.payload(self)
        if gateway and msg.guild_id is not None:
            guild = self.guilds[msg.guild_id]
            data["guild_id"] = str(msg.guild_id)
            member = self._bot_member_payload(guild)
            del member["user"]
            data["member"] = member
        return data

    # ------------------------------------------------------------------ observation helpers
    @property
    def answered_429(self) -> int:
        """How many 429s the fake answered (bucket, global, injected, Cloudflare ban)."""
        return self.ratelimits.answered_429

    def calls(self, method: str, fragment: str) -> list[Recorded]:
        method = method.upper()
        return [r for r in self.requests if r.method == method and fragment in r.path]

    def message_calls(self, method: str, message_id: int) -> list[Recorded]:
        """Requests that created or edited (per ``method``) one message, by any route."""
        method = method.upper()
        return [r for r in self.requests if r.method == method and r.message_id == message_id]

    def channel_messages(self, channel_id: int, *, include_ephemeral: bool = True) -> list[Message]:
        return sorted(
            (m for m in self.messages.values()
             if m.channel_id == channel_id and not m.deleted
             and (include_ephemeral or not m.ephemeral)),
            key=lambda m: m.id,
        )

    def command(self, name: str, guild_id: int | None = None) -> dict:
        """The synced schema of a chat-input command (guild-scoped if ``guild_id``)."""
        try:
            return self.commands[guild_id][name]
        except KeyError:
            raise AssertionError(
                f"command {name!r} not synced (scope {guild_id}); synced: "
                f"{ {k: sorted(v) for k, v in self.commands.items()} }") from None

    def watch_task(self, task: asyncio.Task, name: str = "bot") -> None:
        """``wait_for``/``wait_response`` fail at once if ``task`` dies (e.g. the bot's
        connect task)."""
        self._watched.append((name, task))

    def unwatch_task(self, task: asyncio.Task) -> None:
        self._watched = [(n, t) for n, t in self._watched if t is not task]

    def _check_watched(self) -> None:
        for name, task in self._watched:
            if task.done():
                exc = None if task.cancelled() else task.exception()
                raise AssertionError(f"{name} task died: {exc!r}") from exc

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            self._check_watched()
            result = predicate()
            if isinstance(result, Awaitable):
                result = await result
            if result:
                return result
            if time.monotonic() >= deadline:
                recent = "\n  ".join(repr(r) for r in self.requests[-15:])
                desc = getattr(predicate, "__qualname__", repr(predicate))
                raise AssertionError(
                    f"wait_for({desc}) timed out after {timeout}s.\n"
                    f"Last requests:\n  {recent or '(none)'}\n"
                    f"Unknown routes: {self.unknown_routes}")
            await asyncio.sleep(0.005)

    # ------------------------------------------------------------------ fault injection
    def rate_limit_once(self, method: str, path_fragment: str, retry_after: float = 0.2, *,
                        skip: int = 0, global_: bool = False) -> None:
        """Answer the next matching request (after ``skip`` matches) with a 429."""

        def make() -> ApiError:
            err = ApiError(429, 0, "You are being rate limited.")
            err.body = {"message": "You are being rate limited.", "retry_after": retry_after,
                        "global": global_}
            if global_:
                err.body["code"] = 0
            err.headers = {
                "Via": "1.1 google", "Retry-After": str(math.ceil(retry_after)),
                "X-RateLimit-Scope": "global" if global_ else "user",
            }
            if global_:
                err.headers["X-RateLimit-Global"] = "true"
            else:
                err.headers.update({"X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0",
                                    "X-RateLimit-Reset-After": str(retry_after),
                                    "X-RateLimit-Bucket": "fakebucket"})
            return err

        self._rules.append(_Rule(method.upper(), path_fragment, skip, 1, make))

    def fail_once(self, method: str, path_fragment: str, status: int, code: int,
                  message: str, *, skip: int = 0, times: int = 1) -> None:
        """Answer matching requests with a JSON error (e.g. 403 / 50013 Missing Permissions)."""
        self._rules.append(_Rule(method.upper(), path_fragment, skip, times,
                                 lambda: ApiError(status, code, message)))

    def cut_once(self, method: str, path_fragment: str) -> None:
        """Close the connection under the next matching request, without an answer (a
        connection lost on the way, as a proxy or a network drop does)."""
        self._rules.append(_Rule(method.upper(), path_fragment, 0, 1, _Cut))

    def _apply_rules(self, method: str, path: str) -> None:
        for rule in self._rules:
            if rule.times <= 0 or rule.method != method or rule.fragment not in path:
                continue
            if rule.skip > 0:
                rule.skip -= 1
                continue
            rule.times -= 1
            raise rule.respond()

    # ------------------------------------------------------------------ HTTP plumbing
    def _add_routes(self, app: web.Application) -> None:
        a = API_PREFIX
        r = app.router
        r.add_get(f"{a}/users/@me", self._h_me)
        r.add_get(f"{a}/users/{{uid:\\d+}}", self._h_user)
        r.add_post(f"{a}/users/@me/channels", self._h_create_dm)
        r.add_get(f"{a}/oauth2/applications/@me", self._h_appinfo)
        r.add_get(f"{a}/applications/@me", self._h_appinfo)
        r.add_get(f"{a}/gateway", self._h_gateway_url)
        r.add_get(f"{a}/gateway/bot", self._h_gateway_bot)
        r.add_put(f"{a}/applications/{{app}}/commands", self._h_sync)
        r.add_get(f"{a}/applications/{{app}}/commands", self._h_get_commands)
        r.add_put(f"{a}/applications/{{app}}/guilds/{{gid}}/commands", self._h_sync)
        r.add_get(f"{a}/applications/{{app}}/guilds/{{gid}}/commands", self._h_get_commands)
        r.add_post(f"{a}/interactions/{{iid}}/{{token}}/callback", self._h_callback)
        r.add_post(f"{a}/webhooks/{{app}}/{{token}}", self._h_followup)
        wh_msg = f"{a}/webhooks/{{app}}/{{token}}/messages/{{mid}}"
        r.add_get(wh_msg, self._h_webhook_message)
        r.add_patch(wh_msg, self._h_webhook_message)
        r.add_delete(wh_msg, self._h_webhook_message)
        r.add_get(f"{a}/channels/{{cid}}", self._h_channel)
        r.add_get(f"{a}/channels/{{cid}}/messages", self._h_history)
        r.add_post(f"{a}/channels/{{cid}}/messages", self._h_channel_send)
        ch_msg = f"{a}/channels/{{cid}}/messages/{{mid:\\d+}}"
        r.add_get(ch_msg, self._h_channel_message)
        r.add_patch(ch_msg, self._h_channel_message)
        r.add_delete(ch_msg, self._h_channel_message)
        r.add_post(f"{a}/channels/{{cid}}/typing", self._h_typing)
        r.add_get(f"{a}/guilds/{{gid}}", self._h_guild)
        r.add_get(f"{a}/guilds/{{gid}}/channels", self._h_guild_channels)
        r.add_get(f"{a}/guilds/{{gid}}/roles", self._h_guild_roles)
        r.add_get(f"{a}/guilds/{{gid}}/members/{{uid}}", self._h_guild_member)
        r.add_get("/cdn/attachments/{cid}/{aid}/{filename}", self._h_cdn)
        r.add_get("/gateway", self._h_gateway)
        r.add_route("*", "/{tail:.*}", self._h_unknown)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/gateway":
            return await handler(request)
        rec = await self._record(request)
        request[_REC_KEY] = rec
        limited: dict[str, str] = {}
        try:
            path = rec.path
            if request.path.startswith(API_PREFIX) and not self._is_unknown(request):
                if self.ratelimits.banned():
                    # Past 10,000 invalid requests in 10 minutes Discord's Cloudflare bans
                    # the IP: a 429 in HTML, without Via (discord.py raises at once).
                    rec.status = 429
                    self.ratelimits.answered(429, "cloudflare")
                    return web.Response(status=429, text="error code: 1015",
                                        content_type="text/html")
                authenticated = request.headers.get("Authorization") == f"Bot {self.token}"
                if not _UNAUTHENTICATED.match(path) and not authenticated:
                    raise ApiError(401, 0, "401: Unauthorized")
                self._apply_rules(rec.method, path)
                verdict = self.ratelimits.check(rec.method, path, authenticated=authenticated)
                if verdict.status is not None:
                    err = ApiError(verdict.status, 0, "You are being rate limited.",
                                   headers=verdict.headers)
                    err.body = dict(verdict.body or {})
                    raise err
                limited = verdict.headers
            resp = await handler(request)
        except ApiError as err:
            resp = json_response(err.body, err.status, err.headers)
        except _Cut:
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=499)  # never reaches the client
        if limited and isinstance(resp, web.Response):
            resp.headers.update(limited)
        rec.status = resp.status
        self.ratelimits.answered(resp.status, resp.headers.get("X-RateLimit-Scope"))
        # Only API answers are recorded as JSON: the CDN serves uploads with whatever
        # content type the uploader gave (a "JSON" attachment may hold any bytes).
        if (isinstance(resp, web.Response) and resp.content_type == "application/json"
                and request.path.startswith(API_PREFIX)):
            rec.response = json.loads(resp.body)  # type: ignore[arg-type]
        return resp

    @staticmethod
    def _is_unknown(request: web.Request) -> bool:
        info = request.match_info
        return info.route.resource is not None and "tail" in info

    async def _record(self, request: web.Request) -> Recorded:
        path = request.path
        if path.startswith(API_PREFIX):
            path = path[len(API_PREFIX):]
        payload: Any = None
        files: dict[str, tuple[str, str, bytes]] = {}
        ctype = request.content_type
        if ctype.startswith("multipart/"):
            form = await request.post()
            for key, value in form.items():
                if isinstance(value, web.FileField):
                    files[key] = (value.filename, value.content_type, value.file.read())
                elif key == "payload_json":
                    payload = json.loads(value)
        else:
            body = await request.read()
            if body:
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = body.decode(errors="replace")
        rec = Recorded(request.method, path, dict(request.query), payload, files,
                       time=time.monotonic(), clock_time=self.clock(),
                       headers=dict(request.headers))
        self.requests.append(rec)
        return rec

    async def _h_unknown(self, request: web.Request) -> web.Response:
        rec: Recorded = request[_REC_KEY]
        self.unknown_routes.append(f"{request.method} {rec.path}")
        return json_response({"message": "404: Not Found (route not implemented by FakeDiscord)",
                              "code": 0}, 404)

    # ------------------------------------------------------------------ simple REST routes
    async def _h_me(self, request: web.Request) -> web.Response:
        return json_response(self._me_payload())

    async def _h_user(self, request: web.Request) -> web.Response:
        uid = int(request.match_info["uid"])
        if uid == self.bot_user_id:
            return json_response(self.bot_user_payload())
        user = self.users.get(uid)
        if user is None:
            raise ApiError(404, 10013, "Unknown User")
        return json_response(user.payload())

    async def _h_appinfo(self, request: web.Request) -> web.Response:
        return json_response({
            "id": str(self.application_id), "name": self.bot_username, "icon": None,
            "description": "", "summary": "", "type": None, "bot_public": True,
            "bot_require_code_grant": False, "verify_key": "0" * 64, "flags": 0,
            "owner": self._owner_payload(), "team": None, "rpc_origins": [],
            "bot": self.bot_user_payload(), "interactions_endpoint_url": None,
            "approximate_guild_count": len(self.guilds), "redirect_uris": [],
            "tags": [], "hook": True, "is_monetized": False,
        })

    async def _h_gateway_url(self, request: web.Request) -> web.Response:
        return json_response({"url": self.gateway_url})

    async def _h_gateway_bot(self, request: web.Request) -> web.Response:
        return json_response({"url": self.gateway_url, "shards": 1, "session_start_limit": {
            "total": 1000, "remaining": 999, "reset_after": 14400000, "max_concurrency": 1}})

    def _channel_or_404(self, cid: str) -> Channel:
        try:
            channel = self.channels[int(cid)]
        except (KeyError, ValueError):
            raise ApiError(404, 10003, "Unknown Channel") from None
        return channel

    def _guild_or_404(self, gid: str) -> Guild:
        try:
            return self.guilds[int(gid)]
        except (KeyError, ValueError):
            raise ApiError(404, 10004, "Unknown Guild") from None

    async def _h_channel(self, request: web.Request) -> web.Response:
        return json_response(self._channel_or_404(request.match_info["cid"]).payload(self))

    async def _h_guild(self, request: web.Request) -> web.Response:
        guild = self._guild_or_404(request.match_info["gid"])
        data = self.guild_payload(guild)
        if request.query.get("with_counts") in ("1", "true", "True"):
            count = 1 + sum(1 for u in self.users.values() if u.guild_id == guild.id)
            data["approximate_member_count"] = count
            data["approximate_presence_count"] = count
        return json_response(data)

    async def _h_guild_channels(self, request: web.Request) -> web.Response:
        guild = self._guild_or_404(request.match_info["gid"])
        return json_response([self.channels[c].payload() for c in guild.channel_ids])

    async def _h_guild_roles(self, request: web.Request) -> web.Response:
        guild = self._guild_or_404(request.match_info["gid"])
        return json_response([r.payload() for r in guild.roles.values()])

    async def _h_guild_member(self, request: web.Request) -> web.Response:
        guild = self._guild_or_404(request.match_info["gid"])
        uid = int(request.match_info["uid"])
        if uid == self.bot_user_id:
            return json_response(self._bot_member_payload(guild))
        user = self.users.get(uid)
        if user is None or user.guild_id != guild.id:
            raise ApiError(404, 10007, "Unknown Member")
        return json_response(self.member_payload(user, guild.id, with_permissions=False))

    async def _h_create_dm(self, request: web.Request) -> web.Response:
        rec: Recorded = request[_REC_KEY]
        uid = int((rec.json or {}).get("recipient_id", 0))
        if uid not in self.users:
            raise _form_error("recipient_id", "NUMBER_TYPE_COERCE", "Value is not snowflake.")
        for channel in self.channels.values():
            if channel.type == 1 and channel.recipient_id == uid:
                return json_response(channel.payload(self))
        cid = self.snowflake()
        self.channels[cid] = Channel(cid, None, None, 1, recipient_id=uid)
        return json_response(self.channels[cid].payload(self))

    async def _h_typing(self, request: web.Request) -> web.Response:
        self._channel_or_404(request.match_info["cid"])
        return web.Response(status=204)

    async def _h_cdn(self, request: web.Request) -> web.Response:
        att = self.attachments.get(int(request.match_info["aid"]))
        if att is None or att.filename != request.match_info["filename"]:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=att.data,
                            content_type=att.content_type or "application/octet-stream")

    # ------------------------------------------------------------------ commands
    def _validate_commands(self, body: Any) -> None:
        if not isinstance(body, list):
            raise _form_error("_", "LIST_TYPE_CONVERT", "Only iterables may be used in a ListType")
        if len(body) > 100:
            raise _form_error("_", "BASE_TYPE_MAX_LENGTH", "Must be 100 or fewer in length.")
        seen: set[tuple[int, str]] = set()
        for i, cmd in enumerate(body):
            ctype = cmd.get("type", 1)
            name = cmd.get("name", "")
            if (ctype, name) in seen:
                raise _form_error(f"{i}.name", "APPLICATION_COMMANDS_DUPLICATE_NAME",
                                  f"Application command names must be unique: {name}")
            seen.add((ctype, name))
            if ctype == 1:
                if not _NAME_RE.match(name) or name != name.lower():
                    raise _form_error(f"{i}.name", "APPLICATION_COMMAND_INVALID_NAME",
                                      f"Command name is invalid: {name!r}")
                desc = cmd.get("description", "")
                if not 1 <= len(desc) <= 100:
                    raise _form_error(f"{i}.description", "BASE_TYPE_BAD_LENGTH",
                                      "Must be between 1 and 100 in length.")
                self._validate_options(cmd.get("options") or [], f"{i}.options")
            elif not 1 <= len(name) <= 32:
                raise _form_error(f"{i}.name", "BASE_TYPE_BAD_LENGTH",
                                  "Must be between 1 and 32 in length.")

    def _validate_options(self, options: list[dict], path: str) -> None:
        if len(options) > 25:
            raise _form_error(path, "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
        optional_seen = False
        for j, opt in enumerate(options):
            name = opt.get("name", "")
            if not _NAME_RE.match(name) or name != name.lower():
                raise _form_error(f"{path}.{j}.name", "APPLICATION_COMMAND_INVALID_NAME",
                                  f"Option name is invalid: {name!r}")
            if not 1 <= len(opt.get("description", "")) <= 100:
                raise _form_error(f"{path}.{j}.description", "BASE_TYPE_BAD_LENGTH",
                                  "Must be between 1 and 100 in length.")
            if opt.get("type") in (1, 2):
                self._validate_options(opt.get("options") or [], f"{path}.{j}.options")
                continue
            if opt.get("required"):
                if optional_seen:
                    raise _form_error(f"{path}.{j}.required",
                                      "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                                      "Required options must be placed before non-required "
                                      "options")
            else:
                optional_seen = True
            if len(opt.get("choices") or []) > 25:
                raise _form_error(f"{path}.{j}.choices", "BASE_TYPE_MAX_LENGTH",
                                  "Must be 25 or fewer in length.")

    async def _h_sync(self, request: web.Request) -> web.Response:
        rec: Recorded = request[_REC_KEY]
        if int(request.match_info["app"]) != self.application_id:
            raise ApiError(403, 50001, "Missing Access")
        gid: int | None = None
        if "gid" in request.match_info:
            gid = self._guild_or_404(request.match_info["gid"]).id
        body = rec.json
        self._validate_commands(body)
        self.sync_count += 1
        version = str(self.snowflake())
        out: list[dict] = []
        by_name: dict[str, dict] = {}
        for cmd in body:
            cmd = copy.deepcopy(cmd)
            ctype = cmd.get("type", 1)
            key = (gid, ctype, cmd["name"])
            if key not in self._command_ids:
                self._command_ids[key] = self.snowflake()
            full = {
                "id": str(self._command_ids[key]), "application_id": str(self.application_id),
                "version": version, "type": ctype, "description": "",
                "default_member_permissions": None, "dm_permission": True, "nsfw": False,
                "integration_types": [0], "contexts": None, "name_localizations": None,
                "description_localizations": None, **cmd,
            }
            if full["default_member_permissions"] is not None:  # Discord answers a string
                full["default_member_permissions"] = str(int(full["default_member_permissions"]))
            if gid is not None:
                full["guild_id"] = str(gid)
            out.append(full)
            if ctype == 1:
                by_name[cmd["name"]] = full
            else:
                by_name[f"{cmd['name']}#type{ctype}"] = full
        self.commands[gid] = by_name
        return json_response(out)

    async def _h_get_commands(self, request: web.Request) -> web.Response:
        gid = int(request.match_info["gid"]) if "gid" in request.match_info else None
        return json_response(list(self.commands.get(gid, {}).values()))

    # ------------------------------------------------------------------ message lifecycle
    def _check_files(self, rec: Recorded, limit: int) -> None:
        for _, (_fn, _ct, data) in rec.files.items():
            if len(data) > limit:
                raise ApiError(413, 40005, "Request entity too large")

    def _validate_message(self, payload: dict, *, creating: bool, has_files: bool,
                          components_v2: bool = False) -> None:
        content = payload.get("content")
        if content is not None:
            if not isinstance(content, str):
                raise _form_error("content", "STRING_TYPE_CONVERT", "Must be a string.")
            if len(content) > 2000:
                raise _form_error("content", "BASE_TYPE_MAX_LENGTH",
                                  "Must be 2000 or fewer in length.")
        embeds = payload.get("embeds") or []
        if len(embeds) > 10:
            raise _form_error("embeds", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
        self._validate_embeds(embeds)
        components = payload.get("components") or []
        if components_v2:
            if content or embeds:
                raise _form_error("content", "MESSAGE_CANNOT_USE_LEGACY_FIELDS_WITH_COMPONENTS_V2",
                                  "The 'content' and 'embeds' fields cannot be used when using "
                                  "MessageFlags.IS_COMPONENTS_V2")
        else:
            self._validate_rows(components)
        for comp in iter_components(components):
            if len(comp.get("custom_id") or "") > 100:
                raise _form_error("components", "BASE_TYPE_MAX_LENGTH",
                                  "custom_id must be 100 or fewer in length.")
        nonce = payload.get("nonce")
        # Create Message: "nonce: integer or string, up to 25 characters".
        if isinstance(nonce, str) and len(nonce) > 25:
            raise _form_error("nonce", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
        if len(payload.get("attachments") or []) > 10:
            raise _form_error("attachments", "BASE_TYPE_MAX_LENGTH",
                              "Must be 10 or fewer in length.")
        if creating and not (content or embeds or components or has_files
                             or payload.get("attachments") or payload.get("sticker_ids")
                             or payload.get("poll")):
            raise ApiError(400, 50006, "Cannot send an empty message")

    @staticmethod
    def _validate_embeds(embeds: list[dict]) -> None:
        """Discord's embed limits (Message Resource > Embed Limits): title 256, description
        4096, 25 fields, field name 256 and value 1024, footer text 2048, author name 256,
        and 6000 characters over all of these in all the message's embeds. An error names
        the offending key, e.g. errors.embeds.0.fields.3.value._errors (code 50035)."""
        total = 0
        for i, emb in enumerate(embeds):
            checks: list[tuple[str, Any, int]] = [
                (f"embeds.{i}.title", emb.get("title"), 256),
                (f"embeds.{i}.description", emb.get("description"), 4096),
                (f"embeds.{i}.footer.text", (emb.get("footer") or {}).get("text"), 2048),
                (f"embeds.{i}.author.name", (emb.get("author") or {}).get("name"), 256),
            ]
            fields = emb.get("fields") or []
            if len(fields) > 25:
                raise _form_error(f"embeds.{i}.fields", "BASE_TYPE_MAX_LENGTH",
                                  "Must be 25 or fewer in length.")
            for j, f in enumerate(fields):
                # Field name and value are required and non-empty (1-256 / 1-1024).
                for key, limit in (("name", 256), ("value", 1024)):
                    value = f.get(key)
                    if not value:
                        raise _form_error(f"embeds.{i}.fields.{j}.{key}",
                                          "BASE_TYPE_REQUIRED", "This field is required")
                    checks.append((f"embeds.{i}.fields.{j}.{key}", value, limit))
            for where, value, limit in checks:
                text = value or ""
                if not isinstance(text, str):
                    raise _form_error(where, "STRING_TYPE_CONVERT", "Must be a string.")
                total += len(text)
                if len(text) > limit:
                    raise _form_error(where, "BASE_TYPE_MAX_LENGTH",
                                      f"Must be {limit} or fewer in length.")
        if total > 6000:
            raise _form_error("embeds", "MAX_EMBED_SIZE_EXCEEDED", "Embed size exceeds maximum "
                              "size of 6000")

    @staticmethod
    def _validate_rows(components: list[dict]) -> None:
        """Legacy components (Components reference): at most 5 action rows, each with at most
        5 buttons (or one select); a button label is at most 80 characters, a custom_id 100."""
        if len(components) > 5:
            raise _form_error("components", "BASE_TYPE_MAX_LENGTH",
                              "Must be 5 or fewer in length.")
        for i, row in enumerate(components):
            kids = row.get("components") or []
            if row.get("type") == 1 and len(kids) > 5:
                raise _form_error(f"components.{i}.components", "BASE_TYPE_MAX_LENGTH",
                                  "Must be 5 or fewer in length.")
            for j, comp in enumerate(kids):
                if comp.get("type") == 2 and len(comp.get("label") or "") > 80:
                    raise _form_error(f"components.{i}.components.{j}.label",
                                      "BASE_TYPE_MAX_LENGTH", "Must be 80 or fewer in length.")
                if len(comp.get("custom_id") or "") > 100:
                    raise _form_error(f"components.{i}.components.{j}.custom_id",
                                      "BASE_TYPE_MAX_LENGTH",
                                      "Must be 100 or fewer in length.")

    def _number_components(self, components: list[dict]) -> list[dict]:
        components = copy.deepcopy(components)
        counter = 0
        for comp in iter_components(components):
            counter += 1
            comp.setdefault("id", counter)
        return components

    def _new_attachment(self, filename: str, data: bytes, channel_id: int,
                        description: str | None = None, *, ephemeral: bool = False) -> Attachment:
        ctype = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        att = Attachment(self.snowflake(), filename, data, ctype, description, channel_id,
                         ephemeral, self.base_url)
        self.attachments[att.id] = att
        return att

    def _resolve_attachments(self, payload: dict, files: dict, existing: list[Attachment],
                             channel_id: int, *, editing: bool,
                             ephemeral: bool) -> list[Attachment]:
        entries = payload.get("attachments")
        by_id = {a.id: a for a in existing}
        result: list[Attachment] = [] if (entries is not None or not editing) else list(existing)
        used: set[str] = set()
        for entry in entries or []:
            raw_id = entry.get("id")
            try:
                num = int(raw_id)
            except (TypeError, ValueError):
                raise _form_error("attachments", "NUMBER_TYPE_COERCE",
                                  "Value is not snowflake.") from None
            field_name = f"files[{num}]"
            if num in by_id:
                kept = by_id[num]
                if "description" in entry:
                    kept.description = entry["description"]
                result.append(kept)
            elif field_name in files:
                fn, _ct, data = files[field_name]
                used.add(field_name)
                result.append(self._new_attachment(entry.get("filename") or fn, data, channel_id,
                                                   entry.get("description"),
                                                   ephemeral=ephemeral))
            else:
                raise _form_error(f"attachments.{num}", "ATTACHMENT_NOT_FOUND",
                                  "Unknown attachment")
        for field_name, (fn, _ct, data) in files.items():
            if field_name not in used:
                result.append(self._new_attachment(fn, data, channel_id, ephemeral=ephemeral))
        if len(result) > 10:
            raise _form_error("attachments", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in "
                              "length.")
        return result

    def _create_message(self, channel: Channel, payload: dict | None, files: dict, *,
                        interaction: Interaction | None = None, extra_flags: int = 0,
                        allow_empty: bool = False) -> Message:
        payload = payload or {}
        flags = int(payload.get("flags") or 0)
        allowed = FLAG_SUPPRESS_EMBEDS | FLAG_SUPPRESS_NOTIFICATIONS | FLAG_IS_COMPONENTS_V2
        if interaction is not None:
            allowed |= FLAG_EPHEMERAL
        flags = (flags & allowed) | extra_flags
        self._validate_message(payload, creating=not allow_empty, has_files=bool(files),
                               components_v2=bool(flags & FLAG_IS_COMPONENTS_V2))
        mid = self.snowflake()
        msg_type = 0
        if interaction is not None:
            msg_type = 20 if interaction.type == 2 else 0
        elif payload.get("message_reference"):
            msg_type = 19
        msg = Message(
            id=mid, channel_id=channel.id, guild_id=channel.guild_id,
            content=payload.get("content") or "", embeds=copy.deepcopy(payload.get("embeds") or []),
            components=self._number_components(payload.get("components") or []),
            flags=flags, type=msg_type, tts=bool(payload.get("tts")),
            interaction_id=interaction.id if interaction else None,
            webhook_id=self.application_id if interaction else None,
            poll=payload.get("poll"), nonce=payload.get("nonce"),
        )
        if payload.get("message_reference"):
            ref = dict(payload["message_reference"])
            ref.setdefault("channel_id", str(channel.id))
            if channel.guild_id:
                ref.setdefault("guild_id", str(channel.guild_id))
            msg.message_reference = ref
        if interaction is not None:
            meta: dict[str, Any] = {
                "id": str(interaction.id), "type": interaction.type,
                "user": interaction.user.payload(),
                "authorizing_integration_owners": (
                    {"0": str(interaction.guild_id)} if interaction.guild_id
                    else {"1": str(interaction.user.id)}),
            }
            if interaction.type == 2:
                meta["name"] = interaction.data.get("name")
                meta["command_type"] = interaction.data.get("type", 1)
            if interaction.message_id is not None:
                meta["interacted_message_id"] = str(interaction.message_id)
            if interaction.original_message_id is not None:
                meta["original_response_message_id"] = str(interaction.original_message_id)
            msg.interaction_metadata = meta
        msg.attachments = self._resolve_attachments(payload, files, [], channel.id,
                                                    editing=False, ephemeral=msg.ephemeral)
        self.messages[mid] = msg
        return msg

    def _edit_message(self, msg: Message, payload: dict | None, files: dict) -> None:
        payload = payload or {}
        v2 = bool((int(payload.get("flags") or 0) | msg.flags) & FLAG_IS_COMPONENTS_V2)
        self._validate_message(payload, creating=False, has_files=bool(files), components_v2=v2)
        if "content" in payload:
            msg.content = payload["content"] or ""
        if "embeds" in payload:
            msg.embeds = copy.deepcopy(payload["embeds"] or [])
        if "components" in payload:
            msg.components = self._number_components(payload["components"] or [])
        if "flags" in payload and payload["flags"] is not None:
            mutable = FLAG_SUPPRESS_EMBEDS | FLAG_IS_COMPONENTS_V2
            msg.flags = (msg.flags & ~mutable) | (int(payload["flags"]) & mutable)
        if "poll" in payload:
            msg.poll = payload["poll"]
        msg.attachments = self._resolve_attachments(payload, files, msg.attachments,
                                                    msg.channel_id, editing=True,
                                                    ephemeral=msg.ephemeral)
        msg.flags &= ~FLAG_LOADING
        msg.edited_timestamp = iso_now()
        msg.edits.append(copy.deepcopy(payload))

    async def _announce(self, event: str, msg: Message) -> None:
        """MESSAGE_CREATE / MESSAGE_UPDATE / MESSAGE_DELETE for non-ephemeral messages."""
        if msg.ephemeral:
            return
        intent = INTENT_GUILD_MESSAGES if msg.guild_id else INTENT_DIRECT_MESSAGES
        if event == "MESSAGE_DELETE":
            data: dict[str, Any] = {"id": str(msg.id), "channel_id": str(msg.channel_id)}
            if msg.guild_id:
                data["guild_id"] = str(msg.guild_id)
        else:
            data = self.message_payload(msg, gateway=True)
        await self.dispatch(event, data, intent=intent)

    def _message_in_channel(self, channel: Channel, mid: str) -> Message:
        msg = self.messages.get(int(mid))
        if msg is None or msg.deleted or msg.channel_id != channel.id or msg.ephemeral:
            raise ApiError(404, 10008, "Unknown Message")
        return msg

    async def _h_channel_send(self, request: web.Request) -> web.Response:
        rec: Recorded = request[_REC_KEY]
        channel = self._channel_or_404(request.match_info["cid"])
        self._check_files(rec, self.filesize_limit(channel.guild_id))
        msg = self._create_message(channel, rec.json, rec.files)
        rec.message_id = msg.id
        await self._announce("MESSAGE_CREATE", msg)
        return json_response(msg.payload(self))

    async def _h_history(self, request: web.Request) -> web.Response:
        channel = self._channel_or_404(request.match_info["cid"])
        limit = int(request.query.get("limit", 50))
        msgs = self.channel_messages(channel.id, include_ephemeral=False)
        if "before" in request.query:
            msgs = [m for m in msgs if m.id < int(request.query["before"])]
        if "after" in request.query:
            msgs = [m for m in msgs if m.id > int(request.query["after"])][:limit]
        msgs = list(reversed(msgs))[:limit]
        return json_response([m.payload(self) for m in msgs])

    async def _h_channel_message(self, request: web.Request) -> web.Response:
        rec: Recorded = request[_REC_KEY]
        channel = self._channel_or_404(request.match_info["cid"])
        msg = self._message_in_channel(channel, request.match_info["mid"])
        rec.message_id = msg.id
        if request.method == "GET":
            return json_response(msg.payload(self))
        if request.method == "DELETE":
            msg.deleted = True
            await self._announce("MESSAGE_DELETE", msg)
            return web.Response(status=204)
        self._check_files(rec, self.filesize_limit(channel.guild_id))
        self._edit_message(msg, rec.json, rec.files)
        await self._announce("MESSAGE_UPDATE", msg)
        return json_response(msg.payload(self))

    # ------------------------------------------------------------------ interactions (REST)
    def _interaction_for_token(self, app: str, token: str) -> Interaction:
        itx = self._by_token.get(token)
        if itx is None or app != str(self.application_id):
            raise ApiError(404, 10015, "Unknown Webhook")
        if self.clock() - itx.created_at > TOKEN_LIFETIME:
            raise ApiError(401, 50027, "Invalid Webhook Token")
        return itx

    async def _h_callback(self, request: web.Request) -> web.Response:
        rec: Recorded = request[_REC_KEY]
        try:
            itx = self.interactions[int(request.match_info["iid"])]
        except (KeyError, ValueError):
            raise ApiError(404, 10062, "Unknown interaction") from None
        if itx.token != request.match_info["token"]:
            raise ApiError(404, 10062, "Unknown interaction")
        if itx.responded:
            raise ApiError(400, 40060, "Interaction has already been acknowledged.")
        if self.clock() - itx.created_at > ACK_DEADLINE:
            raise ApiError(404, 10062, "Unknown interaction")
        body = rec.json if isinstance(rec.json, dict) else {}
        rtype = body.get("type")
        data = body.get("data") or {}
        allowed = {2: {4, 5, 9}, 3: {4, 5, 6, 7, 9}, 4: {8}, 5: {4, 5, 6, 7}}.get(itx.type, set())
        if itx.type == 5 and (itx.parent is None or itx.parent.type != 3):
            allowed = {4, 5}
        if rtype not in allowed:
            raise _form_error("type", "INTERACTION_RESPONSE_TYPE_INVALID",
                              f"Interaction response type {rtype} is not valid for an "
                              f"interaction of type {itx.type}")
        limit = self.filesize_limit(itx.guild_id)
        self._check_files(rec, limit)
        channel = self.channels[itx.channel_id]
        message: Message | None = None
        announce: str | None = None
        if rtype == 4:
            message = self._create_message(channel, data, rec.files, interaction=itx)
            announce = "MESSAGE_CREATE"
        elif rtype == 5:
            flags = FLAG_LOADING | (int(data.get("flags") or 0) & FLAG_EPHEMERAL)
            message = self._create_message(channel, {}, {}, interaction=itx, extra_flags=flags,
                                           allow_empty=True)
            announce = "MESSAGE_CREATE"
        elif rtype in (6, 7):
            message = self.messages.get(itx.message_id or 0)
            if message is None and itx.parent is not None:
                message = self.messages.get(itx.parent.message_id or 0)
            if message is None or message.deleted:
                raise ApiError(404, 10008, "Unknown Message")
            if rtype == 7:
                self._edit_message(message, data, rec.files)
                announce = "MESSAGE_UPDATE"
        elif rtype == 8:
            choices = data.get("choices") or []
            # Interaction response "Autocomplete": up to 25 choices; each choice's name is
            # 1-100 characters, a string value at most 100 (Application Commands reference,
            # "Application Command Option Choice Structure").
            if len(choices) > 25:
                raise _form_error("data.choices", "BASE_TYPE_MAX_LENGTH",
                                  "Must be 25 or fewer in length.")
            for k, choice in enumerate(choices):
                name = choice.get("name")
                if not isinstance(name, str) or not 1 <= len(name) <= 100:
                    raise _form_error(f"data.choices.{k}.name", "BASE_TYPE_BAD_LENGTH",
                                      "Must be between 1 and 100 in length.")
                value = choice.get("value")
                if isinstance(value, str) and len(value) > 100:
                    raise _form_error(f"data.choices.{k}.value", "BASE_TYPE_BAD_LENGTH",
                                      "Must be between 1 and 100 in length.")
            itx.choices = choices
        elif rtype == 9:
            title = data.get("title") or ""
            if not 1 <= len(title) <= 45:
                raise _form_error("data.title", "BASE_TYPE_BAD_LENGTH",
                                  "Must be between 1 and 45 in length.")
            if not 1 <= len(data.get("components") or []) <= 5:
                raise _form_error("data.components", "BASE_TYPE_BAD_LENGTH",
                                  "Must be between 1 and 5 in length.")
            itx.modal = copy.deepcopy(data)

        itx.responded = True
        itx.response_type = rtype
        itx.ack_time = self.clock()
        itx.callback = body
        if message is not None:
            itx.original_message_id = message.id
            rec.message_id = message.id
        if announce and message is not None:
            await self._announce(announce, message)

        response: dict[str, Any] = {"interaction": {
            "id": str(itx.id), "type": itx.type,
            "response_message_id": str(message.id) if message else None,
            "response_message_loading": rtype == 5,
            "response_message_ephemeral": bool(message and message.ephemeral),
        }}
        if rtype in (4, 5, 7) and message is not None:
            response["resource"] = {"type": rtype, "message": message.payload(self)}
        elif rtype in (6, 9):
            response["resource"] = {"type": rtype}
        return json_response(response)

    async def _h_followup(self, request: web.Request) -> web.Response:
        rec: Recorded = request[_REC_KEY]
        itx = self._interaction_for_token(request.match_info["app"], request.match_info["token"])
        if not itx.responded:
            raise ApiError(404, 10015, "Unknown Webhook")
        self._check_files(rec, self.filesize_limit(itx.guild_id))
        payload = rec.json if isinstance(rec.json, dict) else {}
        original = itx.response_message()
        if (itx.response_type == 5 and original is not None and original.loading
                and not original.deleted):
            # Discord: the first followup after a "thinking" defer replaces the loading message.
            self._validate_message(payload, creating=True, has_files=bool(rec.files))
            self._edit_message(original, payload, rec.files)
            await self._announce("MESSAGE_UPDATE", original)
            msg = original
        else:
            channel = self.channels[itx.channel_id]
            msg = self._create_message(channel, payload, rec.files, interaction=itx)
            await self._announce("MESSAGE_CREATE", msg)
        rec.message_id = msg.id
        if request.query.get("wait") not in ("1", "true", "True"):
            return web.Response(status=204)
        return json_response(msg.payload(self))

    async def _h_webhook_message(self, request: web.Request) -> web.Response:
        rec: Recorded = request[_REC_KEY]
        itx = self._interaction_for_token(request.match_info["app"], request.match_info["token"])
        mid = request.match_info["mid"]
        if mid == "@original":
            msg = itx.response_message()
            if msg is None and itx.responded and itx.response_type in (6, 9) \
                    and itx.message_id is not None:
                msg = self.messages.get(itx.message_id)
        else:
            try:
                msg = self.messages.get(int(mid))
            except ValueError:
                msg = None
            if msg is not None and msg.interaction_id != itx.id and \
                    msg.id not in (itx.original_message_id, itx.message_id):
                msg = None
        if msg is None or msg.deleted:
            raise ApiError(404, 10008, "Unknown Message")
        rec.message_id = msg.id
        if request.method == "GET":
            return json_response(msg.payload(self))
        if request.method == "DELETE":
            msg.deleted = True
            await self._announce("MESSAGE_DELETE", msg)
            return web.Response(status=204)
        self._check_files(rec, self.filesize_limit(itx.guild_id))
        self._edit_message(msg, rec.json if isinstance(rec.json, dict) else {}, rec.files)
        await self._announce("MESSAGE_UPDATE", msg)
        return json_response(msg.payload(self))

    # ------------------------------------------------------------------ gateway
    async def _send(self, ws: web.WebSocketResponse, frame: dict) -> None:
        if not ws.closed:
            await ws.send_str(json.dumps(frame))

    async def dispatch(self, event: str, data: Any, *, intent: int | None = None) -> None:
        """Send a dispatch (op 0) to every live session (buffered while a session is
        reconnecting, replayed on RESUME)."""
        for session in list(self._sessions.values()):
            if session.dead:
                continue
            if intent is not None and not session.intents & intent:
                continue
            await self._session_dispatch(session, event, data)

    async def _session_dispatch(self, session: _Session, event: str, data: Any) -> None:
        session.seq += 1
        frame = {"op": 0, "t": event, "s": session.seq, "d": data}
        session.log.append(frame)
        if session.conn is not None and not session.conn.closed:
            await self._send(session.conn, frame)

    def _live_sessions(self) -> list[_Session]:
        return [s for s in self._sessions.values() if not s.dead]

    async def _h_gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self._sockets.add(ws)
        self.gateway_connects.append(dict(request.query))
        session: _Session | None = None
        await self._send(ws, {"op": 10, "d": {"heartbeat_interval": HEARTBEAT_INTERVAL_MS,
                                              "_trace": ["fake-gateway"]}, "s": None, "t": None})
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                op, d = frame.get("op"), frame.get("d")
                if op == 1:
                    self.heartbeats += 1
                    await self._send(ws, {"op": 11, "d": None, "s": None, "t": None})
                elif op == 2:
                    session = await self._identify(ws, d)
                elif op == 6:
                    session = await self._resume(ws, d)
                elif op == 3:
                    self.presence_updates.append(d)
                elif op == 8 and session is not None:
                    await self._members_chunk(session, d)
        finally:
            self._sockets.discard(ws)
            if session is not None and session.conn is ws:
                session.conn = None
                # A clean close by the client (1000/1001) ends the session, like Discord.
                if ws not in self._server_closed and ws.close_code in (1000, 1001):
                    session.dead = True
            self._server_closed.discard(ws)
        return ws

    async def _identify(self, ws: web.WebSocketResponse, d: dict) -> _Session | None:
        self.identifies.append(d)
        if d.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return None
        session = _Session(uuid.uuid4().hex, int(d.get("intents") or 0), d, d.get("shard"))
        session.conn = ws
        self._sessions[session.id] = session
        ready: dict[str, Any] = {
            "v": 10, "user": self._me_payload(), "session_type": "normal",
            "guilds": [{"id": str(g), "unavailable": True} for g in self.guilds],
            "session_id": session.id, "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [], "relationships": [], "presences": [],
            "guild_join_requests": [], "geo_ordered_rtc_regions": ["fake"],
            "user_settings": {}, "auth": {}, "_trace": ["fake-gateway"],
        }
        if session.shard is not None:
            ready["shard"] = session.shard
        await self._session_dispatch(session, "READY", ready)
        for guild in self.guilds.values():
            await self._session_dispatch(session, "GUILD_CREATE", self.guild_payload(
                guild, gateway=True, intents=session.intents))
        return session

    async def _resume(self, ws: web.WebSocketResponse, d: dict) -> _Session | None:
        self.resumes.append(d)
        session = self._sessions.get(d.get("session_id", ""))
        if d.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return None
        if session is None or session.dead:
            await self._send(ws, {"op": 9, "d": False, "s": None, "t": None})
            return None
        old = session.conn
        session.conn = ws
        if old is not None and old is not ws and not old.closed:
            self._server_closed.add(old)
            await old.close(code=4000)
        last = int(d.get("seq") or 0)
        for frame in session.log:
            if frame["s"] > last:
                await self._send(ws, frame)
        await self._session_dispatch(session, "RESUMED", {"_trace": ["fake-gateway"]})
        return session

    async def _members_chunk(self, session: _Session, d: dict) -> None:
        gid = int(d.get("guild_id"))
        if gid not in self.guilds:
            return
        members = [self.member_payload(u, gid, with_permissions=False)
                   for u in self.users.values() if u.guild_id == gid]
        members.append(self._bot_member_payload(self.guilds[gid]))
        await self._session_dispatch(session, "GUILD_MEMBERS_CHUNK", {
            "guild_id": str(gid), "members": members, "chunk_index": 0, "chunk_count": 1,
            "not_found": [], "nonce": d.get("nonce")})

    async def reconnect(self) -> None:
        """Send op 7 RECONNECT to every connected session and wait until each RESUMEs."""
        sessions = [s for s in self._live_sessions() if s.conn is not None]
        assert sessions, "no bot is connected to the fake gateway"
        before = len(self.resumes)
        old = {s.id: s.conn for s in sessions}
        for s in sessions:
            assert s.conn is not None
            await self._send(s.conn, {"op": 7, "d": None, "s": None, "t": None})
        await self.wait_for(lambda: len(self.resumes) >= before + len(sessions) and all(
            s.conn is not None and s.conn is not old[s.id] for s in sessions))

    async def invalidate_session(self, *, resumable: bool = False) -> None:
        """Send op 9 INVALID_SESSION; with ``resumable=False`` the bot re-IDENTIFYs (discord.py
        sleeps 5 s before a non-initial IDENTIFY, so this takes about 5 s)."""
        sessions = [s for s in self._live_sessions() if s.conn is not None]
        assert sessions, "no bot is connected to the fake gateway"
        before = len(self.identifies) + len(self.resumes)
        for s in sessions:
            if not resumable:
                s.dead = True
            assert s.conn is not None
            await self._send(s.conn, {"op": 9, "d": resumable, "s": None, "t": None})
        await self.wait_for(lambda: len(self.identifies) + len(self.resumes) > before and any(
            s.conn is not None for s in self._live_sessions()), timeout=15)

    async def drop_connection(self, code: int = 4000) -> None:
        """Close the bot's socket(s) from the server side (the bot should RESUME)."""
        sessions = [s for s in self._live_sessions() if s.conn is not None]
        assert sessions, "no bot is connected to the fake gateway"
        before = len(self.resumes)
        for s in sessions:
            assert s.conn is not None
            self._server_closed.add(s.conn)
            await s.conn.close(code=code)
        await self.wait_for(lambda: len(self.resumes) > before and all(
            s.conn is not None for s in sessions), timeout=15)

    # ------------------------------------------------------------------ interactions (in)
    def _require_connected(self) -> None:
        self._check_watched()
        assert any(s.conn is not None for s in self._live_sessions()) or any(
            not s.dead for s in self._sessions.values()), (
            "no bot session on the fake gateway: connect a bot first")

    def _user(self, user: User | int) -> User:
        if isinstance(user, User):
            return user
        try:
            return self.users[int(user)]
        except KeyError:
            raise AssertionError(f"unknown user {user!r}; use add_user()") from None

    def _new_interaction(self, itype: int, user: User, guild_id: int | None,
                         channel_id: int, data: dict, *, message: Message | None = None,
                         parent: Interaction | None = None) -> Interaction:
        iid = self.snowflake()
        token = "aW50ZXJhY3Rpb246" + secrets.token_urlsafe(48)
        itx = Interaction(iid, token, itype, user, channel_id, guild_id, self.clock(), data,
                          message_id=message.id if message else None, parent=parent,
                          _fake=self)
        channel = self.channels[channel_id]
        # The member's permissions in this channel, overwrites applied (interaction
        # "member.permissions": "including overwrites", Discord's interaction docs).
        perms = (self.channel_permissions(user, channel_id) if guild_id is not None
                 else self.member_permissions(user, guild_id))
        channel_payload = {**channel.payload(self), "permissions": str(perms)}
        payload: dict[str, Any] = {
            "id": str(iid), "application_id": str(self.application_id), "type": itype,
            "token": token, "version": 1, "data": data, "channel_id": str(channel_id),
            "channel": channel_payload, "app_permissions": str(BOT_PERMISSIONS),
            "locale": "en-US", "entitlements": [], "entitlement_sku_ids": [],
            "attachment_size_limit": self.filesize_limit(guild_id),
        }
        if guild_id is not None:
            payload.update({
                "guild_id": str(guild_id), "guild_locale": "en-US",
                "guild": {"id": str(guild_id), "locale": "en-US", "features": []},
                "member": {**self.member_payload(user, guild_id), "permissions": str(perms)},
                "authorizing_integration_owners": {"0": str(guild_id)}, "context": 0,
            })
        else:
            payload.update({"user": user.payload(), "context": 1,
                            "authorizing_integration_owners": {"0": "0",
                                                               "1": str(user.id)}})
        if message is not None:
            payload["message"] = message.payload(self)
        itx.payload = payload
        self.interactions[iid] = itx
        self._by_token[itx.token] = itx
        return itx

    def _find_command(self, name: str, guild_id: int | None) -> tuple[dict, int | None]:
        if guild_id is not None and name in self.commands.get(guild_id, {}):
            return self.commands[guild_id][name], guild_id
        if name in self.commands.get(None, {}):
            return self.commands[None][name], None
        synced = {("global" if k is None else k): sorted(v) for k, v in self.commands.items()}
        raise AssertionError(
            f"/{name} was never synced to Discord (for guild {guild_id} or globally); "
            f"synced commands: {synced or 'none (sync_count=' + str(self.sync_count) + ')'}")

    def _convert_option(self, opt: dict, value: Any, resolved: dict, guild_id: int | None,
                        channel_id: int, *, focused: bool) -> Any:
        otype, oname = opt["type"], opt["name"]
        if focused:
            return value
        where = f"option {oname!r} (type {otype})"
        if otype == 3:
            assert isinstance(value, str), f"{where} needs a str, got {value!r}"
            if "min_length" in opt:
                assert len(value) >= opt["min_length"], f"{where}: shorter than min_length"
            if "max_length" in opt:
                assert len(value) <= opt["max_length"], f"{where}: longer than max_length"
        elif otype == 4:
            assert isinstance(value, int) and not isinstance(value, bool), (
                f"{where} needs an int, got {value!r}")
            assert -(2**53) <= value <= 2**53, f"{where}: out of range"
        elif otype == 10:
            assert isinstance(value, int | float) and not isinstance(value, bool), (
                f"{where} needs a number, got {value!r}")
        elif otype == 5:
            assert isinstance(value, bool), f"{where} needs a bool, got {value!r}"
        elif otype in (6, 9) and isinstance(value, User | int) and (
                isinstance(value, User) or int(value) in self.users):
            user = self._user(value)
            resolved.setdefault("users", {})[str(user.id)] = user.payload()
            if guild_id is not None and user.guild_id == guild_id:
                member = self.member_payload(user, guild_id)
                member.pop("user")
                resolved.setdefault("members", {})[str(user.id)] = member
            return str(user.id)
        elif otype in (8, 9):
            guild = self.guilds.get(guild_id or 0)
            assert guild is not None and int(value) in guild.roles, f"{where}: unknown role"
            resolved.setdefault("roles", {})[str(value)] = guild.roles[int(value)].payload()
            return str(value)
        elif otype == 7:
            assert int(value) in self.channels, f"{where}: unknown channel {value!r}"
            ch = self.channels[int(value)]
            data = {**ch.payload(self), "permissions": str(ALL_PERMISSIONS)}
            resolved.setdefault("channels", {})[str(ch.id)] = data
            return str(ch.id)
        elif otype == 11:
            assert isinstance(value, tuple) and len(value) == 3, (
                f"{where}: pass attachments={{name: (filename, bytes, content_type)}}")
            filename, blob, ctype = value
            # Discord keeps an upload under a URL-safe base name (no directories, no
            # control characters; its client turns spaces into underscores), so the CDN
            # URL it hands out always resolves. Modelled as: the last path part, every
            # character outside letters, digits, "._-" replaced by "_".
            filename = re.sub(r"[^\w.-]", "_", filename.replace("\\", "/").rsplit("/", 1)[-1])
            filename = filename.strip(".") or "unknown"
            att = self._new_attachment(filename, blob, channel_id, ephemeral=True)
            att.content_type = ctype
            resolved.setdefault("attachments", {})[str(att.id)] = att.payload()
            return str(att.id)
        else:
            raise AssertionError(f"{where}: unsupported value {value!r}")
        if opt.get("choices"):
            allowed = [c["value"] for c in opt["choices"]]
            assert value in allowed, f"{where}: {value!r} is not one of the choices {allowed}"
        if otype in (4, 10):
            if opt.get("min_value") is not None:
                assert value >= opt["min_value"], f"{where}: below min_value"
            if opt.get("max_value") is not None:
                assert value <= opt["max_value"], f"{where}: above max_value"
        return value

    def _build_command_data(self, name: str, options: dict | list | None, *, user: User,
                            guild_id: int | None, channel_id: int, subcommand: str | None,
                            group: str | None, attachments: dict | None,
                            focused: str | None = None, force: bool = False) -> dict:
        cmd, scope = self._find_command(name, guild_id)
        if not force and cmd.get("default_member_permissions") is not None:
            needed = int(cmd["default_member_permissions"])
            have = self.member_permissions(user, guild_id)
            assert (have & needed) == needed and (needed or have & ADMINISTRATOR), (
                f"/{name} is hidden from {user.username} by default_member_permissions="
                f"{needed} (user has {have}); pass force=True to bypass the Discord client")
        data: dict[str, Any] = {"id": cmd["id"], "name": name, "type": 1}
        if scope is not None:
            data["guild_id"] = str(scope)
        schema = cmd.get("options") or []
        path: list[dict] = []
        if group is not None:
            grp = next((o for o in schema if o["type"] == 2 and o["name"] == group), None)
            assert grp is not None, f"/{name} has no subcommand group {group!r}"
            path.append({"name": group, "type": 2})
            schema = grp.get("options") or []
        has_subs = any(o["type"] == 1 for o in schema)
        if subcommand is not None:
            sub = next((o for o in schema if o["type"] == 1 and o["name"] == subcommand), None)
            assert sub is not None, f"/{name} {group or ''} has no subcommand {subcommand!r}"
            path.append({"name": subcommand, "type": 1})
            schema = sub.get("options") or []
        else:
            assert not has_subs and not any(o["type"] == 2 for o in schema), (
                f"/{name} has subcommands: pass subcommand= (and group=)")
        resolved: dict[str, Any] = {}
        if isinstance(options, list):
            built = copy.deepcopy(options)
        else:
            given = dict(options or {})
            for key, spec in (attachments or {}).items():
                given[key] = tuple(spec)
            by_name = {o["name"]: o for o in schema}
            unknown = sorted(set(given) - set(by_name))
            assert not unknown, (f"/{name}: options {unknown} are not in the synced schema "
                                 f"(known: {sorted(by_name)})")
            if focused is not None:
                assert focused in by_name, f"/{name}: focused option {focused!r} unknown"
                assert by_name[focused].get("autocomplete"), (
                    f"/{name}: option {focused!r} has no autocomplete")
                given.setdefault(focused, "")
            else:
                missing = [o["name"] for o in schema if o.get("required") and o["name"]
                           not in given]
                assert not missing, f"/{name}: required options missing: {missing}"
            built = []
            for opt in schema:  # Discord sends them in schema order
                if opt["name"] not in given:
                    continue
                entry = {"name": opt["name"], "type": opt["type"],
                         "value": self._convert_option(
                             opt, given[opt["name"]], resolved, guild_id, channel_id,
                             focused=opt["name"] == focused)}
                if opt["name"] == focused:
                    entry["focused"] = True
                built.append(entry)
        for level in reversed(path):
            built = [{**level, "options": built}]
        if built:
            data["options"] = built
        if resolved:
            data["resolved"] = resolved
        return data

    def _defaults(self, user: User, guild_id: int | None,
                  channel_id: int | None) -> tuple[int | None, int]:
        gid = guild_id if guild_id is not None else user.guild_id
        if channel_id is None:
            assert gid is not None, "pass channel_id for users without a guild"
            channel_id = self.guilds[gid].channel_id
        return gid, channel_id

    async def slash(self, name: str, options: dict | list | None = None, *, user: User | int,
                    guild_id: int | None = None, channel_id: int | None = None,
                    subcommand: str | None = None, group: str | None = None,
                    attachments: dict[str, tuple[str, bytes, str]] | None = None,
                    force: bool = False) -> Interaction:
        """Inject a chat-input command (INTERACTION_CREATE type 2), validated against the
        synced schema. ``force=True`` ignores ``default_member_permissions``."""
        self._require_connected()
        user = self._user(user)
        gid, cid = self._defaults(user, guild_id, channel_id)
        # Discord's client shows a member no channel without VIEW_CHANNEL, so no command
        # can come from one (https://discord.com/developers/docs/topics/permissions).
        assert gid is None or self.channel_permissions(user, cid) & VIEW_CHANNEL, (
            f"{user.username} cannot see channel {cid}, so cannot run /{name} there")
        data = self._build_command_data(name, options, user=user, guild_id=gid, channel_id=cid,
                                        subcommand=subcommand, group=group,
                                        attachments=attachments, force=force)
        itx = self._new_interaction(2, user, gid, cid, data)
        await self.dispatch("INTERACTION_CREATE", itx.payload)
        return itx

    async def autocomplete(self, name: str, options: dict | None, focused: str, *,
                           user: User | int, subcommand: str | None = None,
                           group: str | None = None, guild_id: int | None = None,
                           channel_id: int | None = None, timeout: float = 5.0) -> list[dict]:
        """Inject an autocomplete interaction (type 4); returns the bot's choices."""
        self._require_connected()
        user = self._user(user)
        gid, cid = self._defaults(user, guild_id, channel_id)
        data = self._build_command_data(name, options, user=user, guild_id=gid, channel_id=cid,
                                        subcommand=subcommand, group=group, attachments=None,
                                        focused=focused, force=True)
        itx = self._new_interaction(4, user, gid, cid, data)
        await self.dispatch("INTERACTION_CREATE", itx.payload)
        await itx.wait_response(timeout)
        assert itx.response_type == 8, f"autocomplete answered with type {itx.response_type}"
        return list(itx.choices or [])

    async def click(self, message_id: int, custom_id: str, *, user: User | int,
                    values: list[str] | None = None) -> Interaction:
        """Click a button / choose in a select of a message the bot sent (type 3)."""
        self._require_connected()
        user = self._user(user)
        msg = self.messages.get(message_id)
        assert msg is not None, f"message {message_id} was never created by the bot"
        assert not msg.deleted, f"message {message_id} was deleted"
        comp = next((c for c in iter_components(msg.components)
                     if c.get("custom_id") == custom_id), None)
        assert comp is not None, (f"message {message_id} has no component {custom_id!r}; "
                                  f"it has {msg.custom_ids()}")
        assert not comp.get("disabled"), f"component {custom_id!r} is disabled"
        ctype = comp["type"]
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": ctype}
        if "id" in comp:
            data["id"] = comp["id"]
        if ctype in (3, 5, 6, 7, 8):
            values = list(values or [])
            lo, hi = comp.get("min_values", 1), comp.get("max_values", 1)
            assert lo <= len(values) <= hi, f"select {custom_id!r} takes {lo}..{hi} values"
            if ctype == 3:
                allowed = [o["value"] for o in comp.get("options") or []]
                bad = [v for v in values if v not in allowed]
                assert not bad, f"select {custom_id!r}: {bad} not in options {allowed}"
            data["values"] = [str(v) for v in values]
            if ctype != 3:
                resolved: dict[str, Any] = {}
                for v in values:
                    if int(v) in self.users:
                        u = self.users[int(v)]
                        resolved.setdefault("users", {})[str(u.id)] = u.payload()
                        member = self.member_payload(u, msg.guild_id)
                        member.pop("user")
                        resolved.setdefault("members", {})[str(u.id)] = member
                    elif msg.guild_id and int(v) in self.guilds[msg.guild_id].roles:
                        role = self.guilds[msg.guild_id].roles[int(v)]
                        resolved.setdefault("roles", {})[str(v)] = role.payload()
                    elif int(v) in self.channels:
                        resolved.setdefault("channels", {})[str(v)] = {
                            **self.channels[int(v)].payload(self),
                            "permissions": str(ALL_PERMISSIONS)}
                data["resolved"] = resolved
        else:
            assert values is None, "values= is only for select menus"
            assert ctype == 2 and comp.get("style") != 5, f"{custom_id!r} is not clickable"
        itx = self._new_interaction(3, user, msg.guild_id, msg.channel_id, data, message=msg)
        await self.dispatch("INTERACTION_CREATE", itx.payload)
        return itx

    def _modal_component(self, comp: dict, values: dict, used: set) -> dict | None:
        ctype = comp.get("type")
        if ctype == 1:
            kids = [self._modal_component(c, values, used) for c in comp.get("components", [])]
            return {"type": 1, **({"id": comp["id"]} if "id" in comp else {}),
                    "components": [k for k in kids if k is not None]}
        if ctype == 18:
            inner = self._modal_component(comp["component"], values, used)
            return {"type": 18, "id": comp.get("id", 0), "component": inner}
        cid = comp.get("custom_id")
        out: dict[str, Any] = {"type": ctype}
        if "id" in comp:
            out["id"] = comp["id"]
        if cid is None:
            return out
        out["custom_id"] = cid
        if ctype == 4:
            value = values.get(cid, comp.get("value") or "")
            used.add(cid)
            assert isinstance(value, str), f"text input {cid!r} takes a str"
            if comp.get("required", True):
                assert value, f"text input {cid!r} is required"
            if value:
                assert len(value) >= comp.get("min_length", 0), f"{cid!r} below min_length"
            assert len(value) <= comp.get("max_length", 4000), f"{cid!r} above max_length"
            out["value"] = value
        else:
            raw = values.get(cid, [])
            used.add(cid)
            out["values"] = [raw] if isinstance(raw, str) else list(raw)
        return out

    async def submit_modal(self, interaction: Interaction, values: dict[str, Any], *,
                           user: User | int | None = None) -> Interaction:
        """Submit the modal the bot opened (type 9) on ``interaction`` (type 5 interaction)."""
        self._require_connected()
        assert interaction.response_type == 9 and interaction.modal is not None, (
            f"interaction {interaction.id} was answered with type {interaction.response_type}, "
            f"not a modal (9)")
        user = self._user(user if user is not None else interaction.user)
        used: set[str] = set()
        comps = [self._modal_component(c, values, used) for c in interaction.modal["components"]]
        unknown = sorted(set(values) - used)
        assert not unknown, f"modal {interaction.modal['custom_id']!r} has no fields {unknown}"
        data = {"custom_id": interaction.modal["custom_id"],
                "components": [c for c in comps if c is not None]}
        message = None
        if interaction.type == 3 and interaction.message_id is not None:
            message = self.messages.get(interaction.message_id)
        itx = self._new_interaction(5, user, interaction.guild_id, interaction.channel_id, data,
                                    message=message, parent=interaction)
        await self.dispatch("INTERACTION_CREATE", itx.payload)
        return itx
