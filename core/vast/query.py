"""Building the flat JSON filter of an offer search (``POST /bundles/``) from an
:class:`OfferQuery`: region groups, sort names and the SDK's implicit filters."""

from __future__ import annotations

import re
from collections.abc import Sequence

from core.vast.types import JsonDict, OfferQuery

_REGIONS: dict[str, tuple[str, ...]] = {
    "north-america": ("US", "CA", "MX"),
    "europe": ("DE", "NL", "FR", "GB", "SE", "NO", "FI", "PL", "ES", "IT", "CZ", "BE", "AT",
               "CH", "DK", "IE", "PT", "RO", "BG", "HU", "LT", "LV", "EE", "SI", "SK", "HR",
               "GR", "IS", "UA", "RS"),
    "asia": ("JP", "KR", "SG", "TW", "HK", "IN", "TH", "VN", "MY", "CN", "ID", "PH"),
    "oceania": ("AU", "NZ"),
    "south-america": ("BR", "AR", "CL", "CO", "PE"),
}
_REGION_ALIASES = {"na": "north-america", "eu": "europe", "as": "asia", "oc": "oceania",
                   "sa": "south-america", "us": None}

_SORTS: dict[str, tuple[str, str]] = {
    "price": ("dph_total", "asc"),
    "reliability": ("reliability2", "desc"),
    "score": ("score", "desc"),
    "performance": ("dlperf", "desc"),
    "value": ("dlperf_per_dphtotal", "desc"),
    "bandwidth": ("inet_down", "desc"),
    "vram": ("gpu_ram", "desc"),
}


def _countries(region: str | Sequence[str]) -> list[str]:
    items = [region] if isinstance(region, str) else list(region)
    out: list[str] = []
    for item in items:
        for part in item.split(","):
            key = part.strip().lower().replace("_", "-").replace(" ", "-")
            if not key:
                continue
            group = _REGIONS.get(_REGION_ALIASES.get(key, key) or "")
            out.extend(group if group else [key.upper()])
    return list(dict.fromkeys(out))


def build_search_body(query: OfferQuery) -> JsonDict:
    """The flat JSON filter object that ``POST /bundles/`` expects."""
    body: JsonDict = {
        # The SDK adds these unless told not to; without them the search returns
        # machines that cannot be rented.
        "external": {"eq": False},
        "rentable": {"eq": True},
        "rented": {"eq": False},
    }
    if query.verified is not None:
        body["verified"] = {"eq": query.verified}
    if query.gpu_name:
        names = [query.gpu_name] if isinstance(query.gpu_name, str) else list(query.gpu_name)
        # The CLI turns "RTX_4090" into "RTX 4090"; Vast's names contain spaces.
        names = [n.replace("_", " ").strip() for n in names if n.strip()]
        body["gpu_name"] = {"eq": names[0]} if len(names) == 1 else {"in": names}
    if query.num_gpus is not None:
        body["num_gpus"] = {"eq": query.num_gpus}
    if query.max_price_per_hour is not None:
        body["dph_total"] = {"lte": query.max_price_per_hour}
    if query.min_reliability is not None:
        body["reliability2"] = {"gte": query.min_reliability}
    if query.min_disk_gb is not None:
        body["disk_space"] = {"gte": query.min_disk_gb}
    if query.min_gpu_ram_gb is not None:
        body["gpu_ram"] = {"gte": query.min_gpu_ram_gb * 1000}  # MB, as the CLI does
    if query.min_inet_down is not None:
        body["inet_down"] = {"gte": query.min_inet_down}
    if query.min_cuda is not None:
        body["cuda_max_good"] = {"gte": query.min_cuda}
    if query.min_direct_ports is not None:
        body["direct_port_count"] = {"gte": query.min_direct_ports}
    if query.region:
        codes = _countries(query.region)
        if codes:
            body["geolocation"] = {"eq": codes[0]} if len(codes) == 1 else {"in": codes}
    sort = _SORTS.get(query.sort)
    if sort is None:
        name = query.sort.lstrip("-")
        if not re.fullmatch(r"[a-z_0-9]+", name):
            raise ValueError(f"unknown sort {query.sort!r}")
        sort = (name, "desc" if query.sort.startswith("-") else "asc")
    body["order"] = [list(sort)]
    body["type"] = "on-demand"
    body["limit"] = max(1, int(query.limit))
    storage = query.allocated_storage_gb or query.min_disk_gb
    if storage:
        # Prices dph_total with the disk we will actually rent.
        body["allocated_storage"] = float(storage)
    return body
