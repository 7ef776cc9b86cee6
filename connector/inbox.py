"""Notifications from Sage: checked, stored durably, answered, then acted on (product Decision 10).

Storing is idempotent on ``(type, resource.type, resource.id)``. The work a notification triggers runs after the
answer, from the stored row, so a crash after the 200 loses nothing: pending rows are processed again at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from connector.config import Settings
from connector.hookspecs import Provider
from connector.journey.consents import StoredConsent
from connector.security.crypto import SecretBox
from connector.storage import insert_rows, models
from connector.types import WebhookResult

log = logging.getLogger("connector.inbox")

KNOWN = {
    ("resourceCreated", "authorisation"),
    ("resourceCreated", "bankAccount"),
    ("resourceDeleted", "bankAccount"),
}
#: Only bank-account events have work to do after the answer; the rest are done once stored.
AFTER_ANSWER = {(kind, rtype) for kind, rtype in KNOWN if rtype == "bankAccount"}


MAX_GROUP = 256
NOTIFICATION_COLUMNS = ("dedupe_key", "type", "resource_type", "resource_id", "payload", "caller", "received_at",
                        "processed_at", "outcome")
AUTHORISATION_COLUMNS = ("id", "sage_bank_id", "received_at", "expires_at")
_encode_json = models.Notification._meta.fields_map["payload"].to_db_value  # the ORM's own JSON encoding


@dataclass(frozen=True, slots=True)
class Stored:
    """A notification stored: its row, whether this call stored it (else it repeats one), and whether work on it
    is left for after the answer (bank-account events: :meth:`Inbox.process_later`)."""

    id: int
    type: str
    resource_type: str
    new: bool

    @property
    def pending(self) -> bool:
        return self.new and (self.type, self.resource_type) in AFTER_ANSWER


@dataclass(slots=True)
class _Pending:
    key: str
    kind: str
    rtype: str
    rid: str
    extra: Mapping[str, Any]
    body: dict[str, Any]
    caller: str
    done: asyncio.Future


class EnvelopeError(ValueError):
    """The body is JSON but not a notification envelope; the message names the field."""


def parse_envelope(body: Any) -> tuple[str, str, str, Mapping[str, Any]]:
    if not isinstance(body, dict):
        raise EnvelopeError("the body must be a JSON object")
    kind, resource = body.get("type"), body.get("resource")
    if not isinstance(kind, str) or not 0 < len(kind) <= 64:
        raise EnvelopeError("type must be a string of 1 to 64 characters")
    if not isinstance(resource, dict):
        raise EnvelopeError("resource must be an object")
    rid, rtype = resource.get("id"), resource.get("type")
    if not isinstance(rid, str) or not 0 < len(rid) <= 64:
        raise EnvelopeError("resource.id must be a string of 1 to 64 characters")
    if not isinstance(rtype, str) or not 0 < len(rtype) <= 64:
        raise EnvelopeError("resource.type must be a non-empty string")
    if _holds_nul(body):
        raise EnvelopeError("strings must not contain U+0000")
    extra = body.get("additionalData", {})
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise EnvelopeError("additionalData must be an object")
    for name in ("bankId", "externalId", "requestedStartDate"):
        if name in extra and not isinstance(extra[name], str):
            raise EnvelopeError(f"additionalData.{name} must be a string")
    if (kind, rtype) == ("resourceCreated", "authorisation"):
        try:
            uuid.UUID(rid)
        except ValueError:
            raise EnvelopeError("resource.id of an authorisation must be a UUID") from None
        if not extra.get("bankId"):
            raise EnvelopeError("additionalData.bankId is required for an authorisation")
        if len(extra["bankId"]) > 64:
            raise EnvelopeError("additionalData.bankId must be at most 64 characters")
    if rtype == "bankAccount" and not extra.get("externalId"):
        raise EnvelopeError("additionalData.externalId is required for a bank account")
    if extra.get("requestedStartDate"):
        try:
            datetime.fromisoformat(extra["requestedStartDate"].replace("Z", "+00:00"))
        except ValueError:
            raise EnvelopeError("additionalData.requestedStartDate must be an ISO 8601 date-time") from None
    return kind, rtype, rid, extra


def _holds_nul(body: Any) -> bool:
    """A NUL character anywhere in the body, keys included (PostgreSQL can store none of them)."""
    stack = [body]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class Inbox:
    def __init__(
        self,
        settings: Settings,
        providers: Mapping[str, Provider],
        box: SecretBox,
        *,
        on_account_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.providers = providers
        self.box = box
        self.ttl = timedelta(seconds=settings.security["authorisation_ttl_seconds"])
        self.on_account_change = on_account_change
        self._working: set[int] = set()
        self._queue: list[_Pending] = []
        self._flusher: asyncio.Task | None = None
        self._later: set[asyncio.Task[Any]] = set()

    async def store(self, body: Mapping[str, Any], caller: str) -> Stored:
        """Store a checked notification durably; say what was stored.

        Notifications arriving together are written in one transaction (group commit): each caller still gets
        its answer only after the commit that holds its row, but the disk is flushed once per group, not once
        per notification, which is what bounds throughput on SQLite.
        """
        kind, rtype, rid, extra = parse_envelope(body)
        item = _Pending(f"{kind}:{rtype}:{rid}", kind, rtype, rid, extra, dict(body), caller[:200],
                        asyncio.get_running_loop().create_future())
        self._queue.append(item)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await item.done

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let notifications that arrived in the same loop turn join this group
        while self._queue:
            group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
            try:
                results = await self._write(group)
            except Exception as exc:
                for item in group:
                    if not item.done.done():
                        item.done.set_exception(exc)
                continue
            for item, result in zip(group, results):
                if not item.done.done():
                    item.done.set_result(result)

    async def _write(self, group: list[_Pending]) -> list[Stored]:
        first: dict[str, _Pending] = {}
        for item in group:
            first.setdefault(item.key, item)
        now = datetime.now(timezone.utc)
        # Plain multi-row INSERTs, not ORM objects: this is /notification's hot path. Keys already stored (here or
        # by another instance meanwhile) are skipped by the database, which also says which rows are new; nothing
        # deletes a notification, so a key skipped is found by the SELECT after the commit.
        async with in_transaction() as connection:
            inserted = await insert_rows(connection, "notification", NOTIFICATION_COLUMNS,
                                         [self._values(item, now) for item in first.values()],
                                         skip_conflicts_on="dedupe_key", returning=("dedupe_key", "id"))
            ids = {key: row_id for key, row_id in inserted}
            await insert_rows(connection, "authorisation", AUTHORISATION_COLUMNS, [
                (item.rid.lower(), item.extra["bankId"], now, now + self.ttl) for item in first.values()
                if item.key in ids and (item.kind, item.rtype) == ("resourceCreated", "authorisation")],
                # The same id in other capitals, announced before: one authorisation, whose use stays as it is.
                skip_conflicts_on="id")
        earlier = {row.dedupe_key: row for row in await models.Notification.filter(
            dedupe_key__in=[key for key in first if key not in ids])} if len(ids) < len(first) else {}
        results = []
        for item in group:
            new = item.key in ids and first[item.key] is item
            if new:
                self._note(item)
            elif (earlier[item.key].payload if item.key in earlier else first[item.key].body) != item.body:
                log.warning("repeated notification differs from the first; the first is kept",
                            extra={"notification": item.key})
            row_id = ids[item.key] if item.key in ids else earlier[item.key].id
            results.append(Stored(row_id, item.kind, item.rtype, new))
        return results

    def _values(self, item: _Pending, now: datetime) -> tuple[Any, ...]:
        """The row of ``NOTIFICATION_COLUMNS`` for one notification."""
        pending = (item.kind, item.rtype) in AFTER_ANSWER
        outcome = "" if pending else "stored" if (item.kind, item.rtype) in KNOWN else "ignored"
        return (item.key, item.kind, item.rtype, item.rid, _encode_json(item.body, None), item.caller, now,
                None if pending else now, outcome)

    def _note(self, item: _Pending) -> None:
        if (item.kind, item.rtype) not in KNOWN:
            log.info("notification of an unknown type stored and ignored", extra={"notification": item.key})
        elif item.rtype == "authorisation" and self.settings.bank(item.extra["bankId"]) is None:
            log.warning("authorisation for a bank that is not configured", extra={"bank": item.extra["bankId"]})

    async def store_webhook(self, provider: str, result: WebhookResult) -> bool:
        """Store a verified provider webhook's dedupe key and wake the feed; a repeat returns False and does nothing
        (W2)."""
        key = result.dedupe_key[:200]
        try:
            await models.Notification.create(
                dedupe_key=key, type="providerWebhook", resource_type=provider[:64], resource_id=key[-64:],
                payload={"consents": list(result.provider_consent_ids)}, received_at=datetime.now(timezone.utc),
                processed_at=datetime.now(timezone.utc), outcome="stored")
        except IntegrityError:
            return False
        if result.provider_consent_ids and self.on_account_change:
            await self.on_account_change()
        return True

    async def process_pending(self) -> None:
        for row in await models.Notification.filter(processed_at__isnull=True).order_by("id"):
            await self.process(row)

    async def process_later(self, stored: Stored) -> None:
        """Act on a notification just stored (a task started after the answer)."""
        task = asyncio.current_task()
        if task is not None:
            self._later.add(task)
        try:
            row = await models.Notification.get_or_none(id=stored.id)
            if row is not None and row.processed_at is None:
                await self.process(row)
        finally:
            self._later.discard(task)

    async def settled(self) -> None:
        """Return once the work started after answers (:meth:`process_later`) is done: for tests and shutdown."""
        while self._later:
            await asyncio.gather(*self._later, return_exceptions=True)

    async def process(self, row: models.Notification) -> None:
        """Act on a stored notification, then mark it processed. Every action is idempotent, so a crash midway
        (or two instances at once) only repeats work that changes nothing the second time."""
        if row.id in self._working:
            return
        self._working.add(row.id)
        try:
            outcome = await self._act(row)
        except Exception:
            log.exception("processing a notification failed", extra={"notification": row.dedupe_key})
            await models.Notification.filter(id=row.id).update(outcome="error")
            return
        finally:
            self._working.discard(row.id)
        await models.Notification.filter(id=row.id).update(processed_at=datetime.now(timezone.utc),
                                                           outcome=outcome)

    async def _act(self, row: models.Notification) -> str:
        extra = row.payload.get("additionalData") or {}
        match (row.type, row.resource_type):
            case ("resourceCreated", "authorisation"):
                return "stored"
            case ("resourceCreated", "bankAccount"):
                return await self._link(row, extra)
            case ("resourceDeleted", "bankAccount"):
                return await self._unlink(row.resource_id)
        return "ignored"

    async def _link(self, row: models.Notification, extra: Mapping[str, Any]) -> str:
        if await models.Notification.exists(dedupe_key=f"resourceDeleted:bankAccount:{row.resource_id}"):
            return "deleted_before_link"  # the deletion overtook the creation: never start a feed for it
        account = await self._match_account(str(extra.get("externalId", "")))
        if account is None:
            log.warning("bank account notification for an unknown externalId", extra={"bank_account": row.resource_id})
            return "unmatched"
        start = extra.get("requestedStartDate")
        if start:
            first = datetime.fromisoformat(start.replace("Z", "+00:00")).date()
        else:
            log.warning("no requestedStartDate; the feed starts today", extra={"bank_account": row.resource_id})
            first = row.received_at.date()
        consent = await account.consent
        state = "auth_required" if consent.status == "auth_required" else "linked"
        _, created = await models.LinkedAccount.get_or_create(
            bank_account_id=row.resource_id,
            defaults={"account_id": account.id, "sage_bank_id": consent.sage_bank_id,
                      "requested_start_date": first, "feed_state": state},
        )
        if created and self.on_account_change:
            await self.on_account_change()
        return "linked" if created else "already_linked"

    async def _match_account(self, external_id: str) -> models.Account | None:
        """Exact match first; else a compound ``<uuid>:<uuid>`` with exactly one known part (spec 7.17)."""
        # Values longer than the column are unknown; filtering on them would fail Tortoise's length validation.
        found = await models.Account.get_or_none(external_id=external_id) if len(external_id) <= 36 else None
        if found or ":" not in external_id:
            return found
        parts = [p for p in external_id.split(":") if 0 < len(p) <= 36]
        matches = await models.Account.filter(external_id__in=parts) if parts else []
        return matches[0] if len(matches) == 1 else None

    async def _unlink(self, bank_account_id: str) -> str:
        link = await models.LinkedAccount.get_or_none(bank_account_id=bank_account_id).prefetch_related(
            "account__consent")
        if link is None:
            return "unknown_account"
        if link.deleted_at is None:
            await models.LinkedAccount.filter(id=link.id).update(
                deleted_at=datetime.now(timezone.utc), feed_state="stopped", feed_reason="deleted_in_sage")
        consent = link.account.consent
        remaining = await models.LinkedAccount.filter(
            account__consent_id=consent.id, deleted_at__isnull=True).count()
        if remaining == 0 and consent.status != "revoked":
            await self._offboard(consent)
        if self.on_account_change:
            await self.on_account_change()
        return "stopped"

    async def _offboard(self, consent: models.Consent) -> None:
        """Erase the consent's secrets, then revoke provider access where possible with the copy in memory.

        Erasing first is the claim (one conditional UPDATE), so the revoke runs once even when the last two
        deletions are processed together, and a crash can never leave secrets behind.
        """
        consent = await models.Consent.get(id=consent.id)
        bank = self.settings.bank(consent.sage_bank_id)
        session = StoredConsent(consent, bank.info(), self.box, persist=False) if (
            bank is not None and consent.secrets_sealed) else None
        claimed = await models.Consent.filter(id=consent.id).exclude(status="revoked").update(
            secrets_sealed=None, status="revoked", status_reason="no_linked_account")
        if claimed != 1:
            return
        log.info("consent offboarded", extra={"consent": consent.id})
        provider = self.providers.get(consent.provider)
        if provider is not None and session is not None:
            try:
                await provider.revoke(session)
            except Exception as exc:
                log.warning("provider revoke failed; the secrets are erased anyway",
                            extra={"provider": consent.provider, "error": type(exc).__name__})
