"""Error mapping: status + body -> one exception class, user-safe messages."""

from __future__ import annotations

from typing import Any

import pytest

from core.errors import ExternalServiceError, RateLimited
from core.vast import (
    InsufficientCredit,
    OfferQuery,
    OfferUnavailable,
    SearchQuotaExceeded,
    SshKeysNotSupported,
    VastAuthError,
    VastClient,
    VastError,
    VastNotFound,
    VastRateLimited,
    VastServerError,
    error_from_response,
)
from tests.fakevast import FakeVast

from .conftest import comfy_request


@pytest.mark.parametrize(
    ("status", "body", "text", "op", "cls"),
    [
        (401, {"success": False, "error": "auth_error", "msg": "Invalid user key"}, "", "",
         VastAuthError),
        (404, {"success": False, "error": "auth_error", "msg": "Invalid user key"}, "", "search",
         VastAuthError),
        (404, {"msg": "Session expired. Please log in again."}, "", "show", VastAuthError),
        (403, {"success": False, "error": "not_authorized", "msg": "nope"}, "", "", VastAuthError),
        (401, None, "<html>Please log in or sign up</html>", "", VastAuthError),
        (404, {"success": False, "error": "no_such_ask",
               "msg": "error 404/3603: no_such_ask Instance type by id 1 is not available."},
         "", "create", OfferUnavailable),
        (410, {"success": False, "error": "no_such_ask",
               "msg": "error 410/3907: no_such_ask Instance type 1 is no longer available."},
         "", "create", OfferUnavailable),
        (404, {"success": False, "error": "invalid_args", "msg": "gone"}, "", "create",
         OfferUnavailable),
        (411, {"success": False, "msg": "Insufficient credit"}, "", "create",
         InsufficientCredit),
        (400, {"success": False, "error": "invalid_args",
               "msg": "Your credit balance is too low"}, "", "create", InsufficientCredit),
        (400, {"success": False, "error": "spend_rate_limit", "msg": "limit"}, "", "create",
         InsufficientCredit),
        (400, {"success": False, "error": "missing_billing", "msg": "x"}, "", "start",
         InsufficientCredit),
        (404, {"success": False, "error": "no_such_instance", "msg": "x"}, "", "destroy",
         VastNotFound),
        (404, {"error": "not_found", "msg": "Instance not found"}, "", "destroy", VastNotFound),
        (429, None, "API requests too frequent: endpoint threshold=2.0", "", VastRateLimited),
        (429, {"detail": "API requests too frequent endpoint threshold=4.5"}, "", "create",
         VastRateLimited),
        (429, {"success": False, "error": "rate_limit_exceeded",
               "msg": "API requests too frequent endpoint threshold=3.0"}, "", "destroy",
         VastRateLimited),
        (429, {"error": "search_quota_exceeded"}, "", "search", SearchQuotaExceeded),
        (400, {"success": False, "error": "team_ssh_keys_not_supported", "msg": "x"}, "", "",
         SshKeysNotSupported),
        (502, None, "<html>502 Bad Gateway</html>", "", VastServerError),
        (500, {"success": False, "error": "server_error", "msg": "x"}, "", "", VastServerError),
        (200, {"success": False, "error": "invalid_args", "msg": "bad"}, "", "", VastError),
        (410, {"success": False, "error": "deprecated_endpoint", "msg": "x"}, "", "list",
         VastError),
    ],
)
def test_error_mapping(status: int, body: Any, text: str, op: str, cls: type) -> None:
    err = error_from_response(status, body, text=text, op=op)
    assert type(err) is cls
    assert isinstance(err, ExternalServiceError)
    assert err.status == status


def test_rate_limit_hint_from_threshold_and_retry_after() -> None:
    err = error_from_response(429, None, text="API requests too frequent: endpoint threshold=2.0")
    assert isinstance(err, VastRateLimited) and isinstance(err, RateLimited)
    assert err.retry_after == 2.0
    err = error_from_response(429, None, text="slow down", headers={"Retry-After": "7"})
    assert isinstance(err, VastRateLimited) and err.retry_after == 7.0


def test_error_keeps_new_contract_and_strips_internal_prefix() -> None:
    err = error_from_response(400, {"success": False, "error": "invalid_price",
                                    "msg": "error 400/1: bid too low", "new_contract": 42},
                              op="create")
    assert err.new_contract == 42
    assert err.detail == "bid too low"
    assert str(err) == "Vast.ai refused the request: bid too low"


