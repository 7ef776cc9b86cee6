"""The only place that knows Powens's JSON field names for accounts, balances and transactions.

* Bank dates (``date``, ``vdate``) stay :class:`datetime.date` values as Powens gives them: never through UTC.
* Money is :class:`~decimal.Decimal` (the client parses JSON numbers as Decimal; strings and ints are accepted too).
* Datetimes: ``YYYY-MM-DD HH:MM:SS`` or ISO 8601; a missing offset means UTC (§16 OP-13).
* Account type: Sage spec 7.32. Identifiers: Sage spec 7.33 (number, else IBAN, else ``powens-{id}``; BIC, else
  the connector uuid), so the pair never changes for an account once Powens has given it (§16 OP-11).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from connector.types import Account, AccountType, Balance, Transaction

__all__ = [
    "account",
    "account_id",
    "account_kind",
    "account_list",
    "accounts",
    "balance",
    "connector_uuid",
    "find_account",
    "format_datetime",
    "is_booked",
    "is_deleted",
    "parse_date",
    "parse_datetime",
    "transaction",
    "transaction_id",
]


class MappingError(ValueError):
    """A Powens object lacks what we need (an id, a date, an amount)."""


def parse_datetime(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip().replace("Z", "+00:00")
    try:
        parsed = datetime.fromisoformat(text)  # accepts both "YYYY-MM-DD HH:MM:SS" and the "T" form
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def format_datetime(value: datetime) -> str:
    """The form Powens's examples use, in UTC (§16 OP-13)."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def parse_date(value: Any) -> date | None:
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        return None


def _decimal(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, Decimal):
        return value
    try:
        # str() first: an int or a stray float still becomes the decimal text it prints as.
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None


def _currency(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("id") or value.get("code")
    return value.upper() if isinstance(value, str) and len(value) == 3 else None


def _compact(value: Any) -> str | None:
    return value.replace(" ", "") if isinstance(value, str) and value.strip() else None


def account_id(raw: Mapping[str, Any]) -> str:
    if raw.get("id") is None:
        raise MappingError("account without id")
    return str(raw["id"])


def account_kind(raw: Mapping[str, Any]) -> str:
    """Powens's account type name, casefolded (``""`` when absent), as ``options.account_types`` spells it."""
    kind = raw.get("type")
    if isinstance(kind, dict):  # documented as an object, a plain string in practice (§7.3)
        kind = kind.get("name") or kind.get("code")
    return kind.casefold() if isinstance(kind, str) else ""


def account_type(raw: Mapping[str, Any]) -> AccountType:
    kind = account_kind(raw)
    usage = raw.get("usage") or raw.get("original_usage")
    usage = usage.upper() if isinstance(usage, str) else ""
    if kind in ("card", "creditcard", "deferred_card"):
        return AccountType.CREDIT_CARD
    if kind in ("loan", "mortgage", "revolvingcredit", "consumercredit"):
        return AccountType.LOAN
    if kind in ("savings", "deposit"):
        return AccountType.SAVINGS
    if kind in ("checking", "current") and usage == "PRIV":
        return AccountType.PERSONAL
    return AccountType.BUSINESS  # business holder, anything else, or unknown (7.32)


def balance(raw: Mapping[str, Any]) -> Balance | None:
    amount = _decimal(raw.get("balance"))
    currency = _currency(raw.get("currency"))
    if amount is None or currency is None:
        return None
    return Balance(amount=amount, currency=currency, as_of=parse_datetime(raw.get("last_update")))


def account(raw: Mapping[str, Any], *, connector_uuid: str) -> Account:
    ident = account_id(raw)
    number, iban = _compact(raw.get("number")), _compact(raw.get("iban"))
    name = raw.get("name") or raw.get("original_name") or "Account"
    return Account(
        provider_account_id=ident,
        name=str(name),
        bank_identifier=_compact(raw.get("bic")) or connector_uuid,
        account_identifier=number or iban or f"powens-{ident}",
        currency=_currency(raw.get("currency")) or "EUR",
        account_type=account_type(raw),
        branch_identifier="",
        balance=balance(raw),
        iban=iban,
    )


def connector_uuid(secrets: Mapping[str, Any] | None, current: Any, configured: str) -> str:
    """The connector uuid that stands in for a missing BIC in :attr:`Account.bank_identifier`.

    The one saved with the consent comes first: its accounts were mapped with it, and Sage matches accounts on the
    identifier pair (§16 OP-11). Then ``current``, what Powens says now (a connection's ``connector_uuid``, or the
    connector read at the start of a journey), then the bank's configured ``provider_bank``.
    """
    return str((secrets or {}).get("connector_uuid") or current or configured)


def account_list(answer: Any, key: str = "accounts") -> list[dict[str, Any]] | None:
    """The account objects under ``key``: ``accounts`` (the enabled ones) or, on a connection expanded with it,
    ``all_accounts`` (disabled ones too). ``None`` when the answer has no such list; the caller picks the error."""
    if isinstance(answer, Mapping) and isinstance(answer.get(key), list):
        return [a for a in answer[key] if isinstance(a, dict)]
    return None


def accounts(
    raw: Iterable[Mapping[str, Any]], *, connector_uuid: str, account_types: Collection[str] = ()
) -> list[Account]:
    """The accounts a consent can offer or link: never a deleted one, and only ``account_types`` (casefolded, the
    bank's ``options.account_types``) when given, so the journey and ``/availableaccounts`` offer the same list."""
    return [
        account(a, connector_uuid=connector_uuid)
        for a in raw
        if not is_deleted(a) and (not account_types or account_kind(a) in account_types)
    ]


def find_account(raw: Iterable[Mapping[str, Any]], provider_account_id: str) -> Mapping[str, Any] | None:
    return next((a for a in raw if a.get("id") is not None and account_id(a) == provider_account_id), None)


def transaction_id(raw: Mapping[str, Any]) -> str:
    if raw.get("id") is None:
        raise MappingError("transaction without id")
    return str(raw["id"])


def is_deleted(raw: Mapping[str, Any]) -> bool:
    return bool(raw.get("deleted"))


def is_booked(raw: Mapping[str, Any]) -> bool:
    """``coming: true`` is pending: it waits until booked (product Decision 7)."""
    return raw.get("coming") is not True and not is_deleted(raw)


def last_update(raw: Mapping[str, Any]) -> datetime | None:
    return parse_datetime(raw.get("last_update"))


def transaction(raw: Mapping[str, Any], *, currency: str | None = None) -> Transaction:
    ident = transaction_id(raw)
    booked = parse_date(raw.get("date")) or parse_date(raw.get("datetime"))
    amount = _decimal(raw.get("value"))
    if booked is None or amount is None:
        raise MappingError(f"transaction {ident} lacks a date or an amount")
    description = next(
        (str(raw[k]).strip() for k in ("original_wording", "simplified_wording", "wording") if raw.get(k)), ""
    )
    counterparty = raw.get("counterparty")
    label = counterparty.get("label") if isinstance(counterparty, dict) else None
    return Transaction(
        provider_transaction_id=ident,
        booking_date=booked,
        amount=amount,
        description=description,
        value_date=parse_date(raw.get("vdate")),
        currency=currency,
        original_amount=_decimal(raw.get("original_value")),
        original_currency=_currency(raw.get("original_currency")),
        counterparty=label if isinstance(label, str) and label else None,
    )
