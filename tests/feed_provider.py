"""A test-only provider whose bank data each test controls, and helpers the feed tests share.

Register it with ``load_plugins(extra=(feed_provider,))``. Its bank keeps, per account, an append-only log of booked
transactions (the read cursor is the log length, so reads are incremental and re-read an overlap of two entries),
removals, a balance (opening balance plus every transaction present) and switches: ``down`` (TemporaryError for the
next N reads), ``lost`` (ActionRequired for a user), ``no_balance``.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import pytest

from connector.feed import Feed, FeedOptions
from connector.hookspecs import BankInfo, ConsentSession, Flow, ProviderServices, hookimpl
from connector.metrics import Metrics
from connector.outbound import guarded_session
from connector.plugins import load_plugins
from connector.sage.client import SageClient
from connector.sage.ratelimit import Backoff, RateLimiter
from connector.storage import models
from connector.testing.fixtures import DEMO_BANK_ID, FAST_FEED
from connector.types import (
    Account,
    AccountRead,
    ActionRequired,
    Balance,
    Done,
    Failed,
    Field,
    FlowEvent,
    Form,
    Grant,
    ProviderError,
    StepResult,
    TemporaryError,
    Transaction,
)

FEED_BANK_ID = "5d7e4b1c-2f3a-4c5d-8e9f-0a1b2c3d4e5f"
OVERLAP = 2


def today() -> date:
    return datetime.now(UTC).date()


@dataclass
class Book:
    """One account at the test bank."""

    opening: Decimal = Decimal("500.00")
    log: list[Transaction] = field(default_factory=list)
    removed: list[tuple[int, str]] = field(default_factory=list)  # (log position at removal, provider id)
    no_balance: bool = False

    def present(self) -> list[Transaction]:
        gone = {r for _, r in self.removed}
        latest: dict[str, Transaction] = {}
        for tx in self.log:
            latest[tx.provider_transaction_id] = tx
        return [t for t in latest.values() if t.provider_transaction_id not in gone]

    def balance(self) -> Decimal:
        return self.opening + sum((t.amount for t in self.present()), Decimal(0))


@dataclass
class World:
    users: dict[str, list[Account]] = field(default_factory=dict)
    books: dict[str, Book] = field(default_factory=dict)
    lost: set[str] = field(default_factory=set)
    down: int = 0  # the next N reads raise TemporaryError
    reads: list[dict[str, Any]] = field(default_factory=list)
    expires_at: datetime | None = None

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def open_user(self, user: str, accounts: int = 1) -> list[Account]:
        made = []
        for n in range(accounts):
            pid = f"{user}-{n + 1}"
            made.append(Account(pid, f"Feed {n + 1}", "123456", f"{abs(hash(pid)) % 10**8:08d}", "GBP"))
            self.books[pid] = Book()
        self.users[user] = made
        return made

    def add(self, account_id: str, day: date, amount: str | Decimal, *, ptid: str | None = None,
            description: str = "Card payment", **extra: Any) -> Transaction:
        tx = Transaction(ptid or f"{account_id}:{uuid.uuid4().hex[:12]}", day, Decimal(amount), description,
                         currency="GBP", **extra)
        self.books[account_id].log.append(tx)
        return tx

    def daily(self, account_id: str, first: date, days: int, per_day: int = 1) -> list[Transaction]:
        out = []
        for offset in range(days):
            for n in range(per_day):
                amount = Decimal(((offset * 37 + n * 11) % 200) - 120) + Decimal("0.45")
                out.append(self.add(account_id, first + timedelta(days=offset), amount,
                                    ptid=f"{account_id}:{offset}:{n}"))
        return out

    def remove(self, account_id: str, ptid: str) -> None:
        book = self.books[account_id]
        book.removed.append((len(book.log), ptid))


WORLD = World()


class FeedTestProvider:
    name: ClassVar[str] = "feedtest"
    title: ClassVar[str] = "Feed Test Bank"
    template_dir: ClassVar[Path | None] = None

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
        return ()

    @classmethod
    def check_bank(cls, bank: BankInfo) -> Iterable[tuple[str, str]]:
        return ()

    def __init__(self, config: Mapping[str, Any], services: ProviderServices) -> None:
        self.services = services

    async def start(self, flow: Flow) -> StepResult:
        return Form(title="Sign in to Feed Test Bank", fields=(Field("username", "User name"),), action="sign_in",
                    submit_label="Sign in")

    async def resume(self, flow: Flow, event: FlowEvent) -> StepResult:
        if event.kind == "submit" and event.action == "sign_in":
            user = event.first("username").strip()
            if user not in WORLD.users:
                return Failed(ProviderError("feedtest_unknown", "Unknown user."))
            WORLD.lost.discard(user)  # signing in again renews the consent
            return Done(Grant(secrets={"user": user}, accounts=list(WORLD.users[user]), provider_consent_id=user,
                              expires_at=WORLD.expires_at))
        return Failed(ProviderError("feedtest_unexpected", "Unexpected."))

    async def list_accounts(self, consent: ConsentSession) -> Sequence[Account]:
        return WORLD.users[str(consent.secrets["user"])]

    async def read_account(self, consent: ConsentSession, account: Account, since: date,
                           sync_point: str | None) -> AccountRead:
        user = str(consent.secrets.get("user"))
        await asyncio.sleep(0)
        if user in WORLD.lost:
            WORLD.reads.append({"account": account.provider_account_id, "outcome": "lost"})
            raise ActionRequired("feedtest_consent_lost", "Your Feed Test Bank consent has ended.")
        if WORLD.down > 0:
            WORLD.down -= 1
            WORLD.reads.append({"account": account.provider_account_id, "outcome": "down"})
            raise TemporaryError("feedtest_down", "Feed Test Bank is unavailable.", retry_after=0.01)
        book = WORLD.books[account.provider_account_id]
        start = max(int(sync_point) - OVERLAP, 0) if sync_point else 0
        gone = {r for _, r in book.removed}
        booked = [t for t in book.log[start:] if t.provider_transaction_id not in gone
                  and (sync_point is not None or t.booking_date >= since)]
        removed = [r for at, r in book.removed if at >= start]
        WORLD.reads.append({"account": account.provider_account_id, "since": since, "sync_point": sync_point,
                            "returned": len(booked), "outcome": "ok"})
        return AccountRead(balance=None if book.no_balance else Balance(book.balance(), "GBP"), booked=booked,
                           removed=removed, sync_point=str(len(book.log)))

    async def revoke(self, consent: ConsentSession) -> None:
        WORLD.reads.append({"revoked": consent.secrets.get("user")})

    async def close(self) -> None:
        return None


@hookimpl
def connector_register_providers(register):
    register(FeedTestProvider)


# --- helpers shared by the feed tests ----------------------------------------------------------------------------


async def link_accounts(browser, sage_calls, sage, user: str, *, bank_id: str = FEED_BANK_ID,
                        start: date | str | None = None, only: Sequence[int] | None = None) -> list[str]:
    """Walk onboarding for ``user``, then let Sage create a bank account for each account (or those in ``only``);
    return the new bankAccountIds once the connector has stored them."""
    external_ids = (await sage_calls.onboard(browser, user, bank_id=bank_id)).external_ids
    if only is not None:
        external_ids = [external_ids[i] for i in only]
    requested = start if isinstance(start, str) else f"{(start or today() - timedelta(days=60)).isoformat()}T00:00:00Z"
    ids = [await sage_calls.account_created(e, requested_start_date=requested, bank_id=bank_id)
           for e in external_ids]
    assert await models.LinkedAccount.filter(bank_account_id__in=ids).count() == len(ids)
    return ids


# --- fixtures (import them into a test module to use them) --------------------------------------------------------

BANKS = (
    {"sage_bank_id": DEMO_BANK_ID, "name": "Demo Bank", "provider": "demobank"},
    {"sage_bank_id": FEED_BANK_ID, "name": "Feed Test Bank", "provider": "feedtest"},
)
#: Waits shortened so fault tests run in seconds; the rules (order, doubling, caps) are the production ones.
FAST = {**FAST_FEED, "poll_first": 0.02, "poll_cap": 0.1, "late_poll": 0.2, "lease_ttl": 5.0}


@pytest.fixture
def world() -> World:
    WORLD.reset()
    return WORLD


@pytest.fixture
def plugins(world):
    return load_plugins(extra=(sys.modules[__name__],))


@pytest.fixture
def connector_extra() -> dict[str, dict[str, Any]]:
    """Config sections merged into the test connector's config; override per module."""
    return {}


