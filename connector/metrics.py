"""Prometheus metrics. Each app has its own registry, so several apps (tests, the demo) can live in one process."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("connector_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.token_failures = Counter("connector_token_failures", "Sage ID tokens refused, by reason",
                                      ["reason"], registry=r)
        self.notifications = Counter("connector_notifications", "Notifications stored, by type and novelty",
                                     ["type", "new"], registry=r)
        self.statements = Counter("connector_statements", "Statements by outcome (sent, refused, retried)",
                                  ["outcome"], registry=r)
        self.sage_throttled = _Sage429()
        r.register(self.sage_throttled)
        self.feed_lag = Gauge("connector_feed_lag_seconds", "Age of the newest transaction delivered, per account",
                              ["bank_account"], registry=r)
        self.feed_accounts = Gauge("connector_feed_accounts", "Linked accounts by feed state and reason (spec 7.41)",
                                   ["state", "reason"], registry=r)
        self.provider_errors = Counter("connector_provider_errors", "Provider errors by provider and kind",
                                       ["provider", "kind"], registry=r)
        self.journeys = Counter("connector_journeys", "Journeys by kind and outcome", ["kind", "outcome"],
                                registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Sage429(Collector):
    """``connector_sage_429_total``, read at scrape time from the Sage client's own count, so every 429 counts
    (PATCH calls as much as statements), in every worker, whether or not it runs the feed."""

    def __init__(self) -> None:
        self.source: Callable[[], int] | None = None

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("connector_sage_429", "429 answers from the Sage Provider API")
        family.add_metric([], self.source() if self.source is not None else 0)
        yield family
