"""ModelService against real SSH servers (asyncssh and OpenSSH) and a loopback model source.

The SSH test servers run commands as the current user on this machine, so the server's
"ComfyUI install" is a temporary directory and curl really downloads from the aiohttp
source below.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr
from sqlalchemy import select

from core.audit import Actor
from core.db.models import ModelDownload
from core.errors import ComfyVastError, NotFound, ResourceBusy, ValidationFailed
from core.model_files import (
    CurlMeter,
    DiskFull,
    DownloadRequest,
    DownloadView,
    ModelService,
    SourceError,
    curl_config,
    filename_from_source,
    parse_curl_size,
    parse_df_available,
    redact_url,
    temp_name,
    validate_filename,
    validate_folder,
    validate_model_path,
    validate_url,
)
from core.servers import ServerView
from tests.conftest import BotEnv, bot_settings, eventually, register_ssh_server, start_bot
from tests.ssh.conftest import process_cmdlines

ADMIN = Actor(user_id=1, guild_id=2, channel_id=3, is_admin=True)


# --------------------------------------------------------------------------- the model source


@dataclass
class Seen:
    path: str
    range: str | None
    authorization: str | None


@dataclass
class ModelSource:
    """An HTTP file server on loopback: ranges, throttling, Content-Disposition, cut-offs."""

    files: dict[str, bytes] = field(default_factory=dict)
    # bytes per second for /slow/; chunks of a tenth of that every 0.1 s
    rate: int = 1024 * 1024
    dispositions: dict[str, str] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, name: str, kind: str = "f") -> str:
        return f"{self.base}/{kind}/{name}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/f/{name}", self._serve)
        app.router.add_get("/slow/{name}", self._serve)
        app.router.add_get("/cut/{name}", self._serve)
        app.router.add_get("/cd/{name}", self._serve)
        app.router.add_get("/nosize/{name}", self._serve)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        kind = request.path.split("/")[1]
        name = request.match_info["name"]
        self.seen.append(Seen(request.path_qs, request.headers.get("Range"),
                              request.headers.get("Authorization")))
        data = self.files.get(name)
        if data is None:
            raise web.HTTPNotFound()
        if kind == "nosize":
            # A server may ignore Range (RFC 9110 section 14.2) and stream chunked, with no
            # Content-Length (RFC 9112 section 6.1): the size is unknown until the end.
            response = web.StreamResponse(status=200)
            response.enable_chunked_encoding()
            await response.prepare(request)
            try:
                await response.write(data)
                await response.write_eof()
            except ConnectionError:
                pass  # curl's probe stops reading early
            return response
        start, status = 0, 200
        headers = {"Accept-Ranges": "bytes"}
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", ""))
        end = len(data)
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1, len(data)) if match.group(2) else len(data)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        if kind == "cd":
            headers["Content-Disposition"] = self.dispositions[name]
        body = data[start:end]
        headers["Content-Length"] = str(len(body))
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        if kind == "cut" and len(body) > 1:
            # Half the file, then the connection drops (curl: "transfer closed").
            await response.write(body[: len(body) // 2])
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.close()
            return response
        try:
            if kind == "slow" and len(body) > 1:
                chunk = max(self.rate // 10, 1)
                for i in range(0, len(body), chunk):
                    await response.write(body[i: i + chunk])
                    await asyncio.sleep(0.1)
            else:
                await response.write(body)
            await response.write_eof()
        except ConnectionError:
            pass  # the downloader went away (stopped on purpose in some tests)
        return response


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
async def env(fake_discord: Any, tmp_path: Path) -> AsyncIterator[BotEnv]:
    """The bot, with http:// downloads allowed from loopback (the source below)."""
    settings = bot_settings(tmp_path, fake_discord, comfy={"http_allowlist": ["127.0.0.1"]})
    running = await start_bot(fake_discord, settings)
    yield running
    await running.stop()


@pytest.fixture(name="source")
async def source_fixture() -> AsyncIterator[ModelSource]:
    src = ModelSource()
    await src.start()
    yield src
    await src.stop()


@pytest.fixture(name="install")
def install_fixture(tmp_path: Path) -> Path:
    root = tmp_path / "ComfyUI"
    (root / "models" / "checkpoints").mkdir(parents=True)
    return root


