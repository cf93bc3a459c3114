"""Running commands: streaming, exit status, timeouts, quoting and secrets."""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest

from core.ssh import (
    SSHCommandFailed,
    SSHPool,
    SSHTarget,
    SSHTimeout,
    quote_command,
)
from core.ssh.capture import MAX_LINE_CHARS
from tests.ssh.conftest import process_cmdlines


async def test_lines_stream_in_order_while_the_command_runs(pool: SSHPool, target: SSHTarget):
    seen: list[tuple[str, str, float]] = []

    async def on_line(stream: str, line: str) -> None:
        seen.append((stream, line, time.monotonic()))

    command = "echo one; echo e-one >&2; echo two; sleep 0.5; echo e-two >&2; printf 'three'"
    result = await pool.run(target, command, timeout=10, on_line=on_line)
    done = time.monotonic()

    assert [line for stream, line, _ in seen if stream == "stdout"] == ["one", "two", "three"]
    assert [line for stream, line, _ in seen if stream == "stderr"] == ["e-one", "e-two"]
    first_arrival = seen[0][2]
    assert done - first_arrival > 0.3, "the first line arrived only at the end"
    assert result.exit_status == 0
    assert result.stdout == "one\ntwo\nthree"
    assert result.stderr == "e-one\ne-two\n"


async def test_sync_callback_and_carriage_returns(pool: SSHPool, target: SSHTarget):
    lines: list[str] = []
    await pool.run(
        target,
        r"printf '10%%\r50%%\r100%%\r\ndone\n'",
        timeout=10,
        on_line=lambda _stream, line: lines.append(line),
    )
    assert lines == ["10%", "50%", "100%", "done"]


async def test_nonzero_exit_raises_with_stderr_tail(pool: SSHPool, target: SSHTarget):
    command = 'i=1; while [ $i -le 40 ]; do echo "err $i" >&2; i=$((i+1)); done; exit 7'
    with pytest.raises(SSHCommandFailed) as info:
        await pool.run(target, command, timeout=10)
    err = info.value
    assert err.exit_status == 7
    assert err.stderr_tail.splitlines()[-1] == "err 40"
    assert "err 1\n" not in err.stderr_tail
    assert str(err).startswith(f"The command on {target.address} failed with exit status 7.")
    assert str(err).rstrip().endswith("err 40")


async def test_check_false_returns_the_status(pool: SSHPool, target: SSHTarget):
    result = await pool.run(target, "echo out; exit 3", timeout=10, check=False)
    assert (result.exit_status, result.stdout, result.stderr) == (3, "out\n", "")


async def test_timeout_raises_and_kills_the_remote_process(pool: SSHPool, target: SSHTarget):
    marker = f"37.{secrets.randbelow(10**6):06d}"
    needle = f"sleep\0{marker}".encode()
    started = time.monotonic()
    with pytest.raises(SSHTimeout) as info:
        await pool.run(target, f"echo started; sleep {marker}; echo never", timeout=1)
    assert time.monotonic() - started < 6
    assert "did not finish within 1 seconds" in str(info.value)

    deadline = time.monotonic() + 5
    while any(needle in cmdline for cmdline in process_cmdlines()):
        assert time.monotonic() < deadline, "the remote sleep is still running"
        await asyncio.sleep(0.1)
    # The connection is still usable afterwards.
    assert (await pool.run(target, "echo ok", timeout=10)).stdout == "ok\n"


HOSTILE = [
    "a;rm -rf ~",
    "$(id)",
    "`id`",
    "it's",
    'say "hi"',
    "back\\slash",
    "line one\nline two",
    "  spaces  ",
    "*",
    "--help",
    "$HOME ${PATH}",
    "",
    "ünïcødé ✓",
    "tab\there",
]


async def test_hostile_values_reach_the_remote_side_verbatim(pool: SSHPool, target: SSHTarget):
    for value in HOSTILE:
        result = await pool.run(target, quote_command(["printf", "%s", value]), timeout=10)
        assert result.stdout == value


async def test_env_values_are_exported_verbatim(pool: SSHPool, target: SSHTarget):
    env = {"PLAIN": "x", "HOSTILE": "$(id); 'q' \"d\" `id`"}
    result = await pool.run(target, 'printf "%s|%s" "$PLAIN" "$HOSTILE"', timeout=10, env=env)
    assert result.stdout == "x|" + env["HOSTILE"]


