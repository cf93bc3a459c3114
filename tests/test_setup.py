"""SetupService against real SSH servers on 127.0.0.1 (asyncssh and OpenSSH), running the
test profile: real shell commands, a flaky step, a slow step, the shipped supervisor."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from core.db.models import AuditLog, ServerExecution, SetupScript
from core.errors import ConfigError, ResourceBusy, ValidationFailed
from core.services import Services
from core.setup import (
    DEFAULT_PROFILE_DIR,
    RESTART_ERROR,
    SetupProfile,
    SetupService,
    load_profiles,
)
from tests.setup_fixtures import (  # noqa: F401  (fixtures)
    ADMIN,
    TEST_PROFILES,
    SetupBed,
    alive,
    bed_fixture,
    comfy_answers,
    make_setup_service,
    setup_ssh_fixture,
    stop_supervisor,
    wait_until,
)

ALL_STEPS = ["prepare", "fake comfyui", "flaky", "slow", "start", "wait"]


async def row(services: Services, execution_id: int) -> ServerExecution:
    async with services.sessions() as session:
        found = await session.get(ServerExecution, execution_id)
    assert found is not None
    return found


# --------------------------------------------------------------------------- runs


async def test_full_run_then_rerun_skips_everything(bed: SetupBed) -> None:
    view = await bed.setup.run(ADMIN, "box", "test")
    assert view.succeeded, view.error
    assert view.ran() == ALL_STEPS and view.skipped() == []
    assert bed.ran() == ["prepare", "fake comfyui", "flaky", "slow"]
    assert comfy_answers(bed.comfy_port)
    supervisor = bed.pid("supervisor")
    assert supervisor is not None and alive(supervisor)

    stored = await row(bed.services, view.id)
    assert stored.status == "succeeded" and stored.completed_at is not None
    assert stored.current_step == stored.total_steps == 6
    assert "==> [6/6] wait: done" in (stored.output or "")
    assert "a line on stderr" in (stored.output or "")  # stderr is in the log too
    assert "ComfyUI answers on port" in (stored.output_tail or "")

    started = time.monotonic()
    again = await bed.setup.run(ADMIN, "box", "test")
    # Only the final check (wait, which has no "already done") runs again.
    assert again.succeeded and again.skipped() == ALL_STEPS[:-1] and again.ran() == ["wait"]
    assert time.monotonic() - started < 5
    assert bed.ran() == ["prepare", "fake comfyui", "flaky", "slow"]  # nothing re-ran
    assert bed.pid("supervisor") == supervisor  # the running ComfyUI was left alone
    # /setup status rebuilds the step list from the stored log.
    latest = await bed.setup.get(again.id)
    assert [o.outcome for o in latest.outcomes] == ["skipped"] * 5 + ["done"]
    async with bed.services.sessions() as session:
        audits = (await session.scalars(
            select(AuditLog).where(AuditLog.action == "setup run"))).all()
    assert [a.outcome for a in audits] == ["ok", "ok"]


async def test_failure_at_a_step_then_rerun_resumes_there(bed: SetupBed) -> None:
    failed = await bed.setup.run(ADMIN, "box", "test", params={"flaky": "yes"})
    assert failed.status == "failed"
    assert failed.current_step == 3 and failed.step_name == "flaky"
    assert failed.error is not None
    assert "Step 3/6 (flaky) failed with exit status 3" in failed.error
    assert "something went wrong on purpose" in failed.error  # the stderr tail
    stored = await row(bed.services, failed.id)
    assert stored.status == "failed" and stored.error_log == failed.error

    resumed = await bed.setup.run(ADMIN, "box", "test", params={"flaky": "yes"})
    assert resumed.succeeded, resumed.error
    assert resumed.skipped() == ["prepare", "fake comfyui"]
    assert resumed.ran() == ["flaky", "slow", "start", "wait"]
    assert bed.ran() == ["prepare", "fake comfyui", "flaky", "flaky", "slow"]


async def test_dropped_connection_mid_step_then_rerun_resumes(bed: SetupBed) -> None:
    view = await bed.setup.begin(ADMIN, "box", "test", params={"slow_seconds": "5"})
    task = bed.setup.start(view.id)

    def slow_started() -> bool:
        snap = bed.setup.snapshot(view.id)
        return snap is not None and "slow: started" in snap.output_tail

    await wait_until(slow_started)
    bed.ssh.drop_connections()
    dropped = await asyncio.wait_for(task, 10)
    assert dropped.status == "failed" and dropped.step_name == "slow"
    assert "connection" in (dropped.error or "").lower()
    assert not (bed.install_dir / "slow.done").exists()

    resumed = await bed.setup.run(ADMIN, "box", "test")
    assert resumed.succeeded, resumed.error
    assert resumed.skipped() == ["prepare", "fake comfyui", "flaky"]
    assert resumed.ran() == ["slow", "start", "wait"]


async def test_a_second_setup_on_the_same_server_is_refused(bed: SetupBed) -> None:
    first = await bed.setup.begin(ADMIN, "box", "test", params={"slow_seconds": "0.5"})
    task = bed.setup.start(first.id)
    with pytest.raises(ResourceBusy, match="busy on box"):
        await bed.setup.begin(ADMIN, "box", "test")
    with pytest.raises(ResourceBusy):
        await bed.setup.reset(ADMIN, "box", "test")
    # The pending/running row is what makes autostop see the server as busy.
    assert (await row(bed.services, first.id)).status in ("pending", "running")
    assert await bed.services.server_ops.busy(bed.server.id)
    assert (await asyncio.wait_for(task, 15)).succeeded
    assert not await bed.services.server_ops.busy(bed.server.id)
    again = await bed.setup.begin(ADMIN, "box", "test")  # the lock was released
    await bed.setup.abandon(again.id, "not needed")
    assert (await row(bed.services, again.id)).status == "failed"


async def test_a_step_past_its_timeout_is_stopped_and_fails(
    bed: SetupBed, tmp_path: Path
) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "hang.toml").write_text(
        '[params]\ninstall_dir = "/tmp/unused/dir"\npidfile = "x"\n'
        '[[steps]]\nname = "hang"\ntimeout = 1\n'
        'run = "echo $$ > {{pidfile}}; echo about to hang; sleep 30"\n')
    pidfile = tmp_path / "hang.pid"
    service = SetupService(bed.services.settings, bed.services.sessions, bed.services.servers,
                           bed.services.remote, bed.services.audit,
                           profile_dirs=(DEFAULT_PROFILE_DIR, profiles))
    view = await service.run(ADMIN, "box", "hang", params={"pidfile": str(pidfile)})
    assert view.status == "failed"
    assert view.error == ("Step 1/1 (hang) did not finish within 1 seconds and was stopped."
                          "\nLast lines of its output:\nabout to hang")
    await wait_until(lambda: not alive(int(pidfile.read_text())))  # the remote side too


async def test_a_chatty_step_keeps_its_tail_and_the_other_steps(
    bed: SetupBed, tmp_path: Path
) -> None:
    """Issue 12: a step printing 40 MB (no newline for most of it) keeps the end of its
    output with a note of how much was dropped, and the next step's log survives."""
    from core.setup.runlog import MAX_STEP_LOG_CHARS

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "chatty.toml").write_text(
        '[params]\ninstall_dir = "/tmp/unused/dir"\n'
        '[[steps]]\nname = "chatty"\ntimeout = 300\n'
        'run = "seq 1 2000000; head -c 30000000 /dev/zero | tr \'\\\\0\' y; echo; '
        'echo chatty-end; exit 4"\n')
    service = SetupService(bed.services.settings, bed.services.sessions, bed.services.servers,
                           bed.services.remote, bed.services.audit,
                           profile_dirs=(DEFAULT_PROFILE_DIR, profiles))
    view = await service.run(ADMIN, "box", "chatty")
    assert view.status == "failed"
    assert view.output_tail.splitlines()[-1] == "chatty-end"
    log = await service.log(view.id)
    assert len(log) < MAX_STEP_LOG_CHARS + 10_000
    lines = log.splitlines()
    assert lines[0].startswith("==> comfyvast setup #")
    assert lines[1] == "==> [1/1] chatty: running (timeout 300 s)"
    assert lines[2].startswith("[") and lines[2].endswith(
        " earlier characters of this step's output dropped]")
    assert lines[-3] == "chatty-end"
    assert lines[-2].startswith("==> [1/1] chatty: failed in ")
    assert set(lines[-4]) == {"y"}
    assert lines[-1] == "==> failed: Step 1/1 (chatty) failed with exit status 4."


