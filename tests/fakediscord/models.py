"""Data model of the fake Discord: the world (guilds, users, ...) and what the bot produced."""

from __future__ import annotations

import datetime as _dt
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import FakeDiscord

DISCORD_EPOCH_MS = 1420070400000

# --- permission bits (https://discord.com/developers/docs/topics/permissions) ---
CREATE_INSTANT_INVITE = 1 << 0
ADMINISTRATOR = 1 << 3
MANAGE_CHANNELS = 1 << 4
MANAGE_GUILD = 1 << 5
ADD_REACTIONS = 1 << 6
STREAM = 1 << 9
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
MANAGE_MESSAGES = 1 << 13
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_MESSAGE_HISTORY = 1 << 16
USE_EXTERNAL_EMOJIS = 1 << 18
CONNECT = 1 << 20
SPEAK = 1 << 21
USE_VAD = 1 << 25
CHANGE_NICKNAME = 1 << 26
USE_APPLICATION_COMMANDS = 1 << 31
CREATE_PUBLIC_THREADS = 1 << 35
USE_EXTERNAL_STICKERS = 1 << 37
SEND_MESSAGES_IN_THREADS = 1 << 38
ALL_PERMISSIONS = (1 << 51) - 1

#: What the @everyone role of a fresh Discord guild allows (no MANAGE_GUILD, no ADMINISTRATOR).
DEFAULT_MEMBER_PERMISSIONS = (
    CREATE_INSTANT_INVITE
    | ADD_REACTIONS
    | STREAM
    | VIEW_CHANNEL
    | SEND_MESSAGES
    | EMBED_LINKS
    | ATTACH_FILES
    | READ_MESSAGE_HISTORY
    | USE_EXTERNAL_EMOJIS
    | CONNECT
    | SPEAK
    | USE_VAD
    | CHANGE_NICKNAME
    | USE_APPLICATION_COMMANDS
    | CREATE_PUBLIC_THREADS
    | USE_EXTERNAL_STICKERS
    | SEND_MESSAGES_IN_THREADS
)
#: Permissions of the bot's managed role (and the interactions' ``app_permissions``).
BOT_PERMISSIONS = DEFAULT_MEMBER_PERMISSIONS | MANAGE_MESSAGES

# --- message flags ---
FLAG_SUPPRESS_EMBEDS = 1 << 2
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7
FLAG_SUPPRESS_NOTIFICATIONS = 1 << 12
FLAG_IS_COMPONENTS_V2 = 1 << 15

MIB = 1024 * 1024
TIER_FILESIZE = {0: 10 * MIB, 1: 10 * MIB, 2: 50 * MIB, 3: 100 * MIB}


class SnowflakeGenerator:
    """Realistic, strictly increasing snowflakes derived from the real wall clock."""

    def __init__(self) -> None:
        self._last = 0

    def __call__(self) -> int:
        ms = int(time.time() * 1000)
        value = ((ms - DISCORD_EPOCH_MS) << 22) | (1 << 17)
        if value <= self._last:
            value = self._last + 1
        self._last = value
        return value


def iso_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat()


def snowflake_time_iso(snowflake: int) -> str:
    ms = (snowflake >> 22) + DISCORD_EPOCH_MS
    return _dt.datetime.fromtimestamp(ms / 1000, _dt.UTC).isoformat()


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, else None (Discord fills these for images)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    return None


@dataclass
class Role:
    id: int
    name: str
    permissions: int = 0
    position: int = 0
    managed: bool = False

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "permissions": str(self.permissions),
            "position": self.position,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "managed": self.managed,
            "mentionable": False,
            "icon": None,
            "unicode_emoji": None,
            "flags": 0,
            "description": None,
        }


