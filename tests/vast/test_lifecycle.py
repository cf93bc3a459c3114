"""Create -> loading -> running, show, stop/start, destroy, and boot failures."""

from __future__ import annotations

import pytest

from core.vast import CreateRequest, Instance, VastClient, VastNotFound
from tests.fakevast import FakeVast

from .conftest import comfy_request

OFFER = 18822341


async def test_create_sends_the_documented_body(client: VastClient, fake: FakeVast) -> None:
    await client.create_instance(OFFER, comfy_request())
    [call] = fake.calls("PUT /api/v0/asks/18822341/")
    body = call.body
    assert body["client_id"] == "me"
    assert body["image"] == "vastai/base-image:@vastai-automatic-tag"
    assert body["disk"] == 60.0
    assert body["runtype"] == "ssh_direc ssh_proxy"
    assert body["env"] == {"-p 8188:8188": "1", "COMFY_PORT": "8188"}
    assert body["cancel_unavail"] is True
    assert "price" not in body  # on-demand, not an interruptible bid


async def test_create_returns_new_contract_not_offer_id(client: VastClient,
                                                       fake: FakeVast) -> None:
    iid = await client.create_instance(OFFER, comfy_request())
    assert iid != OFFER
    assert iid in fake.instances


async def test_instance_boots_through_null_and_loading_to_running(client: VastClient,
                                                                  fake: FakeVast) -> None:
    iid = await client.create_instance(OFFER, comfy_request())
    inst = await client.show_instance(iid)
    assert inst.actual_status is None
    assert inst.intended_status == "running"
    assert inst.ports == {} and inst.direct_ssh is None

    fake.advance(5)
    inst = await client.show_instance(iid)
    assert inst.actual_status == "loading"
    assert "Pulling" in (inst.status_msg or "")
    assert inst.raw["ports"] is None

    fake.advance(30)
    inst = await client.show_instance(iid)
    assert inst.is_running and inst.cur_state == "running"
    assert inst.public_ipaddr == "203.0.113.45"  # trailing newline stripped
    ssh_port = inst.public_port(22)
    comfy_port = inst.public_port(8188)
    assert ssh_port and comfy_port and ssh_port != comfy_port
    assert 40100 <= comfy_port <= 40199
    assert inst.direct_ssh == ("203.0.113.45", ssh_port)
    assert inst.comfy_endpoint() == ("203.0.113.45", comfy_port)
    assert inst.proxy_ssh is not None and inst.proxy_ssh[0].endswith(".vast.ai")
    assert inst.label == "comfybot:g1:u2:req3"
    assert inst.extra_env == {"-p 8188:8188": "1", "COMFY_PORT": "8188"}
    assert inst.image_runtype == "ssh ssh_direc ssh_proxy"


async def test_show_uses_v0_per_id_route_with_owner_me(client: VastClient,
                                                       fake: FakeVast) -> None:
    iid = await client.create_instance(OFFER, comfy_request())
    await client.show_instance(iid)
    [call] = fake.calls(f"GET /api/v0/instances/{iid}/")
    assert call.query == {"owner": "me"}


async def test_proxy_only_runtype_maps_no_ssh_port(client: VastClient, fake: FakeVast) -> None:
    iid = await client.create_instance(OFFER, comfy_request(runtype="ssh_proxy"))
    fake.advance(60)
    inst = await client.show_instance(iid)
    assert inst.public_port(22) is None
    assert inst.public_port(8188) is not None
    assert inst.ssh_endpoint == inst.proxy_ssh


async def test_stop_then_start(client: VastClient, fake: FakeVast) -> None:
    iid = await client.create_instance(OFFER, comfy_request())
    fake.advance(60)
    await client.stop_instance(iid)
    inst = await client.show_instance(iid)
    assert (inst.actual_status, inst.intended_status, inst.cur_state) == (
        "stopped", "stopped", "stopped")
    assert inst.ports == {}
    assert fake.calls(f"PUT /api/v0/instances/{iid}/")[-1].body == {"state": "stopped"}

    await client.start_instance(iid)
    inst = await client.show_instance(iid)
    assert inst.actual_status == "loading" and inst.intended_status == "running"
    fake.advance(fake.restart_seconds)
    assert (await client.show_instance(iid)).is_running
    assert fake.calls(f"PUT /api/v0/instances/{iid}/")[-1].body == {"state": "running"}