async def test_a_changed_host_key_is_refused(bed: SetupBed) -> None:
    await bed.ssh.rotate_host_key()
    view = await bed.setup.run(ADMIN, "box", "test")
    assert view.status == "failed"
    assert view.error is not None and view.error.startswith("Setup refused:")
    assert "host key" in view.error and "changed" in view.error
    assert view.ran() == [] and not bed.install_dir.exists()


async def test_reset_removes_the_installation_and_the_next_run_starts_clean(
    bed: SetupBed,
) -> None:
    assert (await bed.setup.run(ADMIN, "box", "test")).succeeded
    supervisor = bed.pid()
    assert supervisor is not None
    plan = await bed.setup.reset_plan("box")
    assert plan.profile == "test" and str(bed.install_dir) in plan.summary

    result = await bed.setup.reset(ADMIN, "box")
    assert result.profile == "test" and "removed" in result.output_tail
    assert not bed.install_dir.exists()
    await wait_until(lambda: not alive(supervisor))
    assert not comfy_answers(bed.comfy_port)

    fresh = await bed.setup.run(ADMIN, "box", "test")
    assert fresh.succeeded and fresh.ran() == ALL_STEPS


async def test_values_reach_the_shell_quoted(bed: SetupBed, tmp_path: Path) -> None:
    marker = f"pwned-{secrets.token_hex(4)}"
    odd = tmp_path / "srv" / f"it's a $(touch {marker}) `touch {marker}` dir; touch {marker}"
    service = make_setup_service(bed.services, odd)
    try:
        view = await service.run(ADMIN, "box", "test")
        assert view.succeeded, view.error
        assert (odd / "main.py").is_file() and comfy_answers(bed.comfy_port)
        home = Path.home()
        assert not (home / marker).exists() and not list(tmp_path.rglob(marker))
        reset = await service.reset(ADMIN, "box", "test")
        assert "removed" in reset.output_tail and not odd.exists()
    finally:
        stop_supervisor(odd)
        await service.close()


