"""Settings: TOML, environment, the seed's variable names, one-sentence errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import load_settings
from core.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_match_the_seed(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, ""))
    assert s.vast.base_url == "https://console.vast.ai/api/v0"
    assert s.comfy.default_port == 8188
    assert s.comfy.max_generations == 5
    assert int(s.comfy.model_cache_size) == 10 * 1000**3
    assert s.database.url == "sqlite+aiosqlite:///data/comfyvast.db"
    assert s.discord.api_base_url == "https://discord.com/api/v10"
    assert s.discord.token is None


def test_toml_sections_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[discord]\ntoken = "tok-from-file"\nguild_ids = [123]\n'
        '[costs]\nmonthly_budget = 50.5\nidle_action = "destroy"\n',
    )
    s = load_settings(path)
    assert s.discord.token is not None and s.discord.token.get_secret_value() == "tok-from-file"
    assert s.discord.guild_ids == [123]
    assert s.costs.monthly_budget == 50.5
    assert s.costs.idle_action == "destroy"


def test_seed_variable_names_override_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "[comfy]\ndefault_port = 9000\n")
    monkeypatch.setenv("COMFY_DEFAULT_PORT", "8190")
    monkeypatch.setenv("VAST_AI_API_KEY", "vast-secret-key")
    monkeypatch.setenv("VAST_AI_BASE_URL", "http://127.0.0.1:1/api/v0")
    monkeypatch.setenv("COMFY_MODEL_CACHE_SIZE", "2GB")
    monkeypatch.setenv("COMFY_MAX_GENERATIONS", "7")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@db/x")
    monkeypatch.setenv("DISCORD_TOKEN", "discord-secret")
    s = load_settings(path)
    assert s.comfy.default_port == 8190
    assert s.vast.api_key is not None and s.vast.api_key.get_secret_value() == "vast-secret-key"
    assert s.vast.base_url == "http://127.0.0.1:1/api/v0"
    assert int(s.comfy.model_cache_size) == 2 * 1000**3
    assert s.comfy.max_generations == 7
    assert s.database.url == "postgresql+asyncpg://u:p@db/x"
    assert "discord-secret" not in repr(s) and "vast-secret-key" not in repr(s)


def test_nested_environment_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFYVAST_LIMITS__MAX_BATCH", "3")
    assert load_settings(write(tmp_path, "")).limits.max_batch == 3


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[comfy]\ndefault_port = 9001\n")
    monkeypatch.setenv("COMFYVAST_CONFIG", str(path))
    assert load_settings().comfy.default_port == 9001


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[comfy]\ndefault_port = "abc"\n', "comfy.default_port"),
        ("[comfy]\ndefault_port = 70000\n", "comfy.default_port"),
        ('[costs]\nidle_action = "explode"\n', "costs.idle_action"),
        ('[database]\nurl = "mysql://x"\n', "database.url"),
        ("[discord]\ntokn = 1\n", "discord.tokn"),
    ],
)
def test_bad_value_is_one_sentence_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    message = str(info.value)
    assert f"'{key}'" in message
    assert "\n" not in message and message.endswith(".")


def test_missing_explicit_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_example_config_documents_and_parses_every_key() -> None:
    example = Path(__file__).resolve().parent.parent / "config.example.toml"
    s = load_settings(example)
    import tomllib

    data = tomllib.loads(example.read_text())
    for section_name, section in s.model_dump().items():
        if isinstance(section, dict):
            assert section_name in data, f"[{section_name}] missing from config.example.toml"
            text = example.read_text()
            for key in section:
                assert f"{key} =" in text or f"# {key} =" in text, (
                    f"{section_name}.{key} undocumented"
                )
