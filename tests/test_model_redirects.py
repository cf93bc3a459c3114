"""Model-source redirects, through the real ModelService, real SSH servers and curl.

A hostile source redirects the probe to an internal URL (another loopback server that
records hits, or a cloud metadata address): nothing follows it, and the member gets one
sentence. A redirect within the member's own origin is still followed (sources move
files), and the policy for other hops is checked directly in ``redirect_problem``.
"""

# The fixtures (bot, SSH server, service) are the ones of tests/test_models.py, imported
# by name, which ruff reads as redefinitions in every test's arguments.
# ruff: noqa: F811

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from core.model_files import ModelService, SourceError
from core.model_files.sources import MAX_REDIRECTS, redirect_problem
from core.servers import ServerView
from tests.fakecomfy.hostile import HitRecorder
from tests.test_models import box, env, install_fixture, request, svc  # noqa: F401 - fixtures


@dataclass
class RedirectingSource:
    """A loopback source whose /go/{key} answers with the redirect set for ``key``, and
    whose /file/{name} serves bytes (ranges too, as curl's probe asks for one byte)."""

    files: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    served: list[str] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/go/{key}", self._go)
        app.router.add_get("/file/{name}", self._file)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _go(self, req: web.Request) -> web.Response:
        self.served.append(req.path)
        return web.Response(status=302, headers={"Location": self.redirects[req.match_info["key"]]})

    async def _file(self, req: web.Request) -> web.Response:
        self.served.append(req.path)
        data = self.files[req.match_info["name"]]
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            end = int(match.group(2)) + 1 if match.group(2) else len(data)
            return web.Response(status=206, body=data[start:end], headers={
                "Content-Range": f"bytes {start}-{min(end, len(data)) - 1}/{len(data)}"})
        return web.Response(body=data)


@pytest.fixture
async def redirecting() -> AsyncIterator[RedirectingSource]:
    source = RedirectingSource()
    await source.start()
    yield source
    await source.stop()


@pytest.fixture
async def internal() -> AsyncIterator[HitRecorder]:
    recorder = HitRecorder()
    await recorder.start()
    yield recorder
    await recorder.stop()


async def test_redirects_to_internal_addresses_are_not_followed(
    svc: ModelService, box: ServerView, install: Path,
    redirecting: RedirectingSource, internal: HitRecorder,
) -> None:
    redirecting.redirects = {
        # Another origin over http (the allow-listed host, another port): an internal
        # service next to the source.
        "http": f"{internal.url}/latest/meta-data/iam",
        # https to a cloud metadata address and to localhost: never connected to.
        "meta": "https://169.254.169.254/latest/meta-data/",
        "local": f"https://localhost:{internal.port}/secret",
        "numeric": f"https://2130706433:{internal.port}/secret",
    }
    for key in redirecting.redirects:
        with pytest.raises(SourceError, match="redirected to an address the bot does not"):
            await svc.start(request(box, f"{redirecting.base}/go/{key}"))
    assert internal.hits == []
    assert list((install / "models" / "checkpoints").iterdir()) == []


async def test_a_redirect_loop_ends(
    svc: ModelService, box: ServerView, redirecting: RedirectingSource
) -> None:
    redirecting.redirects = {"loop": f"{redirecting.base}/go/loop"}
    with pytest.raises(SourceError, match=f"more than {MAX_REDIRECTS} times"):
        await svc.start(request(box, f"{redirecting.base}/go/loop"))
    assert len(redirecting.served) == MAX_REDIRECTS + 1


async def test_a_redirect_within_the_same_origin_is_followed(
    svc: ModelService, box: ServerView, install: Path, redirecting: RedirectingSource
) -> None:
    redirecting.files["moved.safetensors"] = b"m" * 5000
    redirecting.redirects = {"moved": "/file/moved.safetensors"}
    view = await svc.start(request(box, f"{redirecting.base}/go/moved",
                                   filename="moved.safetensors"))
    assert view.bytes_total == 5000
    done = await svc.wait(view.id)
    assert done.status == "completed", done.error
    assert (install / "models" / "checkpoints" / "moved.safetensors").read_bytes() == b"m" * 5000


@pytest.mark.parametrize(("target", "problem"), [
    ("https://cdn-lfs.hf.co/repos/x?X-Amz-Signature=abc", None),
    ("https://example.com:8443/file", None),
    ("http://example.com/file", "the target is not https"),
    ("ftp://example.com/file", "the target is not https"),
    ("https://10.0.0.5/file", "the target is an internal address"),
    ("https://[::1]/file", "the target is an internal address"),
    ("https://[::ffff:169.254.169.254]/", "the target is an internal address"),
    ("https://0x7f.1/", "the target is an internal address"),
    ("https://metadata.google.internal/", "the target is an internal address"),
    ("https://printer.local/", "the target is an internal address"),
    ("https://user:pw@example.com/", "the target carries a user name or password"),
    ("https://example.com/a b", "the target is not a valid URL"),
    ("https://example.com:99999/", "the target is not a valid URL"),
    # The member's own (validated) origin: allowed, even over allow-listed http.
    ("http://127.0.0.1:8000/other", None),
])
def test_redirect_policy(target: str, problem: str | None) -> None:
    assert redirect_problem("http://127.0.0.1:8000/model", target) == problem