@dataclass
class Channel:
    id: int
    guild_id: int | None
    name: str | None
    type: int = 0
    position: int = 0
    topic: str | None = None
    recipient_id: int | None = None  # DM channels
    # Permission overwrites as Discord sends them: {"id", "type": 0 role / 1 member,
    # "allow", "deny"} (https://discord.com/developers/docs/resources/channel#overwrite-object).
    overwrites: list[dict[str, Any]] = field(default_factory=list)

    def payload(self, fake: FakeDiscord | None = None) -> dict[str, Any]:
        if self.type == 1:
            data: dict[str, Any] = {"id": str(self.id), "type": 1, "flags": 0,
                                    "last_message_id": None, "recipients": []}
            if fake is not None and self.recipient_id in fake.users:
                data["recipients"] = [fake.users[self.recipient_id].payload()]
            return data
        return {
            "id": str(self.id),
            "type": self.type,
            "guild_id": str(self.guild_id),
            "name": self.name,
            "position": self.position,
            "parent_id": None,
            "permission_overwrites": [dict(o) for o in self.overwrites],
            "nsfw": False,
            "topic": self.topic,
            "rate_limit_per_user": 0,
            "last_message_id": None,
            "flags": 0,
        }


@dataclass
class Guild:
    """A guild of the fake world. ``roles`` maps role id -> :class:`Role` (the @everyone role's
    id is the guild id); ``channel_id`` is the default text channel "general"."""

    id: int
    name: str
    channel_id: int
    owner_id: int
    premium_tier: int = 0
    roles: dict[int, Role] = field(default_factory=dict)
    channel_ids: list[int] = field(default_factory=list)
    bot_role_id: int = 0
    joined_at: str = field(default_factory=iso_now)

    @property
    def everyone_role_id(self) -> int:
        return self.id

    def role_id(self, name: str) -> int:
        for role in self.roles.values():
            if role.name == name:
                return role.id
        raise KeyError(name)


@dataclass
class User:
    """A (human) user of the fake world, member of ``guild_id``."""

    id: int
    username: str
    guild_id: int | None = None
    roles: tuple[int, ...] = ()
    permissions: int = DEFAULT_MEMBER_PERMISSIONS
    global_name: str | None = None
    joined_at: str = field(default_factory=iso_now)

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.username,
            "discriminator": "0",
            "global_name": self.global_name or self.username,
            "avatar": None,
            "avatar_decoration_data": None,
            "public_flags": 0,
            "primary_guild": None,
            "collectibles": None,
            "bot": False,
        }


@dataclass
class Attachment:
    id: int
    filename: str
    data: bytes
    content_type: str | None = None
    description: str | None = None
    channel_id: int = 0
    ephemeral: bool = False
    base_url: str = ""

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def url(self) -> str:
        return f"{self.base_url}/cdn/attachments/{self.channel_id}/{self.id}/{self.filename}"

    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id),
            "filename": self.filename,
            "size": self.size,
            "url": self.url,
            "proxy_url": self.url,
            "content_type": self.content_type,
        }
        if self.description is not None:
            data["description"] = self.description
        if self.ephemeral:
            data["ephemeral"] = True
        dims = image_size(self.data)
        if dims is not None:
            data["width"], data["height"] = dims
        return data


