"""Fake ComfyUI servers for bench/relay.py, in a process of their own.

The benchmark's relays (the bot and the bare client) talk to them over sockets; the
benchmark drives them through this process's stdin and reads their records from its stdout,
so the fake ComfyUIs' event loop is not the fake Discord's (a slow upload being parsed by
the fake Discord does not delay an ``execution_success``, and the other way round).
``time.monotonic()`` is the system's CLOCK_MONOTONIC, so times from here and from the
benchmark's process compare directly.

Run by bench/relay.py::

    python -m bench.fakes comfy --count N --step-delay S

It prints ``ports P1 P2 ...`` once they listen, then answers one JSON line per command line
on stdin: ``pause``, ``resume``, ``marks`` (per server: messages sent, prompts received),
``snapshot MARKS_JSON`` (per server, since the marks: the prompts with their SaveImage
prefix and when their ``execution_success`` was sent, the progress events by prompt, and
how many progress events and previews were sent), ``quit``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import sys
from typing import Any

from tests.fakecomfy import FakeComfy

MODEL = "sd15.safetensors"


def snapshot(comfy: FakeComfy, sent_mark: int, prompt_mark: int) -> dict[str, Any]:
    prompts: dict[str, Any] = {}
    for prompt_id in list(comfy.prompts)[prompt_mark:]:
        prefix = None
        for node in comfy.prompts[prompt_id].values():
            if node.get("class_type") == "SaveImage":
                prefix = str(node["inputs"]["filename_prefix"])
        prompts[prompt_id] = [prefix, comfy.success_at.get(prompt_id)]
    progress: dict[str, list[list[float]]] = {}
    events = 0
    for message in comfy.sent[sent_mark:]:
        if message.type == "binary":
            events += 1
        elif message.type == "progress":
            events += 1
            progress.setdefault(str(message.data.get("prompt_id")), []).append(
                [message.at, int(message.data["value"])])
    return {"prompts": prompts, "progress": progress, "events": events}


async def serve_comfy(args: argparse.Namespace) -> None:
    comfys = [FakeComfy(models={"checkpoints": [MODEL]}, step_delay=args.step_delay,
                        previews=True) for _ in range(args.count)]
    for comfy in comfys:
        await comfy.start()
    # Full collections over everything the fakes recorded would stall their sockets.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 10)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ports " + " ".join(str(c.port) for c in comfys), flush=True)
    try:
        while line := (await reader.readline()).decode().strip():
            command, _, arg = line.partition(" ")
            answer: Any = "ok"
            if command == "pause":
                for comfy in comfys:
                    comfy.pause_sampling()
            elif command == "resume":
                for comfy in comfys:
                    comfy.resume_sampling()
            elif command == "marks":
                answer = [[len(c.sent), len(c.prompts)] for c in comfys]
            elif command == "snapshot":
                marks = json.loads(arg)
                answer = [snapshot(c, s, p) for c, (s, p) in zip(comfys, marks, strict=True)]
            elif command == "quit":
                break
            else:
                answer = f"unknown command {command!r}"
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        for comfy in comfys:
            with contextlib.suppress(Exception):
                await comfy.stop()


class ComfyFleet:
    """The benchmark's side: ``count`` fake ComfyUIs in ``procs`` processes."""

    def __init__(self, count: int, step_delay: float, procs: int, env: dict[str, str],
                 cwd: str) -> None:
        self.count, self.step_delay, self.procs = count, step_delay, max(1, min(procs, count))
        self.env, self.cwd = env, cwd
        self.children: list[asyncio.subprocess.Process] = []
        self.sizes: list[int] = []
        self.urls: list[str] = []

    async def start(self) -> None:
        base, extra = divmod(self.count, self.procs)
        self.sizes = [base + (1 if i < extra else 0) for i in range(self.procs)]
        for size in self.sizes:
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.fakes", "comfy", "--count", str(size),
                "--step-delay", str(self.step_delay), cwd=self.cwd, env=self.env,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                limit=1 << 30)
            self.children.append(child)
        for child in self.children:
            assert child.stdout is not None
            line = (await asyncio.wait_for(child.stdout.readline(), 60)).decode()
            if not line.startswith("ports "):
                raise RuntimeError(f"bench.fakes did not start: {line!r}")
            self.urls += [f"http://127.0.0.1:{p}" for p in line.split()[1:]]

    async def _ask(self, child: asyncio.subprocess.Process, line: str) -> Any:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write((line + "\n").encode())
        await child.stdin.drain()
        return json.loads(await asyncio.wait_for(child.stdout.readline(), 120))

    async def all(self, line: str) -> list[Any]:
        """Send a command to every process (at once); their answers, in server order."""
        return await asyncio.gather(*(self._ask(c, line) for c in self.children))

    async def pause(self) -> None:
        await self.all("pause")

    async def resume(self) -> None:
        await self.all("resume")

    async def marks(self) -> list[list[int]]:
        return [m for answer in await self.all("marks") for m in answer]

    async def snapshot(self, marks: list[list[int]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        start = 0
        answers = []
        for child, size in zip(self.children, self.sizes, strict=True):
            answers.append(self._ask(child, "snapshot " + json.dumps(marks[start:start + size])))
            start += size
        for answer in await asyncio.gather(*answers):
            out += answer
        return out

    async def stop(self) -> None:
        for child in self.children:
            if child.returncode is None:
                with contextlib.suppress(Exception):
                    assert child.stdin is not None
                    child.stdin.write(b"quit\n")
                    await child.stdin.drain()
        for child in self.children:
            try:
                await asyncio.wait_for(child.wait(), 15)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await child.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fakes")
    parser.add_argument("kind", choices=["comfy"])
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--step-delay", type=float, default=0.05)
    args = parser.parse_args(argv)
    asyncio.run(serve_comfy(args))


if __name__ == "__main__":
    main()
