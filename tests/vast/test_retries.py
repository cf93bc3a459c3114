"""Retries: idempotent calls on 429/5xx/timeouts only; create never."""

from __future__ import annotations

import pytest

from core.vast import (
    OfferQuery,
    OfferUnavailable,
    VastClient,
    VastConnectionError,
    VastError,
    VastRateLimited,
    VastServerError,
    VastTimeout,
)
from tests.fakevast import FakeVast

from .conftest import comfy_request


@pytest.fixture
async def iid(client: VastClient, fake: FakeVast) -> int:
    instance_id = await client.create_instance(18822341, comfy_request())
    fake.advance(60)
    return instance_id


async def test_429_with_retry_after_is_retried_after_that_delay(
        client: VastClient, fake: FakeVast, iid: int, sleeps: list[float]) -> None:
    fake.fail_next(f"/instances/{iid}/", 429, headers={"Retry-After": "3"})
    inst = await client.show_instance(iid)
    assert inst.is_running
    assert len(fake.calls(f"GET /api/v0/instances/{iid}/")) == 2
    assert sleeps and sleeps[0] >= 3.0


async def test_plain_text_429_threshold_is_honoured(client: VastClient, fake: FakeVast,
                                                    iid: int, sleeps: list[float]) -> None:
    fake.throttle_threshold = 2.0
    fake.fail_next(f"/instances/{iid}/", 429, count=2)
    await client.show_instance(iid)
    assert len(sleeps) == 2 and all(s >= 2.0 for s in sleeps)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_get_5xx_is_retried(client: VastClient, fake: FakeVast, iid: int,
                                  status: int) -> None:
    fake.fail_next(f"GET /api/v0/instances/{iid}/", status, count=2)
    assert (await client.show_instance(iid)).id == iid
    assert len(fake.calls(f"GET /api/v0/instances/{iid}/")) == 3


async def test_search_retried_on_5xx(client: VastClient, fake: FakeVast) -> None:
    fake.fail_next("/bundles/", 503)
    assert await client.search_offers(OfferQuery())
    assert len(fake.calls("/bundles/")) == 2


async def test_retries_give_up_after_max_retries(client: VastClient, fake: FakeVast,
                                                 iid: int, sleeps: list[float]) -> None:
    fake.fail_next(f"/instances/{iid}/", 502, count=10)
    with pytest.raises(VastServerError) as info:
        await client.show_instance(iid)
    assert info.value.status == 502
    assert len(fake.calls(f"GET /api/v0/instances/{iid}/")) == 4  # 1 + max_retries
    assert len(sleeps) == 3
    assert "502" in str(info.value)


async def test_backoff_grows(fake: FakeVast, session: object, iid: int) -> None:
    import aiohttp

    assert isinstance(session, aiohttp.ClientSession)
    delays: list[float] = []

    async def record(seconds: float) -> None:
        delays.append(seconds)

    c = VastClient(fake.api_key, session, base_url=fake.base_url, backoff_base=1.0,
                   max_retries=5, sleep=record)
    fake.fail_next(f"/instances/{iid}/", 503, count=5)
    await c.show_instance(iid)
    # Full jitter: each delay is within [0, base * 2**attempt].
    assert all(0 <= d <= 2**n for n, d in enumerate(delays))
    assert len(delays) == 5


async def test_4xx_is_not_retried(client: VastClient, fake: FakeVast, iid: int) -> None:
    fake.fail_next(f"/instances/{iid}/", 400,
                   body={"success": False, "error": "invalid_args", "msg": "bad"})
    with pytest.raises(VastError):
        await client.show_instance(iid)
    assert len(fake.calls(f"GET /api/v0/instances/{iid}/")) == 1


async def test_get_timeout_is_retried(timeout_client: VastClient, fake: FakeVast,
                                      iid: int) -> None:
    fake.fail_next(f"GET /api/v0/instances/{iid}/", "timeout")
    assert (await timeout_client.show_instance(iid)).id == iid
    assert len(fake.calls(f"GET /api/v0/instances/{iid}/")) == 2


async def test_destroy_is_retried_on_503(client: VastClient, fake: FakeVast, iid: int) -> None:
    fake.fail_next(f"DELETE /api/v0/instances/{iid}/", 503)
    assert await client.destroy_instance(iid) is True
    assert iid not in fake.instances


async def test_destroy_whose_first_response_was_lost_still_succeeds(
        client: VastClient, fake: FakeVast, iid: int) -> None:
    fake.fail_next(f"DELETE /api/v0/instances/{iid}/", 502, after=True)
    # The retry sees no_such_instance and reads it as "already gone".
    assert await client.destroy_instance(iid) is False
    assert iid not in fake.instances