@dataclass
class Message:
    """A message the bot created (channel send, interaction original, or followup)."""

    id: int
    channel_id: int
    guild_id: int | None
    content: str = ""
    embeds: list[dict] = field(default_factory=list)
    components: list[dict] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    flags: int = 0
    type: int = 0
    tts: bool = False
    edits: list[dict] = field(default_factory=list)
    deleted: bool = False
    interaction_id: int | None = None
    webhook_id: int | None = None
    edited_timestamp: str | None = None
    message_reference: dict | None = None
    interaction_metadata: dict | None = None
    poll: dict | None = None
    sticker_ids: list = field(default_factory=list)
    nonce: Any = None

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & FLAG_EPHEMERAL)

    @property
    def loading(self) -> bool:
        return bool(self.flags & FLAG_LOADING)

    @property
    def timestamp(self) -> str:
        return snowflake_time_iso(self.id)

    def custom_ids(self) -> list[str]:
        """All component custom_ids of the message, depth first."""
        return [c["custom_id"] for c in iter_components(self.components) if "custom_id" in c]

    def payload(self, fake: FakeDiscord) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id),
            "type": self.type,
            "content": self.content,
            "channel_id": str(self.channel_id),
            "author": fake.bot_user_payload(),
            "attachments": [a.payload() for a in self.attachments],
            "embeds": self.embeds,
            "components": self.components,
            "mentions": [],
            "mention_roles": [],
            "mention_everyone": False,
            "pinned": False,
            "tts": self.tts,
            "timestamp": self.timestamp,
            "edited_timestamp": self.edited_timestamp,
            "flags": self.flags,
        }
        if self.webhook_id is not None:
            data["webhook_id"] = str(self.webhook_id)
            data["application_id"] = str(fake.application_id)
        if self.interaction_metadata is not None:
            data["interaction_metadata"] = self.interaction_metadata
        if self.message_reference is not None:
            data["message_reference"] = self.message_reference
        if self.poll is not None:
            data["poll"] = self.poll
        if self.nonce is not None:
            data["nonce"] = self.nonce
        return data


def iter_components(components: list[dict]):
    """Walk a component tree (action rows, containers, sections, labels) depth first."""
    for comp in components or []:
        yield comp
        yield from iter_components(comp.get("components") or [])
        for key in ("accessory", "component"):
            child = comp.get(key)
            if isinstance(child, dict):
                yield from iter_components([child])


@dataclass
class Recorded:
    """One HTTP request the bot made. ``path`` is relative to the API base (``/api/v10`` removed)
    for API routes; ``time`` is ``time.monotonic()``, ``clock_time`` the fake's clock."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    files: dict[str, tuple[str, str, bytes]]
    status: int | None = None
    time: float = 0.0
    clock_time: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    response: Any = None
    # The message the request created, edited, read or deleted, whatever its route (a
    # channel route, the interaction's @original, a followup id).
    message_id: int | None = None

    def __repr__(self) -> str:
        q = "&".join(f"{k}={v}" for k, v in self.query.items())
        return f"<{self.method} {self.path}{'?' + q if q else ''} -> {self.status}>"


@dataclass(eq=False)
class Interaction:
    """An interaction the fake injected, and what the bot answered."""

    id: int
    token: str
    type: int
    user: User
    channel_id: int
    guild_id: int | None
    created_at: float  # fake clock
    data: dict
    payload: dict = field(default_factory=dict, repr=False)
    message_id: int | None = None  # component interactions: the message clicked
    parent: Interaction | None = field(default=None, repr=False)  # modal submit: the opener
    responded: bool = False
    response_type: int | None = None
    ack_time: float | None = None
    original_message_id: int | None = None
    callback: dict | None = None  # the callback body the bot sent
    modal: dict | None = None  # type 9 data
    choices: list | None = None  # type 8 choices
    _fake: FakeDiscord | None = field(default=None, repr=False)

    async def wait_response(self, timeout: float = 5) -> dict:
        """Wait for the bot's callback (``POST /interactions/{id}/{token}/callback``)."""
        if not self.responded:
            assert self._fake is not None
            try:
                await self._fake.wait_for(lambda: self.responded, timeout=timeout)
            except AssertionError as exc:
                raise AssertionError(
                    f"the bot did not acknowledge interaction {self.id} "
                    f"(type {self.type}, data={self.data}) within {timeout}s\n{exc}"
                ) from None
        assert self.callback is not None
        return self.callback

    def response_message(self) -> Message | None:
        if self._fake is None or self.original_message_id is None:
            return None
        return self._fake.messages.get(self.original_message_id)

    def followups(self) -> list[Message]:
        """Messages created for this interaction other than the original response."""
        assert self._fake is not None
        return [m for m in self._fake.messages.values()
                if m.interaction_id == self.id and m.id != self.original_message_id]
