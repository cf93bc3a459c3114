"""Command line: run the bot (default), `doctor`, `generate`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Sequence

import discord

from bot.bot import ComfyVastBot, point_discord_at
from bot.logging_setup import setup_logging
from core.config import Settings, load_settings
from core.errors import ConfigError
from core.services import build_services

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

NO_TOKEN = (
    "No Discord bot token is set: put it in config.toml under [discord] as "  # noqa: S105
    'token = "..." or set the DISCORD_TOKEN environment variable.'
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comfyvast", description="Discord bot for ComfyUI on Vast.ai and your own GPUs."
    )
    parser.add_argument(
        "--config", help="path to config.toml (default: $COMFYVAST_CONFIG or ./config.toml)"
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the bot (the default)")
    sub.add_parser("doctor", help="check configuration, database and external systems")
    from bot.generate_cli import add_generate_parser

    add_generate_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"comfyvast: {exc}", file=sys.stderr)
        return EXIT_USAGE
    command = args.command or "run"
    if command == "doctor":
        from bot.doctor import run_doctor

        return asyncio.run(run_doctor(settings))
    if command == "generate":
        from bot.generate_cli import run_generate

        return asyncio.run(run_generate(settings, args))
    if settings.discord.token is None or not settings.discord.token.get_secret_value().strip():
        print(f"comfyvast: {NO_TOKEN}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(run_bot(settings))
    except KeyboardInterrupt:
        return EXIT_OK


async def run_bot(settings: Settings) -> int:
    setup_logging(settings)
    # Progress messages allocate a lot of short-lived objects; with the default gen-0
    # threshold (700) many live just long enough to be promoted, and the full collections
    # that follow stall the event loop for 50-100 ms (see also _freeze_when_ready).
    gc.set_threshold(50_000, 50, 10)
    point_discord_at(settings.discord.api_base_url, settings.discord.gateway_url)
    services = await build_services(settings)
    bot = ComfyVastBot(services)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    assert settings.discord.token is not None
    token = settings.discord.token.get_secret_value()
    exit_code = EXIT_OK
    try:
        async with bot:
            runner = asyncio.create_task(bot.start(token), name="discord")
            freezer = asyncio.create_task(_freeze_when_ready(bot), name="gc-freeze")
            stopper = asyncio.create_task(stop.wait(), name="signals")
            done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                log.info("signal received; shutting down")
                await bot.close()
            stopper.cancel()
            freezer.cancel()
            try:
                await runner
            except discord.LoginFailure:
                log.error("Discord refused the token: check [discord] token / DISCORD_TOKEN")
                exit_code = EXIT_USAGE
    finally:
        await services.close()
    log.info("stopped")
    return exit_code


async def _freeze_when_ready(bot: ComfyVastBot) -> None:
    """Once connected, move what exists (modules, commands, caches: it lives as long as
    the process) out of the collector's sight, so full collections stay short."""
    await bot.wait_until_ready()
    gc.collect()
    gc.freeze()
    log.info("start-up objects frozen: %d", gc.get_freeze_count())
