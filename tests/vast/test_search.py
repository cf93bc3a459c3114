"""Offer search: the request body Vast expects and the filtering it does."""

from __future__ import annotations

import pytest

from core.vast import OfferQuery, SearchQuotaExceeded, VastClient, build_search_body
from tests.fakevast import FakeVast


async def test_search_sends_sdk_defaults_and_flat_filters(client: VastClient,
                                                          fake: FakeVast) -> None:
    await client.search_offers(OfferQuery(gpu_name="RTX 4090", max_price_per_hour=0.6,
                                          min_disk_gb=60, region=["US", "CA"]))
    [call] = fake.calls("POST /api/v0/bundles/")
    body = call.body
    assert body["verified"] == {"eq": True}
    assert body["rentable"] == {"eq": True}
    assert body["rented"] == {"eq": False}
    assert body["external"] == {"eq": False}
    assert body["gpu_name"] == {"eq": "RTX 4090"}
    assert body["dph_total"] == {"lte": 0.6}
    assert body["geolocation"] == {"in": ["US", "CA"]}
    assert body["order"] == [["dph_total", "asc"]]
    assert body["type"] == "on-demand"
    assert body["allocated_storage"] == 60.0


async def test_default_search_returns_verified_offers_cheapest_first(client: VastClient) -> None:
    offers = await client.search_offers(OfferQuery(num_gpus=None, limit=50))
    prices = [o.price_per_hour for o in offers]
    assert prices == sorted(prices)
    assert offers and all(o.verified for o in offers)
    assert 18822343 not in {o.id for o in offers}  # the unverified one


async def test_search_filters_by_gpu_and_count(client: VastClient) -> None:
    offers = await client.search_offers(OfferQuery(gpu_name=["RTX 3090"], num_gpus=2))
    assert [(o.id, o.gpu_name, o.num_gpus) for o in offers] == [(18822345, "RTX 3090", 2)]


async def test_search_filters_by_country_code_in_free_text_geolocation(
        client: VastClient) -> None:
    offers = await client.search_offers(OfferQuery(region="CA", num_gpus=None))
    assert {o.country for o in offers} == {"CA"}
    assert {o.geolocation for o in offers} == {"Quebec, CA", "Ontario, CA"}


async def test_search_region_group_expands_to_countries(client: VastClient) -> None:
    offers = await client.search_offers(OfferQuery(region="europe", num_gpus=None))
    assert {o.country for o in offers} == {"NL", "DE"}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (OfferQuery(max_price_per_hour=0.4), {18822341, 18822344}),
        (OfferQuery(min_reliability=0.998), {18822342}),
        (OfferQuery(min_disk_gb=1000), {18822346}),
        (OfferQuery(gpu_name="H100 SXM", min_direct_ports=1), set()),
        (OfferQuery(verified=None, gpu_name="RTX 4090"), {18822341, 18822342, 18822343}),
    ],
)
async def test_search_numeric_and_bool_filters(client: VastClient, query: OfferQuery,
                                               expected: set[int]) -> None:
    assert {o.id for o in await client.search_offers(query)} == expected


async def test_sort_by_reliability_descending(client: VastClient) -> None:
    offers = await client.search_offers(OfferQuery(sort="reliability", num_gpus=None))
    rel = [o.reliability for o in offers]
    assert rel == sorted(rel, reverse=True)


async def test_limit_caps_results(client: VastClient) -> None:
    assert len(await client.search_offers(OfferQuery(num_gpus=None, limit=2))) == 2


async def test_dph_total_prices_in_allocated_storage(client: VastClient) -> None:
    small = await client.search_offers(OfferQuery(gpu_name="RTX 4090", min_disk_gb=10))
    large = await client.search_offers(OfferQuery(gpu_name="RTX 4090", min_disk_gb=300))
    a = {o.id: o for o in small}[18822341]
    b = {o.id: o for o in large}[18822341]
    assert a.dph_base == b.dph_base == 0.35
    # storage_cost 0.15 $/GB/month over 290 GB more.
    assert b.price_per_hour - a.price_per_hour == pytest.approx(290 * 0.15 / 30 / 24, rel=1e-3)


async def test_offer_fields_are_parsed(client: VastClient) -> None:
    [offer] = await client.search_offers(OfferQuery(gpu_name="A100 SXM4"))
    assert offer.gpu_ram_mb == 81920
    assert offer.country == "JP"
    assert offer.location == "Yutakachō, Shinagawa District, Tokyo, JP"
    assert offer.inet_down == 4500.0
    assert offer.cpu_cores == 32 and offer.cpu_ram_mb == 64302
    assert offer.min_bid == 0.18


async def test_taken_offer_disappears_from_search(client: VastClient, fake: FakeVast) -> None:
    fake.take_offer(18822341)
    offers = await client.search_offers(OfferQuery(gpu_name="RTX 4090"))
    assert 18822341 not in {o.id for o in offers}


async def test_fake_accepts_cli_style_string_numbers_and_ondemand_type(
        fake: FakeVast, session: object) -> None:
    import aiohttp

    assert isinstance(session, aiohttp.ClientSession)
    body = {"num_gpus": {"eq": "2"}, "verified": {"eq": "true"}, "type": "ondemand",
            "order": [["dph_total", "asc"]]}
    async with session.post(f"{fake.base_url}/bundles/", json=body,
                            headers={"Authorization": f"Bearer {fake.api_key}"}) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        data = await resp.json()
    assert [o["id"] for o in data["offers"]] == [18822345]


async def test_search_quota_is_not_retried(client: VastClient, fake: FakeVast,
                                           sleeps: list[float]) -> None:
    fake.exhaust_search_quota(reset_in=7200)
    with pytest.raises(SearchQuotaExceeded) as info:
        await client.search_offers(OfferQuery())
    assert len(fake.calls("/bundles/")) == 1
    assert sleeps == []
    assert info.value.retry_after == pytest.approx(7200, abs=5)


def test_unknown_sort_is_rejected_before_any_call() -> None:
    with pytest.raises(ValueError):
        build_search_body(OfferQuery(sort="price; drop"))


async def test_search_works_without_a_key_but_not_with_a_wrong_one(
        fake: FakeVast, session: object) -> None:
    import aiohttp

    assert isinstance(session, aiohttp.ClientSession)
    async with session.post(f"{fake.base_url}/bundles/", json={}) as resp:
        assert resp.status == 200
    async with session.post(f"{fake.base_url}/bundles/", json={},
                            headers={"Authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401
        assert await resp.json() == {"success": False, "error": "auth_error",
                                     "msg": "Invalid user key"}