def build_service(env: BotEnv, install: Path) -> ModelService:
    """The service as core/services.py wires it, pointed at the temporary install."""
    s = env.services
    return ModelService(
        s.settings, s.sessions, s.servers, s.comfy, s.remote.pool, s.remote.target, s.audit,
        install_dir=str(install), on_change=s.generation.catalog.invalidate,
    )


@pytest.fixture
async def svc(env: BotEnv, install: Path) -> AsyncIterator[ModelService]:
    service = build_service(env, install)
    yield service
    await service.close()


def closed_port() -> int:
    """A loopback port nothing listens on: ComfyUI "not running"."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def box(env: BotEnv, ssh_host: Any) -> ServerView:
    return await register_ssh_server(env, ssh_host, comfy_port=closed_port())


def request(box: ServerView, url: str, folder: str = "checkpoints", **kw: Any) -> DownloadRequest:
    return DownloadRequest(actor=ADMIN, server=box.name, url=url, folder=folder, **kw)


class Recorder:
    """A DownloadObserver that keeps every state it was shown."""

    def __init__(self) -> None:
        self.states: list[DownloadView] = []
        self.finished: DownloadView | None = None

    async def on_started(self, download: DownloadView) -> tuple[int, int] | None:
        self.states.append(download)
        return None

    async def on_progress(self, download: DownloadView) -> None:
        self.states.append(download)

    async def on_finished(self, download: DownloadView) -> None:
        self.finished = download


async def row(env: BotEnv, download_id: int) -> ModelDownload:
    async with env.services.sessions() as session:
        return (await session.scalars(
            select(ModelDownload).where(ModelDownload.id == download_id))).one()


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --------------------------------------------------------------------------- downloads


async def test_download_streams_progress_and_lands_atomically(
    env: BotEnv, svc: ModelService, source: ModelSource, box: ServerView, install: Path
) -> None:
    data = secrets.token_bytes(1_600_000)
    source.files["big.safetensors"] = data
    source.rate = 1_000_000
    seen_temp_only = False
    recorder = Recorder()
    view = await svc.start(request(box, source.url("big.safetensors", "slow")), recorder)
    folder = install / "models" / "checkpoints"
    while not recorder.finished:
        # While it runs, only the hidden temporary file exists; ComfyUI sees nothing.
        if (folder / temp_name("big.safetensors")).exists():
            assert not (folder / "big.safetensors").exists()
            seen_temp_only = True
        await asyncio.sleep(0.05)
    done = await svc.wait(view.id)

    assert done.status == "completed", done.error
    assert (folder / "big.safetensors").read_bytes() == data
    assert not (folder / temp_name("big.safetensors")).exists()
    assert seen_temp_only
    moving = [s for s in recorder.states if s.status == "downloading" and s.fraction
              and 0 < s.fraction < 1]
    assert moving, [(s.status, s.bytes_done) for s in recorder.states]
    assert all(s.bytes_total == len(data) for s in moving)
    assert any(s.speed and s.speed > 0 and s.eta_seconds is not None for s in moving)
    assert [s.status for s in recorder.states][-1] == "verifying"
    saved = await row(env, view.id)
    assert (saved.status, saved.bytes_done, saved.bytes_total) == ("completed", len(data),
                                                                   len(data))
    assert saved.completed_at is not None and saved.requested_by == ADMIN.user_id
    # The listing was refreshed: ComfyUI is down, so it was read over SSH.
    listing = await svc.list(box)
    assert listing.source == "ssh"
    assert listing.names("checkpoints") == ("big.safetensors",)
    assert await svc.names("checkpoints", "BIG") == ["big.safetensors"]


async def test_token_is_a_header_never_in_the_process_list_or_logs(
    env: BotEnv, svc: ModelService, source: ModelSource, box: ServerView,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token = "hf_" + secrets.token_hex(16)
    query_secret = secrets.token_hex(8)
    # Loopback stands in for huggingface.co: the token goes to its configured host only.
    svc.token_hosts["127.0.0.1"] = SecretStr(token)
    source.files["tok.safetensors"] = secrets.token_bytes(700_000)
    source.rate = 1_000_000
    url = source.url("tok.safetensors", "slow") + f"?token={query_secret}"
    view = await svc.start(request(box, url))
    temp = temp_name("tok.safetensors").encode()
    saw_curl = False
    while not (task_done := (await svc.get(view.id)).finished):
        cmdlines = process_cmdlines()
        assert not any(token.encode() in c for c in cmdlines), "token in a command line"
        assert not any(query_secret.encode() in c for c in cmdlines), "URL in a command line"
        saw_curl = saw_curl or any(b"curl" in c and temp in c for c in cmdlines)
        await asyncio.sleep(0.02)
    assert task_done
    done = await svc.wait(view.id)
    assert done.status == "completed", done.error
    assert saw_curl, "never saw curl running, so the check proved nothing"
    assert {s.authorization for s in source.seen} == {f"Bearer {token}"}
    # (aiohttp.access is the model source's own log of the request it received.)
    leaks = [(r.name, r.getMessage()[:300]) for r in caplog.records
             if r.name != "aiohttp.access"
             and (token in r.getMessage() or query_secret in r.getMessage())]
    assert not leaks, leaks
    saved = await row(env, view.id)
    assert query_secret not in saved.url and "token=REDACTED" in saved.url


async def test_interrupted_download_keeps_a_temp_file_and_the_next_one_resumes(
    svc: ModelService, source: ModelSource, box: ServerView, install: Path
) -> None:
    data = secrets.token_bytes(400_000)
    source.files["m.safetensors"] = data
    folder = install / "models" / "checkpoints"

    first = await svc.download(request(box, source.url("m.safetensors", "cut")))
    assert first.status == "failed"
    assert "closed the connection early" in (first.error or "")
    assert not (folder / "m.safetensors").exists()
    partial = (folder / temp_name("m.safetensors")).read_bytes()
    assert 0 < len(partial) < len(data) and data.startswith(partial)

    second = await svc.download(request(box, source.url("m.safetensors")))
    assert second.status == "completed", second.error
    assert (folder / "m.safetensors").read_bytes() == data
    assert not (folder / temp_name("m.safetensors")).exists()
    assert source.seen[-1].range == f"bytes={len(partial)}-"


async def test_content_disposition_name_is_cleaned_into_the_folder(
    svc: ModelService, source: ModelSource, box: ServerView, install: Path
) -> None:
    source.files["42"] = b"weights"
    source.dispositions["42"] = 'attachment; filename="../../evil model.safetensors"'
    done = await svc.download(request(box, source.url("42", "cd"), folder="loras"))
    assert done.status == "completed", done.error
    assert done.filename == "evil_model.safetensors"
    assert (install / "models" / "loras" / "evil_model.safetensors").read_bytes() == b"weights"
    assert not (install.parent / "evil model.safetensors").exists()


BAD_URLS = [
    "ftp://127.0.0.1/x.safetensors",
    "file:///etc/passwd",
    "http://example.com/x.safetensors",  # http only for allow-listed hosts
    "javascript:alert(1)",
    "https://user:pw@example.com/x.safetensors",
    "https://example.com/a b.safetensors",
    "https:///x.safetensors",
]
HOSTILE_FILENAMES = [
    "../x.safetensors", "/etc/passwd", "a;rm -rf ~", "..", ".hidden.safetensors",
    "sub/x.safetensors", "x.exe", "$(id).safetensors", "-rf.safetensors", "a\\b.safetensors",
    "x\n.safetensors", "",
]
BAD_FOLDERS = ["secrets", "../checkpoints", "checkpoints/..", "", "/etc"]


@pytest.mark.parametrize("url", BAD_URLS)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValidationFailed):
        validate_url(url, ["127.0.0.1"])


@pytest.mark.parametrize("filename", HOSTILE_FILENAMES)
def test_hostile_filenames_are_refused(filename: str) -> None:
    with pytest.raises(ValidationFailed):
        validate_filename(filename)
    if not filename.startswith("sub/"):  # sub-folders are fine when naming a listed model
        with pytest.raises(ValidationFailed):
            validate_model_path(filename)


@pytest.mark.parametrize("folder", BAD_FOLDERS)
def test_unknown_folders_are_refused(folder: str) -> None:
    with pytest.raises(ValidationFailed, match="not a model folder"):
        validate_folder(folder)


async def test_start_refuses_bad_input_before_touching_the_server(
    svc: ModelService, source: ModelSource, install: Path
) -> None:
    """The service checks every option before it asks the server or the source anything."""
    source.files["x.safetensors"] = b"x"
    good = source.url("x.safetensors")
    cases = [dict(url=url) for url in BAD_URLS]
    cases += [dict(filename=name) for name in HOSTILE_FILENAMES if name]
    cases += [dict(folder=folder) for folder in BAD_FOLDERS]
    cases += [dict(sha256="not-a-hash")]
    before = tree(install.parent)
    for case in cases:
        fields = {"url": good, "folder": "checkpoints", **case}
        with pytest.raises(ValidationFailed):
            await svc.start(DownloadRequest(ADMIN, "nowhere", **fields))
    assert source.seen == []
    assert tree(install.parent) == before


async def test_not_enough_disk_is_refused_before_downloading(
    env: BotEnv, svc: ModelService, source: ModelSource, box: ServerView, install: Path
) -> None:
    source.files["huge.safetensors"] = b"x" * 1000
    svc.reserve_bytes = 2**60  # more than any disk: the real df -Pk answer is too small
    with pytest.raises(DiskFull, match="Not enough disk"):
        await svc.start(request(box, source.url("huge.safetensors")))
    # Only the one-byte probe reached the source, and nothing was written or recorded.
    assert [s.range for s in source.seen] == ["bytes=0-0"]
    assert list((install / "models" / "checkpoints").iterdir()) == []
    async with env.services.sessions() as session:
        assert (await session.scalars(select(ModelDownload))).all() == []


async def test_a_404_from_the_source_is_one_sentence(
    svc: ModelService, source: ModelSource, box: ServerView, install: Path
) -> None:
    with pytest.raises(SourceError, match="HTTP 404") as info:
        await svc.start(request(box, source.url("missing.safetensors")))
    assert info.value.status == 404
    assert list((install / "models" / "checkpoints").iterdir()) == []


async def test_one_download_per_file_at_a_time(
    env: BotEnv, svc: ModelService, source: ModelSource, box: ServerView, install: Path
) -> None:
    source.files["dup.safetensors"] = secrets.token_bytes(2_000_000)
    source.rate = 200_000
    first = await svc.start(request(box, source.url("dup.safetensors", "slow")))
    # Once curl writes, it surely runs (and the SSH layer knows its pid to stop it).
    partial = install / "models" / "checkpoints" / temp_name("dup.safetensors")

    async def writing() -> bool:
        return partial.exists()

    await eventually(writing)
    with pytest.raises(ResourceBusy, match="already being downloaded"):
        await svc.start(request(box, source.url("dup.safetensors")))
    with pytest.raises(ResourceBusy):
        await svc.delete(ADMIN, box.name, "checkpoints", "dup.safetensors")
    # Shutting down stops the remote curl and records why.
    await svc.close()
    saved = await row(env, first.id)
    assert saved.status == "failed" and "shut down" in (saved.error_message or "")


async def test_sha256_is_checked_before_the_file_goes_live(
    svc: ModelService, source: ModelSource, box: ServerView, install: Path
) -> None:
    data = b"model bytes"
    source.files["h.safetensors"] = data
    folder = install / "models" / "checkpoints"
    bad = await svc.download(request(box, source.url("h.safetensors"), sha256="0" * 64))
    assert bad.status == "failed" and "sha256" in (bad.error or "")
    assert list(folder.iterdir()) == []

    good_hash = hashlib.sha256(data).hexdigest()
    good = await svc.download(request(box, source.url("h.safetensors"), sha256=good_hash.upper()))
    assert good.status == "completed" and good.sha256 == good_hash
    assert (folder / "h.safetensors").read_bytes() == data

    with pytest.raises(ValidationFailed, match="already exists"):
        await svc.start(request(box, source.url("h.safetensors")))


async def test_direct_servers_have_no_files_to_manage(env: BotEnv, svc: ModelService) -> None:
    await env.services.servers.add_direct(ADMIN, "web", "http://127.0.0.1:9")
    with pytest.raises(ValidationFailed, match="without SSH"):
        await svc.start(DownloadRequest(ADMIN, "web", "https://example.com/x.safetensors",
                                        "checkpoints"))
    with pytest.raises(ValidationFailed, match="without SSH"):
        await svc.delete(ADMIN, "web", "checkpoints", "x.safetensors")


async def test_downloads_a_dead_bot_left_running_are_marked_failed(
    env: BotEnv, svc: ModelService
) -> None:
    server = await env.services.servers.add_direct(ADMIN, "old", "http://127.0.0.1:9")
    async with env.services.sessions.begin() as session:
        session.add(ModelDownload(server_id=server.id, url="https://h/x.safetensors",
                                  folder="checkpoints", filename="x.safetensors",
                                  status="downloading"))
    assert await svc.recover() == 1
    view = await svc.get(1)
    assert view.status == "failed" and "restarted" in (view.error or "")
    assert view.server_name == "old"


# --------------------------------------------------------------------------- listing, deleting


async def test_delete_removes_the_file_and_refreshes_the_listing(
    svc: ModelService, box: ServerView, install: Path
) -> None:
    folder = install / "models" / "loras"
    (folder / "style").mkdir(parents=True)
    (folder / "a.safetensors").write_bytes(b"a")
    (folder / "style" / "b.safetensors").write_bytes(b"b")
    (folder / "notes.txt").write_text("not a model")
    (folder / temp_name("c.safetensors")).write_bytes(b"partial")
    listing = await svc.list(box)
    assert listing.names("loras") == ("a.safetensors", "style/b.safetensors")

    assert await svc.delete(ADMIN, box.name, "loras", "style/b.safetensors") == \
        "loras/style/b.safetensors"
    assert not (folder / "style" / "b.safetensors").exists()
    assert svc.cached(box.id) is None  # dropped, so the next list reads again
    assert (await svc.list(box)).names("loras") == ("a.safetensors",)

    with pytest.raises(NotFound):
        await svc.delete(ADMIN, box.name, "loras", "style/b.safetensors")
    for hostile in ("../../x.safetensors", "/etc/passwd", "a;rm -rf ~"):
        with pytest.raises(ValidationFailed):
            await svc.delete(ADMIN, box.name, "loras", hostile)
    assert (folder / "a.safetensors").exists()


async def test_a_listing_too_long_to_read_whole_is_refused_not_cut(
    svc: ModelService, box: ServerView, install: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.model_files import listing as listing_module

    folder = install / "models" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(20):
        (folder / f"model-{n:02}-{'x' * 40}.safetensors").write_bytes(b"m")
    # The SSH capture keeps the tail of the output: without the check, the first names
    # would be missing from the listing without a word.
    monkeypatch.setattr(listing_module, "LISTING_MAX_OUTPUT", 300)
    with pytest.raises(ComfyVastError, match="more than"):
        await svc.list(box)
    monkeypatch.setattr(listing_module, "LISTING_MAX_OUTPUT", 2**20)
    assert len((await svc.list(box, refresh=True)).names("checkpoints")) == 20


async def test_listing_asks_comfyui_when_it_runs(
    env: BotEnv, svc: ModelService, ssh_host: Any
) -> None:
    from tests.fakecomfy import FakeComfy

    comfy = FakeComfy(models={"checkpoints": ["z.safetensors", "a.safetensors"],
                              "loras": ["l.safetensors"]})
    await comfy.start()
    try:
        server = await register_ssh_server(env, ssh_host, comfy_port=comfy.port)
        listing = await svc.list(server)
        assert listing.source == "comfyui"
        assert listing.names("checkpoints") == ("a.safetensors", "z.safetensors")
        assert listing.names("text_encoders") == ()
        # Autocomplete answers from the cache, names that start with the text first.
        comfy.models["checkpoints"].append("new.safetensors")
        assert await svc.names("checkpoints", "z") == ["z.safetensors"]
        assert (await svc.list(server, refresh=True)).names("checkpoints")[-1] == "z.safetensors"
        assert "new.safetensors" in (await svc.list(server)).names("checkpoints")
    finally:
        await comfy.stop()


# --------------------------------------------------------------------------- pure helpers


def test_df_output_is_parsed() -> None:
    out = ("Filesystem     1024-blocks      Used Available Capacity Mounted on\n"
           "/dev/nvme0n1p2   102687672  48123456  49301234      50% /\n")
    assert parse_df_available(out) == 49301234 * 1024
    spaced = ("Filesystem 1024-blocks Used Available Capacity Mounted on\n"
              "my disk 100 40 60 40% /mnt/with space\n")
    assert parse_df_available(spaced) == 60 * 1024
    with pytest.raises(ValueError):
        parse_df_available("df: /nope: No such file or directory\n")


def test_curl_meter_lines_become_progress() -> None:
    assert parse_curl_size("3072k") == 3072 * 1024
    assert parse_curl_size("45.2M") == int(45.2 * 1024**2)
    assert parse_curl_size("39339") == 39339
    meter = CurlMeter()
    assert meter.feed("  % Total    % Received % Xferd  Average Speed   Time    Time") is None
    p = meter.feed(" 26 3072k   26  800k    0     0  1133k      0  0:00:02 --:--:--  0:00:02 1133k")
    assert p is not None and p.bytes_done == 800 * 1024 and p.bytes_total == 3072 * 1024
    assert p.speed == 1133 * 1024 and p.eta_seconds == pytest.approx(2272 / 1133, rel=0.01)
    # Resumed: curl counts from the offset; unknown totals fall back to the probe's size.
    resumed = CurlMeter(offset=1000, expected_total=5000)
    q = resumed.feed(
        "  0     0    0  2000    0     0   1000      0 --:--:--  0:00:02 --:--:--     0")
    assert q is not None and (q.bytes_done, q.bytes_total, q.speed) == (3000, 5000, 1000.0)
    assert resumed.feed("curl: (18) transfer closed with 100 bytes remaining") is None


def test_filenames_from_the_source() -> None:
    assert filename_from_source('attachment; filename="x.safetensors"', "https://h/1") == \
        "x.safetensors"
    assert filename_from_source("attachment; filename*=UTF-8''caf%C3%A9%20v2.safetensors",
                                "https://h/1") == "caf_v2.safetensors"
    assert filename_from_source(None, "https://h/m/sd%20xl.safetensors?download=true") == \
        "sd_xl.safetensors"
    assert filename_from_source('inline; filename="..\\..\\.bashrc.pt"', "https://h/1") == \
        "bashrc.pt"
    with pytest.raises(ValidationFailed, match="filename option"):
        filename_from_source(None, "https://civitai.com/api/download/models/123")


def test_validators() -> None:
    assert validate_filename("sd_xl-1.0 ".strip() + ".safetensors") == "sd_xl-1.0.safetensors"
    assert validate_model_path("sdxl/base.safetensors") == "sdxl/base.safetensors"
    assert validate_url("http://127.0.0.1:8/x", ["127.0.0.1"]) == "http://127.0.0.1:8/x"
    with pytest.raises(ValidationFailed, match="https"):
        validate_url("http://127.0.0.1:8/x")
    assert redact_url("https://h/x?token=abc&v=1") == "https://h/x?token=REDACTED&v=1"
    assert curl_config('https://h/a"b\\c', ['Authorization: Bearer t"k']) == (
        'url = "https://h/a\\"b\\\\c"\nheader = "Authorization: Bearer t\\"k"\n')
    with pytest.raises(ValueError):
        curl_config("https://h/x", ["Authorization: Bearer a\nb"])


def test_tokens_go_only_to_their_own_hosts(env: BotEnv, install: Path) -> None:
    s = env.services
    settings = s.settings.model_copy(update={"comfy": s.settings.comfy.model_copy(
        update={"hf_token": SecretStr("hf_1"), "civitai_token": SecretStr("cv_2")})})
    service = ModelService(settings, s.sessions, s.servers, s.comfy, s.remote.pool,
                           s.remote.target, s.audit, install_dir=str(install))
    assert service.auth_headers("https://huggingface.co/a/b") == ["Authorization: Bearer hf_1"]
    assert service.auth_headers("https://cdn-lfs.huggingface.co/x") == \
        ["Authorization: Bearer hf_1"]
    assert service.auth_headers("https://civitai.com/api/download/models/1") == \
        ["Authorization: Bearer cv_2"]
    assert service.auth_headers("https://evilhuggingface.co/x") == []
    assert service.auth_headers("https://example.com/huggingface.co") == []
    assert "hf_1" not in repr(service.token_hosts)
    assert os.environ.get("HF_TOKEN") != "hf_1"
