"""Operator actions on a held account (``connector feed retry``): spec 3.5.7 and 7.23 pause the feed for an operator
when Sage refuses a statement or answers in a way we cannot act on; this is how the operator lets it go on."""

from __future__ import annotations

from dataclasses import dataclass

from tortoise.transactions import in_transaction

from connector.storage import models

HELD = ("rejected", "blocked")


@dataclass(frozen=True)
class RetryResult:
    released: bool
    message: str


async def retry(bank_account_id: str, *, rebuild: bool = False) -> RetryResult:
    """Release the statement holding ``bank_account_id``'s feed.

    Without ``rebuild`` the same bytes are sent again at the next run (Sage's problem was fixed on its side). With
    ``rebuild`` the held statement and every later unsent one are dropped and their transactions cut again at the
    next run, with the same ``uniqueId``\\ s (our problem, fixed in a new release).
    """
    link = await models.LinkedAccount.get_or_none(bank_account_id=bank_account_id)
    if link is None:
        return RetryResult(False, f"{bank_account_id}: no such linked account")
    if link.deleted_at is not None:
        return RetryResult(False, f"{bank_account_id}: deleted in Sage; its feed is stopped for good")
    held = await models.FeedStatement.filter(linked_account_id=link.id, status__in=HELD).order_by("id").first()
    if held is None:
        return RetryResult(False, f"{bank_account_id}: no statement is holding this account")
    if not rebuild:
        await models.FeedStatement.filter(id=held.id).update(status="ready", reason="", error="",
                                                             next_attempt_at=None)
        await models.LinkedAccount.filter(id=link.id).update(feed_state="backfilling", feed_reason="")
        return RetryResult(True, f"{bank_account_id}: statement {held.id} will be sent again, unchanged")
    async with in_transaction():
        dropped = [held.id] + list(await models.FeedStatement.filter(
            linked_account_id=link.id, kind="transactions", status="ready", id__gt=held.id,
            post_attempts=0).values_list("id", flat=True))
        await models.FeedStatement.filter(id__in=dropped).update(status="abandoned", reason="rebuilt_by_operator")
        freed = await models.FeedTransaction.filter(statement_id__in=dropped).update(statement_id=None)
        kept = await models.FeedStatement.filter(
            linked_account_id=link.id, kind="transactions", status__in=("complete", "accepted", "ready"),
        ).order_by("-last_date").first()
        await models.FeedCursor.filter(linked_account_id=link.id).update(
            last_planned_date=kept.last_date if kept else None)
        await models.LinkedAccount.filter(id=link.id).update(feed_state="backfilling", feed_reason="")
    return RetryResult(True, f"{bank_account_id}: {len(dropped)} statement(s) dropped; {freed} transaction(s) "
                             "will be cut into new statements at the next run")