async def test_input_reaches_stdin(pool: SSHPool, target: SSHTarget):
    result = await pool.run(target, "wc -c", timeout=10, input=b"12345")
    assert result.stdout.strip() == "5"


async def test_secret_env_never_appears_on_a_command_line(pool: SSHPool, target: SSHTarget):
    secret = "hf_" + secrets.token_hex(16)
    marker = f"1.{secrets.randbelow(10**6):06d}"
    command = f'printf %s "$HF_TOKEN"; cat; sleep {marker}'
    task = asyncio.create_task(
        pool.run(
            target,
            command,
            timeout=15,
            secret_env={"HF_TOKEN": secret, "OTHER": "x y'z"},
            input="and stdin",
        )
    )
    saw_command = False
    while not task.done():
        cmdlines = process_cmdlines()
        assert not any(secret.encode() in c for c in cmdlines), "secret visible in a cmdline"
        saw_command = saw_command or any(marker.encode() in c for c in cmdlines)
        await asyncio.sleep(0.02)
    result = await task
    assert saw_command, "never saw the remote command, so the check proved nothing"
    assert result.stdout == secret + "and stdin"


async def test_secret_env_rejects_newlines(pool: SSHPool, target: SSHTarget):
    with pytest.raises(ValueError, match="newline") as info:
        await pool.run(target, "true", timeout=5, secret_env={"T": "a\nb"})
    assert "a\nb" not in str(info.value)


async def test_cancel_right_after_start_still_kills_the_remote_process(
    pool: SSHPool, target: SSHTarget
):
    """Cancelled before the shell reported its pid: the command must not keep running."""
    await pool.run(target, "true", timeout=10)  # connection already open: the race is tight
    marker = f"38.{secrets.randbelow(10**6):06d}"
    needle = f"sleep\0{marker}".encode()
    task = asyncio.create_task(pool.run(target, f"sleep {marker}", timeout=60))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 8
    while any(needle in cmdline for cmdline in process_cmdlines()):
        assert time.monotonic() < deadline, "the remote sleep is still running"
        await asyncio.sleep(0.1)


@pytest.mark.timeout(300)  # 96 MiB through SSH under tracemalloc on a busy machine
async def test_output_is_capped_to_its_tail_and_memory_stays_bounded(
    pool: SSHPool, target: SSHTarget
):
    """Issue 12: a server's output is untrusted; 96 MiB of it (twice the peak allowed
    below) must not reach the bot's memory, and the result keeps the end, where a failure
    explains itself."""
    import tracemalloc

    size = 96 * 1024 * 1024
    huge = (
        f"head -c {size} /dev/zero | tr '\\0' x; echo; echo last-line-of-stdout; "
        "seq 1 100000 >&2; echo the-real-error >&2; exit 3"
    )
    longest = 0

    def on_line(_stream: str, line: str) -> None:
        nonlocal longest
        longest = max(longest, len(line))

    tracemalloc.start()
    try:
        with pytest.raises(SSHCommandFailed) as info:
            await pool.run(target, huge, timeout=600, on_line=on_line)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.stderr_tail.splitlines()[-1] == "the-real-error"
    assert longest <= MAX_LINE_CHARS
    # Without the cap the bot held all of it (and more while joining it).
    assert peak < 48 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB"

    size = 8 * 1024 * 1024
    command = (
        f"head -c {size} /dev/zero | tr '\\0' x; echo; echo last-line-of-stdout; "
        f"head -c {size // 2} /dev/zero >&2; echo >&2; echo the-real-error >&2; exit 3"
    )
    result = await pool.run(target, command, timeout=600, check=False, max_output=64 * 1024)
    assert result.exit_status == 3
    assert result.stdout.endswith("x\nlast-line-of-stdout\n")
    assert len(result.stdout.encode()) == 64 * 1024
    assert result.stdout_dropped == size + len("\nlast-line-of-stdout\n") - 64 * 1024
    assert result.stderr.endswith("\nthe-real-error\n")
    assert result.stderr_dropped > 0 and result.truncated


async def test_small_output_is_kept_whole(pool: SSHPool, target: SSHTarget):
    result = await pool.run(target, "printf 'a%.0s' $(seq 1 1000)", timeout=30, max_output=1000)
    assert result.stdout == "a" * 1000
    assert not result.truncated