async def test_set_label(client: VastClient, fake: FakeVast) -> None:
    iid = await client.create_instance(OFFER, comfy_request())
    await client.set_label(iid, "renamed")
    assert (await client.show_instance(iid)).label == "renamed"


async def test_destroy_makes_instance_gone_and_frees_the_offer(client: VastClient,
                                                              fake: FakeVast) -> None:
    iid = await client.create_instance(OFFER, comfy_request())
    assert await client.destroy_instance(iid) is True
    call = fake.calls(f"DELETE /api/v0/instances/{iid}/")[0]
    assert call.body == {}  # the SDK always sends a JSON body
    with pytest.raises(VastNotFound):
        await client.show_instance(iid)
    # Destroy is idempotent: the second one reports "already gone".
    assert await client.destroy_instance(iid) is False
    assert fake.calls(f"DELETE /api/v0/instances/{iid}/")[-1].status == 404
    assert iid in fake.destroyed and iid not in fake.instances


async def test_show_of_destroyed_instance_is_null_wrapper(client: VastClient, fake: FakeVast,
                                                          session: object) -> None:
    import aiohttp

    assert isinstance(session, aiohttp.ClientSession)
    iid = await client.create_instance(OFFER, comfy_request())
    await client.destroy_instance(iid)
    async with session.get(f"{fake.base_url}/instances/{iid}/",
                           headers={"Authorization": f"Bearer {fake.api_key}"}) as resp:
        assert resp.status == 200
        assert await resp.json() == {"instances": None}


async def test_start_stop_unknown_instance_is_not_found(client: VastClient) -> None:
    with pytest.raises(VastNotFound) as info:
        await client.stop_instance(1)
    assert info.value.code == "no_such_instance"


@pytest.mark.parametrize("kind", ["exited", "oci", "unknown", "offline"])
async def test_boot_failures_are_detected(client: VastClient, fake: FakeVast, kind: str) -> None:
    fake.fail_next_boot(kind)
    iid = await client.create_instance(OFFER, comfy_request())
    fake.advance(60)
    inst = await client.show_instance(iid)
    assert inst.is_failed
    assert not inst.is_running


async def test_stuck_boot_stays_loading(client: VastClient, fake: FakeVast) -> None:
    fake.fail_next_boot("stuck")
    iid = await client.create_instance(OFFER, comfy_request())
    fake.advance(3600)
    inst = await client.show_instance(iid)
    assert inst.actual_status == "loading" and not inst.is_failed


async def test_interruption_signature(client: VastClient, fake: FakeVast) -> None:
    iid = await client.create_instance(OFFER, comfy_request())
    fake.advance(60)
    fake.interrupt(iid)
    inst = await client.show_instance(iid)
    assert inst.is_interrupted


async def test_reboot_passes_through_rebooting(client: VastClient, fake: FakeVast) -> None:
    iid = await client.create_instance(OFFER, comfy_request())
    fake.advance(60)
    await client.reboot_instance(iid)
    assert (await client.show_instance(iid)).actual_status == "rebooting"
    fake.advance(fake.reboot_seconds)
    assert (await client.show_instance(iid)).is_running


async def test_set_network_points_instance_at_loopback(client: VastClient,
                                                       fake: FakeVast) -> None:
    iid = await client.create_instance(OFFER, comfy_request())
    fake.set_network(iid, public_ipaddr="127.0.0.1", ports={"22/tcp": 2222, "8188/tcp": 8188})
    fake.advance(60)
    inst = await client.show_instance(iid)
    assert inst.direct_ssh == ("127.0.0.1", 2222)
    assert inst.comfy_endpoint() == ("127.0.0.1", 8188)


def test_instance_parses_documented_sample() -> None:
    sample = {
        "id": 27815123, "actual_status": "running", "intended_status": "running",
        "cur_state": "running", "next_state": "running", "label": "x",
        "ssh_host": "ssh4.vast.ai", "ssh_port": 35122, "public_ipaddr": "203.0.113.45\n",
        "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "40122"}],
                  "8188/tcp": [{"HostIp": "0.0.0.0", "HostPort": "40188"}]},
        "extra_env": [["-p 8188:8188", "1"], ["COMFY_PORT", "8188"]],
        "gpu_name": "RTX 4090", "num_gpus": 1, "gpu_ram": 24564, "dph_total": 0.3708,
        "geolocation": "Texas, US", "start_date": 1766580012.52, "disk_space": 60.0,
    }
    inst = Instance.from_api(sample)
    assert inst.ports == {"22/tcp": 40122, "8188/tcp": 40188}
    assert inst.direct_ssh == ("203.0.113.45", 40122)
    assert inst.proxy_ssh == ("ssh4.vast.ai", 35122)
    assert inst.country == "US"