async def test_runs_left_running_by_a_dead_bot_are_failed_on_start(bed: SetupBed) -> None:
    async with bed.services.sessions.begin() as session:
        stale = ServerExecution(server_id=bed.server.id, status="running", current_step=4,
                                total_steps=6, step_name="slow")
        session.add(stale)
        await session.flush()
        stale_id = stale.id
    restarted = make_setup_service(bed.services, bed.install_dir)
    await restarted.startup()
    stored = await row(bed.services, stale_id)
    assert stored.status == "failed" and stored.error_log == RESTART_ERROR
    assert not await bed.services.server_ops.busy(bed.server.id)
    # Nothing holds the server any more: a new run may begin (and would resume).
    fresh = await restarted.begin(ADMIN, "box", "test")
    await restarted.abandon(fresh.id, "not needed")


async def test_setup_needs_ssh_and_a_known_profile(bed: SetupBed) -> None:
    await bed.services.servers.add_direct(ADMIN, "direct", "http://127.0.0.1:1")
    with pytest.raises(ValidationFailed, match="no SSH access"):
        await bed.setup.begin(ADMIN, "direct")
    with pytest.raises(Exception, match="no setup profile named 'nope'"):
        await bed.setup.begin(ADMIN, "box", "nope")
    with pytest.raises(ValidationFailed, match="no parameter"):
        await bed.setup.begin(ADMIN, "box", "test", params={"nope": "1"})
    assert not bed.setup.busy(bed.server.id)


# --------------------------------------------------------------------------- profiles


