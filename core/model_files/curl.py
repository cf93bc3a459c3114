"""Talking to curl: the config it reads on stdin (so secrets stay out of every argv) and
its progress meter, parsed into byte counts, speed and time left."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_CURL_METER = re.compile(
    r"^\s*(\d{1,3})\s+(\S+)\s+(\d{1,3})\s+(\S+)\s+(\d{1,3})\s+(\S+)\s+(\S+)\s+(\S+)\s+.*\s(\S+)\s*$"
)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}


def _curl_quote(value: str) -> str:
    """A double-quoted string for a curl config file (backslash and quote escaped)."""
    if any(ch in value for ch in "\r\n\0"):
        raise ValueError("curl config values cannot contain line breaks")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def curl_config(url: str, headers: Iterable[str]) -> str:
    """The secret part of curl's arguments, fed to ``curl -K -`` on stdin: the URL (it may
    carry a signed query) and the token headers never become part of any argv."""
    lines = [f"url = {_curl_quote(url)}"]
    lines += [f"header = {_curl_quote(h)}" for h in headers]
    return "\n".join(lines) + "\n"


def parse_curl_size(text: str) -> int:
    """curl's progress-meter sizes: ``39339``, ``800k``, ``45.2M``, ``1.5G`` (powers of 1024)."""
    text = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtTpP]?)", text)
    if not match:
        raise ValueError(f"not a curl size: {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


@dataclass(frozen=True, slots=True)
class CurlProgress:
    bytes_done: int
    bytes_total: int | None
    speed: float  # bytes per second
    eta_seconds: float | None

    @property
    def fraction(self) -> float | None:
        if not self.bytes_total:
            return None
        return min(1.0, self.bytes_done / self.bytes_total)


class CurlMeter:
    """Parses curl's default progress meter (one line per redraw, ended by ``\\r``).

    Columns: % Total % Received % Xferd AvgDload AvgUpload TimeTotal TimeSpent TimeLeft
    Current. When resuming, curl counts from the resume offset; ``offset`` adds it back.
    ``expected_total`` is the probe's exact size, preferred over the meter's rounded total.
    """

    def __init__(self, offset: int = 0, expected_total: int | None = None) -> None:
        self.offset = offset
        self.expected_total = expected_total

    def feed(self, line: str) -> CurlProgress | None:
        match = _CURL_METER.match(line)
        if not match:
            return None
        try:
            total = parse_curl_size(match.group(2))
            received = parse_curl_size(match.group(4))
            average = parse_curl_size(match.group(7))
            current = parse_curl_size(match.group(9))
        except ValueError:
            return None
        done = self.offset + received
        # The probe's exact size beats the meter's rounded one ("1562k").
        full = self.expected_total or (self.offset + total if total else None)
        speed = float(current or average)
        eta = (full - done) / speed if full and speed > 0 and full >= done else None
        return CurlProgress(done, full, speed, eta)