@pytest.fixture
async def connector(connector_factory, connector_extra):
    return await connector_factory(banks=BANKS, providers={"demobank": {"history_days": 90}, "feedtest": {}},
                                   extra=connector_extra)


@pytest.fixture
async def make_feed(connector, sage):
    """Build a Feed on the running connector's database and providers, with its own fast-retrying Sage client."""
    sessions = []

    def make(*, rate: float = 1000, read_timeout: float = 5.0, limiter: RateLimiter | None = None,
             metrics: Metrics | None = None, **options: Any) -> Feed:
        session = guarded_session([sage.base_url], timeout=30)
        sessions.append(session)
        client = SageClient(session, **sage.client_settings(),
                            limiter=limiter or RateLimiter(rate, backoff=Backoff(0.05, 0.5)),
                            backoff_base=0.01, backoff_cap=0.05, read_timeout=read_timeout, connect_timeout=2)
        opts = FeedOptions.from_settings(connector.settings, **{**FAST, **options})
        if metrics is not None:  # as connector serve wires its own client
            metrics.sage_throttled.source = lambda: client.stats.throttled
        return Feed(connector.settings, connector.app.ctx.providers, connector.app.ctx.box, client, options=opts,
                    metrics=metrics)

    yield make
    for session in sessions:
        await session.close()
