"""The opt-in Prometheus endpoint: ``GET /metrics`` in the text exposition format.

Served by an aiohttp server on the bot's own event loop (aiohttp is already the bot's HTTP
stack; prometheus-client's own server runs a thread per scrape and reads collectors
synchronously, while these numbers come from the async database). Each scrape reads one
:class:`MetricsSnapshot` and renders it with prometheus-client's metric families and
``generate_latest``, so the format is the library's, not hand-written.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from core.db.models import GenerationStatus, ServerStatus
from core.stats.service import MetricsSnapshot, StatsService

log = logging.getLogger(__name__)

# Seconds: queue waits span instant starts to cold starts of several minutes.
WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800)
RUN_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
# A scrape that cannot read the database in this time answers 503 instead of hanging.
SCRAPE_TIMEOUT = 10.0


def histogram(
    name: str, doc: str, values: Sequence[float], buckets: Sequence[float]
) -> HistogramMetricFamily:
    cumulative = [(str(float(b)), float(sum(1 for v in values if v <= b))) for b in buckets]
    cumulative.append(("+Inf", float(len(values))))
    return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=float(sum(values)))


class _SnapshotCollector(Collector):
    def __init__(self, snap: MetricsSnapshot) -> None:
        self._snap = snap

    def collect(self) -> Iterator[Metric]:
        snap = self._snap
        jobs = GaugeMetricFamily("comfyvast_jobs", "Jobs by state.", labels=["state"])
        # Every state appears, at zero too, so a query does not see series come and go.
        for state in GenerationStatus:
            jobs.add_metric([state.value], snap.jobs_by_state.get(state.value, 0))
        yield jobs
        servers = GaugeMetricFamily("comfyvast_servers", "Servers by state.", labels=["state"])
        for state in ServerStatus:
            servers.add_metric([state.value], snap.servers_by_state.get(state.value, 0))
        yield servers
        yield histogram(
            "comfyvast_queue_wait_seconds", "From request to start, per started job.",
            snap.waits, WAIT_BUCKETS,
        )
        yield histogram(
            "comfyvast_run_seconds", "From start to images, per completed job.",
            snap.runs, RUN_BUCKETS,
        )
        yield CounterMetricFamily(
            "comfyvast_spend_dollars", "Dollars spent on servers, all time.",
            value=snap.spend_total,
        )
        yield GaugeMetricFamily(
            "comfyvast_spend_month_dollars", "Dollars spent this month (UTC).",
            value=snap.spend_month,
        )
        yield GaugeMetricFamily(
            "comfyvast_spend_rate_dollars_per_hour", "What the servers bill right now.",
            value=snap.rate,
        )
        if snap.budget is not None:
            yield GaugeMetricFamily(
                "comfyvast_budget_month_dollars", "The configured monthly budget.",
                value=snap.budget,
            )


def exposition(snap: MetricsSnapshot) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snap))
    return generate_latest(registry)


class MetricsServer:
    """``/metrics`` on ``host:port``; :meth:`start` returns the bound port (0 picks one)."""

    def __init__(self, stats: StatsService, host: str, port: int) -> None:
        self._stats = stats
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/metrics", self._scrape)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        port = int(runner.addresses[0][1])
        log.info("metrics on http://%s:%d/metrics", self._host, port)
        return port

    async def _scrape(self, request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT):
                snap = await self._stats.snapshot()
        except TimeoutError:
            log.warning("metrics scrape: the database did not answer in %.0fs", SCRAPE_TIMEOUT)
            return web.Response(status=503, text="database busy\n")
        return web.Response(body=exposition(snap), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