def test_create_request_without_ssh_uses_args_runtype() -> None:
    body = CreateRequest(image="img", ssh=False).to_body()
    assert body["runtype"] == "args"


async def test_instance_logs_polls_result_url_without_auth(client: VastClient,
                                                           fake: FakeVast) -> None:
    iid = await client.create_instance(OFFER, comfy_request())
    fake.set_logs(iid, "\n".join(f"line {n}" for n in range(10)))
    fake.logs_ready_after = 2
    text = await client.instance_logs(iid, tail=3)
    assert text.splitlines() == ["line 7", "line 8", "line 9"]
    polls = fake.calls("GET /_fake/logs/")
    assert len(polls) == 3 and not any(p.bearer for p in polls)
    assert fake.calls("PUT /api/v0/instances/request_logs/")[0].body == {"tail": "3"}


async def test_fake_accepts_docs_spelling_of_direct_runtype(fake: FakeVast,
                                                            session: object) -> None:
    import aiohttp

    assert isinstance(session, aiohttp.ClientSession)
    async with session.put(f"{fake.base_url}/asks/{OFFER}/",
                           json={"client_id": "me", "image": "img", "disk": 20,
                                 "runtype": "ssh_direct", "env": {"-p 8188:8188": "1"}},
                           headers={"Authorization": f"Bearer {fake.api_key}"}) as resp:
        assert resp.status == 200
        iid = (await resp.json())["new_contract"]
    fake.advance(60)
    data = fake.instance_json(iid)
    assert set(data["ports"]) == {"22/tcp", "8188/tcp"}
    assert data["image_runtype"] == "ssh ssh_direc"
    assert all(isinstance(b[0]["HostPort"], str) for b in data["ports"].values())


async def test_fake_rejects_env_as_docker_flag_string(fake: FakeVast, session: object) -> None:
    import aiohttp

    assert isinstance(session, aiohttp.ClientSession)
    async with session.put(f"{fake.base_url}/asks/{OFFER}/",
                           json={"client_id": "me", "image": "img", "disk": 20,
                                 "env": "-e A=b -p 8188:8188"},
                           headers={"Authorization": f"Bearer {fake.api_key}"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_args"


async def test_missing_image_tag_is_accepted_then_stays_loading(client: VastClient,
                                                                fake: FakeVast) -> None:
    """Vast does not check the registry at create: the instance bills its disk in
    loading, with the daemon's pull error in status_msg (issue 11; see remove_image)."""
    image = "vastai/comfy:latest"
    fake.remove_image(image)
    iid = await client.create_instance(OFFER, comfy_request(image=image))
    credit = fake.credit
    fake.advance(3600)
    inst = await client.show_instance(iid)
    assert inst.actual_status == "loading" and not inst.ports
    assert f"manifest for {image} not found: manifest unknown" in (inst.status_msg or "")
    assert fake.credit < credit  # storage bills meanwhile


async def test_start_waits_in_scheduling_while_the_gpu_is_taken(client: VastClient,
                                                                 fake: FakeVast) -> None:
    iid = await client.create_instance(OFFER, comfy_request())
    fake.advance(60)
    await client.stop_instance(iid)
    fake.hold_gpu(iid)
    await client.start_instance(iid)
    fake.advance(3600)
    inst = await client.show_instance(iid)
    assert inst.actual_status == "scheduling" and inst.intended_status == "running"
    assert fake.instances[iid].running_since is None  # no GPU billing while waiting
    fake.release_gpu(iid)
    fake.advance(60)
    assert (await client.show_instance(iid)).is_running


async def test_hold_after_acts_first_and_answers_on_release(client: VastClient,
                                                            fake: FakeVast) -> None:
    import asyncio

    hold = fake.hold_after("PUT /api/v0/asks/")
    create = asyncio.ensure_future(client.create_instance(OFFER, comfy_request(label="h:1")))
    await asyncio.wait_for(hold.arrived.wait(), 30)
    assert not create.done()
    assert [i.label for i in fake.instances.values()] == ["h:1"]  # Vast already acted
    hold.release()
    assert await asyncio.wait_for(create, 30) in fake.instances
