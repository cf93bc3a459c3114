"""One setup step over SSH: the remote command (check, then run) and running it into a
run's log, recording whether it was skipped, done or failed."""

from __future__ import annotations

import secrets
import shlex
import time
from collections.abc import Callable, Mapping

from core.setup.profiles import SetupProfile, SetupStep
from core.setup.runlog import Run
from core.setup.types import StepOutcome
from core.ssh import SSHPool, SSHTarget

CHECK_TIMEOUT = 60.0


def posix_sh(script: str) -> str:
    """Run ``script`` with ``sh`` whatever the user's login shell is (zsh does not split
    words, fish is not POSIX). ``exec`` keeps the pid the SSH layer reported, so a timed
    out step is still killed with its whole process group."""
    return "exec sh -c " + shlex.quote(script)


def step_command(
    profile: SetupProfile, step: SetupStep, values: Mapping[str, str], marker: str
) -> str:
    """The one remote command for a step: its check, then (unless the check passed) its
    command with ``set -e``.

    One SSH session per step instead of two halves the round trips. The check runs in its
    own ``sh -e`` (``set -e`` is ignored inside an ``if`` condition), silenced and bounded
    by ``timeout`` when the server has it; when it passes, ``marker`` is printed and
    nothing else runs.
    """
    run = "set -e\n" + profile.render(step.run, values)
    if step.check is None:
        return posix_sh(run)
    check = shlex.quote("set -e\n" + profile.render(step.check, values))
    return posix_sh(
        f"if command -v timeout >/dev/null 2>&1; then limit='timeout {CHECK_TIMEOUT:g}'; "
        "else limit=; fi\n"
        f"if $limit sh -c {check} </dev/null >/dev/null 2>&1; then\n"
        f"  echo {shlex.quote(marker)}\n  exit 0\nfi\n"
        f"unset limit\n{run}"
    )


async def run_step(
    pool: SSHPool,
    target: SSHTarget,
    run: Run,
    index: int,
    total: int,
    step: SetupStep,
    on_update: Callable[[], None],
) -> bool:
    """Run ``step`` (number ``index`` of ``total``) of ``run`` on ``target``, its output
    into the run's log and tail, its outcome into ``run.outcomes`` and a marker line.

    Returns True when the check passed and the command was skipped; raises what the SSH
    layer raised when the step failed.
    """
    label = f"[{index}/{total}] {step.name}"
    run.tail.clear()
    # A marker nobody's output can guess: the check passed and the command was skipped.
    marker = f"comfyvast-step-already-done-{secrets.token_hex(8)}"
    skipped = False
    # "running" is logged with the first output line (never for a skipped step).
    started_logged = False

    def start_log() -> None:
        nonlocal started_logged
        started_logged = True
        run.mark(f"{label}: running (timeout {step.timeout:g} s)")

    def on_line(_stream: str, line: str) -> None:
        nonlocal skipped
        if line == marker:
            skipped = True
            return
        if not started_logged:
            start_log()
        run.output(line)
        on_update()

    started = time.monotonic()
    try:
        await pool.run(
            target, step_command(run.profile, step, run.params, marker),
            timeout=step.timeout, on_line=on_line, env=run.profile.env)
    except BaseException:
        seconds = time.monotonic() - started
        if not started_logged:
            start_log()
        run.outcomes.append(StepOutcome(index, step.name, "failed", round(seconds, 1)))
        run.mark(f"{label}: failed in {seconds:.1f} s")
        raise
    seconds = time.monotonic() - started
    if skipped:
        run.outcomes.append(StepOutcome(index, step.name, "skipped"))
        run.mark(f"{label}: skipped (already done)")
        return True
    if not started_logged:
        start_log()
    run.outcomes.append(StepOutcome(index, step.name, "done", round(seconds, 1)))
    run.mark(f"{label}: done in {seconds:.1f} s")
    return False
