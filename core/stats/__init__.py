"""Statistics: /stats (jobs, waits, utilisation), /budget (spend, forecast), and the
opt-in Prometheus endpoint. Queries select columns; the aggregation is pure."""

from core.stats.service import MetricsSnapshot, StatsReport, StatsService
from core.stats.spend import BudgetReport, PoolLookup

__all__ = ["BudgetReport", "MetricsSnapshot", "PoolLookup", "StatsReport", "StatsService"]
