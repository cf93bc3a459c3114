"""/server diagnose's HTTP check of a direct server, against a hostile ComfyUI: a redirect
to an internal URL is not followed and junk stats are "not ComfyUI", never a crash."""

from __future__ import annotations

from pathlib import Path

from core.diagnostics import COMFY_PORT, GPU, Diagnostics
from core.services import Services
from tests.fakecomfy import FakeComfy
from tests.fakecomfy.hostile import HitRecorder
from tests.setup_fixtures import ADMIN, make_setup_service


async def test_diagnose_of_a_hostile_direct_server(services: Services, tmp_path: Path) -> None:
    comfy, internal = FakeComfy(), HitRecorder()
    await comfy.start()
    await internal.start()
    try:
        await services.servers.add_direct(ADMIN, "direct", comfy.url)
        setup = make_setup_service(services, tmp_path / "srv" / "ComfyUI")
        diagnostics = Diagnostics(services.servers, services.remote, setup, services.http)

        comfy.hostile.redirect("/system_stats", f"{internal.url}/latest/meta-data")
        check = (await diagnostics.diagnose("direct")).check(COMFY_PORT)
        assert check.ok is False and "answered HTTP 302" in check.detail
        assert internal.hits == []

        comfy.hostile.redirects.clear()
        comfy.hostile.junk("/system_stats", {"system": "junk", "devices": 5})
        check = (await diagnostics.diagnose("direct")).check(COMFY_PORT)
        assert check.ok is False and "answered HTTP 200" in check.detail

        comfy.hostile.junk("/system_stats", {"system": {"comfyui_version": ["x"]}, "devices": [
            {"type": "cuda", "name": {"a": 1}, "vram_free": "lots", "vram_total": 2**70}]})
        report = await diagnostics.diagnose("direct")
        assert report.check(COMFY_PORT).ok
        assert report.check(GPU).detail == "{'a': 1}: 0 of 0 MiB free (from ComfyUI)"
    finally:
        await internal.stop()
        await comfy.stop()
