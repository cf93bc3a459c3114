"""/server diagnose's service: checks on a healthy host, a broken one, an unreachable one,
one whose host key changed, and a direct ComfyUI; plus the embed."""

from __future__ import annotations

import os
import signal

from core.diagnostics import (
    COMFY_PORT,
    GPU,
    INSTALLATION,
    REACHABILITY,
    SERVICE,
    SSH_LOGIN,
    Check,
    DiagnosticReport,
    Diagnostics,
)
from core.services import Services
from tests.fakecomfy import FakeComfy
from tests.setup_fixtures import (  # noqa: F401  (fixtures)
    ADMIN,
    SetupBed,
    alive,
    bed_fixture,
    free_port,
    make_setup_service,
    setup_ssh_fixture,
    wait_until,
)


def diagnostics(bed: SetupBed) -> Diagnostics:
    return Diagnostics(bed.services.servers, bed.services.remote, bed.setup, bed.services.http)


async def test_a_healthy_host_passes_every_check(bed: SetupBed) -> None:
    assert (await bed.setup.run(ADMIN, "box", "test")).succeeded
    report = await diagnostics(bed).diagnose("box")
    assert report.ok, report.failed
    assert [c.name for c in report.checks] == [
        REACHABILITY, SSH_LOGIN, COMFY_PORT, SERVICE, INSTALLATION, GPU]
    assert "0.0.1-test answers on 127.0.0.1:" in report.check(COMFY_PORT).detail
    assert report.check(SERVICE).detail.startswith("supervised (supervisor pid")
    installation = report.check(INSTALLATION).detail
    assert "0.0.1-test" in installation and str(bed.install_dir) in installation
    assert "profile test" in installation
    gpu = report.check(GPU)
    # nvidia-smi when the host has it, else what ComfyUI reports.
    assert gpu.ok and ("Test GPU" in gpu.detail or "MiB free" in gpu.detail)


async def test_a_broken_host_fails_with_hints(bed: SetupBed) -> None:
    assert (await bed.setup.run(ADMIN, "box", "test")).succeeded
    supervisor = bed.pid("supervisor")
    assert supervisor is not None
    os.killpg(supervisor, signal.SIGKILL)  # ComfyUI and its supervisor die
    await wait_until(lambda: not alive(supervisor))
    (bed.install_dir / "main.py").unlink()

    report = await diagnostics(bed).diagnose("box")
    assert not report.ok
    assert report.check(REACHABILITY).ok and report.check(SSH_LOGIN).ok
    port = report.check(COMFY_PORT)
    assert port.ok is False and "nothing listens" in port.detail
    assert port.hint == "Start ComfyUI with /setup run box."
    service = report.check(SERVICE)
    assert service.ok is False and "not running" in service.detail
    assert "starting ComfyUI" in service.detail  # the last lines of ComfyUI's log
    install = report.check(INSTALLATION)
    assert install.ok is False and "no ComfyUI in" in install.detail
    assert install.hint and "/setup run box" in install.hint


async def test_a_changed_host_key_fails_the_login_check(bed: SetupBed) -> None:
    await bed.ssh.rotate_host_key()
    report = await diagnostics(bed).diagnose("box")
    login = report.check(SSH_LOGIN)
    assert report.check(REACHABILITY).ok
    assert login.ok is False and "host key" in login.detail
    assert login.hint and "add it again" in login.hint
    assert report.check(INSTALLATION).ok is None  # not checked


async def test_an_unreachable_host_skips_the_rest(services: Services, tmp_path) -> None:  # type: ignore[no-untyped-def]
    closed = free_port()
    await services.servers.add_ssh(ADMIN, "gone", "127.0.0.1", closed, "root",
                                   services.remote.key.public_openssh, comfy_port=8188)
    setup = make_setup_service(services, tmp_path / "srv" / "ComfyUI")
    report = await Diagnostics(services.servers, services.remote, setup).diagnose("gone")
    reach = report.check(REACHABILITY)
    assert reach.ok is False and f"127.0.0.1:{closed}" in reach.detail and reach.hint
    assert [c.ok for c in report.checks[1:]] == [None] * 5
    assert all(c.detail == "not checked: the host is unreachable" for c in report.checks[1:])


async def test_a_direct_server_is_checked_over_http(services: Services, tmp_path) -> None:  # type: ignore[no-untyped-def]
    comfy = FakeComfy(models={"checkpoints": ["a.safetensors"]})
    await comfy.start()
    try:
        await services.servers.add_direct(ADMIN, "direct", comfy.url)
        setup = make_setup_service(services, tmp_path / "srv" / "ComfyUI")
        report = await Diagnostics(services.servers, services.remote, setup,
                                   services.http).diagnose("direct")
    finally:
        await comfy.stop()
    assert [c.name for c in report.checks] == [REACHABILITY, COMFY_PORT, GPU]
    assert report.check(REACHABILITY).ok and report.check(COMFY_PORT).ok
    # The recorded ComfyUI ran without a GPU: that is what the check must say.
    gpu = report.check(GPU)
    assert gpu.ok is False and "runs on the CPU" in gpu.detail and gpu.hint


def test_the_embed_shows_each_check_and_hints_for_failures() -> None:
    from bot.diagnose_render import diagnosis_embed

    report = DiagnosticReport("box", "ssh", (
        Check(REACHABILITY, True, "127.0.0.1:22 accepts connections (1 ms)", "unused"),
        Check(COMFY_PORT, False, "nothing listens on 127.0.0.1:8188 on the server",
              "Start ComfyUI with /setup run box."),
        Check(GPU, None, "not checked: SSH login failed"),
    ), 0.4)
    embed = diagnosis_embed(report)
    assert embed.title == "box: 1 problem found"
    fields = {f.name: f.value for f in embed.fields}
    assert fields["✅ Reachability"] == "127.0.0.1:22 accepts connections (1 ms)"
    assert fields["❌ ComfyUI port"].endswith("→ Start ComfyUI with /setup run box.")
    assert fields["➖ GPU and VRAM"] == "not checked: SSH login failed"
