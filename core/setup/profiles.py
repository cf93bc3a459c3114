"""Setup profiles: the TOML files in ``core/profiles/``, parsed and checked, and their
parameters resolved for one server.

A *profile* is data: named parameters with defaults, environment variables, and a list of
steps, each with a ``check`` command that exits 0 when the step is already done, the
``run`` command, and a timeout; optionally a ``reset`` command.

Templating: ``{{name}}`` in a command is replaced by the parameter's value **already
quoted** for the shell (:func:`shlex.quote`), so it must stand outside quotes:
``cd {{install_dir}}/models``, never ``cd "{{install_dir}}"``. Parameter defaults may
refer to earlier parameters (``python = "{{install_dir}}/venv/bin/python"``); there the
expansion is raw, the quoting happens when the final value lands in a command. Nothing
secret is ever templated: any secret a future step needs must go through ``secret_env``
(stdin), never the command line that ``ps`` shows.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from core.config import Settings
from core.errors import ConfigError, ValidationFailed
from core.servers import ServerView

# The profile files are package data of ``core`` (pyproject), beside this package.
DEFAULT_PROFILE_DIR = Path(__file__).parent.parent / "profiles"
DEFAULT_PROFILE = "default"

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
PROFILE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
STEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Parameters the service fills from the server and the settings when a profile has them.
COMPUTED_PARAMS = ("port", "listen", "install_dir")
MAX_TIMEOUT = 6 * 3600.0


@dataclass(frozen=True, slots=True)
class SetupStep:
    """One step: ``check`` exits 0 when it is already done; ``run`` does it."""

    name: str
    run: str
    check: str | None = None
    timeout: float = 600.0


@dataclass(frozen=True)
class SetupProfile:
    """A named, versioned list of steps over named parameters (see the module docstring)."""

    name: str
    version: str
    description: str
    params: Mapping[str, str]
    steps: tuple[SetupStep, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    reset: str | None = None
    reset_timeout: float = 300.0
    reset_summary: str = "removes what this profile installed"

    def step(self, name: str) -> SetupStep:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    # -- parameters and templates

    def resolve(self, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        """The parameter values: defaults, then ``overrides`` (names the profile lacks are
        ignored), each expanded raw against the parameters defined before it."""
        overrides = overrides or {}
        values: dict[str, str] = {}
        for name, default in self.params.items():
            raw = str(overrides.get(name, default))
            value = PLACEHOLDER.sub(lambda m, n=name: _lookup(values, m.group(1), n), raw)
            _check_value(name, value)
            values[name] = value
        return values

    def render(self, template: str, values: Mapping[str, str]) -> str:
        """A command with every placeholder replaced by its shell-quoted value."""
        return PLACEHOLDER.sub(lambda m: shlex.quote(_lookup(values, m.group(1), "command")),
                               template)

    def describe(self, template: str, values: Mapping[str, str]) -> str:
        """A human sentence with placeholders replaced raw (for Discord, never a shell)."""
        return PLACEHOLDER.sub(lambda m: _lookup(values, m.group(1), "text"), template)

    # -- storage in setup_scripts.steps (a JSON list of typed entries, in order)

    def to_entries(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = [
            {"kind": "param", "name": k, "default": v} for k, v in self.params.items()
        ]
        entries += [{"kind": "env", "name": k, "value": v} for k, v in self.env.items()]
        entries += [
            {"kind": "step", "name": s.name, "check": s.check, "run": s.run,
             "timeout": s.timeout}
            for s in self.steps
        ]
        if self.reset is not None:
            entries.append({"kind": "reset", "run": self.reset, "timeout": self.reset_timeout,
                            "summary": self.reset_summary})
        return entries

    @classmethod
    def from_entries(
        cls, name: str, version: str, description: str | None, entries: Sequence[Any]
    ) -> SetupProfile:
        params: dict[str, str] = {}
        env: dict[str, str] = {}
        steps: list[SetupStep] = []
        reset: dict[str, Any] = {}
        for entry in entries:
            kind = entry.get("kind")
            if kind == "param":
                params[entry["name"]] = str(entry["default"])
            elif kind == "env":
                env[entry["name"]] = str(entry["value"])
            elif kind == "step":
                steps.append(SetupStep(entry["name"], entry["run"], entry.get("check"),
                                       float(entry["timeout"])))
            elif kind == "reset":
                reset = entry
        return cls(
            name=name, version=version, description=description or "", params=params,
            steps=tuple(steps), env=env, reset=reset.get("run"),
            reset_timeout=float(reset.get("timeout", 300.0)),
            reset_summary=reset.get("summary") or "removes what this profile installed",
        )


def server_values(
    profile: SetupProfile,
    server: ServerView,
    settings: Settings,
    params: Mapping[str, str],
    overrides: Mapping[str, str] | None,
) -> dict[str, str]:
    """The parameter values of ``profile`` on ``server``: the computed ones, then the
    service-wide ``params``, then the run's ``overrides`` (which must all exist)."""
    computed = {
        "port": str(server.comfy_port or settings.comfy.default_port),
        # Where ComfyUI lives on this server (a rented one: /workspace/ComfyUI, from its
        # image); a server without one keeps the profile's own default.
        **({"install_dir": server.comfy_path} if server.comfy_path else {}),
        # ComfyUI has no login: it listens on loopback and the bot comes through the SSH
        # tunnel, unless the operator opted in to exposing the port.
        "listen": "0.0.0.0" if settings.comfy.expose_port else "127.0.0.1",
    }
    merged: dict[str, str] = {k: v for k, v in computed.items() if k in profile.params}
    merged.update({k: v for k, v in params.items() if k in profile.params})
    unknown = set(overrides or {}) - set(profile.params)
    if unknown:
        raise ValidationFailed(
            f"The profile {profile.name} has no parameter {sorted(unknown)[0]}.")
    merged.update(overrides or {})
    try:
        return profile.resolve(merged)
    except ValueError as exc:
        raise ValidationFailed(f"The profile {profile.name} is invalid: {exc}.") from None


