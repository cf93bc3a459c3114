"""Making a new pool member ready: the pool's setup profile, then its model downloads."""

from __future__ import annotations

from core.audit import SYSTEM
from core.errors import ValidationFailed
from core.model_files import ModelService
from core.model_files.types import DownloadRequest
from core.pools.autoscaler import OnReady
from core.pools.service import split_model
from core.pools.types import PoolView
from core.servers.registry import ServerView
from core.setup import SetupService


def prepare_member(setup: SetupService, models: ModelService) -> OnReady:
    async def prepare(pool: PoolView, server: ServerView) -> None:
        if pool.profile:
            run = await setup.run(SYSTEM, server.id, pool.profile)
            if run.status != "succeeded":
                raise ValidationFailed(
                    f"Setup of {server.name} with profile {pool.profile} ended {run.status}."
                )
        for entry in pool.models:
            folder, url = split_model(entry)
            download = await models.download(DownloadRequest(SYSTEM, server.name, url, folder))
            if download.status != "completed":
                raise ValidationFailed(f"A model download on {server.name} ended "
                                       f"{download.status}.")

    return prepare
