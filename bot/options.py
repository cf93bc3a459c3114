"""Length-bounded string option types shared by the cogs.

Every free-text option carries a ``max_length`` so Discord's client refuses an
over-long value before it reaches the bot: a value echoed in an error reply must keep
that reply under Discord's 2000-character limit, or Discord refuses the reply and the
member waits on "thinking..." for ever (issue 12). ``tests/test_meta.py`` holds every
string option to it.
"""

from __future__ import annotations

from discord import app_commands

# A server as typed or autocompleted: a name (at most 32 characters, see
# core.servers.validation.NAME_RE) or "#<id>" (ids fit in 18 digits).
ServerOption = app_commands.Range[str, 1, 40]
# A model file as ComfyUI lists it (a path under its folder; autocomplete values are
# capped at 100 by Discord, typed values may be longer paths).
ModelOption = app_commands.Range[str, 1, 255]
# A custom workflow's name (names are 1-32 characters, see /workflow add).
WorkflowOption = app_commands.Range[str, 1, 32]
# A setup profile's name (the stems of core/profiles/*.toml).
ProfileOption = app_commands.Range[str, 1, 64]
# A GPU model as Vast.ai names it ("RTX 4090", "A100 SXM4 80GB", ...).
GpuOption = app_commands.Range[str, 1, 64]
