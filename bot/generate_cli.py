"""`python -m bot generate`: one generation without Discord."""

from __future__ import annotations

import argparse
from typing import Any

from core.config import Settings


def add_generate_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="run one generation against a ComfyUI URL")
    p.add_argument("prompt")
    p.add_argument("--comfy-url", required=True)


async def run_generate(settings: Settings, args: argparse.Namespace) -> int:
    raise NotImplementedError
