"""Talking to ComfyUI servers.

* :mod:`core.comfy.client`: :class:`ComfyClient`, the HTTP calls to one server.
* :mod:`core.comfy.responses`: what those calls return, and the parsers.
* :mod:`core.comfy.errors`: the :class:`ComfyError` hierarchy.
* :mod:`core.comfy.limits`: the untrusted-server boundary: size caps, no redirects, and
  the once-per-kind log of malformed input.
* :mod:`core.comfy.events`: WebSocket message types and their decoding.
* :mod:`core.comfy.subscriptions`: subscriptions to a stream and the routing of events.
* :mod:`core.comfy.tracking`: the prompts a stream follows and their one PromptDone each.
* :mod:`core.comfy.stream`: :class:`ComfyEventStream`, the reconnecting WebSocket.
* :mod:`core.comfy.pool`: one client and stream per server.
* :mod:`core.comfy.workflows`: building API-format workflows.
"""
