"""Ask the invoker to confirm before something costly or destructive happens.

``if not await confirm(interaction, "Destroy **box**?", danger=True): return``

The prompt is ephemeral, has Confirm and Cancel buttons that only the invoker may press,
and a timeout counts as "no". After the answer the buttons are removed and the prompt says
what was chosen; the caller then continues with ``interaction.followup``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import discord

log = logging.getLogger(__name__)

__all__ = ["ConfirmView", "confirm"]


class ConfirmView(discord.ui.View):
    """Confirm / Cancel for one user; ``value`` is True, False, or None until answered."""

    def __init__(
        self, invoker_id: int, *, confirm_label: str = "Confirm", danger: bool = False,
        timeout: float = 60.0, prompt_text: str | None = None,
    ) -> None:
        super().__init__(timeout=timeout)
        self.invoker_id = invoker_id
        self.value: bool | None = None
        self.prompt_text = prompt_text
        self.confirm_button.label = confirm_label
        self.confirm_button.style = (
            discord.ButtonStyle.danger if danger else discord.ButtonStyle.success
        )
        # Set by confirm(): edits the prompt when nobody answered in time.
        self.edit_prompt: Callable[..., Awaitable[Any]] | None = None

    def _outcome(self, word: str) -> str:
        # The prompt stays readable (what was asked) and says what was answered.
        return f"{self.prompt_text}\n**{word}**" if self.prompt_text else f"**{word}**"

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id == self.invoker_id:
            return True
        await interaction.response.send_message(
            "Only the person who ran the command can answer this.", ephemeral=True)
        return False

    async def _answer(self, interaction: discord.Interaction, value: bool, word: str) -> None:
        self.value = value
        try:
            await interaction.response.edit_message(content=self._outcome(word), view=None)
        finally:
            # After the edit: the caller's next message then follows the answered prompt.
            self.stop()

    @discord.ui.button(label="Confirm", style=discord.ButtonStyle.success)
    async def confirm_button(
        self, interaction: discord.Interaction, button: discord.ui.Button[ConfirmView]
    ) -> None:
        await self._answer(interaction, True, "Confirmed.")

    @discord.ui.button(label="Cancel", style=discord.ButtonStyle.secondary)
    async def cancel_button(
        self, interaction: discord.Interaction, button: discord.ui.Button[ConfirmView]
    ) -> None:
        await self._answer(interaction, False, "Cancelled; nothing was changed.")

    async def on_timeout(self) -> None:
        self.value = False

    async def mark_timed_out(self) -> None:
        if self.edit_prompt is None:
            return
        try:
            await self.edit_prompt(
                content=self._outcome("No answer in time; nothing was changed."), view=None)
        except discord.HTTPException:
            log.info("could not mark a timed-out confirmation prompt")


async def confirm(
    interaction: discord.Interaction,
    text_or_embed: str | discord.Embed,
    *,
    confirm_label: str = "Confirm",
    danger: bool = False,
    timeout: float = 60.0,
) -> bool:
    """Send an ephemeral prompt and wait for the invoker's answer; a timeout means no.

    Works whether or not ``interaction`` was deferred (or already answered).
    """
    is_embed = isinstance(text_or_embed, discord.Embed)
    view = ConfirmView(interaction.user.id, confirm_label=confirm_label, danger=danger,
                       timeout=timeout, prompt_text=None if is_embed else str(text_or_embed))
    kwargs: dict[str, Any] = (
        {"embed": text_or_embed} if is_embed else {"content": text_or_embed}
    )
    if interaction.response.is_done():
        message = await interaction.followup.send(**kwargs, view=view, ephemeral=True,
                                                  wait=True)
        view.edit_prompt = message.edit
    else:
        await interaction.response.send_message(**kwargs, view=view, ephemeral=True)
        view.edit_prompt = interaction.edit_original_response
    if await view.wait():
        # Done here rather than in on_timeout, which discord.py runs as a separate task:
        # the prompt says "no answer" before the caller replies.
        await view.mark_timed_out()
    return view.value is True
