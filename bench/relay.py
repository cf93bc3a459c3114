"""Relay benchmark (not a test): many concurrent generations through the real bot.

This process hosts the fake Discord (tests/fakediscord, which enforces Discord's per-route
rate-limit buckets and global limit, as real Discord does); the N fake ComfyUI servers
(tests/fakecomfy) run in ``--fake-procs`` processes of their own (``python -m bench.fakes``),
so neither fake's event loop delays the other's timestamps. All on 127.0.0.1. Two relays
run the same workload against them, taking turns for ``--rounds`` rounds (the machine's
noise moves both alike within a round):

1. the bare client (``python -m bench.bare``): WS -> /history -> /view -> upload;
2. the real bot (``python -m bot`` with a generated config.toml and a temp SQLite DB),
   driven like users would: ``/server add-direct`` for each server (once), then
   ``/generate`` from several users in several channels. The bot process stays up
   across rounds (idle while the bare client runs).

A warm-up of ``--warmup`` jobs per relay (not counted) comes first.

Sampling is paused on every server while jobs are submitted, so all of them are in flight
at once when it resumes. Measured:

* bot CPU (utime+stime from /proc/<pid>/stat) while the jobs run, per progress event the
  servers sent (``progress`` messages + binary previews) and as a % of one core;
* bot peak RSS (VmHWM from /proc/<pid>/status);
* edits per status message per second: the most PATCHes of one message in any 1-s window;
* delivery latency: when the fake Discord received the result upload minus when the fake
  ComfyUI sent ``execution_success`` for that prompt, p50/p99 for both relays and the
  ratio bot/bare (both wait for Discord's buckets: the bare client as discord.py does);
* the 429s the fake Discord answered each relay, against 1 % of its requests.

Each round prints a line; the table gives medians over the rounds (peak RSS: the
highest), and the targets are judged on those medians, ratios taken per round.

Run from the repository root::

    python -m bench.relay            # 500 jobs, 20 servers, 3 rounds
    python -m bench.relay --quick    # 40 jobs, 4 servers, 1 round
    python -m bench.relay --scale    # 2,000 jobs, 100 servers, 40 channels, 2 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.fakes import ComfyFleet
from tests.fakediscord import MANAGE_GUILD, FakeDiscord

ROOT = Path(__file__).resolve().parent.parent
MODEL = "sd15.safetensors"
PROMPTS = [
    "a lighthouse at dusk, oil painting",
    "a red fox in fresh snow, telephoto",
    "isometric cyberpunk alley, neon, rain",
    "a bowl of ramen, studio lighting",
    "ancient library with floating books",
]
CLK_TCK = os.sysconf("SC_CLK_TCK")
MESSAGES_PATH = re.compile(r"^/channels/(\d+)/messages$")
FOOTER_JOB = re.compile(r"^Job #(\d+) ")
BARE_PREFIX = re.compile(r"(bare/r\d+-job-\d+)")
SHOWN_STEP = re.compile(r"` (\d+)/(\d+) \(")  # the progress line of a status embed
FINAL_TITLES = ("Done ·", "Failed ·", "Cancelled ·")
STALENESS_SAMPLE = 0.1  # seconds between staleness samples while a job runs
STORM_SHARE = 0.01  # "no 429 storm": fewer 429s than 1 % of a relay's requests


# --------------------------------------------------------------------------- /proc


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------- stats


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def staleness_samples(progress: list[tuple[float, int]], shown: list[tuple[float, int]],
                      end: float) -> list[float]:
    """How stale a status message was, sampled every STALENESS_SAMPLE s from the job's
    first progress event to ``end``: at each instant, the age of the oldest progress event
    the message did not show yet (0 when it showed the newest step). ``progress`` and
    ``shown`` are (time, step) pairs in time order."""
    if not progress:
        return []
    samples: list[float] = []
    t, i, j, current = progress[0][0], 0, 0, 0
    while t <= end:
        while i < len(progress) and progress[i][0] <= t:
            i += 1  # progress[:i] had been sent by t
        while j < len(shown) and shown[j][0] <= t:
            current = max(current, shown[j][1])
            j += 1
        unseen = next((at for at, step in progress[:i] if step > current), None)
        samples.append(0.0 if unseen is None else t - unseen)
        t += STALENESS_SAMPLE
    return samples


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most events inside any half-open window [t, t + window)."""
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


# --------------------------------------------------------------------------- the rig


@dataclass
class Phase:
    name: str
    jobs: int = 0
    delivered: int = 0
    latencies: list[float] = field(default_factory=list)
    events: int = 0
    cpu_submit: float = 0.0
    cpu_run: float = 0.0
    run_wall: float = 0.0
    peak_rss_kb: int = 0
    max_edits_per_s: int = 0
    edit_gaps: list[float] = field(default_factory=list)
    edits: int = 0
    finals: int = 0
    http_errors: int = 0
    notes: list[str] = field(default_factory=list)
    per_server: list[int] = field(default_factory=list)
    comfy_wall: float = 0.0  # resume -> last execution_success of the phase
    # What a member sees, per job (seconds): interaction -> acknowledgement, -> first
    # status message, -> result; result -> the status message's final state; and samples
    # of how stale the status message was while the job ran.
    ack: list[float] = field(default_factory=list)
    first_status: list[float] = field(default_factory=list)
    to_result: list[float] = field(default_factory=list)
    final_lag: list[float] = field(default_factory=list)
    staleness: list[float] = field(default_factory=list)
    worst_job_staleness: float = 0.0  # the highest p95 staleness of any one job
    requests: int = 0  # API requests the relay made to the fake Discord in the phase
    answered_429: int = 0  # of which the fake answered 429 (buckets / global limit)


