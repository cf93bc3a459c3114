"""/generate (alias /imagine), /progress and /history."""

from __future__ import annotations

from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.autocomplete import name_choices
from bot.checks import actor_of, bot_of, is_admin_member
from bot.context import BotContext
from bot.jobs import STATUS_WORDS, launch_jobs, status_embed
from bot.options import ModelOption, ServerOption, WorkflowOption
from bot.rendering import BRAND_COLOUR, timestamp, truncate
from bot.tree import defer_public
from core.generation import GenerationRequest, InputImage, Viewer, check_input_size

SAMPLERS = Literal[
    "euler",
    "euler_ancestral",
    "heun",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_sde",
    "dpmpp_3m_sde",
    "ddim",
    "uni_pc",
    "lcm",
]
SCHEDULERS = Literal[
    "normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta"
]
MAX_CHOICES = 25
# Job ids are a 32-bit Integer column (PostgreSQL refuses larger values in a lookup).
MAX_JOB_ID = 2**31 - 1


def _matching(names: list[str], current: str) -> list[app_commands.Choice[str]]:
    """Up to 25 names containing what was typed: Discord shows at most 25 choices, so the
    filter does the rest of the work past that limit."""
    needle = current.lower()
    hits = [n for n in names if needle in n.lower()]
    hits.sort(key=lambda n: (not n.lower().startswith(needle), n.lower()))
    return name_choices(hits)


def viewer_of(interaction: discord.Interaction) -> Viewer:
    """Whose jobs the member may see: their guild's, in the channels they can view (and
    their own); admins the whole guild. The channels come from the guild cache with each
    channel's permission overwrites, computed for this member by discord.py."""
    user_id = interaction.user.id
    guild = interaction.guild
    if interaction.guild_id is None:
        return Viewer(user_id, None)
    if is_admin_member(interaction, bot_of(interaction).services.settings):
        return Viewer(user_id, interaction.guild_id, None)
    member = interaction.user
    if guild is None or not isinstance(member, discord.Member):
        # Guild not cached: only the channel the command came from is known visible.
        here = {interaction.channel_id} if interaction.channel_id else set()
        return Viewer(user_id, interaction.guild_id, frozenset(here))
    visible = {c.id for c in guild.channels if c.permissions_for(member).view_channel}
    visible |= {
        t.id
        for t in guild.threads
        if t.type is discord.ChannelType.public_thread and t.permissions_for(member).view_channel
    }
    return Viewer(user_id, guild.id, frozenset(visible))


