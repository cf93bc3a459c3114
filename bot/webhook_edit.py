"""Editing a message through its interaction's webhook, without reading the answer back.

discord.py's ``Interaction.edit_original_response`` and ``WebhookMessage.edit`` build a
Message from Discord's answer (embeds, components, attachments): an eighth of an edit's
CPU in ``bench.relay --scale`` (py-spy), for a message the relay never reads. They also
hold the Interaction (its whole payload) for as long as the relay may edit through it:
about 2,000 of them at 2,000 jobs in flight. The editor here keeps the token and the
client's own state, and sends the same request through the same adapter, so rate limits,
retries on 429 and the errors raised (NotFound, Forbidden, HTTPException) are discord.py's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import discord
from discord.http import handle_message_parameters
from discord.utils import MISSING
from discord.webhook.async_ import async_context

#: ``await edit(embed=..., attachments=..., view=...)``: the keywords of
#: ``InteractionMessage.edit`` that the relay uses; returns nothing.
Editor = Callable[..., Awaitable[None]]


def webhook_editor(interaction: discord.Interaction, message_id: int | None) -> Editor:
    """How to edit the interaction's original response (``message_id`` None) or one of
    its followups through the interaction's webhook, while its token lives."""
    application_id, token = interaction.application_id, interaction.token
    state = interaction._state  # the client's: allowed mentions, HTTP proxy, views
    session = interaction._session  # the client's HTTP session

    async def edit(
        *, content: Any = MISSING, embed: Any = MISSING, embeds: Any = MISSING,
        attachments: Any = MISSING, view: Any = MISSING, allowed_mentions: Any = None,
    ) -> None:
        http = state.http
        with handle_message_parameters(
            content=content, attachments=attachments, embed=embed, embeds=embeds,
            view=view, allowed_mentions=allowed_mentions,
            previous_allowed_mentions=state.allowed_mentions,
        ) as params:
            adapter = async_context.get()
            if message_id is None:
                data = await adapter.edit_original_interaction_response(
                    application_id, token, session=session, proxy=http.proxy,
                    proxy_auth=http.proxy_auth, payload=params.payload,
                    multipart=params.multipart, files=params.files,
                )
            else:
                data = await adapter.edit_webhook_message(
                    application_id, token, message_id, session=session, proxy=http.proxy,
                    proxy_auth=http.proxy_auth, payload=params.payload,
                    multipart=params.multipart, files=params.files,
                    with_components=bool(view),
                )
        # As discord.py does: a view with callbacks is dispatched by message id (the job
        # buttons are DynamicItems, found by custom id, so this is for any other view).
        if view and not view.is_finished() and view.is_dispatchable():
            state.store_view(view, int(data["id"]))

    return edit
