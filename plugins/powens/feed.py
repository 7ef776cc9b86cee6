"""The feed side: accounts of a consent, one account's booked transactions since a sync point, and revocation.

One consent = one permanent Powens user with one connection (its id is the consent's ``provider_consent_id``).
Before reading data we read the connection's ``state``: a state that needs the person raises
:class:`~connector.types.ActionRequired`, one Powens retries by itself raises
:class:`~connector.types.TemporaryError` (§6.2, "person absent").

The sync point is ``v1:<highest last_update seen>``; an incremental read asks for ``last_update`` five minutes before
it (rows written in the same second), and the core drops the overlap by id (§8.3).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from datetime import date, datetime, timedelta
from typing import Any

from connector.hookspecs import ConsentSession
from connector.types import Account, AccountRead, ProviderError, Transaction

from . import errors, mapping
from .client import PowensAPIError, PowensBadAnswer, PowensClient, PowensUnreachable, Retry, same_origin
from .config import bank_options
from .tokens import ConsentCaller

log = logging.getLogger("plugins.powens")

PAGE_LIMIT = 1000  # the most Powens allows (§8.1)
MAX_PAGES = 10_000  # a loop guard: a cursor that never ends is a Powens bug, not our reason to spin
OVERLAP = timedelta(minutes=5)
SYNC_POINT_PREFIX = "v1:"


def encode_sync_point(mark: datetime) -> str:
    return SYNC_POINT_PREFIX + mapping.format_datetime(mark)


def decode_sync_point(value: str | None) -> datetime | None:
    if not value or not value.startswith(SYNC_POINT_PREFIX):
        return None  # unknown or older format: read again from ``since``, which the core de-duplicates
    return mapping.parse_datetime(value[len(SYNC_POINT_PREFIX):])


class Feed:
    def __init__(self, client: PowensClient, consents: ConsentCaller) -> None:
        self._client = client
        self._consents = consents

    async def _call(self, consent: ConsentSession, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return await self._consents.call(consent, method, path, **kwargs)
        except ProviderError:
            raise
        except (PowensAPIError, PowensUnreachable, PowensBadAnswer) as exc:
            if isinstance(exc, PowensAPIError) and exc.status == 404 and "/connections/" in path:
                raise errors.action_required("powens_connection_deleted", detail=exc.detail) from None
            raise errors.from_exception(exc) from None

    @staticmethod
    def _connection_id(consent: ConsentSession) -> str:
        value = consent.secrets.get("connection_id") or consent.provider_consent_id
        if value is None:
            raise errors.action_required("powens_connection_deleted")
        return str(value)

    async def connection(self, consent: ConsentSession, expand: str) -> dict[str, Any]:
        """The consent's connection, after checking that its state lets us read (§6.2, person absent)."""
        connection_id = self._connection_id(consent)
        answer = await self._call(consent, "GET", f"/users/me/connections/{connection_id}", params={"expand": expand})
        if not isinstance(answer, dict):
            raise errors.temporary("powens_bad_answer")
        state = answer.get("state")
        key = state.casefold() if isinstance(state, str) else None
        detail = answer.get("error_message") if isinstance(answer.get("error_message"), str) else None
        if key in errors.ACTION_STATES:
            log.info("powens connection needs the person", extra={"state": state, "connection_id": connection_id})
            raise errors.action_required(errors.ACTION_STATES[key], detail=detail)
        if key in errors.TEMPORARY_STATES:
            level = logging.ERROR if key == "bug" else logging.INFO
            log.log(
                level, "powens connection temporarily failing", extra={"state": state, "connection_id": connection_id}
            )
            raise errors.temporary(errors.TEMPORARY_STATES[key], detail=detail)
        if key not in (None, "validating"):
            # notSupported or a future state: keep the account's status and read what Powens already has.
            log.warning("powens connection state not handled by the feed", extra={"state": str(state)[:64]})
        return answer

    async def list_accounts(self, consent: ConsentSession) -> Sequence[Account]:
        """Every account of the connection, disabled ones included, filtered as the journey's account page is, so
        Sage is never offered an account the journey hid."""
        connection = await self.connection(consent, "all_accounts,sources")
        raw = mapping.account_list(connection, "all_accounts")
        if raw is None:
            raise errors.temporary("powens_bad_answer")
        uuid = mapping.connector_uuid(consent.secrets, connection.get("connector_uuid"), consent.bank.provider_bank)
        return mapping.accounts(raw, connector_uuid=uuid, account_types=bank_options(consent.bank).account_types)

    async def read_account(
        self, consent: ConsentSession, account: Account, since: date, sync_point: str | None
    ) -> AccountRead:
        connection = await self.connection(consent, "accounts,sources")
        raw_account = mapping.find_account(mapping.account_list(connection) or [], account.provider_account_id)
        if raw_account is None:
            # Not among the enabled accounts: disabled or gone at the bank. The person must choose it again.
            log.warning("powens account not enabled", extra={"account": account.provider_account_id})
            raise errors.action_required("powens_account_unavailable")
        balance = mapping.balance(raw_account)
        currency = balance.currency if balance else account.currency

        mark = decode_sync_point(sync_point)
        path = f"/users/me/accounts/{account.provider_account_id}/transactions"
        if mark is None:
            # First read: booked on or after ``since`` (posting date), deleted rows left out.
            params = {"limit": str(PAGE_LIMIT), "filter": "date", "min_date": since.isoformat()}
        else:
            params = {"limit": str(PAGE_LIMIT), "last_update": mapping.format_datetime(mark - OVERLAP), "all": ""}

        booked: list[Transaction] = []
        removed: list[str] = []
        high = mark
        async for row in self._pages(consent, path, params):
            changed = mapping.last_update(row)
            if changed is not None and (high is None or changed > high):
                high = changed
            if mapping.is_deleted(row):
                removed.append(mapping.transaction_id(row))
            elif mapping.is_booked(row):
                try:
                    booked.append(mapping.transaction(row, currency=currency))
                except mapping.MappingError:
                    log.warning("powens transaction skipped: no date or amount", extra={"id": row.get("id")})
        return AccountRead(
            balance=balance,
            booked=booked,
            removed=removed,
            sync_point=encode_sync_point(high) if high is not None else sync_point,
        )

    async def _pages(
        self, consent: ConsentSession, path: str, params: dict[str, str]
    ) -> AsyncIterator[dict[str, Any]]:
        """Every row of every page, following ``_links.next`` as given, on Powens's own origin only."""
        target: str = path
        query: dict[str, str] | None = params
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            try:
                page = await self._consents.call(consent, "GET", target, params=query, retry=Retry.IDEMPOTENT)
            except PowensAPIError as exc:
                if exc.code_cf == "noaccount":  # no activated account: nothing to read (§8.1)
                    return
                if exc.status == 404:
                    raise errors.action_required("powens_account_unavailable", detail=exc.detail) from None
                raise errors.from_exception(exc) from None
            except (PowensUnreachable, PowensBadAnswer) as exc:
                raise errors.from_exception(exc) from None
            if page is None:
                return
            if not isinstance(page, dict) or not isinstance(page.get("transactions"), list):
                raise errors.temporary("powens_bad_answer")
            for row in page["transactions"]:
                if isinstance(row, dict):
                    yield row
            link = (page.get("_links") or {}).get("next") if isinstance(page.get("_links"), dict) else None
            href = link.get("href") if isinstance(link, dict) else link if isinstance(link, str) else None
            if not href:
                return
            absolute = self._client.absolute(href)
            if not same_origin(absolute, self._client.base_url):
                log.error("powens next link points to another origin; not followed")
                raise errors.temporary("powens_bad_answer")
            if absolute in seen:
                raise errors.temporary("powens_bad_answer")
            seen.add(absolute)
            target, query = absolute, None
        raise errors.temporary("powens_bad_answer")

    async def revoke(self, consent: ConsentSession) -> None:
        """``DELETE /users/me``: one Powens user per consent, so this removes the user, its connection and data
        at Powens (product Decision 9, §13)."""
        try:
            await self._consents.call(consent, "DELETE", "/users/me", retry=Retry.IDEMPOTENT)
        except ProviderError as exc:
            if exc.code == "powens_connection_deleted":
                return  # already gone
            raise
        except PowensAPIError as exc:
            if exc.status in (401, 404):
                return
            raise errors.from_exception(exc) from None
        except (PowensUnreachable, PowensBadAnswer) as exc:
            raise errors.from_exception(exc) from None
