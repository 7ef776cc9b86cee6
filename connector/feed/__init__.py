"""The statement feed: provider reads → outbox → ``POST /v1/statements`` (spec 1.4.4, 3.5, 3.6; product
Decisions 5–9). See :mod:`connector.feed.engine` for the run and :mod:`connector.feed.statements` for the bodies."""

from connector.feed.engine import AccountOutcome, Feed, FeedOptions, LeaseHeld, RunReport
from connector.feed.statements import UNIQUE_ID_NAMESPACE, unique_id

__all__ = ["UNIQUE_ID_NAMESPACE", "AccountOutcome", "Feed", "FeedOptions", "LeaseHeld", "RunReport", "unique_id"]
