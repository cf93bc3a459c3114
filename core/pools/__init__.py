"""Server pools: templates, limits, members, and the autoscaler that acts on them."""

from core.pools.autoscaler import Autoscaler
from core.pools.service import PoolService, Template, parse_models
from core.pools.types import PoolStatus, PoolView

__all__ = ["Autoscaler", "PoolService", "PoolStatus", "PoolView", "Template", "parse_models"]