def test_shipped_profiles_load_and_share_steps() -> None:
    profiles = load_profiles([DEFAULT_PROFILE_DIR, TEST_PROFILES])
    default, fast, test = profiles["default"], profiles["fast"], profiles["test"]
    plain = profiles["plain-test"]
    assert [s.name for s in default.steps] == [
        "system packages", "clone", "venv", "pytorch", "requirements", "start", "autostart",
        "wait"]
    # Vast's ComfyUI image: checks path, service and port; installs and starts nothing.
    assert [s.name for s in fast.steps] == ["verify", "service", "wait"]
    assert fast.params["port"] == "18188" and fast.params["install_dir"] == "/workspace/ComfyUI"
    # ComfyUI is pinned in one place, to a current Comfy-Org release.
    assert default.params["comfy_ref"] == "v0.35.1"
    assert "Comfy-Org/ComfyUI" in default.params["comfy_repo"]
    # `from = "default"` copies the step, so the test profiles run the shipped supervisor
    # and the shipped boot hook.
    assert default.step("start").run == test.step("start").run == plain.step("start").run
    assert default.step("autostart").run == plain.step("autostart").run
    assert test.step("start").timeout == 30 and default.step("start").timeout == 120
    values = default.resolve({"install_dir": "/srv/comfy ui"})
    assert values["python"] == "/srv/comfy ui/venv/bin/python"
    assert default.render("cd {{install_dir}}/models", values) == "cd '/srv/comfy ui'/models"
    round_trip = SetupProfile.from_entries(default.name, default.version, default.description,
                                           default.to_entries())
    assert round_trip == default


@pytest.mark.parametrize(("text", "problem"), [
    ('[[steps]]\nname = "a"\nrun = "echo {{missing}}"\n', "undefined parameters"),
    ('[params]\na = "{{b}}"\nb = "x"\n[[steps]]\nname = "a"\nrun = "true"\n', "defined after"),
    ('[[steps]]\nname = "a"\nrun = "true"\n[[steps]]\nname = "a"\nrun = "true"\n', "unique"),
    ('[[steps]]\nname = "a"\nfrom = "ghost"\n', "no profile 'ghost'"),
    ('[[steps]]\nname = "a"\nrun = "true"\ntimeout = 0\n', "timeouts"),
    ('surprise = 1\n[[steps]]\nname = "a"\nrun = "true"\n', "unknown keys"),
    ('version = "1"\n', "at least one"),
])
def test_invalid_profiles_are_refused_with_the_reason(
    tmp_path: Path, text: str, problem: str
) -> None:
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_profiles([tmp_path])


@pytest.mark.parametrize("install_dir", ["relative/dir", "/", "/opt", "/opt/../etc/x"])
def test_install_dir_must_be_a_safe_absolute_path(install_dir: str) -> None:
    default = load_profiles([DEFAULT_PROFILE_DIR])["default"]
    with pytest.raises(ValidationFailed, match="install_dir"):
        default.resolve({"install_dir": install_dir})


async def test_profiles_are_stored_and_updated_by_version(
    services: Services, tmp_path: Path
) -> None:
    (tmp_path / "mine.toml").write_text(
        'version = "1"\n[[steps]]\nname = "hello"\nrun = "echo hello"\n')
    service = SetupService(services.settings, services.sessions, services.servers,
                           services.remote, services.audit,
                           profile_dirs=(DEFAULT_PROFILE_DIR, tmp_path))
    assert sorted(await service.sync_profiles()) == ["default", "fast", "mine"]
    assert await service.sync_profiles() == []  # unchanged: nothing written
    (tmp_path / "mine.toml").write_text(
        'version = "2"\n[[steps]]\nname = "hello"\nrun = "echo hello again"\n')
    assert await service.sync_profiles() == ["mine"]
    async with services.sessions() as session:
        stored = (await session.scalars(
            select(SetupScript).where(SetupScript.name == "mine"))).one()
    assert stored.version == "2" and stored.steps[0]["run"] == "echo hello again"
    assert [p.name for p in await service.profiles()] == ["default", "fast", "mine"]
