"""``connector feed status``: each linked account's state, last statement, lag, waiting transactions, consent expiry
and last error (lessons 2 and 7). Read-only; safe to run beside a running feed."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tortoise.functions import Count, Max

from connector.config import Settings
from connector.feed.engine import NOT_DELIVERED, OPEN
from connector.feed.lease import current_holder
from connector.storage import models


@dataclass
class AccountStatus:
    bank_account_id: str
    name: str
    bank: str
    provider: str
    state: str
    reason: str
    last_statement: str
    lag: str
    waiting: int
    consent_expires: str
    last_error: str
    next_read: str

    @property
    def needs_attention(self) -> bool:
        return self.state in NOT_DELIVERED


def ago(delta: timedelta) -> str:
    seconds = int(max(delta.total_seconds(), 0))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d{(seconds % 86400) // 3600}h"


def expiry(expires_at: datetime | None, now: datetime) -> str:
    if expires_at is None:
        return "unknown"
    left = expires_at - now
    if left.total_seconds() <= 0:
        return f"{expires_at:%Y-%m-%d} (expired)"
    return f"{expires_at:%Y-%m-%d} ({left.days} day{'s' if left.days != 1 else ''} left)"


async def collect(settings: Settings, *, now: datetime | None = None,
                  include_deleted: bool = False) -> list[AccountStatus]:
    now = now or datetime.now(UTC)
    query = models.LinkedAccount.all() if include_deleted else models.LinkedAccount.filter(deleted_at__isnull=True)
    links = await query.order_by("id").prefetch_related("account__consent")
    cursors = {c.linked_account_id: c for c in await models.FeedCursor.all()}
    waiting: dict[int, int] = defaultdict(int)
    for link_id, count in await models.FeedTransaction.filter(statement_id=None).annotate(n=Count("id")) \
            .group_by("linked_account_id").values_list("linked_account_id", "n"):
        waiting[link_id] += count
    for link_id, count in await models.FeedStatement.filter(status__in=OPEN).values_list(
            "linked_account_id", "transaction_count"):
        waiting[link_id] += count
    last_ids = [i for _, i in await models.FeedStatement.annotate(last=Max("id")).group_by("linked_account_id")
                .values_list("linked_account_id", "last")]
    last = {s.linked_account_id: s for s in await models.FeedStatement.filter(id__in=last_ids)} if last_ids else {}

    rows = []
    for link in links:
        consent = link.account.consent
        cursor = cursors.get(link.id)
        statement = last.get(link.id)
        if statement is None:
            last_text = "none"
        else:
            when = statement.completed_at or statement.accepted_at or statement.created_at
            what = "authRequired" if statement.kind == "auth_required" else f"{statement.transaction_count} tx"
            last_text = f"{statement.status} {what} {ago(now - when)} ago"
            if statement.sage_statement_id:
                last_text += f" [{statement.sage_statement_id}]"
        bank = settings.bank(link.sage_bank_id)
        next_read = "now"
        if cursor is not None and cursor.next_read_at is not None and cursor.next_read_at > now:
            next_read = f"in {ago(cursor.next_read_at - now)}"
        rows.append(AccountStatus(
            bank_account_id=link.bank_account_id,
            name=link.account.display_name,
            bank=bank.name if bank else link.sage_bank_id,
            provider=consent.provider,
            state=link.feed_state,
            reason=link.feed_reason,
            last_statement=last_text,
            lag=ago(now - cursor.caught_up_at) if cursor and cursor.caught_up_at else "never caught up",
            waiting=waiting.get(link.id, 0),
            consent_expires=expiry(consent.expires_at, now),
            last_error=(cursor.last_error if cursor else "") or "",
            next_read=next_read,
        ))
    return rows


async def feed_holder() -> str:
    holder = await current_holder()
    if holder is None:
        return "feed: not running"
    return f"feed: running in {holder[0]} (lease until {holder[1]:%Y-%m-%d %H:%M:%S} UTC)"


def render(rows: list[AccountStatus]) -> str:
    """One block per account: the first line is a summary a person can scan, the next lines the details."""
    if not rows:
        return "no linked accounts"
    out = []
    for row in rows:
        state = f"{row.state} ({row.reason})" if row.reason else row.state
        out.append(f"{row.bank_account_id}  {row.name}  {row.bank} [{row.provider}]  {state}")
        out.append(f"    last statement: {row.last_statement}; lag: {row.lag}; waiting: {row.waiting} "
                   f"transaction{'s' if row.waiting != 1 else ''}; next read: {row.next_read}")
        out.append(f"    consent expires: {row.consent_expires}")
        if row.last_error:
            out.append(f"    last error: {row.last_error}")
    return "\n".join(out)