async def test_wrong_key_is_auth_error(fake: FakeVast, client: VastClient) -> None:
    fake.api_key = "a-different-key"
    with pytest.raises(VastAuthError) as info:
        await client.balance()
    assert info.value.status == 401


async def test_wrong_key_answered_with_404_is_still_auth_error(fake: FakeVast,
                                                               client: VastClient) -> None:
    fake.api_key = "a-different-key"
    fake.auth_failure_status = 404
    with pytest.raises(VastAuthError):
        await client.search_offers(OfferQuery())
    with pytest.raises(VastAuthError):
        # Must not be mistaken for "offer gone" on create.
        await client.create_instance(18822341, comfy_request())


async def test_scoped_key_forbidden(fake: FakeVast, client: VastClient) -> None:
    fake.forbid("/asks/")
    with pytest.raises(VastAuthError) as info:
        await client.create_instance(18822341, comfy_request())
    assert info.value.status == 403


async def test_offer_rented_twice_is_unavailable(client: VastClient) -> None:
    await client.create_instance(18822341, comfy_request())
    with pytest.raises(OfferUnavailable) as info:
        await client.create_instance(18822341, comfy_request(label="second"))
    assert info.value.code == "no_such_ask" and info.value.status == 404


async def test_offer_taken_by_someone_else(client: VastClient, fake: FakeVast) -> None:
    fake.take_offer(18822342)
    with pytest.raises(OfferUnavailable) as info:
        await client.create_instance(18822342, comfy_request())
    # cancel_unavail is set, so Vast says 410 "no longer available".
    assert info.value.status == 410


async def test_unknown_offer_is_unavailable(client: VastClient) -> None:
    with pytest.raises(OfferUnavailable):
        await client.create_instance(1, comfy_request())


async def test_insufficient_credit_on_create(client: VastClient, fake: FakeVast) -> None:
    fake.credit = 0.0
    with pytest.raises(InsufficientCredit) as info:
        await client.create_instance(18822341, comfy_request())
    assert not info.value.may_have_succeeded
    assert fake.instances == {}


async def test_spend_rate_limit_is_a_billing_error(client: VastClient, fake: FakeVast) -> None:
    fake.spend_rate_limit = 0.5
    await client.create_instance(18822341, comfy_request())
    with pytest.raises(InsufficientCredit):
        await client.create_instance(18822342, comfy_request())


async def test_low_bid_error_carries_new_contract(client: VastClient, fake: FakeVast,
                                                  session: object) -> None:
    import aiohttp

    assert isinstance(session, aiohttp.ClientSession)
    async with session.put(f"{fake.base_url}/asks/18822341/",
                           json={"client_id": "me", "image": "img", "disk": 10, "price": 0.01},
                           headers={"Authorization": f"Bearer {fake.api_key}"}) as resp:
        body = await resp.json()
    err = error_from_response(resp.status, body, op="create")
    assert err.new_contract in fake.instances
    inst = await client.show_instance(err.new_contract)
    assert inst.is_interrupted  # created stopped; the caller must destroy it


async def test_credit_runs_out_and_everything_stops(client: VastClient,
                                                    fake: FakeVast) -> None:
    fake.credit = 1.0
    iid = await client.create_instance(18822341, comfy_request())
    fake.advance(60)
    before = (await client.balance()).credit
    assert before < 1.0
    fake.advance(4 * 3600)
    inst = await client.show_instance(iid)
    assert inst.is_interrupted and inst.actual_status == "stopped"
    assert (await client.balance()).credit <= 0
    with pytest.raises(InsufficientCredit):
        await client.start_instance(iid)


async def test_create_validation_error_is_plain_vast_error(client: VastClient) -> None:
    with pytest.raises(VastError) as info:
        await client.create_instance(18822341, comfy_request(disk_gb=4))
    assert type(info.value) is VastError
    assert info.value.status == 400 and "8 GB" in str(info.value)


async def test_200_with_success_false_is_an_error(client: VastClient, fake: FakeVast) -> None:
    fake.fail_next("/asks/", 200, body={"success": False, "error": "invalid_args",
                                        "msg": "something odd"})
    with pytest.raises(VastError):
        await client.create_instance(18822341, comfy_request())
