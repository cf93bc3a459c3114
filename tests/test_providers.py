"""What each kind of server allows, as the provider modules tell it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from core.errors import ValidationFailed
from core.providers import has_shell, kinds, provider_for


@dataclass
class Row:
    provider: str
    provider_id: str | None = None
    ssh_host: str | None = None
    comfy_url: str | None = None


def test_shell_only_where_there_is_an_ssh_address_and_never_on_a_url() -> None:
    assert has_shell(Row("vast", "7", ssh_host="1.2.3.4"))
    assert not has_shell(Row("vast", "7"))  # still booting
    assert has_shell(Row("ssh", ssh_host="gpu.lan"))
    assert not has_shell(Row("direct", ssh_host="gpu.lan", comfy_url="http://gpu.lan:8188"))


def test_comfyui_is_tunnelled_unless_the_server_has_a_url() -> None:
    assert provider_for("vast").tunnelled(Row("vast", ssh_host="h"))
    assert not provider_for("vast").tunnelled(Row("vast", comfy_url="http://h:8188"))
    assert provider_for("ssh").tunnelled(Row("ssh", ssh_host="h"))
    assert not provider_for("direct").tunnelled(Row("direct"))


def test_only_rented_instances_are_powered_billed_and_synced() -> None:
    vast, ssh, direct = provider_for("vast"), provider_for("ssh"), provider_for("direct")
    assert vast.rented and vast.can_start_stop and vast.bills and vast.synced
    for other in (ssh, direct):
        assert not (other.rented or other.can_start_stop or other.bills or other.synced)
    assert kinds(synced=True) == ["vast"]
    assert vast.has_instance(Row("vast", "7")) and not vast.has_instance(Row("vast"))
    assert not ssh.has_instance(Row("ssh", "7"))


def test_rates_per_billing_state() -> None:
    vast, ssh = provider_for("vast"), provider_for("ssh")
    assert vast.rate("running", 0.5) == vast.rate("loading", 0.5) == 0.5
    assert vast.rate("stopped", 0.5) == 0.05  # the disk still bills
    assert ssh.rate("stopped", 0.5) == 0.0 and ssh.rate("running", 0.5) == 0.5
    assert vast.rate("destroyed", 0.5) == 0.0


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValidationFailed):
        provider_for("gcp")
