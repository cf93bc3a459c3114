"""The team's GPU servers: rows and views, validation, renting, life cycle and costs.

``validation`` checks names and addresses; ``registry`` owns the rows and views. Above
them, one module per concern of :class:`core.servers.service.ServerService`: ``context``
(the shared handles), ``billing``, ``state`` (status writes with their billing intervals),
``boot`` (waiting for an instance), ``rental``, ``lifecycle``, ``pending`` and ``recovery``
(operations in flight, finished after a restart), ``sync``, ``autostop``,
``own_hosts`` (adding a URL or an SSH host the team has), and ``service``, the facade.

The registry's names are re-exported here; import the service from ``core.servers.service``
(this package stays light for the many modules that only need :class:`ServerView`).
"""

from core.servers.registry import ServerRegistry, ServerView
from core.servers.validation import (
    NAME_RE,
    USER_RE,
    default_name,
    parse_server_ref,
    validate_comfy_url,
    validate_host,
    validate_name,
    validate_ssh_target,
)

__all__ = [
    "NAME_RE",
    "USER_RE",
    "ServerRegistry",
    "ServerView",
    "default_name",
    "parse_server_ref",
    "validate_comfy_url",
    "validate_host",
    "validate_name",
    "validate_ssh_target",
]