def _lookup(values: Mapping[str, str], name: str, where: str) -> str:
    try:
        return values[name]
    except KeyError:
        raise ValueError(f"{where} refers to the unknown parameter {name!r}") from None


def _check_value(name: str, value: str) -> None:
    if "\n" in value or "\0" in value or "\r" in value:
        raise ValidationFailed(f"The setup parameter {name} must be a single line.")
    if name == "install_dir":
        path = PurePosixPath(value)
        # reset deletes this directory: refuse anything that could be a system directory.
        if not path.is_absolute() or ".." in path.parts or len(path.parts) < 3:
            raise ValidationFailed(
                "The setup parameter install_dir must be an absolute path at least two "
                "directories deep (like /opt/ComfyUI) without '..'."
            )


def _placeholders(text: str | None) -> set[str]:
    return set(PLACEHOLDER.findall(text or ""))


# --------------------------------------------------------------------------- TOML files


def load_profiles(dirs: Iterable[Path]) -> dict[str, SetupProfile]:
    """Read every ``*.toml`` in ``dirs`` (later directories win on a name clash).

    A step may be ``{name = "start", from = "default"}``: a copy of that profile's step,
    so profiles share steps instead of duplicating shell. Raises :class:`ConfigError`
    naming the file and the problem.
    """
    docs: dict[str, tuple[Path, dict[str, Any]]] = {}
    for directory in dirs:
        for path in sorted(Path(directory).glob("*.toml")):
            try:
                doc = tomllib.loads(path.read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"The setup profile {path} could not be read: {exc}.") from None
            name = str(doc.get("name", path.stem))
            docs[name] = (path, doc)
    profiles: dict[str, SetupProfile] = {}
    for name, (path, doc) in docs.items():
        try:
            profiles[name] = _profile_from_doc(name, doc, docs)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"The setup profile {path} is invalid: {exc}.") from None
    return profiles


