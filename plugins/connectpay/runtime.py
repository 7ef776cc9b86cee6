"""What the psd2 and baas halves share: settings, the two hosts, the clock, and helpers for journey state.

``flow.state`` and consent secrets are stored as JSON by the core, so everything kept there is plain data: accounts
are turned into dicts here and back, and instants are ISO strings.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from connector.types import Account, AccountType, Balance, ProviderError, Transaction
from plugins.connectpay import errors
from plugins.connectpay.client import Endpoint, Reply
from plugins.connectpay.mapping import LedgerBalance, MappingError, parse_datetime, parse_report_page
from plugins.connectpay.settings import Settings

log = logging.getLogger("plugins.connectpay")

Clock = Callable[[], datetime]
MAX_PAGES = 1000


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class Runtime:
    settings: Settings
    mtls: Endpoint
    tls: Endpoint
    callback_url: str
    clock: Clock = utc_now

    def now(self) -> datetime:
        return self.clock()


# --- plain-data conversions for flow.state ------------------------------------------------------------------------


def iso(instant: datetime) -> str:
    """Read back with :func:`plugins.connectpay.mapping.parse_datetime`, the plugin's one datetime parser."""
    return instant.astimezone(UTC).isoformat()


def account_to_state(account: Account) -> dict[str, Any]:
    data = asdict(account)
    data["account_type"] = account.account_type.value
    if account.balance is not None:
        data["balance"] = {
            "amount": str(account.balance.amount),
            "currency": account.balance.currency,
            "as_of": iso(account.balance.as_of) if account.balance.as_of else None,
        }
    return data


def account_from_state(data: Mapping[str, Any]) -> Account:
    values = dict(data)
    values["account_type"] = AccountType(values.get("account_type", AccountType.BUSINESS.value))
    balance = values.get("balance")
    if isinstance(balance, Mapping):
        values["balance"] = Balance(Decimal(balance["amount"]), balance["currency"],
                                    parse_datetime(balance.get("as_of")))
    return Account(**values)


def offered_accounts(state: Mapping[str, Any]) -> list[Account]:
    return [account_from_state(a) for a in state.get("offered", ())]


def chosen(offered: Sequence[Account], ids: Sequence[str]) -> list[Account]:
    """The offered accounts the person picked, in the order offered. Ids never offered are ignored (the core checks
    them too; an id sent by a browser is never trusted on its own)."""
    wanted = set(ids)
    return [a for a in offered if a.provider_account_id in wanted]


def missing_linked(linked: Sequence[Account], reachable: Sequence[Account]) -> list[Account]:
    """Linked accounts a re-authorisation does not reach (matched by provider id, then by IBAN: lessons.md #4)."""
    ids = {a.provider_account_id for a in reachable}
    ibans = {(a.iban, a.currency) for a in reachable if a.iban}
    return [a for a in linked if a.provider_account_id not in ids and (a.iban, a.currency) not in ibans]


def match_linked(linked: Sequence[Account], reachable: Sequence[Account]) -> list[Account]:
    """The fresh version of each linked account (same provider id, else same IBAN and currency)."""
    by_id = {a.provider_account_id: a for a in reachable}
    by_iban: dict[tuple[str | None, str], Account] = {(a.iban, a.currency): a for a in reachable if a.iban}
    found = []
    for account in linked:
        fresh = by_id.get(account.provider_account_id) or by_iban.get((account.iban, account.currency))
        if fresh is not None:
            found.append(fresh)
    return found


def names(accounts: Sequence[Account]) -> str:
    return ", ".join(f"{a.name} ••{a.masked_identifier}" for a in accounts)


# --- the feed window and paging (shared by psd2 transactions and baas payment entries) ----------------------------


def window_start(since: date, sync_point: str | None, overlap_days: int) -> date:
    """``dateFrom``: the newest booking date already read minus the overlap, or ``since`` on a first read (§3.9).
    The sync point is our own ISO date; anything unreadable falls back to ``since``."""
    if sync_point:
        try:
            return date.fromisoformat(sync_point) - timedelta(days=overlap_days)
        except ValueError:
            log.warning("unreadable sync point ignored")
    return since


def next_sync_point(booked: Sequence[Transaction], sync_point: str | None, start: date) -> str:
    newest = max((t.booking_date for t in booked), default=None)
    previous = None
    if sync_point:
        try:
            previous = date.fromisoformat(sync_point)
        except ValueError:
            previous = None
    candidates = [d for d in (newest, previous) if d is not None]
    return (max(candidates) if candidates else start).isoformat()


PageFetch = Callable[[str | None, int], Awaitable[Reply]]


async def read_all_pages(
    endpoint: Endpoint, fetch: PageFetch, page_size: int, fail: Callable[[Reply], ProviderError]
) -> list[Mapping[str, Any]]:
    """Every booked entry of a report, page after page (OP-11): follow ``_links.next`` on the same host, else ask for
    the next page number while pages come back full. Guards: 1000 pages, and a page that repeats the previous one."""
    entries: list[Mapping[str, Any]] = []
    url: str | None = None
    page_no = 1
    previous: tuple[str, ...] | None = None
    for _ in range(MAX_PAGES):
        reply = await fetch(url, page_no)
        if not reply.ok:
            raise fail(reply)  # what a 401/403/404 means depends on the mode
        try:
            page = parse_report_page(reply.json())
        except MappingError as exc:
            log.error("ConnectPay report not understood", extra={"path": reply.template, "json_path": exc.path})
            raise errors.unreadable(f"HTTP {reply.status} {exc.path}") from None
        if previous is not None and page.fingerprint and page.fingerprint == previous:
            log.error("ConnectPay paging repeated a page; stopping", extra={"path": reply.template})
            break
        previous = page.fingerprint
        entries.extend(page.booked)
        if page.next_href:
            url = endpoint.resolve(page.next_href)
            if url is None:
                log.error("ConnectPay next link points to another host; refused", extra={"path": reply.template})
                raise errors.unreadable("next link to another host")
            page_no += 1
        elif page.size >= page_size:
            url = None
            page_no += 1
        else:
            break
    else:
        log.error("ConnectPay paging stopped after %d pages", MAX_PAGES)
    return entries


def ledger_balance(ledger: LedgerBalance | None, booked: Sequence[Transaction], start: date) -> Balance | None:
    """A ``closingBooked`` balance plus the booked entries after its reference date, when the read covers them all
    (connectpay.md §5.5); other balance types as they are."""
    if ledger is None:
        return None
    if ledger.balance_type != "closingBooked" or ledger.reference_date is None:
        return ledger.balance
    if start > ledger.reference_date + timedelta(days=1):
        return ledger.balance  # the read misses some later entries: the closing balance is the best we have
    later = sum((t.amount for t in booked if t.booking_date > ledger.reference_date), Decimal(0))
    return replace(ledger.balance, amount=ledger.balance.amount + later)