class Generation(commands.Cog):
    def __init__(self, bot: BotContext) -> None:
        self.bot = bot

    async def _run_generate(
        self,
        interaction: discord.Interaction,
        *,
        prompt: str,
        negative: str | None,
        model: str | None,
        width: int,
        height: int,
        steps: int,
        cfg: float,
        seed: int | None,
        sampler: str,
        scheduler: str,
        batch: int,
        lora: str | None,
        lora_strength: float,
        image: discord.Attachment | None,
        denoise: float,
        workflow: str | None,
        server: str | None,
    ) -> None:
        await defer_public(interaction)
        input_image = None
        if image is not None:
            check_input_size(image.size)
            input_image = InputImage(image.filename, await image.read())
        request = GenerationRequest(
            actor=actor_of(interaction),
            prompt=prompt,
            negative=negative or "",
            model=model,
            width=width,
            height=height,
            steps=steps,
            cfg=cfg,
            seed=seed,
            sampler=sampler,
            scheduler=scheduler,
            batch=batch,
            lora=lora,
            lora_strength=lora_strength,
            image=input_image,
            denoise=denoise,
            workflow=workflow,
            server=server,
        )
        await launch_jobs(self.bot, interaction, [request])

    @app_commands.command(name="generate", description="Generate images from a prompt.")
    @app_commands.describe(
        prompt="What to draw.",
        negative="What to avoid.",
        model="Checkpoint model (default: the server's first).",
        width="Width in pixels, a multiple of 8.",
        height="Height in pixels, a multiple of 8.",
        steps="Sampling steps.",
        cfg="Prompt strength (CFG scale).",
        seed="Seed for reproducible results (random if empty).",
        sampler="Sampler.",
        scheduler="Noise schedule.",
        batch="How many images at once.",
        lora="A LoRA to apply.",
        lora_strength="How strongly the LoRA applies.",
        image="Start from this image (img2img).",
        denoise="With an image: how much to repaint (0-1).",
        workflow="A custom workflow added with /workflow add.",
        server="Run on this server.",
    )
    async def generate(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, 1500],
        negative: app_commands.Range[str, 0, 1500] | None = None,
        model: ModelOption | None = None,
        width: app_commands.Range[int, 64, 4096] = 1024,
        height: app_commands.Range[int, 64, 4096] = 1024,
        steps: app_commands.Range[int, 1, 500] = 25,
        cfg: app_commands.Range[float, 0.1, 100.0] = 7.0,
        seed: app_commands.Range[int, 0, 2**53 - 1] | None = None,
        sampler: SAMPLERS = "euler",
        scheduler: SCHEDULERS = "normal",
        batch: app_commands.Range[int, 1, 16] = 1,
        lora: ModelOption | None = None,
        lora_strength: app_commands.Range[float, -10.0, 10.0] = 1.0,
        image: discord.Attachment | None = None,
        denoise: app_commands.Range[float, 0.01, 1.0] = 0.75,
        workflow: WorkflowOption | None = None,
        server: ServerOption | None = None,
    ) -> None:
        await self._run_generate(
            interaction,
            prompt=prompt,
            negative=negative,
            model=model,
            width=width,
            height=height,
            steps=steps,
            cfg=cfg,
            seed=seed,
            sampler=sampler,
            scheduler=scheduler,
            batch=batch,
            lora=lora,
            lora_strength=lora_strength,
            image=image,
            denoise=denoise,
            workflow=workflow,
            server=server,
        )

    @app_commands.command(
        name="imagine", description="Generate images from a prompt (alias of /generate)."
    )
    @app_commands.describe(
        prompt="What to draw.",
        negative="What to avoid.",
        model="Checkpoint model.",
        width="Width in pixels, a multiple of 8.",
        height="Height in pixels, a multiple of 8.",
        seed="Seed (random if empty).",
        batch="How many images at once.",
        server="Run on this server.",
    )
    async def imagine(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, 1500],
        negative: app_commands.Range[str, 0, 1500] | None = None,
        model: ModelOption | None = None,
        width: app_commands.Range[int, 64, 4096] = 1024,
        height: app_commands.Range[int, 64, 4096] = 1024,
        seed: app_commands.Range[int, 0, 2**53 - 1] | None = None,
        batch: app_commands.Range[int, 1, 16] = 1,
        server: ServerOption | None = None,
    ) -> None:
        await self._run_generate(
            interaction,
            prompt=prompt,
            negative=negative,
            model=model,
            width=width,
            height=height,
            steps=25,
            cfg=7.0,
            seed=seed,
            sampler="euler",
            scheduler="normal",
            batch=batch,
            lora=None,
            lora_strength=1.0,
            image=None,
            denoise=0.75,
            workflow=None,
            server=server,
        )

    @generate.autocomplete("model")
    @imagine.autocomplete("model")
    async def _model_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return _matching(await self._models("checkpoints", current), current)

    @generate.autocomplete("lora")
    async def _lora_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return _matching(await self._models("loras", current), current)

    @generate.autocomplete("server")
    @imagine.autocomplete("server")
    async def _server_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return _matching(await self.bot.services.servers.names(current), current)

    @generate.autocomplete("workflow")
    async def _workflow_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return _matching(await self.bot.services.workflows.names(), current)

    async def _models(self, folder: str, current: str = "") -> list[str]:
        """Names across running servers, from the model cache (filled within ~2 s)."""
        return await self.bot.services.models.names(folder, current)

    @app_commands.command(name="progress", description="Show the state of a generation.")
    @app_commands.describe(generation="The job number (from the status message).")
    async def progress(
        self,
        interaction: discord.Interaction,
        generation: app_commands.Range[int, 1, MAX_JOB_ID],
    ) -> None:
        job = await self.bot.services.generation.get_visible(generation, viewer_of(interaction))
        await interaction.response.send_message(embed=status_embed(job), ephemeral=True)

    @app_commands.command(name="history", description="Recent generations.")
    @app_commands.describe(user="Only this person's generations.", limit="How many (1-25).")
    async def history(
        self,
        interaction: discord.Interaction,
        user: discord.User | None = None,
        limit: app_commands.Range[int, 1, 25] = 10,
    ) -> None:
        jobs = await self.bot.services.generation.history(
            viewer_of(interaction), user_id=user.id if user else None, limit=limit
        )
        if not jobs:
            await interaction.response.send_message("No generations yet.", ephemeral=True)
            return
        lines = [
            f"`#{j.id}` {STATUS_WORDS.get(j.status, j.status)} · <@{j.user_id}> · "
            f"{timestamp(j.created_at)} · {truncate(j.prompt, 60)}"
            for j in jobs
        ]
        embed = discord.Embed(
            title="Recent generations", description="\n".join(lines), colour=BRAND_COLOUR
        )
        await interaction.response.send_message(
            embed=embed, ephemeral=True, allowed_mentions=discord.AllowedMentions.none()
        )


async def setup(bot: BotContext) -> None:
    await bot.add_cog(Generation(bot))
