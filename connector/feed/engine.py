"""The statement feed: provider reads → outbox → statements → Sage, one account at a time, many accounts at once.

For each linked account (a Sage ``bankAccountId``) a run does, in this order:

1. deliver what is already queued (a statement left over from a crash is resent with the same bytes, an accepted one
   is polled again), never skipping past a statement Sage refused;
2. read what is new from the provider, from the stored ``sync_point`` (or ``requestedStartDate`` the first time), and
   store the transactions and the new ``sync_point`` in one database transaction;
3. cut the stored transactions into statements (:mod:`connector.feed.statements`) and store their bodies;
4. send them one at a time: POST, then poll ``GET /v1/statements/{id}`` (1 s, doubling to 30 s) until ``complete``.

A lost consent (:class:`~connector.types.ActionRequired`) queues one ``authRequired`` statement per linked account and
holds the transaction feed until ``/authrefresh`` sets the consent active again; the feed then reads from where it
stopped. A :class:`~connector.types.TemporaryError` is retried with backoff and sends nothing. A deleted account's
unsent and in-flight statements are abandoned.

All Sage calls go through the one :class:`~connector.sage.client.SageClient` (shared rate limiter, 401/429/5xx
handling). The feed runs in one process at a time, holding a database lease (:mod:`connector.feed.lease`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from tortoise.expressions import F
from tortoise.functions import Count
from tortoise.queryset import QuerySet
from tortoise.transactions import in_transaction

from connector.config import Settings
from connector.feed import statements as st
from connector.feed.lease import Lease, current_holder
from connector.hookspecs import PolledProvider, Provider
from connector.journey.consents import StoredConsent, to_domain
from connector.sage.client import SageClient, SageError
from connector.security.crypto import SecretBox
from connector.storage import models
from connector.types import AccountRead, ActionRequired, ProviderError

log = logging.getLogger("connector.feed")

#: Statements still needing something from us; ``rejected`` and ``blocked`` hold the account until an operator acts.
OPEN = ("ready", "accepted", "rejected", "blocked")
#: Feed states in which an account could not deliver (``feed run`` exits non-zero).
NOT_DELIVERED = ("auth_required", "failing", "held")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def utcnow() -> datetime:
    return datetime.now(UTC)


def _clean(text: str, limit: int = 300) -> str:
    text = " ".join(_CONTROL.sub(" ", text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _sage_errors(errors: Any) -> str:
    parts: list[str] = []
    if isinstance(errors, list):
        for error in errors[:5]:
            if isinstance(error, dict):
                parts.append(": ".join(str(error[k]) for k in ("code", "message") if isinstance(error.get(k), str)))
            elif isinstance(error, str):
                parts.append(error)
    return _clean("; ".join(p for p in parts if p)) or "no error details"


class LeaseHeld(Exception):
    """Another process runs the feed."""

    def __init__(self, holder: str | None) -> None:
        super().__init__(f"the feed is running in another process ({holder or 'unknown'})")
        self.holder = holder


@dataclass
class FeedOptions:
    """How the feed paces itself. :meth:`from_settings` reads the config; tests shorten the waits."""

    batch_size: int = 100
    parallel_accounts: int = 8
    interval: float = 300.0
    statement_timeout: float = 900.0
    poll_first: float = 1.0  # first poll this long after acceptance …
    poll_cap: float = 30.0  # … doubling up to this
    late_poll: float = 300.0  # after the timeout: poll the same statement this often (spec 3.6)
    failed_backoff: float = 60.0  # a ``failed`` statement is resent after 1 min …
    failed_backoff_cap: float = 3600.0  # … doubling up to 1 h
    read_attempts: int = 3  # provider reads tried per run before the account is marked failing
    read_retry: float = 2.0  # pause between those attempts (doubling; a larger retry_after wins, up to the cap)
    read_retry_cap: float = 30.0
    read_backoff: float = 60.0  # after a run's attempts failed: no read for 1 min …
    read_backoff_cap: float = 3600.0  # … doubling up to 1 h
    read_timeout: float = 300.0  # one provider read
    throttle_rounds: int = 30  # a call still throttled after the client's retries is repeated this often
    lease_ttl: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> FeedOptions:
        values: dict[str, Any] = {
            "batch_size": int(settings.sage["statement_batch_size"]),
            "statement_timeout": float(settings.sage["statement_timeout_seconds"]),
            "parallel_accounts": int(settings.feed["parallel_accounts"]),
            "interval": float(settings.feed["interval_seconds"]),
            "lease_ttl": float(settings.feed["lease_seconds"]),
        }
        values.update(overrides)
        return cls(**values)


@dataclass
class AccountOutcome:
    """What one run did for one linked account."""

    bank_account_id: str
    name: str
    state: str
    reason: str = ""
    statements: int = 0  # transaction statements completed in this run
    transactions: int = 0
    notices: int = 0  # authRequired statements completed in this run
    error: str = ""

    @property
    def delivered(self) -> bool:
        return self.state not in NOT_DELIVERED

    def line(self) -> str:
        state = f"{self.state} ({self.reason})" if self.reason else self.state
        done = []
        if self.statements:
            done.append(f"sent {self.transactions} transaction{'s' if self.transactions != 1 else ''} in "
                        f"{self.statements} statement{'s' if self.statements != 1 else ''}")
        if self.notices:
            done.append("authRequired sent")
        sent = ", ".join(done) or "nothing sent"
        tail = f"; {self.error}" if self.error and not self.delivered else ""
        return f"{self.bank_account_id}  {self.name}  {state}  {sent}{tail}"


@dataclass
class RunReport:
    outcomes: dict[str, AccountOutcome] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(o.delivered for o in self.outcomes.values())

    def lines(self) -> list[str]:
        return [o.line() for o in self.outcomes.values()]


class Feed:
    def __init__(
        self,
        settings: Settings,
        providers: Mapping[str, Provider],
        box: SecretBox,
        sage: SageClient,
        *,
        options: FeedOptions | None = None,
        lease: Lease | None = None,
        metrics: Any = None,
    ) -> None:
        """``metrics``: the app's :class:`connector.metrics.Metrics` (``serve``), or ``None`` (``feed run``)."""
        self.settings = settings
        self.providers = providers
        self.box = box
        self.sage = sage
        self.options = options or FeedOptions.from_settings(settings)
        self.lease = lease or Lease(self.options.lease_ttl)
        self._sem = asyncio.Semaphore(self.options.parallel_accounts)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._active: set[int] = set()  # accounts being fed right now (by any round)
        self._rounds: set[asyncio.Task[None]] = set()
        self._webhook_mark = 0  # the last provider-webhook notification acted on
        self._states_task: asyncio.Task[None] | None = None
        self.metrics = metrics

    def _count(self, metric: str, *labels: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, metric).labels(*labels).inc()

    async def export_states(self) -> None:
        """Refresh the per-state account gauge (spec 7.41); called after every round in ``serve``."""
        try:
            await self._export_states()
        except Exception:
            log.warning("feed metrics not refreshed", exc_info=True)

    async def _export_states(self) -> None:
        if self.metrics is None:
            return
        counts = await models.LinkedAccount.filter(deleted_at__isnull=True).annotate(n=Count("id")).group_by(
            "feed_state", "feed_reason").values_list("feed_state", "feed_reason", "n")
        self.metrics.feed_accounts.clear()
        for state, reason, count in counts:
            self.metrics.feed_accounts.labels(state, reason).set(count)

    # -- running --------------------------------------------------------------------------------------------------

    async def wake(self) -> None:
        """Run soon (a bank account was linked or deleted). Matches the Inbox's ``on_account_change``."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run_once(self) -> RunReport:
        """One full run over every linked account; waits until each is done. Raises :class:`LeaseHeld`."""
        if not await self.lease.acquire():
            holder = await current_holder(self.lease.name)
            raise LeaseHeld(holder[0] if holder else None)
        try:
            report = RunReport()
            await self._webhook_news()
            await self._round(await self._account_ids(), report)
            # Accounts whose consent another account found lost during this run get their authRequired now.
            await self._round(await self._needing_notice(), report)
            return report
        finally:
            await self.lease.release()

    async def run_forever(self) -> None:
        """Run every ``interval`` and whenever woken, while holding the lease; returns after :meth:`stop`."""
        next_run = 0.0
        try:
            while not self._stopping.is_set():
                held = False
                try:
                    held = await self.lease.acquire()
                    if held and not self._wake.is_set() and await self._has_news():
                        self._wake.set()  # e.g. an account linked through another worker of ``serve --workers N``
                    if held and (self._wake.is_set() or time.monotonic() >= next_run):
                        self._wake.clear()
                        await self._tick()
                        next_run = time.monotonic() + self.options.interval
                except Exception:
                    log.exception("feed loop error; trying again shortly")
                if not held and not self._stopping.is_set():
                    # Not the holder: a wake-up is the holder's business (it finds the work in _has_news), and left
                    # set it would turn the wait below into a busy loop of lease attempts.
                    self._wake.clear()
                wait = self.options.lease_ttl / 3
                if held:
                    wait = min(wait, max(0.0, next_run - time.monotonic()))
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    pass
        finally:
            running = [t for t in self._rounds if not t.done()]
            if running:
                await asyncio.wait(running, timeout=5)
                for task in running:
                    task.cancel()
            try:
                await self.lease.release()
            except Exception:
                log.warning("feed lease not released", exc_info=True)

    async def _read_soon(self, provider: str, provider_consent_ids: Sequence[str]) -> None:
        """A provider webhook said these consents have news: read their accounts at the next run."""
        ids = await models.LinkedAccount.filter(
            account__consent__provider=provider, account__consent__provider_consent_id__in=list(provider_consent_ids),
            deleted_at__isnull=True).values_list("id", flat=True)
        if ids:
            await models.FeedCursor.filter(linked_account_id__in=list(ids)).update(next_read_at=None)
            self._wake.set()

    async def _has_news(self) -> bool:
        """Work the wake-up may have missed (it only reaches the worker process that received the notification):
        a linked account never fed, a deleted account with unsent statements, a consent re-authorised, a provider
        webhook not acted on yet."""
        if await self._webhooks().exists():
            return True
        linked = await models.LinkedAccount.filter(deleted_at__isnull=True).count()
        started = await models.FeedCursor.filter(linked_account__deleted_at__isnull=True).count()
        if linked != started:
            return True
        if await models.FeedStatement.filter(status__in=OPEN, linked_account__deleted_at__isnull=False).exists():
            return True
        return await models.FeedCursor.filter(auth_notice=True, linked_account__deleted_at__isnull=True,
                                              linked_account__account__consent__status="active").exists()

    async def _webhook_news(self) -> None:
        """Provider webhooks stored by the Inbox name consents with news: read their accounts now, even inside a
        provider's poll interval."""
        news: dict[str, set[str]] = defaultdict(set)
        for row_id, provider, payload in await self._webhooks().values_list("id", "resource_type", "payload"):
            self._webhook_mark = max(self._webhook_mark, row_id)
            consents = payload.get("consents") if isinstance(payload, dict) else None
            if isinstance(consents, list):
                news[provider].update(str(c) for c in consents)
        for provider, consent_ids in news.items():
            if consent_ids:
                await self._read_soon(provider, sorted(consent_ids))

    def _webhooks(self) -> QuerySet[models.Notification]:
        """Provider webhooks not acted on yet; at start, only those recent enough to still matter."""
        query = models.Notification.filter(type="providerWebhook", id__gt=self._webhook_mark)
        if self._webhook_mark == 0:
            query = query.filter(received_at__gte=utcnow() - timedelta(seconds=max(self.options.interval, 3600)))
        return query

    async def _tick(self) -> None:
        """Start a round in the background: a slow account (a statement Sage is still processing) must not hold
        back the next round for the others, nor an account linked meanwhile."""
        await self._webhook_news()
        report = RunReport()
        task = asyncio.get_running_loop().create_task(self._round(await self._account_ids(), report))
        self._rounds.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._rounds.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("feed round failed", exc_info=t.exception())
            elif not t.cancelled() and self.metrics is not None and not self._stopping.is_set():
                self._states_task = asyncio.get_running_loop().create_task(self.export_states())

        task.add_done_callback(done)

    async def _round(self, link_ids: Sequence[int], report: RunReport) -> None:
        """Feed ``link_ids`` with at most ``parallel_accounts`` workers (memory stays flat however many accounts
        there are); an account another round is feeding right now is skipped."""
        await self._abandon_deleted()
        queue = deque(i for i in link_ids if i not in self._active)

        async def worker() -> None:
            while queue and not self._stopping.is_set():
                link_id = queue.popleft()
                if link_id in self._active:
                    continue
                self._active.add(link_id)
                try:
                    outcome = await self._account(link_id)
                except Exception:
                    log.exception("feed could not load an account; the next run tries again")
                    outcome = None
                finally:
                    self._active.discard(link_id)
                if outcome is not None:
                    report.outcomes[outcome.bank_account_id] = outcome

        workers = min(self.options.parallel_accounts, len(queue))
        if workers:
            await asyncio.gather(*(worker() for _ in range(workers)))

    async def _account_ids(self) -> list[int]:
        return list(await models.LinkedAccount.filter(deleted_at__isnull=True).order_by("id")
                    .values_list("id", flat=True))

    async def _needing_notice(self) -> list[int]:
        lost = await models.LinkedAccount.filter(
            deleted_at__isnull=True, account__consent__status="auth_required").values_list("id", flat=True)
        noticed = set(await models.FeedCursor.filter(linked_account_id__in=list(lost), auth_notice=True)
                      .values_list("linked_account_id", flat=True)) if lost else set()
        return [i for i in lost if i not in noticed]

    async def _abandon_deleted(self) -> None:
        ids = await models.FeedStatement.filter(
            status__in=OPEN, linked_account__deleted_at__isnull=False).values_list("linked_account_id", flat=True)
        for link_id in set(ids):
            await self._abandon(link_id)

    # -- one account ----------------------------------------------------------------------------------------------

    async def _account(self, link_id: int) -> AccountOutcome | None:
        async with self._sem:
            if self._stopping.is_set():
                return None
            link = await models.LinkedAccount.get_or_none(id=link_id).prefetch_related("account__consent")
            if link is None:
                return None
            out = AccountOutcome(link.bank_account_id, link.account.display_name, link.feed_state, link.feed_reason)
            try:
                await self._work(link, out)
            except Exception as exc:
                log.exception("feed run for an account failed", extra={"bank_account": link.bank_account_id})
                await self._state(link, out, "failing", "internal_error", f"{type(exc).__name__}")
            return out

    async def _work(self, link: models.LinkedAccount, out: AccountOutcome) -> None:
        if link.deleted_at is not None:
            await self._abandon(link.id)
            out.state, out.reason = "stopped", link.feed_reason
            return
        cursor, _ = await models.FeedCursor.get_or_create(linked_account_id=link.id)
        consent = link.account.consent
        if consent.status == "auth_required":
            await self._queue_notice(link, cursor)
            if await self._deliver(link, cursor, out):
                await self._state(link, out, "auth_required", consent.status_reason or "consent_lost",
                                  cursor.last_error)
            return
        if consent.status != "active":  # pending (PATCH in progress) or revoked: nothing to do
            out.reason = out.reason or f"consent_{consent.status}"
            return
        if cursor.auth_notice:  # the consent is back (``/authrefresh``): a notice still unsent is moot
            await models.FeedStatement.filter(linked_account_id=link.id, kind="auth_required", status="ready") \
                .update(status="abandoned", reason="consent_restored")
            await models.FeedCursor.filter(id=cursor.id).update(auth_notice=False)
            cursor.auth_notice = False
        provider = self.providers.get(consent.provider)
        bank = self.settings.bank(consent.sage_bank_id)
        if provider is None or bank is None:
            await self._state(link, out, "held", "provider_not_enabled" if provider is None else "bank_not_configured")
            return

        if not await self._deliver(link, cursor, out):
            return
        if cursor.next_read_at is None or cursor.next_read_at <= utcnow():
            session = StoredConsent(consent, bank.info(), self.box)
            if not await self._read(link, cursor, consent, provider, session, out):
                return
        elif cursor.read_failures:  # the provider failed lately: wait out the backoff, stay visible
            await self._state(link, out, "failing", "provider_unavailable", cursor.last_error)
            return
        if cursor.balance is None:
            if await models.FeedTransaction.filter(linked_account_id=link.id, statement_id=None).exists():
                await self._state(link, out, "held", "balance_unavailable",
                                  "the provider gives no balance for this account")
                return
        else:
            await self._plan(link, cursor)
        if not await self._deliver(link, cursor, out):
            return
        now = utcnow()
        await models.FeedCursor.filter(id=cursor.id).update(caught_up_at=now, last_error="")
        cursor.caught_up_at = now
        await self._state(link, out, "live", "")

    async def _state(self, link: models.LinkedAccount, out: AccountOutcome, state: str, reason: str,
                     error: str = "") -> None:
        out.state, out.reason = state, reason
        if error:
            out.error = error
        if (link.feed_state, link.feed_reason) != (state, reason):
            await models.LinkedAccount.filter(id=link.id, deleted_at__isnull=True).update(
                feed_state=state, feed_reason=reason[:64])
            link.feed_state, link.feed_reason = state, reason
            if state in NOT_DELIVERED:
                log.warning("account feed %s", state, extra={"bank_account": link.bank_account_id,
                                                             "feed_state": state, "reason": reason})

    async def _error(self, cursor: models.FeedCursor, text: str) -> None:
        cursor.last_error = _clean(text)
        await models.FeedCursor.filter(id=cursor.id).update(last_error=cursor.last_error, last_error_at=utcnow())

    async def _abandon(self, link_id: int) -> None:
        """Spec 1.4.5: drop the deleted account's unsent and in-flight work; post nothing more."""
        dropped = await models.FeedStatement.filter(linked_account_id=link_id, status__in=OPEN).update(
            status="abandoned", reason="account_deleted")
        await models.FeedTransaction.filter(linked_account_id=link_id, statement_id=None).delete()
        if dropped:
            log.info("feed stopped: unsent statements abandoned", extra={"count": dropped})

    async def _deleted(self, link: models.LinkedAccount) -> bool:
        return await models.LinkedAccount.filter(id=link.id, deleted_at__isnull=False).exists()

    # -- consent lost ---------------------------------------------------------------------------------------------

    async def _consent_lost(self, consent: models.Consent, err: ProviderError) -> None:
        changed = await models.Consent.filter(id=consent.id, status="active").update(
            status="auth_required", status_reason=err.code[:64])
        consent.status, consent.status_reason = "auth_required", err.code[:64]
        await models.LinkedAccount.filter(account__consent_id=consent.id, deleted_at__isnull=True).update(
            feed_state="auth_required", feed_reason=err.code[:64])
        if changed:
            log.warning("consent lost: authRequired goes to every linked account",
                        extra={"consent": consent.id, "provider": consent.provider, "code": err.code})
        self._wake.set()  # the consent's other accounts get their notice in the next pass

    async def _queue_notice(self, link: models.LinkedAccount, cursor: models.FeedCursor) -> None:
        """Queue the one ``authRequired`` statement of this loss (after anything already queued)."""
        if cursor.auth_notice:
            return
        async with in_transaction():
            claimed = await models.FeedCursor.filter(id=cursor.id, auth_notice=False).update(auth_notice=True)
            if claimed:
                await models.FeedStatement.create(
                    linked_account_id=link.id, kind="auth_required",
                    body=st.auth_required_body(link.bank_account_id, link.sage_bank_id))
        cursor.auth_notice = True

    # -- reading the provider -------------------------------------------------------------------------------------

    async def _read(self, link: models.LinkedAccount, cursor: models.FeedCursor, consent: models.Consent,
                    provider: Provider, session: StoredConsent, out: AccountOutcome) -> bool:
        account = to_domain(link.account, self.box)
        opts = self.options
        attempt = 0
        while True:
            attempt += 1
            try:
                async with asyncio.timeout(opts.read_timeout):
                    result = await provider.read_account(session, account, link.requested_start_date,
                                                         cursor.sync_point)
                break
            except ActionRequired as err:
                self._count("provider_errors", consent.provider, "action_required")
                await self._error(cursor, f"{err.code}: {err.message}")
                await self._consent_lost(consent, err)
                await self._queue_notice(link, cursor)
                if await self._deliver(link, cursor, out):
                    await self._state(link, out, "auth_required", err.code, cursor.last_error)
                return False
            except Exception as exc:  # noqa: BLE001 - TemporaryError, a timeout or a plugin bug: not the consent
                self._count("provider_errors", consent.provider, "temporary")
                if isinstance(exc, ProviderError):
                    text, retry_after = f"{exc.code}: {exc.message}", exc.retry_after
                elif isinstance(exc, TimeoutError):
                    text, retry_after = "the provider did not answer in time", None
                else:
                    log.warning("provider read raised %s", type(exc).__name__,
                                extra={"provider": consent.provider, "bank_account": link.bank_account_id})
                    text, retry_after = f"provider error ({type(exc).__name__})", None
                give_up = attempt >= opts.read_attempts or (retry_after or 0) > opts.read_retry_cap
                if give_up or self._stopping.is_set():
                    failures = cursor.read_failures + 1
                    wait = min(opts.read_backoff * 2 ** min(failures - 1, 20), opts.read_backoff_cap)
                    wait = max(wait, min(retry_after or 0.0, opts.read_backoff_cap))
                    cursor.read_failures, cursor.next_read_at = failures, utcnow() + timedelta(seconds=wait)
                    await models.FeedCursor.filter(id=cursor.id).update(read_failures=failures,
                                                                        next_read_at=cursor.next_read_at)
                    await self._error(cursor, text)
                    await self._state(link, out, "failing", "provider_unavailable", cursor.last_error)
                    return False
                pause = min(opts.read_retry * 2 ** (attempt - 1), opts.read_retry_cap)
                await self._sleep(max(pause, min(retry_after or 0.0, opts.read_retry_cap)))
        await self._store(link, cursor, consent.provider, provider, result)
        return True

    async def _store(self, link: models.LinkedAccount, cursor: models.FeedCursor, provider_name: str,
                     provider: Provider, result: AccountRead) -> None:
        """Keep what is new, in one database transaction with the new sync point (lessons, peers 4)."""
        since = link.requested_start_date
        fresh: dict[str, Any] = {}
        zero = early = 0
        for tx in result.booked:
            if tx.amount == 0:
                zero += 1
                continue
            if tx.booking_date < since:
                early += 1
                continue
            fresh[st.unique_id(link.bank_account_id, provider_name, tx.provider_transaction_id)] = tx
        removed = [st.unique_id(link.bank_account_id, provider_name, r) for r in result.removed]
        removed = [r for r in removed if r not in fresh]
        now = utcnow()
        interval = provider.poll_interval_seconds if isinstance(provider, PolledProvider) else 0
        next_read = now + timedelta(seconds=interval) if interval > 0 else None
        balance = result.balance
        async with in_transaction():
            known: dict[str, tuple[int, int | None, str, date, Any]] = {}
            for part in st.chunks(list(fresh)):
                for uid, row_id, statement_id, amount, day, detail in await models.FeedTransaction.filter(
                        unique_id__in=list(part)).values_list(
                        "unique_id", "id", "statement_id", "amount", "booking_date", "detail"):
                    known[uid] = (row_id, statement_id, amount, day, detail)
            rows = []
            for uid, tx in fresh.items():
                detail = st.to_stored(st.transaction_detail(link.bank_account_id, uid, tx))
                if uid not in known:
                    rows.append(models.FeedTransaction(
                        linked_account_id=link.id, unique_id=uid, provider_transaction_id=tx.provider_transaction_id,
                        booking_date=tx.booking_date, amount=str(tx.amount), detail=detail))
                    continue
                row_id, statement_id, amount, day, stored = known[uid]
                if statement_id is None and (Decimal(amount) != tx.amount or day != tx.booking_date
                                             or stored != detail):
                    # Not sent yet and changed at the bank: send the bank's latest version.
                    await models.FeedTransaction.filter(id=row_id, statement_id=None).update(
                        amount=str(tx.amount), booking_date=tx.booking_date, detail=detail)
            if rows:
                await models.FeedTransaction.bulk_create(rows, batch_size=500)
            for part in st.chunks(removed):
                await models.FeedTransaction.filter(unique_id__in=list(part), statement_id=None).delete()
            await models.FeedCursor.filter(id=cursor.id).update(
                sync_point=result.sync_point, balance=None if balance is None else str(balance.amount),
                balance_currency=(balance.currency if balance else "")[:3], read_at=now, read_failures=0,
                next_read_at=next_read, skipped_zero=F("skipped_zero") + zero,
                skipped_early=F("skipped_early") + early)
        cursor.sync_point, cursor.read_at, cursor.read_failures, cursor.next_read_at = \
            result.sync_point, now, 0, next_read
        cursor.balance = None if balance is None else str(balance.amount)
        if rows:
            log.info("feed read: new transactions stored", extra={"bank_account": link.bank_account_id,
                                                                  "count": len(rows)})

    # -- planning -------------------------------------------------------------------------------------------------

    async def _plan(self, link: models.LinkedAccount, cursor: models.FeedCursor) -> int:
        rows = await models.FeedTransaction.filter(linked_account_id=link.id, statement_id=None).values_list(
            "id", "booking_date", "amount", "detail")
        if not rows or cursor.balance is None:
            return 0
        pending = [st.Pending(i, d, Decimal(a), detail) for i, d, a, detail in rows]
        batches = st.plan_batches(pending, balance=Decimal(cursor.balance), batch_size=self.options.batch_size,
                                  today=utcnow().date(), last_planned=cursor.last_planned_date)
        if not batches:
            return 0
        late = sum(len(b.rows) for b in batches if b.late)
        newest = batches[-1].balance_date
        async with in_transaction():
            for batch in batches:
                statement = await models.FeedStatement.create(
                    linked_account_id=link.id, kind="transactions",
                    body=st.transactions_body(link.bank_account_id, link.sage_bank_id, batch),
                    transaction_count=len(batch.rows), first_date=batch.first_date, last_date=batch.last_date,
                    ledger_balance=str(batch.ledger_balance))
                ids = [p.row_id for p in batch.rows]
                claimed = 0
                for part in st.chunks(ids):
                    claimed += await models.FeedTransaction.filter(id__in=list(part), statement_id=None).update(
                        statement_id=statement.id)
                if claimed != len(ids):
                    raise RuntimeError("transactions were planned twice; is another feed running?")
            await models.FeedCursor.filter(id=cursor.id).update(last_planned_date=newest,
                                                                late_booked=F("late_booked") + late)
        cursor.last_planned_date = newest
        if late:
            log.warning("late-booked transactions sent in a batch of their own",
                        extra={"bank_account": link.bank_account_id, "count": late})
        return len(batches)

    # -- sending --------------------------------------------------------------------------------------------------

    async def _deliver(self, link: models.LinkedAccount, cursor: models.FeedCursor, out: AccountOutcome) -> bool:
        """Send queued statements one at a time, oldest first; ``False`` when the account cannot go on now."""
        while True:
            if self._stopping.is_set():
                return False
            statement = await models.FeedStatement.filter(linked_account_id=link.id, status__in=OPEN) \
                .order_by("id").first()
            if statement is None:
                return True
            if statement.status == "rejected":
                await self._state(link, out, "held", statement.reason, statement.error)
                return False
            if statement.status == "blocked":
                await self._state(link, out, "failing", statement.reason, statement.error)
                return False
            if statement.next_attempt_at is not None and statement.next_attempt_at > utcnow():
                await self._state(link, out, "failing", statement.reason, statement.error)
                return False
            if await self._deleted(link):
                await self._abandon(link.id)
                out.state, out.reason = "stopped", "deleted_in_sage"
                return False
            if statement.kind == "auth_required" and statement.status == "ready":
                status = await models.Consent.filter(id=link.account.consent_id).values_list("status", flat=True)
                if status and status[0] == "active":
                    await models.FeedStatement.filter(id=statement.id, status="ready").update(
                        status="abandoned", reason="consent_restored")
                    continue
            elif statement.kind == "transactions" and cursor.caught_up_at is None:
                await self._state(link, out, "backfilling", "")
            if statement.status == "ready" and not await self._post(link, cursor, statement, out):
                return False
            if not await self._poll(link, cursor, statement, out):
                return False

    async def _post(self, link: models.LinkedAccount, cursor: models.FeedCursor, statement: models.FeedStatement,
                    out: AccountOutcome) -> bool:
        statement.post_attempts += 1
        await models.FeedStatement.filter(id=statement.id).update(post_attempts=statement.post_attempts)
        rounds = 0
        while True:
            try:
                statement_id = await self.sage.post_statement(bytes(statement.body))
                break
            except SageError as err:
                if err.reason == "throttled" and rounds < self.options.throttle_rounds \
                        and not self._stopping.is_set():
                    rounds += 1
                    continue
                await self._post_failed(link, cursor, statement, err, out)
                return False
        now = utcnow()
        await models.FeedStatement.filter(id=statement.id).update(
            status="accepted", sage_statement_id=statement_id, accepted_at=now, next_attempt_at=None, reason="",
            error="")
        statement.status, statement.sage_statement_id, statement.accepted_at = "accepted", statement_id, now
        statement.next_attempt_at = None
        log.info("statement accepted", extra={"bank_account": link.bank_account_id, "statement": statement_id,
                                              "count": statement.transaction_count})
        return True

    async def _post_failed(self, link: models.LinkedAccount, cursor: models.FeedCursor,
                           statement: models.FeedStatement, err: SageError, out: AccountOutcome) -> None:
        text = _clean(f"Sage {'HTTP ' + str(err.status) if err.status else err.reason}: {err.detail or err.reason}")
        await self._error(cursor, text)
        if err.reason == "rejected":
            # Spec 3.5.7 / 7.23: recorded with Sage's reason; nothing later is sent until an operator acts.
            reason = "rejected_after_resend" if statement.post_attempts > 1 else "statement_rejected"
            await models.FeedStatement.filter(id=statement.id).update(status="rejected", reason=reason, error=text)
            self._count("statements", "refused")
            await self._state(link, out, "held", reason, text)
        elif err.reason == "unexpected_response":
            # Spec 7.22: accepted or not, we cannot tell; resending could trigger the duplicate rejection.
            await models.FeedStatement.filter(id=statement.id).update(status="blocked", reason=err.reason,
                                                                      error=text)
            await self._state(link, out, "failing", err.reason, text)
        else:
            reason = {"unauthorized": "sage_unauthorized", "token_rejected": "sage_credentials",
                      "refused_origin": "sage_refused_origin", "throttled": "sage_throttled"}.get(
                err.reason, "sage_unavailable")
            await models.FeedStatement.filter(id=statement.id).update(reason=reason, error=text)
            await self._state(link, out, "failing", reason, text)

    async def _poll(self, link: models.LinkedAccount, cursor: models.FeedCursor, statement: models.FeedStatement,
                    out: AccountOutcome) -> bool:
        """Spec 3.6: poll until ``complete``; ``failed`` is resent later; a timeout keeps polling every 5 min."""
        opts = self.options
        accepted = statement.accepted_at or utcnow()
        deadline = accepted + timedelta(seconds=opts.statement_timeout)
        delay = opts.poll_first
        first = True
        rounds = 0
        while True:
            if not (first and utcnow() >= deadline):
                await self._sleep(delay)
            first = False
            if self._stopping.is_set():
                return False
            if await self._deleted(link):
                await self._abandon(link.id)
                out.state, out.reason = "stopped", "deleted_in_sage"
                return False
            try:
                data = await self.sage.get_statement(str(statement.sage_statement_id))
            except SageError as err:
                if err.reason == "throttled" and rounds < opts.throttle_rounds:
                    rounds += 1
                    delay = 0
                    continue
                text = _clean(f"polling statement {statement.sage_statement_id}: {err}")
                await self._error(cursor, text)
                await models.FeedStatement.filter(id=statement.id).update(reason="sage_unavailable", error=text)
                await self._state(link, out, "failing", "sage_unavailable", text)
                return False
            status = str(data.get("status") or "").lower()
            now = utcnow()
            if status == "complete":
                async with in_transaction():
                    await models.FeedStatement.filter(id=statement.id).update(
                        status="complete", completed_at=now, reason="", error="", next_attempt_at=None)
                    await models.FeedCursor.filter(id=cursor.id).update(
                        sent_transactions=F("sent_transactions") + statement.transaction_count)
                if statement.kind == "auth_required":
                    out.notices += 1
                    self._count("statements", "auth_required_sent")
                else:
                    out.statements += 1
                    out.transactions += statement.transaction_count
                    self._count("statements", "sent")
                    if self.metrics is not None and statement.last_date is not None:
                        newest = datetime.combine(statement.last_date, datetime.min.time(), UTC) + timedelta(hours=12)
                        self.metrics.feed_lag.labels(link.bank_account_id).set(max((now - newest).total_seconds(), 0))
                return True
            if status == "failed":
                failures = statement.failures + 1
                wait = min(opts.failed_backoff * 2 ** min(failures - 1, 20), opts.failed_backoff_cap)
                text = _clean(f"Sage reported statement {statement.sage_statement_id} failed: "
                              f"{_sage_errors(data.get('errors'))}")
                # Spec 3.6: the identical batch is resent with backoff; nothing later goes first.
                await models.FeedStatement.filter(id=statement.id).update(
                    status="ready", failures=failures, next_attempt_at=now + timedelta(seconds=wait),
                    reason="statement_failed", error=text, sage_statement_id=None, accepted_at=None)
                self._count("statements", "retried")
                await self._error(cursor, text)
                await self._state(link, out, "failing", "statement_failed", text)
                log.warning("statement failed at Sage; it will be resent",
                            extra={"bank_account": link.bank_account_id, "statement": statement.sage_statement_id,
                                   "seconds": wait})
                return False
            if now >= deadline:
                text = f"statement {statement.sage_statement_id} still processing after " \
                       f"{opts.statement_timeout:g} s"
                await models.FeedStatement.filter(id=statement.id).update(
                    next_attempt_at=now + timedelta(seconds=opts.late_poll), reason="statement_timeout", error=text)
                await self._error(cursor, text)
                await self._state(link, out, "failing", "statement_timeout", text)
                return False
            remaining = (deadline - now).total_seconds()
            delay = max(0.0, min(delay * 2 if delay else opts.poll_first, opts.poll_cap, remaining))

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass
