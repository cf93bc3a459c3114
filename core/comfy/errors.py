"""Errors raised by the ComfyUI client layer.

Every class derives from :class:`ComfyError` (an :class:`ExternalServiceError`), so the
bot's single error handler can show ``str(err)``: one plain sentence, no traceback. The
structured fields keep ComfyUI's own details for logs and tests.

The shapes parsed here are the ones recorded from a real ComfyUI 0.3.64
(tests/data/comfyui-traces/08_prompt_validation_errors.json and 09*_execution_error*.json).
"""

from __future__ import annotations

from typing import Any

from core.errors import ExternalServiceError

# Exception messages can be long and multi-line (trace 09 has a five-line message with
# server paths); a Discord reply only needs the gist.
_MAX_DETAIL = 300


class ComfyError(ExternalServiceError):
    """Base class for everything that went wrong talking to a ComfyUI server."""


class ComfyUnreachable(ComfyError):
    """The server could not be reached, or did not answer within the timeout."""

    def __init__(self, base_url: str, reason: str) -> None:
        super().__init__(f"The ComfyUI server at {base_url} is unreachable ({reason}).")
        self.base_url = base_url
        self.reason = reason


class ComfyHTTPError(ComfyError):
    """ComfyUI answered with a status code we did not expect."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"ComfyUI answered {method} {path} with HTTP {status}.")
        self.method = method
        self.path = path
        self.status = status
        self.body = body[:2000]


class ComfyNotFound(ComfyHTTPError):
    """A 404: a file for /view, a model folder, ... does not exist on the server."""


class ComfyProtocolError(ComfyError):
    """The server's answer did not have the shape ComfyUI's protocol promises."""


class ComfyMalformed(ComfyProtocolError):
    """One message, row, entry or response from ComfyUI has the wrong shape.

    A rented server is untrusted: the stream and the poll loop skip such input (logged
    once per kind, see :class:`core.comfy.limits.MalformedLog`); a request whose answer is
    unusable fails with this sentence.
    """

    def __init__(self, kind: str, problem: str) -> None:
        super().__init__(f"ComfyUI sent a malformed {kind} ({problem}).")
        self.kind = kind
        self.problem = problem


class ComfyResponseTooLarge(ComfyProtocolError):
    """An answer was larger than the cap for its kind (:class:`ResponseLimits`)."""

    def __init__(self, path: str, limit: int) -> None:
        super().__init__(
            f"ComfyUI's answer to {path} is larger than {limit // (1024 * 1024) or 1} MiB; "
            "the bot does not read it."
        )
        self.path = path
        self.limit = limit


class ComfyRedirectRefused(ComfyHTTPError):
    """ComfyUI answered with a redirect. Its API never redirects, and following one would
    let a hostile server make the bot fetch some other (internal) URL, so none is followed."""

    def __init__(self, method: str, path: str, status: int) -> None:
        super().__init__(method, path, status, "")
        self.message = (
            f"ComfyUI answered {method} {path} with a redirect (HTTP {status}); the bot "
            "does not follow redirects from a server."
        )
        self.args = (self.message,)


class ComfyValidationError(ComfyError):
    """POST /prompt was rejected (HTTP 400): the workflow did not validate.

    ``error`` is ComfyUI's ``{"type","message","details","extra_info"}`` and ``node_errors``
    maps node id -> ``{"errors": [...], "dependent_outputs": [...], "class_type": ...}``.
    """

    def __init__(self, node_errors: dict[str, Any], error: dict[str, Any] | None) -> None:
        self.node_errors: dict[str, Any] = node_errors or {}
        self.error: dict[str, Any] = error or {}
        super().__init__(describe_validation_failure(self.error, self.node_errors))

    @property
    def error_type(self) -> str:
        return _name(self.error.get("type"))

    def problems(self) -> list[str]:
        """Every node error as a short phrase, for logs or a detailed embed."""
        return [phrase for _node, phrase in _node_error_phrases(self.node_errors)]


class ComfyExecutionError(ComfyError):
    """A queued prompt failed while running (the ``execution_error`` message)."""

    def __init__(
        self,
        node_id: str | None,
        node_type: str | None,
        exception_message: str,
        *,
        exception_type: str = "",
        prompt_id: str | None = None,
    ) -> None:
        self.node_id = node_id
        self.node_type = node_type
        self.exception_message = exception_message
        self.exception_type = exception_type
        self.prompt_id = prompt_id
        where = _node_label(node_id, node_type) if node_id else "a node"
        gist = _gist(exception_message) or exception_type or "unknown error"
        super().__init__(f"ComfyUI failed while running {where}: {_end_sentence(gist)}")


class ComfyInterrupted(ComfyError):
    """The prompt was interrupted (cancelled) while it ran."""

    def __init__(self, prompt_id: str | None, node_id: str | None, node_type: str | None) -> None:
        self.prompt_id = prompt_id
        self.node_id = node_id
        self.node_type = node_type
        where = f" at {_node_label(node_id, node_type)}" if node_id else ""
        super().__init__(f"The generation was interrupted{where}.")


class ComfyPromptLost(ComfyError):
    """The prompt is neither queued, running nor in the history (deleted, or the server
    restarted and lost its in-memory queue)."""

    def __init__(self, prompt_id: str) -> None:
        self.prompt_id = prompt_id
        super().__init__(
            "The generation disappeared from the ComfyUI server "
            "(it was removed from the queue or the server restarted)."
        )


# ---------------------------------------------------------------------------------------
# Sentences


def _node_label(node_id: str | None, node_type: str | None) -> str:
    return f"node {node_id} ({node_type})" if node_type else f"node {node_id}"


def _gist(text: str) -> str:
    """First meaningful line of an exception message, trimmed."""
    for line in str(text).splitlines():
        line = line.strip().strip("*").strip()
        if line:
            return line if len(line) <= _MAX_DETAIL else line[: _MAX_DETAIL - 1] + "…"
    return ""


def _end_sentence(text: str) -> str:
    text = text.rstrip()
    return text if text.endswith((".", "!", "?", "…")) else text + "."


def _short(value: Any) -> str:
    if isinstance(value, list | dict):
        # A server's value may be nested hundreds deep: str() would recurse into all of it.
        return "a list" if isinstance(value, list) else "an object"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:79] + "…"


def _type_name(value: Any) -> str:
    """A ComfyUI type ("INT", "LATENT") as written; anything else shortened."""
    return value[:80] if isinstance(value, str) else _short(value)


def _name(value: Any, limit: int = 80) -> str:
    """A name or text from ComfyUI's answer; anything but a string is junk."""
    return value[:limit] if isinstance(value, str) else ""


def describe_node_error(err: dict[str, Any]) -> str:
    """One phrase for one entry of ``node_errors[id]["errors"]`` (types from trace 08)."""
    kind = err.get("type", "")
    extra = err.get("extra_info")
    extra = extra if isinstance(extra, dict) else {}
    name = _name(extra.get("input_name"))
    details = _name(err.get("details"), 2000)
    received = extra.get("received_value")
    config = extra.get("input_config")
    limits = config[1] if isinstance(config, list) and len(config) > 1 else {}
    if not isinstance(limits, dict):
        limits = {}
    if kind == "value_not_in_list":
        return f"{name} {_short(received)} is not in the list of available values"
    if kind == "required_input_missing":
        return f"required input {name!r} is missing"
    if kind == "value_bigger_than_max":
        bound = limits.get("max")
        tail = f" of {_short(bound)}" if bound is not None else ""
        return f"{name} {_short(received)} is bigger than the maximum{tail}"
    if kind == "value_smaller_than_min":
        bound = limits.get("min")
        tail = f" of {_short(bound)}" if bound is not None else ""
        return f"{name} {_short(received)} is smaller than the minimum{tail}"
    if kind == "invalid_input_type":
        wanted = (
            _type_name(config[0]) if isinstance(config, list) and config else "the expected type"
        )
        return f"{name} {_short(received)} is not a valid {wanted}"
    if kind == "return_type_mismatch":
        got = _type_name(extra.get("received_type", "?"))
        wanted = _type_name(config[0]) if isinstance(config, list) and config else "?"
        return f"input {name!r} expects {wanted} but is linked to a {got} output"
    if kind == "exception_during_inner_validation":
        return f"input {name!r} is linked to a node that does not exist ({details})"
    if kind == "custom_validation_failed":
        # details look like "image - Invalid image file: not_uploaded.png"
        text = details.split(" - ", 1)[1] if " - " in details else details
        return f"{name}: {text}" if name else text
    message = _name(err.get("message"), 2000) or _name(kind) or "invalid"
    if details:
        return f"{message.rstrip('.')} ({_gist(details)})"
    return message.rstrip(".")


def _node_error_phrases(node_errors: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for node_id, entry in node_errors.items():
        if not isinstance(entry, dict):
            continue
        label = _node_label(str(node_id), _name(entry.get("class_type")) or None)
        errors = entry.get("errors")
        for err in errors if isinstance(errors, list) else []:
            if isinstance(err, dict):
                out.append((str(node_id), f"{label}: {describe_node_error(err)}"))
    return out


def describe_validation_failure(error: dict[str, Any], node_errors: dict[str, Any]) -> str:
    """The one-sentence summary of a 400 from POST /prompt."""
    phrases = _node_error_phrases(node_errors)
    if phrases:
        first = phrases[0][1]
        more = len(phrases) - 1
        tail = f" (and {more} more problem{'s' if more != 1 else ''})" if more else ""
        return f"ComfyUI rejected the workflow: {first}{tail}."
    message = (_name(error.get("message"), 2000) or "the workflow is invalid").rstrip(".")
    details = _name(error.get("details"), 2000)
    # invalid_prompt carries the node in details ("Node ID '#2'"); no_prompt repeats itself.
    if details and details != message:
        message = f"{message} ({details})"
    return f"ComfyUI rejected the workflow: {message[:1].lower()}{message[1:]}."