class Servers:
    """What the fake ComfyUIs recorded in a phase (bench.fakes ``snapshot``)."""

    def __init__(self, snaps: list[dict[str, Any]]) -> None:
        self.snaps = snaps
        self.by_prefix: dict[str, tuple[str, float | None]] = {}
        for snap in snaps:
            for prompt_id, (prefix, success_at) in snap["prompts"].items():
                if prefix is not None:
                    self.by_prefix[prefix] = (prompt_id, success_at)
        self.progress: dict[str, list[list[float]]] = {}
        for snap in snaps:
            self.progress.update(snap["progress"])

    @property
    def events(self) -> int:
        """Progress events and previews the servers sent."""
        return sum(snap["events"] for snap in self.snaps)

    def success_of(self, prefix: str | None) -> float | None:
        found = self.by_prefix.get(prefix) if prefix else None
        return found[1] if found else None

    def progress_of(self, prefix: str) -> tuple[list[tuple[float, int]], float | None]:
        """(time, step) progress events of the prompt with this SaveImage prefix, and when
        its execution_success was sent."""
        found = self.by_prefix.get(prefix)
        if found is None:
            return [], None
        return [(at, int(v)) for at, v in self.progress.get(found[0], [])], found[1]

    def spread(self, phase: Phase, started: float) -> None:
        """Jobs per server, and when the servers finished the phase's last prompt."""
        last = started
        for snap in self.snaps:
            phase.per_server.append(len(snap["prompts"]))
            last = max([last] + [at for _, at in snap["prompts"].values() if at is not None])
        phase.comfy_wall = last - started


