"""Listing through the paginated /api/v1/instances/ and finding by label."""

from __future__ import annotations

import json

import aiohttp
import pytest

from core.vast import VastClient, VastError
from tests.fakevast import FakeVast, make_offer

from .conftest import comfy_request


@pytest.fixture
async def many(fake: FakeVast, client: VastClient) -> list[int]:
    ids = []
    for n in range(31):
        offer_id = 500000 + n
        fake.add_offer(make_offer(offer_id, "RTX 3090"))
        ids.append(await client.create_instance(offer_id, comfy_request(label=f"bulk:{n}")))
    return ids


async def test_list_follows_next_token_across_pages(client: VastClient, fake: FakeVast,
                                                    many: list[int]) -> None:
    found = await client.list_instances()
    assert sorted(i.id for i in found) == sorted(many)
    pages = fake.calls("GET /api/v1/instances/")
    assert len(pages) == 2
    assert "after_token" not in pages[0].query
    assert pages[1].query["after_token"]
    assert all(int(p.query["limit"]) <= 25 for p in pages)
    assert not fake.calls("GET /api/v0/instances/ ")


async def test_list_empty_account(client: VastClient) -> None:
    assert await client.list_instances() == []


async def test_find_instance_by_label(client: VastClient, fake: FakeVast,
                                      many: list[int]) -> None:
    inst = await client.find_instance_by_label("bulk:17")
    assert inst is not None and inst.id == many[17]
    call = fake.calls("GET /api/v1/instances/")[-1]
    assert json.loads(call.query["select_filters"]) == {"label": {"eq": "bulk:17"}}
    assert await client.find_instance_by_label("nope") is None


async def test_list_with_status_filter(client: VastClient, fake: FakeVast,
                                       many: list[int]) -> None:
    await client.stop_instance(many[0])
    stopped = await client.list_instances(filters={"actual_status": {"eq": "stopped"}})
    assert [i.id for i in stopped] == [many[0]]


async def test_list_error_is_raised_not_read_as_empty(client: VastClient,
                                                      fake: FakeVast) -> None:
    fake.fail_next("/api/v1/instances/", 400,
                   body={"success": False, "error": "invalid_args", "msg": "bad"})
    with pytest.raises(VastError):
        await client.list_instances()


async def _raw_get(session: aiohttp.ClientSession, fake: FakeVast, url: str,
                   params: dict[str, str] | None = None) -> tuple[int, object]:
    async with session.get(url, params=params,
                           headers={"Authorization": f"Bearer {fake.api_key}"}) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_fake_retires_v0_list_with_410(fake: FakeVast,
                                            session: aiohttp.ClientSession) -> None:
    status, body = await _raw_get(session, fake, f"{fake.base_url}/instances/")
    assert status == 410
    assert body == {"success": False, "error": "deprecated_endpoint",
                    "msg": "/api/v0/instances/ is deprecated. Use /api/v1/instances/ instead."}


@pytest.mark.parametrize(
    "params",
    [
        {"after_token": "garbage"},
        {"select_filters": json.dumps({"dph_total": {"lte": 1}})},
        {"select_filters": json.dumps({"num_gpus": {"eq": 1}})},
    ],
)
async def test_fake_v1_rejects_bad_tokens_and_computed_filters(
        fake: FakeVast, session: aiohttp.ClientSession, params: dict[str, str]) -> None:
    status, body = await _raw_get(session, fake, f"{fake.root_url}/api/v1/instances/", params)
    assert status == 400
    assert isinstance(body, dict) and body["success"] is False


async def test_fake_v1_limit_rules(fake: FakeVast, session: aiohttp.ClientSession,
                                   many: list[int]) -> None:
    url = f"{fake.root_url}/api/v1/instances/"
    _, big = await _raw_get(session, fake, url, {"limit": "100"})
    _, zero = await _raw_get(session, fake, url, {"limit": "0"})
    assert isinstance(big, dict) and isinstance(zero, dict)
    assert len(big["instances"]) == 25 and big["next_token"]
    assert len(zero["instances"]) == 5
    assert big["total_instances"] == 31
    assert big["label_counts"]["bulk:3"] == 1
