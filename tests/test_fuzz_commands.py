"""Fuzz test (issue 12): Hypothesis values for every slash-command option and every button,
through the fake Discord (real Gateway + REST) into the real, running bot with all its cogs,
a fake ComfyUI, a fake Vast.ai and a real SSH server.

The commands and their options are read from what the bot synced to the fake Discord (names,
types, choices, min/max, max_length), so a new command or option is fuzzed without editing
this file. After every example (a handful of interactions run together) it checks:

* no unhandled exception: no log record at ERROR or above, and no reply saying
  ``core.errors.GENERIC_FAILURE`` (it means an unexpected exception);
* every interaction acknowledged, and Discord refused none of the bot's requests (the fake
  enforces the 3 s deadline and Discord's limits with 400/50035, 10062 ...);
* no shell or path escape: values carry ``$(touch CANARY)``, ``; touch CANARY``, backticks,
  ``../../CANARY``, NUL bytes and newlines, and no file named like the canary appears;
* no secret (the Vast API key, the Discord token, the SSH private key, a token planted in a
  model URL) in anything the bot sent to Discord, any log record or any audit row.

The bot and the fakes run on an event loop in a background thread for the whole test; each
Hypothesis example is driven from the synchronous test with ``run_coroutine_threadsafe``.
``FUZZ_CASES`` (environment) sets how many interactions to send (default 10,000); the test
prints the count and the time taken. Derandomized, so CI runs the same cases every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from sqlalchemy import select

from core.db.models import AuditLog
from core.errors import GENERIC_FAILURE
from tests.conftest import MODELS, BotEnv, bot_settings, start_bot
from tests.fakecomfy import FakeComfy
from tests.fakediscord import FakeDiscord
from tests.fakediscord.models import MANAGE_GUILD, Interaction, Message, iter_components
from tests.fakevast import FakeVast
from tests.fakevast.server import make_offer
from tests.sshserver import AsyncSSHTestServer

# Read at import: the autouse _isolated_env fixture clears COMFYVAST_* variables.
FUZZ_CASES = int(os.environ.get("FUZZ_CASES", "10000"))
FUZZ_CASES_TOGETHER = int(os.environ.get("FUZZ_CASES_TOGETHER", "500"))
BATCH = 10  # interactions per Hypothesis example, sent together

DISCORD_TOKEN = "fuzzDiscordTok3n.Xq7Zr9Lk2Wm4Np6Vb8Jc"
VAST_KEY = "fuzzvastkey5e3c1d9b7a6f4e2c0b8a7d5f3e1c9b"
MODEL_TOKEN = "hfFuzzModelTok9Ye2Wq4Rt6Uo8Pa"
CANARY_NAME = "FUZZCANARY"


# ----------------------------------------------------------------------------- the world


class LoopThread:
    """An event loop in a daemon thread; ``run(coro)`` waits for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        # Cancel what is left (discord.py's view timeouts) as asyncio.run does, so that no
        # pending task of this loop is destroyed later, inside another test's checks.
        with contextlib.suppress(Exception):
            self.run(_cancel_all(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _cancel_all() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Recorder(logging.Handler):
    """Every log record, kept for the checks (formatted at once: args may change later)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[tuple[int, str, str]] = []
        self._formatter = logging.Formatter("%(name)s %(levelname)s: %(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self._formatter.format(record)
        except Exception as exc:  # a record that cannot be formatted is a finding too
            text = f"{record.name} UNFORMATTABLE {record.msg!r}: {exc!r}"
            record.levelno = logging.ERROR
        self.lines.append((record.levelno, record.name, text))


@dataclass
class World:
    fake: FakeDiscord
    env: BotEnv
    comfy: FakeComfy
    vast: FakeVast
    ssh: AsyncSSHTestServer
    canary_dir: Path
    root: Path
    secrets: list[str]
    servers: list[str] = field(default_factory=list)
    interactions: int = 0
    refused_by_fake: int = 0
    checked_requests: int = 0
    checked_logs: int = 0
    checked_audit: int = 0
    failures: list[str] = field(default_factory=list)
    recorder: Recorder = field(default_factory=Recorder)
    forged_messages: set[int] = field(default_factory=set)
    box_id: int = 0
    commands_run: set[str] = field(default_factory=set)


async def build_world(tmp_path: Path) -> World:
    fake = FakeDiscord(token=DISCORD_TOKEN)
    await fake.start()
    fake.guild = fake.add_guild()
    admin_role = fake.add_role(fake.guild.id, "Admin", permissions=MANAGE_GUILD)
    fake.admin = fake.add_user("admin", guild_id=fake.guild.id, roles=[admin_role])
    fake.member = fake.add_user("member", guild_id=fake.guild.id)
    comfy = FakeComfy(models=MODELS, step_delay=0.0, output_size=(64, 64))
    await comfy.start()
    vast = FakeVast(
        api_key=VAST_KEY,
        offers=[make_offer(101, "RTX 4090", dph_base=0.40, public_ipaddr="127.0.0.1"),
                make_offer(201, "RTX 3090", dph_base=0.20, public_ipaddr="127.0.0.1")],
        clock=time.time, provision_seconds=0.05, boot_seconds=0.1, restart_seconds=0.1,
    )
    await vast.start()
    settings_ = bot_settings(
        tmp_path, fake,
        vast={"api_key": VAST_KEY, "base_url": vast.base_url, "request_timeout": 5},
    )
    env = await start_bot(fake, settings_)
    env.services.server_ops.heartbeat = None  # the fake instances have no SSH behind them
    ssh = AsyncSSHTestServer(env.services.remote.key.public_openssh)
    await ssh.start()
    canary_dir = tmp_path / "canary"
    canary_dir.mkdir()
    key_path = env.services.remote.key.path
    body = [line for line in Path(key_path).read_text().splitlines()
            if line and not line.startswith("-----")]
    secrets = [DISCORD_TOKEN, VAST_KEY, MODEL_TOKEN, "".join(body)] + [
        line for line in body if len(line) >= 40]
    world = World(fake, env, comfy, vast, ssh, canary_dir, tmp_path, secrets)

    # The servers a command can name: a direct ComfyUI and an SSH host (its ComfyUI port is
    # the fake ComfyUI's, reached through the SSH tunnel).
    admin = fake.admin
    for name, sub, options in (
        ("gpu-1", "add-direct", {"name": "gpu-1", "url": comfy.url}),
        ("box", "add-ssh", {"name": "box", "host": ssh.host, "port": ssh.port,
                            "user": ssh.username, "comfy_port": comfy.port}),
    ):
        itx = await env.slash("server", options, user=admin, subcommand=sub)
        reply = await fake.wait_for(lambda itx=itx: final_answer(itx), timeout=30)
        assert "Added server" in reply.content, reply.content
        world.servers.append(name)
    world.box_id = (await env.services.servers.get("box")).id
    return world


async def close_world(world: World) -> None:
    await world.env.stop()
    await world.ssh.close()
    await world.vast.stop()
    await world.comfy.stop()
    await world.fake.stop()


def final_answer(itx: Interaction) -> Message | None:
    """The bot's last word on an interaction: a followup, or the (no longer loading)
    original response; None while it is still thinking."""
    followups = itx.followups()
    if followups:
        return followups[-1]
    message = itx.response_message()
    if message is not None and not message.loading:
        return message
    return None


# ----------------------------------------------------------------------------- values


def hostile_strings(canary: Path) -> list[str]:
    target = canary / CANARY_NAME
    return [
        f"$(touch {target})",
        f"; touch {target}",
        f"`touch {target}`",
        f"x' ; touch {target}; echo '",
        f'x" && touch {target} && echo "',
        f"|| touch {target}",
        f"\ntouch {target}\n",
        f"a\x00$(touch {target})",
        f"../../{CANARY_NAME}",
        f"../../../../../../{canary}/{CANARY_NAME}",
        f"{canary}/{CANARY_NAME}",
        f"..%2f..%2f{CANARY_NAME}",
        f"$'\\x2e\\x2e/{CANARY_NAME}'",
        f"{{{{touch {target}}}}}",
        "-rf", "--help", "*", "~", ".", "..", "/", "#1", "#0", "#99999999999999999999",
        "²", "٣", "9" * 30, "gpu-1", "box", "GPU-1", " gpu-1 ", "default", "fast",
        "sd15.safetensors", "detail.safetensors", "4x-ultra.pth", "checkpoints",
        "RTX 4090", "RTX 3090", "{\"1\": {}}", "{}", "[]", "null", "%s%s%n", "{0}",
        "\u202e\u0000\u200b", "é" * 10, "🙂" * 5,
    ]


def hostile_urls(canary: Path) -> list[str]:
    tok = MODEL_TOKEN
    return [
        f"https://huggingface.co/o/r/resolve/main/m.safetensors?token={tok}",
        f"https://civitai.com/api/download/models/1?token={tok}&type=Model",
        f"https://user:{tok}@127.0.0.1:9/m.safetensors",
        f"http://127.0.0.1:9/$(touch {canary}/{CANARY_NAME}).safetensors",
        f"https://127.0.0.1:9/a;touch%20{CANARY_NAME}?x=`id`&token={tok}",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:9/x.safetensors",
        "file:///etc/passwd",
        "ftp://127.0.0.1/x",
        "http://127.0.0.1:1",
        "https://example.invalid/model.safetensors",
        "javascript:alert(1)",
        "http://0:9",
        "http://[fe80::1]:9",
        "https://x" + "a" * 300 + ".invalid/",
    ]


# Discord never sends these in a string option: it strips surrogates (they are not valid
# UTF-8 in JSON). Everything else, NUL and control characters included, may arrive.
TEXT_ALPHABET = st.characters(exclude_categories=("Cs",))


def string_values(opt: dict[str, Any], world: World) -> st.SearchStrategy[str]:
    lo = int(opt.get("min_length", 0))
    hi = int(opt.get("max_length", 6000))
    name = opt["name"]
    specials = hostile_strings(world.canary_dir) + world.servers
    if name == "url":
        specials = specials + hostile_urls(world.canary_dir) + [world.comfy.url]
    fits = [s for s in specials if lo <= len(s) <= hi]
    free = st.text(TEXT_ALPHABET, min_size=lo, max_size=min(hi, 80))
    edge = st.builds(lambda ch, n: (ch * n)[:hi], st.sampled_from("a9-_ /.\x00é🙂"),
                     st.integers(max(lo, 1), max(hi, 1)))
    options = [free, edge.filter(lambda s: len(s) >= lo)]
    if fits:
        options.insert(0, st.sampled_from(fits))
    return st.one_of(*options)


def option_value(opt: dict[str, Any], world: World) -> st.SearchStrategy[Any]:
    otype = opt["type"]
    if opt.get("choices"):
        return st.sampled_from([c["value"] for c in opt["choices"]])
    if otype == 3:
        return string_values(opt, world)
    if otype == 4:
        lo = opt.get("min_value", -(2**53))
        hi = opt.get("max_value", 2**53)
        return st.one_of(st.sampled_from([int(lo), int(hi)]), st.integers(int(lo), int(hi)),
                         st.integers(max(int(lo), 0), min(int(hi), 100)))
    if otype == 10:
        lo = opt.get("min_value")
        hi = opt.get("max_value")
        return st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    if otype == 5:
        return st.booleans()
    if otype == 11:
        return attachment_values(world)
    fake = world.fake
    if otype == 6:
        return st.sampled_from([fake.admin.id, fake.member.id])
    if otype == 7:
        return st.sampled_from(fake.guild.channel_ids)
    if otype == 8:
        return st.sampled_from(sorted(fake.guild.roles))
    if otype == 9:
        return st.sampled_from([fake.admin.id, fake.member.id, *sorted(fake.guild.roles)])
    raise AssertionError(f"option type {otype} of {opt['name']!r} is not fuzzed yet")


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buffer, "PNG")
    return buffer.getvalue()


PNG_SMALL = _png((64, 64))


def attachment_values(world: World) -> st.SearchStrategy[tuple[str, bytes, str]]:
    names = st.one_of(
        st.sampled_from(["photo.png", "a.json", f"../../{CANARY_NAME}.png",
                         f"$(touch {world.canary_dir}/{CANARY_NAME}).png", "x\ny.png"]),
        st.text(TEXT_ALPHABET, min_size=1, max_size=40),
    )
    blobs = st.one_of(
        st.just(PNG_SMALL),
        st.binary(max_size=64),
        st.just(b'{"1": {"class_type": "KSampler", "inputs": {}}}'),
        st.just(b"[" * 5000 + b"]" * 5000),
        st.just(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),
    )
    ctypes = st.sampled_from(["image/png", "application/json", "text/plain",
                              "application/octet-stream"])
    return st.tuples(names, blobs, ctypes)


# ----------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Leaf:
    """One runnable command: /name [group] [subcommand] with its option schema."""

    name: str
    group: str | None
    sub: str | None
    options: tuple[dict[str, Any], ...]
    admin_only: bool

    def __repr__(self) -> str:
        return f"Leaf(/{self.label})"

    @property
    def label(self) -> str:
        return " ".join(p for p in (self.name, self.group, self.sub) if p)


def command_leaves(fake: FakeDiscord) -> list[Leaf]:
    leaves: list[Leaf] = []
    for name, cmd in sorted(fake.commands[None].items()):
        if cmd.get("type", 1) != 1:
            continue
        admin = cmd.get("default_member_permissions") is not None
        schema = cmd.get("options") or []
        if not any(o["type"] in (1, 2) for o in schema):
            leaves.append(Leaf(name, None, None, tuple(schema), admin))
            continue
        for opt in schema:
            if opt["type"] == 1:
                leaves.append(Leaf(name, None, opt["name"], tuple(opt.get("options") or []),
                                   admin))
            elif opt["type"] == 2:
                for sub in opt.get("options") or []:
                    leaves.append(Leaf(name, opt["name"], sub["name"],
                                       tuple(sub.get("options") or []), admin))
    return leaves


@dataclass
class Action:
    kind: str  # "slash", "autocomplete", "click", "forged", "outside"
    leaf: Leaf | None = None
    options: dict[str, Any] = field(default_factory=dict)
    attachments: dict[str, tuple[str, bytes, str]] = field(default_factory=dict)
    focused: str | None = None
    user: str = "admin"
    custom_id: str = ""
    pick: int = 0

    def __repr__(self) -> str:
        where = self.leaf.label if self.leaf else self.custom_id
        opts = {k: (v if not isinstance(v, tuple) else ("<file>", v[0]))
                for k, v in {**self.options, **self.attachments}.items()}
        return f"{self.kind}({where!r}, user={self.user}, {opts!r}, focused={self.focused})"


@st.composite
def slash_action(draw: st.DrawFn, leaves: list[Leaf], world: World) -> Action:
    leaf = draw(st.sampled_from(leaves))
    user = draw(st.sampled_from(["admin", "admin", "member"]))
    options: dict[str, Any] = {}
    attachments: dict[str, tuple[str, bytes, str]] = {}
    for opt in leaf.options:
        if not opt.get("required") and not draw(st.booleans()):
            continue
        value = draw(option_value(opt, world))
        if opt["type"] == 11:
            attachments[opt["name"]] = value
            options[opt["name"]] = value[0]
        else:
            options[opt["name"]] = value
    auto = [o["name"] for o in leaf.options if o.get("autocomplete")]
    if auto and draw(st.integers(0, 3)) == 0:
        focused = draw(st.sampled_from(auto))
        options = {k: v for k, v in options.items() if k not in attachments}
        options[focused] = draw(st.one_of(st.just(""), string_values(
            {"name": focused, "max_length": 100}, world)))
        return Action("autocomplete", leaf, options, {}, focused, user)
    return Action("slash", leaf, options, attachments, None, user)


JOB_ID_TEXT = st.one_of(st.integers(0, 50).map(str), st.just("9" * 30),
                        st.just(str(2**31)), st.just(str(2**63)), st.just("0" * 40))
FORGED = st.one_of(
    st.builds("cv:cancel:{}".format, JOB_ID_TEXT),
    st.builds("cv:reroll:{}".format, JOB_ID_TEXT),
    st.builds("cv:vary:{}".format, JOB_ID_TEXT),
    st.builds("cv:upscale:{}".format, JOB_ID_TEXT),
    st.builds("cv:keepalive:{}".format, JOB_ID_TEXT),
    st.builds("cv:offer:{}:{}".format, JOB_ID_TEXT, st.integers(0, 9)),
    st.text(st.characters(codec="ascii"), min_size=1, max_size=100),
)


def action_strategy(leaves: list[Leaf], world: World) -> st.SearchStrategy[Action]:
    users = st.sampled_from(["admin", "member"])
    click = st.builds(lambda p, u: Action("click", user=u, pick=p), st.integers(0, 10**6),
                      users)
    forged = st.builds(lambda c, p, u: Action("forged", custom_id=c, user=u, pick=p),
                       FORGED, st.integers(0, 10**6), users)
    outside = st.builds(lambda a: Action("outside", a.leaf, {
        k: v for k, v in a.options.items() if k not in a.attachments}, user="admin"),
                        slash_action(leaves, world))
    return st.one_of(
        slash_action(leaves, world), slash_action(leaves, world), slash_action(leaves, world),
        click, forged, outside,
    )


# ----------------------------------------------------------------------------- running


def user_of(world: World, name: str) -> Any:
    return world.fake.admin if name == "admin" else world.fake.member


RECENT_MESSAGES = 200
CONFIRM_LABELS = ("Confirm", "Rent it", "Start it", "Destroy", "Reset", "Delete")


def clickable(world: World, user: Any) -> list[tuple[int, str]]:
    """(message id, custom id) of the enabled buttons on the bot's live messages that
    ``user`` can see (an ephemeral message only its member). Confirm buttons are left to
    the flows that answer them (a rental is never confirmed here)."""
    out = []
    # The latest messages only: scanning every message of a long run costs more than the
    # interaction itself (older buttons were pressed earlier in the run, or are alike).
    for msg in list(world.fake.messages.values())[-RECENT_MESSAGES:]:
        if msg.deleted or msg.id in world.forged_messages:
            continue
        if msg.ephemeral:
            owner = world.fake.interactions.get(msg.interaction_id or 0)
            if owner is None or owner.user.id != user.id:
                continue
        components = list(iter_components(msg.components))
        if any(c.get("label") in CONFIRM_LABELS for c in components):
            continue  # a confirmation prompt: answered (Cancel) by the flow that asked
        for comp in components:
            cid = comp.get("custom_id")
            if cid and comp.get("type") == 2 and not comp.get("disabled") and (
                    comp.get("style") != 5):
                out.append((msg.id, cid))
    return out


def break_constraint(leaf: Leaf, options: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """The options with one value just outside its synced constraint, or None."""
    for opt in leaf.options:
        name = opt["name"]
        if "max_length" in opt:
            return {**options, name: "x" * (int(opt["max_length"]) + 1)}, "max_length"
        if opt.get("choices") and opt["type"] == 3:
            return {**options, name: "not-a-choice"}, "choices"
        if opt["type"] in (4, 10) and opt.get("max_value") is not None:
            return {**options, name: opt["max_value"] + 1}, "max_value"
        if opt["type"] in (4, 10) and opt.get("min_value") is not None:
            return {**options, name: opt["min_value"] - 1}, "min_value"
    return None


async def send(world: World, action: Action) -> Interaction | None:
    fake = world.fake
    user = user_of(world, action.user)
    if action.kind in ("slash", "outside", "autocomplete"):
        leaf = action.leaf
        assert leaf is not None
        kw: dict[str, Any] = {"subcommand": leaf.sub, "group": leaf.group}
        if action.kind == "outside":
            broken = break_constraint(leaf, action.options)
            if broken is None:
                return None
            options, rule = broken
            # Discord's client refuses a value outside the synced constraints; the fake
            # must too, or the in-range values above test nothing.
            try:
                await fake.slash(leaf.name, options, user=user, guild_id=fake.guild.id,
                                 force=True, **kw)
            except AssertionError:
                world.refused_by_fake += 1
                return None
            world.failures.append(f"the fake accepted /{leaf.label} outside {rule}: {options}")
            return None
        if action.kind == "autocomplete":
            itx_choices = await fake.autocomplete(
                leaf.name, action.options, action.focused or "", user=user,
                guild_id=fake.guild.id, timeout=15, **kw)
            assert isinstance(itx_choices, list)
            return None
        world.commands_run.add(leaf.label)
        options = action.options
        if leaf.label == "setup run" and str(options.get("server", "")).strip().lower() in (
                "box", f"#{world.box_id}"):
            # The SSH "box" is this machine: a real setup run would apt-get, clone and pip
            # install ComfyUI here. Its options (server, profile) are names, validated
            # before anything runs; the run itself is tested in tests/test_setup_e2e.py.
            options = {**options, "server": "gpu-1"}
        return await fake.slash(leaf.name, options, user=user, guild_id=fake.guild.id,
                                attachments=action.attachments or None,
                                force=leaf.admin_only and action.user != "admin", **kw)
    if action.kind == "click":
        targets = clickable(world, user)
        if not targets:
            return None
        message_id, custom_id = targets[action.pick % len(targets)]
        return await fake.click(message_id, custom_id, user=user)
    # forged: a button whose custom id matches one of the bot's DynamicItem templates (or
    # nothing) with values the bot never sent, on a message "the bot posted before a
    # restart or a database reset": discord.py only dispatches a custom id that is on the
    # clicked message, and Discord only sends what is on it.
    channel = fake.channels[fake.guild.channel_id]
    old = fake._create_message(channel, {"content": "an old message", "components": [
        {"type": 1, "components": [{"type": 2, "style": 2, "label": "Old",
                                    "custom_id": action.custom_id}]}]}, {})
    world.forged_messages.add(old.id)
    return await fake.click(old.id, action.custom_id, user=user)


async def settle(world: World, itx: Interaction, action: Action) -> None:
    """Wait for the bot's final answer; press Cancel on a confirmation prompt."""
    fake = world.fake
    if action.kind == "forged":
        # An unknown custom id is ignored by discord.py (Discord then shows "interaction
        # failed" to the presser): nothing to wait for unless a template matched.
        if not re.fullmatch(r"cv:(cancel|reroll|vary|upscale|keepalive):[0-9]+",
                            action.custom_id):
            await asyncio.sleep(0)
            return
    await itx.wait_response(timeout=10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        answer = final_answer(itx)
        if answer is not None:
            buttons = {c.get("label"): c["custom_id"] for c in iter_components(answer.components)
                       if c.get("custom_id") and not c.get("disabled")}
            if "Cancel" in buttons and ("Confirm" in buttons or len(buttons) == 2):
                click = await fake.click(answer.id, buttons["Cancel"], user=itx.user)
                await click.wait_response(timeout=20)
                await fake.wait_for(lambda prompt=answer: "Cancelled" in (prompt.content or "")
                                    or len(itx.followups()) > 1 or prompt.deleted, timeout=20)
                await asyncio.sleep(0.01)
                continue
            return
        if itx.type == 3 and itx.response_type in (6, 7):
            return
        await asyncio.sleep(0.005)
    world.failures.append(f"{action!r}: no final answer within 20 s")


# FUZZ_TRACE=<file>: every action and every failure appended there (for debugging a run).
TRACE = os.environ.get("FUZZ_TRACE")


def trace(line: str) -> None:
    assert TRACE is not None
    with open(TRACE, "a") as fh:
        fh.write(line + "\n")


async def run_batch(world: World, actions: list[Action], *, together: bool) -> None:
    """Send the actions one after another (each waits for the previous answer), or all
    at once (``together``) and then wait for every answer."""
    sent: list[tuple[Interaction, Action]] = []
    results: list[Any] = []
    for action in actions:
        if TRACE:
            trace(f"{time.monotonic():.3f} {action!r}")
        itx = await send(world, action)
        world.interactions += 1
        if itx is None:
            continue
        sent.append((itx, action))
        if not together:
            try:
                results.append(await settle(world, itx, action))
            except Exception as exc:
                results.append(exc)
    if together:
        results = await asyncio.gather(*(settle(world, i, a) for i, a in sent),
                                       return_exceptions=True)
    for (itx, action), result in zip(sent, results, strict=True):
        if isinstance(result, BaseException):
            world.failures.append(f"{action!r}: {result!r}")
        else:
            answer = final_answer(itx)
            text = json.dumps([answer.content, answer.embeds]) if answer else ""
            if GENERIC_FAILURE in text:
                world.failures.append(f"{action!r}: answered {GENERIC_FAILURE!r}")
    await check_world(world, actions)


async def check_world(world: World, actions: list[Action]) -> None:
    fake = world.fake
    # Discord refused nothing the bot sent (limits, deadline, unknown message ...).
    new = fake.requests[world.checked_requests:]
    world.checked_requests = len(fake.requests)
    for rec in new:
        if rec.status is not None and rec.status >= 400:
            world.failures.append(f"{actions!r}: Discord refused {rec.method} {rec.path} "
                                  f"({rec.status}): {rec.response}")
        blob = json.dumps(rec.json, default=str) if rec.json is not None else ""
        blob += " ".join(f"{fn} {data[:20000].decode(errors='replace')}"
                         for fn, _ct, data in rec.files.values())
        for secret in world.secrets:
            if secret in blob:
                world.failures.append(f"{actions!r}: a secret reached Discord in {rec!r}")
    # The log: nothing at ERROR, no secret anywhere.
    recorder = world.recorder
    lines = recorder.lines[world.checked_logs:]
    world.checked_logs = len(recorder.lines)
    for level, _name, text in lines:
        if level >= logging.ERROR:
            world.failures.append(f"{actions!r}: logged {text}")
        for secret in world.secrets:
            if secret in text:
                world.failures.append(f"{actions!r}: a secret in the log: {text[:300]}")
    # The audit log: no secret in any row.
    async with world.env.services.sessions() as session:
        rows = (await session.scalars(
            select(AuditLog).where(AuditLog.id > world.checked_audit).order_by(AuditLog.id)
        )).all()
    for row in rows:
        world.checked_audit = row.id
        blob = f"{row.action} {row.resource} {json.dumps(row.details, default=str)}"
        for secret in world.secrets:
            if secret in blob:
                world.failures.append(f"{actions!r}: a secret in audit row {row.id}: {blob}")
    # No shell or path escape.
    if any(CANARY_NAME in p.name for p in world.canary_dir.iterdir()) or (
            world.root / CANARY_NAME).exists() or (world.root.parent / CANARY_NAME).exists():
        world.failures.append(f"{actions!r}: the canary file appeared")


def canaries_anywhere(root: Path) -> list[Path]:
    """Any file named like the canary under the test's directory (data dir, database,
    inputs, logs): a path value that escaped where the bot meant to write it."""
    return list(root.rglob(f"*{CANARY_NAME}*"))


# ----------------------------------------------------------------------------- the test


# A generous timeout: about 90 s on an idle 2-core machine, over 300 s on a loaded one.
@pytest.mark.timeout(600)
def test_fuzz_every_command_and_button(tmp_path: Path) -> None:
    """Interactions one after another (the bot's background work, generations, downloads,
    setup runs, still overlaps them). Found here: a job's Cancel button cancelled its
    runner in the middle of an UPDATE, and SQLite kept that connection's write lock
    (core/db/engine.RollbackOnClose; tests/test_storage.py holds the regression test)."""
    fuzz_the_bot(tmp_path, FUZZ_CASES, together=False)


@pytest.mark.timeout(600)
def test_fuzz_interactions_arriving_together(tmp_path: Path) -> None:
    """Ten interactions at a time, so that commands overlap each other too."""
    fuzz_the_bot(tmp_path, FUZZ_CASES_TOGETHER, together=True)


def fuzz_the_bot(tmp_path: Path, cases: int, *, together: bool) -> None:
    # Earlier tests closed their event loops with discord.py view timeouts still pending;
    # collected later, asyncio logs "Task was destroyed but it is pending!" at ERROR,
    # which the recorder would take for this bot's. Collect that garbage first.
    gc.collect()
    loop = LoopThread()
    recorder = Recorder()
    root_logger = logging.getLogger()
    saved_level = root_logger.level
    root_logger.addHandler(recorder)
    root_logger.setLevel(logging.INFO)
    product_loggers = [logging.getLogger(n) for n in ("bot", "cogs", "core")]
    for lg in product_loggers:
        lg.setLevel(logging.DEBUG)
    world: World | None = None
    started = time.monotonic()
    try:
        world = loop.run(build_world(tmp_path), timeout=120)
        world.recorder = recorder
        leaves = command_leaves(world.fake)
        assert len(leaves) >= 20, [leaf.label for leaf in leaves]
        examples = max(1, cases // BATCH)
        fuzz_started = time.monotonic()

        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), print_blob=False)
        @given(st.lists(action_strategy(leaves, world), min_size=BATCH, max_size=BATCH))
        def fuzz(actions: list[Action]) -> None:
            assert world is not None
            before = len(world.failures)
            loop.run(run_batch(world, actions, together=together), timeout=300)
            new = world.failures[before:]
            if TRACE and new:
                trace("FAILED " + "\n".join(new))
            assert not new, "\n".join(new[:5])

        fuzz()
        elapsed = time.monotonic() - fuzz_started
        escaped = canaries_anywhere(tmp_path)
        assert not escaped, escaped
        mode = "together" if together else "in turn"
        print(f"\nfuzz ({mode}): {world.interactions} interactions "
              f"({examples} examples of {BATCH}) "
              f"over {len(leaves)} commands in {elapsed:.1f} s "
              f"(setup {fuzz_started - started:.1f} s); the fake refused "
              f"{world.refused_by_fake} out-of-constraint values")
        assert world.interactions >= cases
        if cases >= 1000:  # every command was run (a new one is fuzzed without edits here)
            missed = sorted({leaf.label for leaf in leaves} - world.commands_run)
            assert not missed, missed
        assert world.refused_by_fake > 0
    finally:
        if world is not None:
            with contextlib.suppress(Exception):
                loop.run(close_world(world), timeout=60)
        loop.close()
        root_logger.removeHandler(recorder)
        root_logger.setLevel(saved_level)
        for lg in product_loggers:
            lg.setLevel(logging.NOTSET)


@pytest.mark.timeout(120)
def test_the_fuzz_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    """Each check above can fail: a refused reply, an ERROR record, a secret in the log
    and the canary file are each reported."""
    loop = LoopThread()
    recorder = Recorder()
    logging.getLogger().addHandler(recorder)
    world: World | None = None
    try:
        world = loop.run(build_world(tmp_path), timeout=120)
        world.recorder = recorder
        about = next(leaf for leaf in command_leaves(world.fake) if leaf.label == "about")

        async def scenario(world: World) -> list[str]:
            await check_world(world, [])
            assert world.failures == [], world.failures
            world.fake.fail_once("POST", "/callback", 400, 50035, "Invalid Form Body")
            with contextlib.suppress(Exception):
                await run_batch(world, [Action("slash", about)], together=False)
            logging.getLogger("core.fuzzcheck").error("boom")
            logging.getLogger("core.fuzzcheck").warning("key=%s", VAST_KEY)
            (world.canary_dir / CANARY_NAME).touch()
            await check_world(world, [])
            return world.failures

        failures = "\n".join(loop.run(scenario(world), timeout=60))
        assert "Discord refused POST" in failures, failures
        assert "logged core.fuzzcheck ERROR: boom" in failures, failures
        assert "a secret in the log" in failures, failures
        assert "the canary file appeared" in failures, failures
    finally:
        if world is not None:
            with contextlib.suppress(Exception):
                loop.run(close_world(world), timeout=60)
        loop.close()
        logging.getLogger().removeHandler(recorder)