async def test_stop_is_retried_on_429(client: VastClient, fake: FakeVast, iid: int) -> None:
    fake.fail_next(f"PUT /api/v0/instances/{iid}/", 429,
                   body={"success": False, "error": "rate_limit_exceeded",
                         "msg": "API requests too frequent endpoint threshold=1.0"})
    await client.stop_instance(iid)
    assert fake.instances[iid].intended_status == "stopped"


@pytest.mark.parametrize("status", [429, 500, 502, 503])
async def test_create_is_never_retried(client: VastClient, fake: FakeVast, status: int,
                                       sleeps: list[float]) -> None:
    fake.fail_next("/asks/", status)
    with pytest.raises(VastError) as info:
        await client.create_instance(18822341, comfy_request())
    assert len(fake.calls("PUT /api/v0/asks/")) == 1
    assert sleeps == []
    if status == 429:
        assert isinstance(info.value, VastRateLimited)
        assert not info.value.may_have_succeeded
    else:
        assert isinstance(info.value, VastServerError)
        assert info.value.may_have_succeeded


async def test_create_timeout_after_commit_can_be_reconciled_by_label(
        timeout_client: VastClient, client: VastClient, fake: FakeVast) -> None:
    fake.fail_next("/asks/", "timeout", after=True)
    with pytest.raises(VastTimeout) as info:
        await timeout_client.create_instance(18822341, comfy_request(label="comfybot:g1:u2:req9"))
    assert info.value.may_have_succeeded
    assert len(fake.calls("PUT /api/v0/asks/")) == 1
    # The rental happened; the service layer finds it instead of renting again.
    found = await client.find_instance_by_label("comfybot:g1:u2:req9")
    assert found is not None and found.id in fake.instances


async def test_create_5xx_after_commit_then_retry_sees_offer_gone(
        client: VastClient, fake: FakeVast) -> None:
    fake.fail_next("/asks/", 502, after=True)
    with pytest.raises(VastServerError):
        await client.create_instance(18822341, comfy_request())
    assert len(fake.instances) == 1
    with pytest.raises(OfferUnavailable):
        await client.create_instance(18822341, comfy_request())


async def test_connection_refused_is_connection_error(session: object) -> None:
    import aiohttp

    assert isinstance(session, aiohttp.ClientSession)
    fake = FakeVast()
    await fake.start()
    url = fake.base_url
    await fake.stop()

    async def no_sleep(_: float) -> None:
        return None

    c = VastClient("k", session, base_url=url, max_retries=1, sleep=no_sleep)
    with pytest.raises(VastConnectionError) as info:
        await c.create_instance(1, comfy_request())
    assert not info.value.may_have_succeeded  # never connected, so nothing was rented


async def test_chaos_reconciliation_never_double_rents(timeout_client: VastClient,
                                                       fake: FakeVast) -> None:
    """A service-style loop under random faults: check by label before renting again."""
    client = timeout_client
    fake.fail_ratio(0.3, seed=7, statuses=(500, 502, 503, 429, "timeout"))
    label = "comfybot:chaos"
    instance_id = None
    for _ in range(20):
        try:
            existing = await client.find_instance_by_label(label)
        except VastError:
            continue
        if existing is not None:
            instance_id = existing.id
            break
        offers = None
        try:
            offers = await client.search_offers(OfferQuery(gpu_name="RTX 4090"))
        except VastError:
            continue
        if not offers:
            break
        try:
            instance_id = await client.create_instance(offers[0].id,
                                                       comfy_request(label=label))
            break
        except (VastServerError, VastTimeout, VastConnectionError, VastRateLimited):
            continue
        except OfferUnavailable:
            continue
    fake.fail_ratio(0)
    assert any(r.fault for r in fake.requests), "the seed should inject some faults"
    assert instance_id is not None
    assert [i.label for i in fake.instances.values()] == [label]


@pytest.mark.parametrize("style", ["text", "detail", "json"])
async def test_real_throttle_is_waited_out(fake: FakeVast, session: object, iid: int,
                                           style: str) -> None:
    import aiohttp

    assert isinstance(session, aiohttp.ClientSession)
    fake.throttle(f"GET /api/v0/instances/{iid}/", 0.05, style=style)
    c = VastClient(fake.api_key, session, base_url=fake.base_url, backoff_base=0.01)
    await c.show_instance(iid)
    await c.show_instance(iid)  # too soon: 429, then the threshold hint is slept out
    statuses = [r.status for r in fake.calls(f"GET /api/v0/instances/{iid}/")]
    assert statuses == [200, 429, 200]
