"""Settings: one typed model with sections, read from config.toml and the environment.

Precedence (highest first): explicit arguments, the seed's legacy variable names
(``VAST_AI_API_KEY``, ``DISCORD_TOKEN``, ...), ``COMFYVAST_<SECTION>__<KEY>`` variables,
then ``config.toml``, then the defaults below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from core.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("config.toml")
CONFIG_ENV_VAR = "COMFYVAST_CONFIG"

# The seed document's variable names, mapped onto (section, key).
LEGACY_ENV: dict[str, tuple[str, str]] = {
    "DISCORD_TOKEN": ("discord", "token"),
    "VAST_AI_API_KEY": ("vast", "api_key"),
    "VAST_AI_BASE_URL": ("vast", "base_url"),
    "COMFY_DEFAULT_PORT": ("comfy", "default_port"),
    "COMFY_MODEL_CACHE_SIZE": ("comfy", "model_cache_size"),
    "COMFY_MAX_GENERATIONS": ("comfy", "max_generations"),
    "DATABASE_URL": ("database", "url"),
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DiscordSettings(_Section):
    token: SecretStr | None = None
    guild_ids: list[int] = Field(default_factory=list)
    admin_role_ids: list[int] = Field(default_factory=list)
    admin_user_ids: list[int] = Field(default_factory=list)
    api_base_url: str = "https://discord.com/api/v10"
    gateway_url: str = "wss://gateway.discord.gg"
    guild_ready_timeout: float = Field(default=2.0, ge=0)

    @field_validator("api_base_url", "gateway_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")


class VastSettings(_Section):
    api_key: SecretStr | None = None
    base_url: str = "https://console.vast.ai/api/v0"
    request_timeout: float = Field(default=30.0, gt=0)
    # The one place that names the default image. Vast publishes vastai/comfy only with
    # versioned tags (there is no "latest"; a missing tag sits in "loading" while its disk
    # bills). This is the tag Vast's own recommended ComfyUI template pins (vast-ai/base-image
    # docs/adr/0011-recommended-template-format-and-dogfood-publish.md at a7552d1:
    # comfyui `v0.22.0-cuda-12.9-py312`); tags follow <ComfyUI tag>-cuda-<ver>-py<N>.
    default_image: str = "vastai/comfy:v0.22.0-cuda-12.9-py312"
    default_disk_gb: int = Field(default=60, ge=10)
    # Seconds a fresh rental may take to reach "running" before it is destroyed.
    boot_timeout: float = Field(default=900.0, gt=0)
    # Seconds a first boot may sit in "loading" (pulling the image) before the bot reads it
    # as a missing image or tag and destroys the instance; an image pull error in Vast's
    # status message ends the wait at once. First boots only.
    image_pull_timeout: float = Field(default=600.0, gt=0)
    # Seconds /server start waits for "running"; a start that takes longer (Vast waiting
    # for the GPU to be free) is left to finish on its own, never destroyed.
    start_timeout: float = Field(default=600.0, gt=0)
    # Seconds between looks at an instance that is booting (Vast's docs suggest 5-10 s).
    poll_interval: float = Field(default=5.0, gt=0)


class ComfySettings(_Section):
    default_port: int = Field(default=8188, ge=1, le=65535)
    model_cache_size: ByteSize = ByteSize(10 * 1000**3)
    max_generations: int = Field(default=5, ge=1)
    expose_port: bool = False
    request_timeout: float = Field(default=30.0, gt=0)
    job_timeout: float = Field(default=1800.0, gt=0)
    # Seconds a server may stay unreachable under a running job before the job moves.
    failover_after: float = Field(default=20.0, gt=0)
    hf_token: SecretStr | None = None
    civitai_token: SecretStr | None = None
    # http:// download sources allowed besides https:// (hostnames); tests use loopback.
    http_allowlist: list[str] = Field(default_factory=list)
    # Models every server fetches when it joins (setup succeeded): "folder/file=https://...".
    popular_models: list[str] = Field(default_factory=list)

    @field_validator("popular_models")
    @classmethod
    def _model_specs(cls, value: list[str]) -> list[str]:
        # The full checks (folder, name, URL) run per download; this catches the form.
        for spec in value:
            where, sep, url = spec.partition("=")
            if not sep or "/" not in where or not url.strip().startswith(("https://", "http://")):
                raise ValueError(
                    f"each entry must look like folder/file=https://..., not {spec[:80]!r}")
        return value


class SSHSettings(_Section):
    key_path: Path | None = None
    user: str = "root"
    connect_timeout: float = Field(default=15.0, gt=0)
    keepalive_interval: float = Field(default=30.0, gt=0)
    command_timeout: float = Field(default=1800.0, gt=0)
    # Rotate the bot's SSH key this many days after the last rotation (None: only on
    # /server rotate-key). An unfinished rotation is retried hourly (core.servers.keys).
    rotate_days: float | None = Field(default=None, gt=0)


class DatabaseSettings(_Section):
    url: str = "sqlite+aiosqlite:///data/comfyvast.db"
    echo: bool = False

    @field_validator("url")
    @classmethod
    def _supported_driver(cls, value: str) -> str:
        if value.startswith("postgres://"):
            value = "postgresql+asyncpg://" + value.removeprefix("postgres://")
        elif value.startswith("postgresql://"):
            value = "postgresql+asyncpg://" + value.removeprefix("postgresql://")
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must be a sqlite+aiosqlite:// or postgresql+asyncpg:// URL")
        return value


class LimitsSettings(_Section):
    min_size: int = Field(default=64, ge=8)
    max_width: int = Field(default=2048, ge=64)
    max_height: int = Field(default=2048, ge=64)
    max_steps: int = Field(default=150, ge=1)
    max_cfg: float = Field(default=30.0, gt=0)
    max_batch: int = Field(default=4, ge=1, le=16)
    max_prompt_length: int = Field(default=1500, ge=10)
    user_jobs_per_minute: int = Field(default=6, ge=1)
    user_concurrent_jobs: int = Field(default=2, ge=1)


class CostsSettings(_Section):
    monthly_budget: float | None = Field(default=None, ge=0)
    idle_timeout: int = Field(default=30, ge=0)
    idle_warning: int = Field(default=5, ge=0)
    idle_action: Literal["stop", "destroy"] = "stop"
    max_hours: float | None = Field(default=None, gt=0)
    orphan_timeout: int = Field(default=60, ge=5)


class MetricsSettings(_Section):
    """The opt-in Prometheus endpoint (GET /metrics)."""

    enabled: bool = False
    # Loopback by default: the numbers (spend, job counts) are for operators only.
    host: str = "127.0.0.1"
    port: int = Field(default=9108, ge=0, le=65535)  # 0 picks a free port (tests)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="COMFYVAST_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    data_dir: Path = Path("data")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    discord: DiscordSettings = Field(default_factory=DiscordSettings)
    vast: VastSettings = Field(default_factory=VastSettings)
    comfy: ComfySettings = Field(default_factory=ComfySettings)
    ssh: SSHSettings = Field(default_factory=SSHSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    costs: CostsSettings = Field(default_factory=CostsSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            LegacyEnvSource(settings_cls),
            env_settings,
        ]
        toml_file = settings_cls.model_config.get("toml_file")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @property
    def ssh_key_path(self) -> Path:
        return self.ssh.key_path or self.data_dir / "ssh" / "id_ed25519"


class LegacyEnvSource(PydanticBaseSettingsSource):
    """The seed's flat variable names, folded into their sections."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ builds the whole dict

    def __call__(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for name, (section, key) in LEGACY_ENV.items():
            value = os.environ.get(name)
            if value is not None and value != "":
                data.setdefault(section, {})[key] = value
        return data


def resolve_config_path(cli_path: str | os.PathLike[str] | None = None) -> Path:
    """--config wins over COMFYVAST_CONFIG, which wins over ./config.toml."""
    if cli_path:
        return Path(cli_path)
    env_path = os.environ.get(CONFIG_ENV_VAR)
    return Path(env_path) if env_path else DEFAULT_CONFIG_PATH


def load_settings(config_path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build the settings, or raise ConfigError with one sentence naming the bad key."""
    path = resolve_config_path(config_path)
    if config_path is not None and not path.exists():
        raise ConfigError(f"The configuration file {path} does not exist.")
    toml_file = path if path.exists() else None

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(**{**Settings.model_config, "toml_file": toml_file})

    try:
        return _FileSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    except ValueError as exc:  # TOML syntax errors surface as ValueError subclasses
        raise ConfigError(f"The configuration file {path} could not be read: {exc}.") from None


def _describe(exc: ValidationError, path: Path) -> str:
    err = exc.errors(include_url=False, include_input=False)[0]
    key = ".".join(str(part) for part in err["loc"]) or "(root)"
    if err["type"] == "extra_forbidden":
        return f"Unknown configuration key '{key}' (in {path} or the environment)."
    msg = err["msg"].rstrip(".")
    return f"Invalid configuration value for '{key}': {msg}."
