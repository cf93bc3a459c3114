"""Confirmation before anything that costs money or destroys data.

Only the person who asked may answer; no answer before the timeout means no.
"""

from __future__ import annotations

import discord


class ConfirmView(discord.ui.View):
    def __init__(self, owner_id: int, *, confirm_label: str, danger: bool, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self.owner_id = owner_id
        self.value: bool | None = None
        yes: discord.ui.Button[ConfirmView] = discord.ui.Button(
            label=confirm_label,
            style=discord.ButtonStyle.danger if danger else discord.ButtonStyle.success,
        )
        no: discord.ui.Button[ConfirmView] = discord.ui.Button(
            label="Cancel", style=discord.ButtonStyle.secondary
        )
        yes.callback = self._yes  # type: ignore[method-assign]
        no.callback = self._no  # type: ignore[method-assign]
        self.add_item(yes)
        self.add_item(no)

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id != self.owner_id:
            await interaction.response.send_message(
                "Only the person who asked can answer this.", ephemeral=True
            )
            return False
        return True

    async def _answer(self, interaction: discord.Interaction, value: bool) -> None:
        self.value = value
        await interaction.response.edit_message(view=None)
        self.stop()

    async def _yes(self, interaction: discord.Interaction) -> None:
        await self._answer(interaction, True)

    async def _no(self, interaction: discord.Interaction) -> None:
        await self._answer(interaction, False)


async def confirm(
    interaction: discord.Interaction,
    prompt: str | discord.Embed,
    *,
    confirm_label: str = "Confirm",
    danger: bool = False,
    timeout: float = 60.0,
) -> bool:
    """Ask privately and wait for the invoker's answer (True only for an explicit yes)."""
    view = ConfirmView(interaction.user.id, confirm_label=confirm_label, danger=danger,
                       timeout=timeout)
    kwargs: dict[str, object] = {"view": view, "ephemeral": True}
    if isinstance(prompt, discord.Embed):
        kwargs["embed"] = prompt
    else:
        kwargs["content"] = prompt
    if interaction.response.is_done():
        await interaction.followup.send(**kwargs)  # type: ignore[arg-type]
    else:
        await interaction.response.send_message(**kwargs)  # type: ignore[arg-type]
    await view.wait()
    return view.value is True
