"""What differs between the kinds of server (rented on Vast.ai, own SSH host, bare URL).

Each kind is one :class:`ServerProvider` in its own module; :func:`core.providers.provider_for`
picks it by the server's ``provider`` column. Callers ask the provider instead of comparing
the column with a kind's name, so a new kind is one new module (SkyPilot's
``sky/provision/`` is the model).
"""

from __future__ import annotations

from typing import ClassVar, Protocol


class ServerFields(Protocol):
    """The columns a provider looks at: a ``ServerView`` and a ``Server`` row both have them."""

    @property
    def provider(self) -> str: ...

    @property
    def provider_id(self) -> str | None: ...

    @property
    def ssh_host(self) -> str | None: ...

    @property
    def comfy_url(self) -> str | None: ...


class ServerProvider:
    """One kind of server. The defaults describe a host the bot neither rents nor powers."""

    #: The value of ``Server.provider`` (a ``core.db.models.Provider``).
    kind: ClassVar[str]
    #: How a refusal names such a server: "Server 'x' is <what>; the bot cannot stop it."
    what: ClassVar[str]
    #: The bot rented it: destroying it ends the instance and everything on its disk.
    rented: ClassVar[bool] = False
    #: The bot can start and stop it (and so stop it when idle).
    can_start_stop: ClassVar[bool] = False
    #: It costs money by the hour; its spend is shown and counted against the budget.
    bills: ClassVar[bool] = False
    #: Its rows are reconciled with the provider's API by the periodic sync.
    synced: ClassVar[bool] = False

    def has_shell(self, server: ServerFields) -> bool:
        """Whether the bot has a shell (SSH) on the server: setup, model files, diagnosis."""
        return bool(server.ssh_host)

    def tunnelled(self, server: ServerFields) -> bool:
        """Whether ComfyUI is reached through an SSH tunnel rather than at ``comfy_url``."""
        return not server.comfy_url

    def has_instance(self, server: ServerFields) -> bool:
        """Whether destroying the server must end an instance at the provider."""
        return self.rented and bool(server.provider_id)

    def rate(self, state: str, price_per_hour: float) -> float:
        """$/h in a billing state: the full price while loading or running, else nothing."""
        if state in ("loading", "running"):
            return price_per_hour
        return 0.0
