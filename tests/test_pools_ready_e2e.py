"""A new pool member gets the pool's models: the real download over a real SSH server."""

from __future__ import annotations

import secrets
from pathlib import Path

from core.model_files import ModelService
from core.pools.ready import prepare_member
from core.servers import ServerView
from tests.conftest import BotEnv, _answered
from tests.test_models import ModelSource, install_fixture, source_fixture  # noqa: F401
from tests.test_models_e2e import box, env, models, ssh_host  # noqa: F401


async def test_pool_models_download_on_a_new_member(
    env: BotEnv, box: ServerView, models: ModelService, source: ModelSource,  # noqa: F811
    install: Path,  # noqa: F811
) -> None:
    first, lora = secrets.token_bytes(200_000), secrets.token_bytes(50_000)
    source.files["base.safetensors"] = first
    source.files["style.safetensors"] = lora
    (install / "models" / "loras").mkdir()
    interaction = await env.slash("pool", {
        "name": "gpu", "gpu": "RTX 4090",
        "models": f"{source.url('base.safetensors')} loras:{source.url('style.safetensors')}",
    }, user=env.fake.admin, subcommand="create")
    assert "Pool created" in (await env.fake.wait_for(lambda: _answered(interaction))).content
    pool = await env.services.pools.store.get("gpu")
    # As core/services.py wires it (the fixture replaced the model service).
    prepare = prepare_member(env.services.setup, models)
    await prepare(pool, box)
    assert (install / "models" / "checkpoints" / "base.safetensors").read_bytes() == first
    assert (install / "models" / "loras" / "style.safetensors").read_bytes() == lora


async def test_a_failed_download_fails_the_member(
    env: BotEnv, box: ServerView, models: ModelService, source: ModelSource,  # noqa: F811
) -> None:
    import pytest

    from core.errors import ComfyVastError

    interaction = await env.slash("pool", {
        "name": "gpu", "gpu": "RTX 4090", "models": source.url("missing.safetensors"),
    }, user=env.fake.admin, subcommand="create")
    await env.fake.wait_for(lambda: _answered(interaction))
    pool = await env.services.pools.store.get("gpu")
    with pytest.raises(ComfyVastError):
        await prepare_member(env.services.setup, models)(pool, box)
