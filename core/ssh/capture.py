"""Capturing a remote command's output: :class:`OutputCapture` and the pid report.

Each stream is collected up to a cap (for :class:`~core.ssh.run.CommandResult`), keeping
its *tail*, since that is where a failure explains itself, and counting the bytes dropped;
a server's output is untrusted and may be endless. When asked, the stream is also reported
line by line as it arrives, each line cut at :data:`MAX_LINE_CHARS`. stderr starts with
the shell's pid report (:data:`PID_REPORT`), which is stripped here and kept as
:attr:`OutputCapture.pid` so a command can be stopped later (:func:`core.ssh.run.stop`).
"""

from __future__ import annotations

import codecs
import inspect
import re
from collections.abc import Awaitable, Callable

import asyncssh

LineCallback = Callable[[str, str], Awaitable[None] | None]

# Lines of stderr kept in SSHCommandFailed: enough to see the cause, short enough for Discord.
STDERR_TAIL_LINES = 15
STDERR_TAIL_CHARS = 1500

# Bytes of each stream kept for CommandResult by default: far more than any command of the
# product prints on purpose (a model listing, a probe), small enough that a runaway command
# cannot grow the bot (issue 12: 300 MiB of output took it from 125 to 740 MiB).
DEFAULT_MAX_OUTPUT = 2 * 1024 * 1024
# A "line" without a line ending (one endless progress bar, binary junk) is cut into pieces
# of this many characters, so the partial line held between reads stays bounded too.
MAX_LINE_CHARS = 16384

_NEWLINES = re.compile(r"\r\n|\r|\n")
_READ_CHUNK = 65536

# The first thing every command does is report its shell's pid on stderr (the client strips
# that line). sshd starts each session with setsid(), so the pid is also the process group
# of everything the command starts. We need it to stop a timed-out command: OpenSSH ignores
# "signal" requests for root logins ("session signalling requires privilege separation"),
# and Vast.ai instances are root, so we kill the group with a second command instead.
_PID_MARKER = b"\x1ecomfyvast-pid="
PID_REPORT = "printf '\\036comfyvast-pid=%s\\n' \"$$\" >&2;"


def stderr_tail(text: str) -> str:
    """The last non-blank lines of ``text``, within the limits above."""
    lines = [ln for ln in text.rstrip().splitlines() if ln.strip()]
    tail = "\n".join(lines[-STDERR_TAIL_LINES:])
    return tail[-STDERR_TAIL_CHARS:]


class OutputCapture:
    """Collects one output stream and reports it line by line."""

    def __init__(
        self,
        name: str,
        on_line: LineCallback | None,
        *,
        pid_marker: bool = False,
        max_bytes: int = DEFAULT_MAX_OUTPUT,
    ) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.name = name
        self._on_line = on_line
        self._max = max_bytes
        # The newest output: trimmed to the last max_bytes whenever it reaches twice that,
        # so memory stays within 2 * max_bytes and trimming costs O(1) per byte.
        self._buffer = bytearray()
        # Bytes received but no longer kept (the oldest ones).
        self.dropped = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._partial = ""
        # stderr starts with our pid report; hold bytes back until that line is complete.
        self._head: bytes | None = b"" if pid_marker else None
        self.pid: int | None = None

    def text(self) -> str:
        """The kept tail of the stream (a cut multi-byte character decodes as U+FFFD)."""
        self._trim(self._max)
        return bytes(self._buffer).decode("utf-8", "replace")

    def _keep(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= 2 * self._max:
            self._trim(self._max)

    def _trim(self, size: int) -> None:
        excess = len(self._buffer) - size
        if excess > 0:
            del self._buffer[:excess]
            self.dropped += excess

    async def pump(self, reader: asyncssh.SSHReader[bytes]) -> None:
        while True:
            data = await reader.read(_READ_CHUNK)
            if not data:
                break
            if self._head is not None:
                data = self._strip_pid(data)
                if not data:
                    continue
            self._keep(data)
            if self._on_line is not None:
                await self._emit(self._decoder.decode(data), final=False)
        if self._head:
            # Not our report after all (the shell failed before it): keep the bytes.
            self._keep(self._head)
            if self._on_line is not None:
                await self._emit(self._decoder.decode(self._head), final=False)
            self._head = None
        if self._on_line is not None:
            await self._emit(self._decoder.decode(b"", final=True), final=True)

    def _strip_pid(self, data: bytes) -> bytes:
        assert self._head is not None
        head = self._head + data
        if len(head) < len(_PID_MARKER) and _PID_MARKER.startswith(head):
            self._head = head
            return b""
        if not head.startswith(_PID_MARKER):
            self._head = None
            return head
        end = head.find(b"\n")
        if end < 0:
            self._head = head
            return b""
        self._head = None
        digits = head[len(_PID_MARKER) : end]
        if digits.isdigit():
            self.pid = int(digits)
        return head[end + 1 :]

    async def _emit(self, text: str, *, final: bool) -> None:
        assert self._on_line is not None
        text = self._partial + text
        hold = ""
        if not final and text.endswith("\r"):
            # Might be the first half of "\r\n" split across reads.
            text, hold = text[:-1], "\r"
        lines = _NEWLINES.split(text)
        partial = lines.pop()
        if len(partial) > MAX_LINE_CHARS:
            # No line ending in sight: pass it on in pieces rather than hold it all.
            cut = len(partial) - len(partial) % MAX_LINE_CHARS
            lines.extend(
                partial[i : i + MAX_LINE_CHARS] for i in range(0, cut, MAX_LINE_CHARS)
            )
            partial = partial[cut:]
        self._partial = partial + hold
        if final and self._partial:
            lines.append(self._partial)
            self._partial = ""
        for whole in lines:
            # A line longer than the limit arrives in pieces, like an unended one.
            for start in range(0, max(len(whole), 1), MAX_LINE_CHARS):
                result = self._on_line(self.name, whole[start : start + MAX_LINE_CHARS])
                if inspect.isawaitable(result):
                    await result
