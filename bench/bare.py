"""The baseline for bench/relay.py: the least a relay can do, as its own process.

For each job: ``POST /prompt`` (same graph as the bot's built-in template), wait on the
server's WebSocket for ``execution_success``, ``GET /history/{id}``, ``GET /view``, then
upload the image to Discord (``POST /channels/{id}/messages``, multipart). No database,
no status message, no progress rendering. It keeps to Discord's rate limits the way
discord.py does: per channel, it waits out ``X-RateLimit-Reset-After`` once
``X-RateLimit-Remaining`` is 0, and sleeps a 429's ``retry_after`` before trying again.
Run by bench/relay.py::

    python -m bench.bare SPEC_JSON

It prints ``queued N`` once every prompt is queued, then one line ``result {json}``
(own CPU seconds from getrusage, peak RSS from /proc/self/status) when every image was posted.
"""

from __future__ import annotations

import asyncio
import collections
import json
import resource
import sys
import time
import uuid
from typing import Any

import aiohttp

from core.comfy.workflows import GenerationParams, build_workflow


def _peak_rss_kb() -> int:
    """VmHWM: unlike getrusage's ru_maxrss it starts afresh at exec, so the peak of the
    (large) benchmark process this one was forked from does not count."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class BareRelay:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.servers: list[str] = spec["servers"]
        self.client_id = f"bare-{uuid.uuid4().hex[:12]}"
        self.jobs: dict[str, dict[str, Any]] = {}  # prompt id -> job
        self.ended: dict[str, asyncio.Event] = {}  # prompt id -> "executing null" seen
        self.done = 0
        self.failed: list[str] = []
        self.all_done = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        # Per channel (the message bucket's major parameter): one upload at a time, and
        # when the bucket is empty, until when (time.monotonic()).
        self.channel_locks: dict[int, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self.empty_until: dict[int, float] = {}
        self.rate_limited = 0

    async def run(self) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=60)
        # No pool limit: one WebSocket per server holds a connection (aiohttp allows 100).
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            self.http = http
            readers = []
            for url in self.servers:
                ws = await http.ws_connect(f"{url}/ws", params={"clientId": self.client_id},
                                           max_msg_size=0)
                await ws.send_json({"type": "feature_flags",
                                    "data": {"supports_preview_metadata": True}})
                readers.append(asyncio.create_task(self._read(url, ws)))
            cpu_start = _cpu()
            await self._queue_all()
            print(f"queued {len(self.jobs)}", flush=True)
            cpu_queued = _cpu()
            await asyncio.wait_for(self.all_done.wait(), self.spec["timeout"])
            cpu_end = _cpu()
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        return {
            "delivered": self.done, "failed": self.failed,
            "cpu_queue": cpu_queued - cpu_start, "cpu_run": cpu_end - cpu_queued,
            "peak_rss_kb": _peak_rss_kb(),
        }

    async def _queue_all(self) -> None:
        spec = self.spec
        channels, users = spec["channels"], spec["users"]
        for n in range(spec["jobs"]):
            url = self.servers[n % len(self.servers)]
            prefix = f"bare/r{spec['round']}-job-{n + 1}"
            workflow = build_workflow(GenerationParams(
                prompt=spec["prompts"][n % len(spec["prompts"])], model=spec["model"],
                width=spec["size"], height=spec["size"], steps=spec["steps"],
                seed=1000 + n, filename_prefix=prefix,
            ))
            prompt_id = str(uuid.uuid4())
            self.jobs[prompt_id] = {"url": url, "prefix": prefix,
                                    "channel": channels[n % len(channels)],
                                    "user": users[n % len(users)]}
            self.ended[prompt_id] = asyncio.Event()
            async with self.http.post(f"{url}/prompt", json={
                "prompt": workflow, "client_id": self.client_id, "prompt_id": prompt_id,
            }) as resp:
                resp.raise_for_status()
                await resp.read()

    async def _read(self, url: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue  # previews: a relay that only posts results ignores them
            data = json.loads(msg.data)
            kind, body = data.get("type"), data.get("data") or {}
            prompt_id = body.get("prompt_id")
            if prompt_id not in self.jobs:
                continue
            if kind == "execution_success":
                task = asyncio.create_task(self._deliver(prompt_id))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif kind == "executing" and body.get("node") is None:
                self.ended[prompt_id].set()
            elif kind in ("execution_error", "execution_interrupted"):
                self._count(prompt_id, ok=False)

    async def _history(self, url: str, prompt_id: str) -> dict[str, Any]:
        async with self.http.get(f"{url}/history/{prompt_id}") as resp:
            resp.raise_for_status()
            return (await resp.json()).get(prompt_id) or {}

    async def _deliver(self, prompt_id: str) -> None:
        job = self.jobs[prompt_id]
        url = job["url"]
        try:
            entry = await self._history(url, prompt_id)
            if not entry:  # not written yet: it is once "executing null" arrives
                await self.ended[prompt_id].wait()
                entry = await self._history(url, prompt_id)
            image = next(img for out in entry["outputs"].values()
                         for img in out.get("images", []) if img.get("type") == "output")
            async with self.http.get(f"{url}/view", params={
                "filename": image["filename"], "subfolder": image["subfolder"],
                "type": image["type"],
            }) as resp:
                resp.raise_for_status()
                data = await resp.read()
            await self._upload(job, image["filename"], data)
            self._count(prompt_id, ok=True)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            print(f"bare: delivery of {prompt_id} failed: {exc!r}", file=sys.stderr)
            self._count(prompt_id, ok=False)

    async def _upload(self, job: dict[str, Any], filename: str, data: bytes) -> None:
        channel = job["channel"]
        async with self.channel_locks[channel]:
            for _ in range(5):
                wait = self.empty_until.get(channel, 0.0) - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                form = aiohttp.FormData()  # a fresh body for every try
                form.add_field("payload_json", json.dumps({
                    "content": f"<@{job['user']}> {job['prefix']}",
                    "attachments": [{"id": 0, "filename": filename}],
                }), content_type="application/json")
                form.add_field("files[0]", data, filename=filename, content_type="image/png")
                async with self.http.post(
                    f"{self.spec['api_base']}/channels/{channel}/messages", data=form,
                    headers={"Authorization": f"Bot {self.spec['token']}"},
                ) as resp:
                    body = await resp.read()
                    if resp.status == 429:
                        self.rate_limited += 1
                        retry = float(json.loads(body).get("retry_after", 1.0))
                        self.empty_until[channel] = time.monotonic() + retry
                        continue
                    resp.raise_for_status()
                    if resp.headers.get("X-RateLimit-Remaining") == "0":
                        self.empty_until[channel] = time.monotonic() + float(
                            resp.headers.get("X-RateLimit-Reset-After", "0"))
                    return
            raise RuntimeError(f"upload to channel {channel} rate limited 5 times")

    def _count(self, prompt_id: str, *, ok: bool) -> None:
        if ok:
            self.done += 1
        else:
            self.failed.append(prompt_id)
        if self.done + len(self.failed) >= len(self.jobs) == self.spec["jobs"]:
            self.all_done.set()


def main() -> None:
    spec = json.loads(sys.argv[1])
    started = time.monotonic()
    result = asyncio.run(BareRelay(spec).run())
    result["wall"] = time.monotonic() - started
    print("result " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