def _profile_from_doc(
    name: str, doc: dict[str, Any], docs: Mapping[str, tuple[Path, dict[str, Any]]],
    _seen: tuple[str, ...] = (),
) -> SetupProfile:
    if not PROFILE_NAME.match(name):
        raise ValueError("the name must be 1-32 lowercase letters, digits, '-' or '_'")
    known = {"name", "version", "description", "params", "env", "steps", "reset",
             "reset_timeout", "reset_summary"}
    unknown = set(doc) - known
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    params = {str(k): str(v) for k, v in (doc.get("params") or {}).items()}
    env = {str(k): str(v) for k, v in (doc.get("env") or {}).items()}
    for key in env:
        if not ENV_NAME.match(key):
            raise ValueError(f"env name {key!r} is not a valid variable name")
    steps: list[SetupStep] = []
    for raw in doc.get("steps") or []:
        steps.append(_step_from_doc(raw, docs, (*_seen, name)))
    if not steps:
        raise ValueError("a profile needs at least one [[steps]] entry")
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError("step names must be unique")
    reset = doc.get("reset")
    profile = SetupProfile(
        name=name, version=str(doc.get("version", "1")),
        description=str(doc.get("description", "")).strip(), params=params,
        steps=tuple(steps), env=env, reset=str(reset) if reset else None,
        reset_timeout=_timeout(doc.get("reset_timeout", 300)),
        reset_summary=str(doc.get("reset_summary") or "removes what this profile installed"),
    )
    # Every placeholder must name a parameter; parameters may only use earlier ones.
    defined: list[str] = []
    for key, value in params.items():
        missing = _placeholders(value) - set(defined)
        if missing:
            raise ValueError(f"parameter {key} refers to {sorted(missing)} defined after it")
        defined.append(key)
    texts = [(s.name, s.check) for s in steps] + [(s.name, s.run) for s in steps]
    texts += [("reset", profile.reset), ("reset_summary", profile.reset_summary)]
    for where, text in texts:
        missing = _placeholders(text) - set(params)
        if missing:
            raise ValueError(f"{where} uses undefined parameters {sorted(missing)}")
    return profile


def _step_from_doc(
    raw: dict[str, Any], docs: Mapping[str, tuple[Path, dict[str, Any]]], seen: tuple[str, ...]
) -> SetupStep:
    name = str(raw.get("name", ""))
    if not STEP_NAME.match(name):
        raise ValueError(
            f"step name {name!r} must be 1-64 letters, digits, spaces, '.', '_' or '-'")
    source = raw.get("from")
    if source is not None:
        if source in seen or source not in docs:
            raise ValueError(f"step {name}: there is no profile {source!r} to copy it from")
        _, other = docs[source]
        match = [s for s in other.get("steps") or [] if s.get("name") == name]
        if not match:
            raise ValueError(f"step {name}: profile {source!r} has no step of that name")
        base = _step_from_doc(match[0], docs, (*seen, source))
        return replace(base, timeout=_timeout(raw.get("timeout", base.timeout)))
    unknown = set(raw) - {"name", "check", "run", "timeout"}
    if unknown:
        raise ValueError(f"step {name}: unknown keys {sorted(unknown)}")
    run = raw.get("run")
    if not isinstance(run, str) or not run.strip():
        raise ValueError(f"step {name} has no run command")
    check = raw.get("check")
    if check is not None and (not isinstance(check, str) or not check.strip()):
        check = None
    return SetupStep(name=name, run=run.strip(), check=check.strip() if check else None,
                     timeout=_timeout(raw.get("timeout", 600)))


def _timeout(value: Any) -> float:
    seconds = float(value)
    if not 0 < seconds <= MAX_TIMEOUT:
        raise ValueError(f"timeouts must be between 0 and {MAX_TIMEOUT:g} seconds")
    return seconds