class Rig:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.discord = FakeDiscord(rate_limits=not args.no_discord_limits)
        if args.no_global_limit:
            self.discord.ratelimits.global_limit = None
        self.fleet = ComfyFleet(args.servers, args.step_delay, args.fake_procs, child_env(),
                                str(ROOT))
        self.bot: asyncio.subprocess.Process | None = None
        self.injected: dict[int, float] = {}  # interaction id -> time.monotonic() sent
        self.bare: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        fake = self.discord
        await fake.start()
        self.guild = fake.add_guild("Bench Guild")
        admin_role = fake.add_role(self.guild.id, "Admin", permissions=MANAGE_GUILD)
        self.admin = fake.add_user("admin", guild_id=self.guild.id, roles=[admin_role])
        self.channels = [self.guild.channel_id] + [
            fake.add_channel(self.guild.id, f"studio-{i}") for i in range(1, self.args.channels)
        ]
        self.users = [fake.add_user(f"artist{i}", guild_id=self.guild.id)
                      for i in range(self.args.users)]
        await self.fleet.start()
        self.urls = self.fleet.urls

    async def stop(self) -> None:
        for proc in (self.bare, self.bot):
            await stop_process(proc)
        with contextlib.suppress(Exception):
            await self.fleet.stop()
        with contextlib.suppress(Exception):
            await self.discord.stop()

    # -- shared helpers ------------------------------------------------------------------

    async def pause(self) -> None:
        await self.fleet.pause()

    async def resume(self) -> None:
        await self.fleet.resume()

    async def marks(self) -> list[list[int]]:
        """Per server: (messages sent, prompts received) so far."""
        return await self.fleet.marks()

    async def servers_since(self, marks: list[list[int]]) -> Servers:
        return Servers(await self.fleet.snapshot(marks))

    def results(self, start: int, end: int | None = None, *, bot: bool) -> list[Any]:
        """Result uploads among requests ``start:end`` that the fake accepted (not the
        429s that were retried): content starts "<@", with files."""
        out = []
        for rec in self.discord.requests[start:end]:
            # A post to the channel, or an edit of a message by any route (the channel's,
            # or the interaction's webhook: the status message becoming the result).
            if (from_bot(rec) == bot and rec.files and rec.status is not None
                    and 200 <= rec.status < 300
                    and ((rec.method == "POST" and MESSAGES_PATH.match(rec.path))
                         or (rec.method == "PATCH" and rec.message_id is not None))):
                payload = rec.json if isinstance(rec.json, dict) else {}
                if str(payload.get("content") or "").startswith("<@"):
                    out.append(rec)
        return out

    @staticmethod
    def latencies(results: list[Any], prefix_of: Any, servers: Servers) -> list[float]:
        values = []
        for rec in results:
            sent = servers.success_of(prefix_of(rec))
            if sent is not None:
                values.append(rec.time - sent)
        return values

    def count_requests(self, phase: Phase, req_mark: int, answered_mark: int) -> None:
        """The relay's own API requests of the phase (by User-Agent: the other relay's
        stragglers are not its), its 429s and errors."""
        recs = [r for r in self.discord.requests[req_mark:] if r.path.startswith("/")
                and not r.path.startswith("/cdn/") and from_bot(r) == (phase.name == "bot")]
        phase.requests = len(recs)
        phase.answered_429 = sum(1 for r in recs if r.status == 429)
        phase.http_errors = sum(1 for r in recs if r.status is not None and r.status >= 400
                                and r.status != 429)
        limited = collections.Counter(
            (self.discord.ratelimits.route_of(r.method, r.path)[0],
             "global" if isinstance(r.response, dict) and r.response.get("global") else "route")
            for r in recs if r.status == 429)
        if limited:
            phase.notes.append("429s by route (global limit / route bucket): " + ", ".join(
                f"{route} {scope} {n}" for (route, scope), n in limited.most_common()))

    async def wait_quiet(self, deadline: float, quiet: float = 3.0, limit: float = 180.0) -> None:
        """Wait until the bot has sent nothing for ``quiet`` s (its last round's final edits
        would otherwise share Discord's global limit with the bare client's uploads)."""
        until = min(deadline, time.monotonic() + limit)
        while time.monotonic() < until:
            last = next((r.time for r in reversed(self.discord.requests) if from_bot(r)), 0.0)
            if time.monotonic() - last >= quiet:
                return
            await asyncio.sleep(0.5)
        print("  the bot was still sending when the bare client started", flush=True)

    async def wait_results(self, start: int, count: int, deadline: float, *,
                           bot: bool) -> list[Any]:
        found: list[Any] = []
        last_new = time.monotonic()
        while True:
            # Only the new requests are scanned: this process hosts the fake Discord.
            end = len(self.discord.requests)
            new = self.results(start, end, bot=bot)
            found += new
            start = end
            now = time.monotonic()
            if new:
                last_new = now
            if len(found) >= count or now > deadline:
                return found
            if found and now - last_new > self.args.stall:
                # A job that failed posts no result: stop waiting for it.
                print(f"  no new result for {self.args.stall:.0f} s: {len(found)} of {count} "
                      "delivered", flush=True)
                return found
            await asyncio.sleep(0.05)

    # -- the bare client -----------------------------------------------------------------

    async def run_bare(self, deadline: float, round_no: int, jobs: int) -> Phase:
        args = self.args
        phase = Phase("bare", jobs=jobs)
        await self.wait_quiet(deadline)
        spec = {
            "servers": self.urls, "api_base": self.discord.api_base,
            "token": self.discord.token, "channels": self.channels,
            "users": [u.id for u in self.users], "jobs": jobs, "steps": args.steps,
            "size": args.size, "model": MODEL, "prompts": PROMPTS, "round": round_no,
            "timeout": max(10.0, deadline - time.monotonic()),
        }
        await self.pause()
        req_mark, answered_mark = len(self.discord.requests), self.discord.answered_429
        prompt_marks = await self.marks()
        self.bare = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.bare", json.dumps(spec), cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, env=child_env(),
        )
        assert self.bare.stdout is not None
        line = await asyncio.wait_for(self.bare.stdout.readline(), deadline - time.monotonic())
        if not line.startswith(b"queued"):
            raise RuntimeError(f"bare client failed to queue: {line!r}")
        marks = [[s, p] for (s, _), (_, p) in zip(await self.marks(), prompt_marks,
                                                   strict=True)]
        started = time.monotonic()
        await self.resume()
        results = await self.wait_results(req_mark, jobs, deadline, bot=False)
        phase.run_wall = (max(r.time for r in results) if results else time.monotonic()) - started
        servers = await self.servers_since(marks)
        phase.events = servers.events
        servers.spread(phase, started)
        line = await asyncio.wait_for(self.bare.stdout.readline(),
                                      max(1.0, deadline - time.monotonic()))
        await self.bare.wait()
        self.bare = None
        report = json.loads(line.decode().removeprefix("result ")) if line.startswith(
            b"result ") else {}
        phase.cpu_submit = report.get("cpu_queue", float("nan"))
        phase.cpu_run = report.get("cpu_run", float("nan"))
        phase.peak_rss_kb = report.get("peak_rss_kb", 0)
        phase.delivered = len(results)

        def prefix_of(rec: Any) -> str | None:
            match = BARE_PREFIX.search(str(rec.json.get("content")))
            return match.group(1) if match else None

        phase.latencies = self.latencies(results, prefix_of, servers)
        self.count_requests(phase, req_mark, answered_mark)
        return phase

    # -- the bot -------------------------------------------------------------------------

    def write_config(self) -> Path:
        fake, data = self.discord, self.workdir / "data"
        config = self.workdir / "config.toml"
        config.write_text(f"""\
data_dir = {json.dumps(str(data))}
log_level = "INFO"

[discord]
token = {json.dumps(fake.token)}
api_base_url = {json.dumps(fake.api_base)}
gateway_url = {json.dumps(fake.gateway_url)}
guild_ready_timeout = 0.05

[comfy]
max_generations = {self.args.jobs + 10}

[database]
url = {json.dumps(f"sqlite+aiosqlite:///{self.workdir}/bench.db")}

[limits]
user_jobs_per_minute = {self.args.jobs + 10}
user_concurrent_jobs = {self.args.jobs + 10}
""")
        return config

    async def start_bot(self, deadline: float) -> None:
        config = self.write_config()
        log = (self.workdir / "bot.log").open("wb")
        # --memory-profile: the same bot under memray or tracemalloc (bench/memhook.py).
        hook: list[str] = []
        if self.args.memory_profile:
            from bench.memhook import memray_command

            out = Path(self.args.memory_profile).resolve()
            hook = (memray_command(out) if self.args.memory_tool == "memray"
                    else ["-m", "bench.memhook", str(out)])
        self.bot = await asyncio.create_subprocess_exec(
            sys.executable, *hook, "-m", "bot", "--config", str(config), cwd=ROOT,
            stdout=log, stderr=asyncio.subprocess.STDOUT, env=child_env(),
        )
        fake = self.discord
        while not ("generate" in fake.commands.get(None, {}) and fake.identifies):
            if self.bot.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the bot did not come up; see {self.workdir}/bot.log")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # READY and GUILD_CREATE processed

    async def slash_all(self, calls: list[tuple[str, dict[str, Any], dict[str, Any]]],
                        rate: float, deadline: float) -> list[Any]:
        """Inject slash commands at ``rate`` per second; wait until each was answered."""
        interactions = []
        started = time.monotonic()
        for i, (name, options, kw) in enumerate(calls):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            itx = await self.discord.slash(name, options, guild_id=self.guild.id, **kw)
            self.injected[itx.id] = time.monotonic()
            interactions.append(itx)
        last_injected = time.monotonic()
        while True:
            interactions_left = [itx for itx in interactions if not answered(itx)]
            if not interactions_left:
                return interactions
            if time.monotonic() > min(deadline, last_injected + self.args.stall):
                # Reported (the run goes on): a command the bot never answered.
                print(f"  {len(interactions_left)} commands not answered "
                      f"{self.args.stall:.0f} s after the last was sent", flush=True)
                return interactions
            await asyncio.sleep(0.1)

    async def prepare_bot(self, deadline: float) -> None:
        """Start the bot and register every server with it."""
        await self.start_bot(deadline)
        adds = [("server", {"name": f"gpu-{i + 1:02d}", "url": url},
                 {"user": self.admin, "subcommand": "add-direct"})
                for i, url in enumerate(self.urls)]
        for itx in await self.slash_all(adds, 20.0, deadline):
            if "Added server" not in answered(itx):
                raise RuntimeError(f"/server add-direct failed: {answered(itx)}")

    async def run_bot(self, deadline: float, round_no: int, jobs: int) -> Phase:
        args = self.args
        phase = Phase("bot", jobs=jobs)
        assert self.bot is not None
        pid = self.bot.pid
        await self.pause()
        req_mark, answered_mark = len(self.discord.requests), self.discord.answered_429
        prompt_marks = await self.marks()
        known = set(self.discord.messages)
        submit_profiler = await self.start_profiler(pid, self.args.profile_submit)
        cpu0, t0 = proc_cpu(pid), time.monotonic()
        gens = [("generate",
                 {"prompt": PROMPTS[n % len(PROMPTS)], "width": args.size, "height": args.size,
                  "steps": args.steps, "seed": 1000 * round_no + n},
                 {"user": self.users[n % len(self.users)],
                  "channel_id": self.channels[n % len(self.channels)]})
                for n in range(jobs)]
        interactions = await self.slash_all(gens, args.inject_rate, deadline)
        # Each /generate's reply is its status message (an embed); a refusal is a sentence.
        refused = [answered(i) for i in interactions if answered(i) != "(embed)"]
        if refused:
            phase.notes.append(f"{len(refused)} /generate refused, e.g. {refused[0]!r}")
        marks = [[s, p] for (s, _), (_, p) in zip(await self.marks(), prompt_marks,
                                                   strict=True)]
        cpu1, t1 = proc_cpu(pid), time.monotonic()
        phase.cpu_submit = cpu1 - cpu0
        await self.stop_profiler(submit_profiler)
        phase.notes.append(f"submitting took {t1 - t0:.1f} s wall")
        profiler = await self.start_profiler(pid, self.args.profile)
        await self.resume()
        results = await self.wait_results(req_mark, jobs - len(refused), deadline, bot=True)
        cpu2 = proc_cpu(pid)
        await self.stop_profiler(profiler)
        end = max(r.time for r in results) if results else time.monotonic()
        phase.run_wall = end - t1
        phase.cpu_run = cpu2 - cpu1
        servers = await self.servers_since(marks)
        phase.events = servers.events
        phase.delivered = len(results)
        servers.spread(phase, t1)

        def prefix_of(rec: Any) -> str | None:
            for embed in rec.json.get("embeds") or []:
                match = FOOTER_JOB.match(str((embed.get("footer") or {}).get("text", "")))
                if match:
                    return f"comfyvast/job-{match.group(1)}"
            return None

        phase.latencies = self.latencies(results, prefix_of, servers)
        # Let the coalesced final edits land (they queue behind the per-channel budget).
        drain_until = min(deadline, time.monotonic() + args.drain)
        phase.finals = self.final_states(known)
        while time.monotonic() < drain_until and phase.finals < phase.delivered:
            await asyncio.sleep(0.25)
            phase.finals = self.final_states(known)
        phase.notes.append(f"final status edits landed {time.monotonic() - end:.1f} s "
                           "after the last result")
        phase.peak_rss_kb = proc_status_kb(pid, "VmHWM")
        self.member_view(phase, interactions, req_mark, results, prefix_of, servers)
        edits: dict[str, list[float]] = {}
        for rec in self.discord.requests[req_mark:]:
            if (rec.method == "PATCH" and rec.message_id is not None and rec.status is not None
                    and rec.status < 300 and from_bot(rec)):
                edits.setdefault(str(rec.message_id), []).append(rec.time)
        phase.edits = sum(len(v) for v in edits.values())
        phase.max_edits_per_s = max((max_in_window(v) for v in edits.values()), default=0)
        phase.edit_gaps = [b - a for v in edits.values() for a, b in zip(v, v[1:], strict=False)]
        self.count_requests(phase, req_mark, answered_mark)
        return phase

    def member_view(self, phase: Phase, interactions: list[Any], req_mark: int,
                    results: list[Any], prefix_of: Any, servers: Servers) -> None:
        """Per job, what its member saw: acknowledgement, first status, result, final state,
        and how stale the status message was while the job ran."""
        for itx in interactions:
            if itx.ack_time is not None:
                phase.ack.append(itx.ack_time - itx.created_at)
        job_of_itx: dict[int, int] = {}
        status_msg: dict[int, int] = {}  # job -> status message id
        status_at: dict[int, float] = {}
        shown: dict[int, list[tuple[float, int]]] = {}  # message id -> (time, step shown)
        done_at: dict[int, float] = {}  # message id -> when its final state landed
        for rec in self.discord.requests[req_mark:]:
            # Whatever the route (a channel post or edit, the interaction's reply or a
            # followup through its webhook): the message it made or edited, and its embed.
            mid = rec.message_id
            if mid is None or rec.status is None or not 200 <= rec.status < 300 \
                    or rec.method not in ("POST", "PATCH"):
                continue  # a 429 the relay retried: its retry is recorded too
            payload = rec.json if isinstance(rec.json, dict) else {}
            embeds = payload.get("embeds") or []
            if not embeds:
                continue
            embed = embeds[0]
            if str(embed.get("title", "")).startswith(FINAL_TITLES):
                done_at.setdefault(mid, rec.time)
                continue
            match = FOOTER_JOB.match(str((embed.get("footer") or {}).get("text", "")))
            if match and int(match.group(1)) not in status_at:
                # The first time a job's status is shown: its status message.
                job = int(match.group(1))
                status_msg[job], status_at[job] = mid, rec.time
                shown[mid] = [(rec.time, 0)]
                message = self.discord.messages.get(mid)
                if message is not None and message.interaction_id is not None:
                    job_of_itx[job] = message.interaction_id
                continue
            text = " ".join(str(f.get("value", "")) for f in embed.get("fields") or [])
            step = SHOWN_STEP.search(text)
            if step:
                shown.setdefault(mid, []).append((rec.time, int(step.group(1))))
        result_at: dict[int, float] = {}
        for rec in results:
            prefix = prefix_of(rec)
            if prefix:
                result_at[int(prefix.rsplit("-", 1)[1])] = rec.time
        for job, itx_id in job_of_itx.items():
            injected = self.injected.get(itx_id)
            if injected is not None and job in status_at:
                phase.first_status.append(status_at[job] - injected)
            if injected is not None and job in result_at:
                phase.to_result.append(result_at[job] - injected)
            mid = status_msg.get(job)
            if mid is None or job not in result_at:
                continue
            # A final state that never landed counts as the whole drain.
            phase.final_lag.append(done_at.get(mid, time.monotonic()) - result_at[job])
            progress, success_at = servers.progress_of(f"comfyvast/job-{job}")
            if not progress:
                continue
            samples = staleness_samples(progress, shown.get(mid, []),
                                        success_at if success_at is not None else result_at[job])
            phase.staleness += samples
            if samples:
                phase.worst_job_staleness = max(phase.worst_job_staleness,
                                                percentile(samples, 95))

    @staticmethod
    async def stop_profiler(profiler: asyncio.subprocess.Process | None) -> None:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            await asyncio.wait_for(profiler.wait(), 30)

    async def start_profiler(self, pid: int, output: str | None
                             ) -> asyncio.subprocess.Process | None:
        if not output:
            return None
        py_spy = os.environ.get("PY_SPY") or shutil.which("py-spy") or "py-spy"
        return await asyncio.create_subprocess_exec(
            py_spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
            "--threads", "--output", output, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    def final_states(self, known: set[int]) -> int:
        """Status messages of this round (not in ``known``) showing their final state."""
        done = 0
        for mid, msg in self.discord.messages.items():
            if mid in known:
                continue
            if msg.embeds and str(msg.embeds[0].get("title", "")).startswith("Done ·"):
                done += 1
        return done


class Answers:
    """The bot's latest answer to each interaction. Followups are indexed as the fake
    Discord creates them (``Interaction.followups()`` scans every message: with thousands of
    interactions polled, that scan was most of this process's CPU, which the fake shares)."""

    def __init__(self) -> None:
        self.fake: FakeDiscord | None = None
        self.scanned = 0
        self.followup: dict[int, Any] = {}

    def __call__(self, itx: Any) -> str:
        fake = itx._fake  # noqa: SLF001 - the fake the interaction came from
        if fake is not self.fake:
            self.fake, self.scanned, self.followup = fake, 0, {}
        if len(fake.messages) > self.scanned:
            for message in list(fake.messages.values())[self.scanned:]:
                iid = message.interaction_id
                if iid is not None and iid in fake.interactions and (
                        message.id != fake.interactions[iid].original_message_id):
                    self.followup[iid] = message
            self.scanned = len(fake.messages)
        followup = self.followup.get(itx.id)
        if followup is not None:
            return followup.content or "(embed)"
        return response_text(itx)


def response_text(itx: Any) -> str:
    """The text of the interaction's original response ("" while none or loading)."""
    message = itx.response_message()
    if message is not None and not message.loading and (message.content or message.embeds):
        return message.content or "(embed)"
    return ""


answered = Answers()


def from_bot(rec: Any) -> bool:
    """Whether the bot sent a request, not the bare client: discord.py's User-Agent, or an
    interaction route (its webhook adapter sends aiohttp's own User-Agent, as the bare
    client does, but the bare client never answers interactions)."""
    return (str(rec.headers.get("User-Agent", "")).startswith("DiscordBot")
            or rec.path.startswith(("/interactions/", "/webhooks/")))


def child_env() -> dict[str, str]:
    """The environment without anything that would configure the bot from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYVAST_")}
    for name in ("DISCORD_TOKEN", "VAST_AI_API_KEY", "VAST_AI_BASE_URL", "DATABASE_URL",
                 "COMFY_DEFAULT_PORT", "COMFY_MODEL_CACHE_SIZE", "COMFY_MAX_GENERATIONS"):
        env.pop(name, None)
    env["PYTHONPATH"] = str(ROOT)
    return env


async def stop_process(proc: asyncio.subprocess.Process | None) -> None:
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 15)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


# --------------------------------------------------------------------------- report


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def p50_p99(values: list[float]) -> str:
    return f"{fmt_ms(percentile(values, 50))} / {fmt_ms(percentile(values, 99))}"


def figures(bare: Phase, bot: Phase) -> dict[str, float]:
    """The figures of one round."""
    def pct(phase: Phase) -> float:
        return 100 * phase.cpu_run / phase.run_wall if phase.run_wall else float("nan")

    def per_event(phase: Phase) -> float:
        return 1e6 * phase.cpu_run / phase.events if phase.events else float("nan")

    b50, b99 = percentile(bot.latencies, 50), percentile(bot.latencies, 99)
    r50, r99 = percentile(bare.latencies, 50), percentile(bare.latencies, 99)
    return {
        "bot_p50": b50, "bot_p99": b99, "bare_p50": r50, "bare_p99": r99,
        "ratio_p50": b50 / r50, "ratio_p99": b99 / r99,
        "bot_cpu_pct": pct(bot), "bare_cpu_pct": pct(bare),
        "bot_us_per_event": per_event(bot), "bare_us_per_event": per_event(bare),
        "bot_cpu_run": bot.cpu_run, "bot_submit_ms_per_job": 1000 * bot.cpu_submit / max(
            1, bot.jobs),
        "bot_run_wall": bot.run_wall, "bare_run_wall": bare.run_wall,
        "bot_429": bot.answered_429, "bot_requests": bot.requests,
        "bare_429": bare.answered_429, "bare_requests": bare.requests,
    }


def round_line(number: int, fig: dict[str, float]) -> str:
    return (f"round {number}: delivery p50 {fmt_ms(fig['bot_p50'])} / {fmt_ms(fig['bare_p50'])}"
            f" ({fig['ratio_p50']:.2f}x), p99 {fmt_ms(fig['bot_p99'])} / "
            f"{fmt_ms(fig['bare_p99'])} ({fig['ratio_p99']:.2f}x), bot CPU "
            f"{fig['bot_cpu_pct']:.1f} %, 429s bot {fig['bot_429']:.0f}/"
            f"{fig['bot_requests']:.0f} bare {fig['bare_429']:.0f}/{fig['bare_requests']:.0f}")


def report(args: argparse.Namespace, rounds: list[tuple[Phase, Phase]]) -> str:
    figs = [figures(bare, bot) for bare, bot in rounds]

    def med(key: str) -> float:
        return statistics.median(f[key] for f in figs)

    bots = [bot for _, bot in rounds]
    bares = [bare for bare, _ in rounds]
    rss = max(b.peak_rss_kb for b in bots)
    gaps = [g for b in bots for g in b.edit_gaps]
    max_edits = max(b.max_edits_per_s for b in bots)
    last = bots[-1]
    ack = [v for b in bots for v in b.ack]
    first = [v for b in bots for v in b.first_status]
    to_result = [v for b in bots for v in b.to_result]
    final = [v for b in bots for v in b.final_lag]
    stale = [v for b in bots for v in b.staleness]
    worst_job = max((b.worst_job_staleness for b in bots), default=float("nan"))
    rows = [
        ("rounds (medians below; RSS: highest)", f"{len(rounds)}"),
        ("jobs per round (delivered bot / bare)",
         f"{args.jobs} ({'+'.join(str(b.delivered) for b in bots)} / "
         f"{'+'.join(str(b.delivered) for b in bares)})"),
        ("servers / channels / users", f"{args.servers} / {args.channels} / {args.users}"),
        ("steps x step delay, size", f"{args.steps} x {args.step_delay * 1000:.0f} ms, "
                                     f"{args.size}x{args.size}"),
        ("progress events per bot round", f"{last.events}"),
        ("run wall time bot / bare", f"{med('bot_run_wall'):.1f} s / "
                                     f"{med('bare_run_wall'):.1f} s"),
        ("jobs per server min-max (last round) bot",
         f"{min(last.per_server, default=0)}-{max(last.per_server, default=0)}"),
        ("bot CPU while running", f"{med('bot_cpu_run'):.2f} s"),
        ("bot CPU per progress event", f"{med('bot_us_per_event'):.0f} us "
                                       f"(bare: {med('bare_us_per_event'):.0f} us)"),
        ("bot CPU, % of one core", f"{med('bot_cpu_pct'):.1f} % "
                                   f"(bare: {med('bare_cpu_pct'):.1f} %)"),
        ("bot CPU to submit", f"{med('bot_submit_ms_per_job'):.1f} ms/job"),
        ("bot peak RSS", f"{rss / 1024:.0f} MB (bare: "
                         f"{max(b.peak_rss_kb for b in bares) / 1024:.0f} MB)"),
        ("status edits, max per message per s", f"{max_edits} "
                                                f"({sum(b.edits for b in bots)} edits in all)"),
        ("gap between edits of a message, min / p1",
         f"{fmt_ms(min(gaps, default=float('nan')))} / {fmt_ms(percentile(gaps, 1))}"),
        ("final states landed", f"{sum(b.finals for b in bots)} / "
                                f"{sum(b.delivered for b in bots)}"),
        ("delivery p50 bot / bare", f"{fmt_ms(med('bot_p50'))} / {fmt_ms(med('bare_p50'))}"),
        ("delivery p99 bot / bare", f"{fmt_ms(med('bot_p99'))} / {fmt_ms(med('bare_p99'))}"),
        ("ratio p50 / p99 (median of rounds)",
         f"{med('ratio_p50'):.2f}x / {med('ratio_p99'):.2f}x"),
        ("HTTP errors at the fake Discord (not 429)",
         f"bot {sum(b.http_errors for b in bots)}, bare {sum(b.http_errors for b in bares)}"),
        ("429s at the fake Discord / requests",
         f"bot {'+'.join(str(b.answered_429) for b in bots)} / "
         f"{'+'.join(str(b.requests) for b in bots)}, bare "
         f"{'+'.join(str(b.answered_429) for b in bares)} / "
         f"{'+'.join(str(b.requests) for b in bares)}"
         + (" (Discord's limits off)" if args.no_discord_limits else
            " (no global limit)" if args.no_global_limit else "")),
        ("member: interaction -> ack p50 / p99", p50_p99(ack)),
        ("member: interaction -> first status p50 / p99", p50_p99(first)),
        ("member: interaction -> result p50 / p99", p50_p99(to_result)),
        ("member: result -> final state p50 / p99 / max",
         f"{p50_p99(final)} / {fmt_ms(max(final, default=float('nan')))}"),
        ("member: status staleness p50 / p95 / p99",
         f"{fmt_ms(percentile(stale, 50))} / {fmt_ms(percentile(stale, 95))} / "
         f"{fmt_ms(percentile(stale, 99))} ({len(stale)} samples)"),
        ("member: staleness p95 of the worst-served job", fmt_ms(worst_job)),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [round_line(i + 1, f) for i, f in enumerate(figs)] + [""]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    storm = [b.answered_429 / max(1, b.requests) for b in bots]
    targets = [
        ("delivery p50 within 1.05x of bare", med("ratio_p50") <= 1.05),
        ("delivery p99 within 1.05x of bare", med("ratio_p99") <= 1.05),
        ("bot CPU < 25 % of one core", med("bot_cpu_pct") < 25),
        (f"bot peak RSS < {args.rss_target} MB", rss < args.rss_target * 1024),
        (f"no 429 storm: bot's 429s < {STORM_SHARE:.0%} of its requests, every round"
         f" (worst {max(storm):.2%})", max(storm) < STORM_SHARE),
        ("acknowledgement p99 < 250 ms", percentile(ack, 99) < 0.25),
        ("every interaction acknowledged", len(ack) == sum(b.jobs for b in bots)),
        ("first status p99 < 1 s", percentile(first, 99) < 1.0),
        ("final state within 2 s of the result, every job",
         bool(final) and max(final) < 2.0 and len(final) == sum(b.delivered for b in bots)),
        ("status staleness p95 < 1.5 s", percentile(stale, 95) < 1.5),
        ("no job starves: its staleness p95 < 3 s", worst_job < 3.0),
        ("bot CPU to submit < 8 ms/job", med("bot_submit_ms_per_job") < 8),
    ]
    lines.append("")
    lines += [f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in targets]
    for number, (bare, bot) in enumerate(rounds, 1):
        for phase in (bare, bot):
            lines += [f"note (round {number}, {phase.name}): {n}" for n in phase.notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> list[tuple[Phase, Phase]]:
    deadline = time.monotonic() + args.deadline * args.rounds
    rounds: list[tuple[Phase, Phase]] = []
    with tempfile.TemporaryDirectory(prefix="comfyvast-bench-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rig = Rig(args, workdir)
        try:
            await rig.start()
            # This process hosts every fake being timed: keep its collector's full passes
            # (over all it recorded) short, as the bot does.
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 50, 10)
            await rig.prepare_bot(deadline)
            if args.warmup:
                # Both relays open their connections and fill their caches first.
                print(f"warm-up: {args.warmup} jobs each, not counted...", flush=True)
                await rig.run_bare(deadline, 0, args.warmup)
                await rig.run_bot(deadline, 0, args.warmup)
            for number in range(1, args.rounds + 1):
                print(f"round {number}/{args.rounds}: bare client, {args.jobs} jobs on "
                      f"{args.servers} servers...", flush=True)
                bare = await rig.run_bare(deadline, number, args.jobs)
                print(f"round {number}/{args.rounds}: bot, {args.jobs} jobs on "
                      f"{args.servers} servers...", flush=True)
                bot = await rig.run_bot(deadline, number, args.jobs)
                rounds.append((bare, bot))
                print(round_line(number, figures(bare, bot)), flush=True)
        finally:
            await rig.stop()
            if args.memory_profile:
                from bench.memhook import report, report_memray

                memory_report = report_memray if args.memory_tool == "memray" else report
                print(memory_report(Path(args.memory_profile)), flush=True)
    return rounds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--servers", type=int, default=20)
    parser.add_argument("--channels", type=int, default=10)
    parser.add_argument("--users", type=int, default=25)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--step-delay", type=float, default=0.05,
                        help="seconds per sampler step (default 0.05: 20 it/s)")
    parser.add_argument("--size", type=int, default=512, help="image width and height")
    parser.add_argument("--inject-rate", type=float, default=50.0,
                        help="/generate commands per second while submitting (default 50: the "
                             "issue's burst of 500 in 10 s)")
    parser.add_argument("--drain", type=float, default=60.0,
                        help="seconds to wait for final status edits after the last result")
    parser.add_argument("--warmup", type=int, default=40,
                        help="jobs each relay runs first, not counted (default 40)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="bare and bot take turns this many times (default 3)")
    parser.add_argument("--deadline", type=float, default=600.0,
                        help="time limit per round in seconds")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 40 jobs, 4 servers, 1 round")
    parser.add_argument("--scale", action="store_true",
                        help="the issue's scale run: 2,000 jobs in flight on 100 servers in 40 "
                             "channels from 100 members, 2 rounds, RSS target 300 MB")
    parser.add_argument("--fake-procs", type=int, default=0,
                        help="processes for the fake ComfyUIs (default: one per 25 servers)")
    parser.add_argument("--no-discord-limits", action="store_true",
                        help="turn the fake Discord's rate limits off (as before they existed)")
    parser.add_argument("--stall", type=float, default=60.0,
                        help="stop waiting for results after this many seconds without a new "
                             "one (a failed job posts none)")
    parser.add_argument("--no-global-limit", action="store_true",
                        help="keep the per-route buckets but not Discord's global 50 per second")
    parser.add_argument("--rss-target", type=int, default=250, help="bot peak RSS target, MB")
    parser.add_argument("--keep", metavar="DIR", help="keep config, DB and bot.log in DIR")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--profile", metavar="PATH",
                        help="sample the bot with py-spy while the jobs run (collapsed stacks "
                             "to PATH, each round overwriting the last; py-spy from $PY_SPY "
                             "or PATH); skews the CPU figures")
    parser.add_argument("--profile-submit", metavar="PATH",
                        help="the same, while the /generate commands are submitted")
    parser.add_argument("--memory-profile", metavar="PATH",
                        help="run the bot under a memory profiler (bench/memhook.py) writing "
                             "to PATH; what was allocated at the peak is printed at the end "
                             "(by thread, project line, library line); skews CPU and RSS")
    parser.add_argument("--memory-tool", choices=("memray", "tracemalloc"), default="memray",
                        help="memray (default: Python and native allocations of every "
                             "thread, at the heap's peak; pip install memray) or tracemalloc "
                             "(Python allocations only, the snapshot nearest the RSS peak; "
                             "slow enough to change the run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.servers, args.channels, args.users = 40, 4, 4, 8
        args.rounds = 1
    if args.scale:
        args.jobs, args.servers, args.channels, args.users = 2000, 100, 40, 100
        args.rounds = min(args.rounds, 2)
        args.rss_target = 300
        args.drain = max(args.drain, 120.0)
    if args.fake_procs <= 0:
        args.fake_procs = max(1, math.ceil(args.servers / 25))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rounds = asyncio.run(run(args))
    print()
    print(report(args, rounds))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args),
            "rounds": [{
                "figures": figures(bare, bot),
                "bot": {k: v for k, v in vars(bot).items() if k not in (
                    "latencies", "edit_gaps", "staleness")},
                "bare": {k: v for k, v in vars(bare).items() if k != "latencies"},
            } for bare, bot in rounds],
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
