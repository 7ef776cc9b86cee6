"""Statement bodies, built by pure functions so every rule of spec 3.5 can be checked without a server.

- ``uniqueId`` = uuid5(:data:`UNIQUE_ID_NAMESPACE`, bankAccountId + "\\n" + provider + "\\n" + provider transaction id)
  (product Decision 6, spec 7.37): stable across reads and resends, new for a reconnected account;
- one account per statement; transactions oldest first; at most ``batch_size``; at most 14 days between the oldest
  and the newest ``datePosted`` of a batch; late-booked transactions in batches of their own (spec 3.5.5, 7.40);
- the balance after each batch is computed back from the provider's current balance (product Decision 5);
- ``expected`` holds the batch's count and sums; date-only values are sent as ``T12:00:00.000Z``; amounts are
  ``Decimal`` written as plain JSON numbers (spec 7.39); zero amounts and empty optional fields are never sent.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from connector.types import Transaction

#: Fixed for the life of the project: changing it would resend every transaction with new ids.
UNIQUE_ID_NAMESPACE = uuid.UUID("6f1c2b0e-8a4d-5e37-9c1a-5b2d7e4f3a90")
MAX_SPAN = timedelta(days=14)
MAX_BATCH_SIZE = 1000
DESCRIPTION_LIMIT = 500
TEXT_LIMIT = 250


def unique_id(bank_account_id: str, provider: str, provider_transaction_id: str) -> str:
    """Sage's ``uniqueId`` for one transaction of one linked account (spec 7.37)."""
    return str(uuid.uuid5(UNIQUE_ID_NAMESPACE, f"{bank_account_id}\n{provider}\n{provider_transaction_id}"))


def sage_date(day: date) -> str:
    """A bank date as Sage's date-time: noon UTC, so the day survives display from UTC−11 to UTC+11 (spec 7.39)."""
    return f"{day.isoformat()}T12:00:00.000Z"


def _text(value: str | None, limit: int = TEXT_LIMIT) -> str:
    return " ".join((value or "").split())[:limit]


def transaction_detail(bank_account_id: str, unique: str, tx: Transaction) -> dict[str, Any]:
    """The ``transactionDetails`` entry for ``tx`` (amounts as ``Decimal``), optional fields only when known."""
    amount = tx.amount
    description = _text(tx.description, DESCRIPTION_LIMIT) or _text(tx.counterparty) or _text(tx.reference) \
        or ("Credit" if amount > 0 else "Debit")
    detail: dict[str, Any] = {
        "uniqueId": unique,
        "bankAccountId": bank_account_id,
        "transactionAmount": amount,
        "transactionType": "CREDIT" if amount > 0 else "DEBIT",
        "transactionStatus": "posted",
        "datePosted": sage_date(tx.booking_date),
        "description": description,
    }
    if tx.value_date is not None and tx.value_date <= tx.booking_date:
        # A value date after the booking date is not when the person acted, and could be after today (UTC).
        detail["dateUserInitiated"] = sage_date(tx.value_date)
    for index, line in enumerate((_text(n) for n in tx.narrative if _text(n)), start=1):
        if index > 2:
            break
        detail[f"narrative{index}"] = line
    if _text(tx.reference):
        detail["referenceNumber"] = _text(tx.reference)
    foreign = bool(tx.original_currency) and tx.original_currency.upper() != (tx.currency or "").upper()
    if foreign and tx.original_amount is not None and tx.original_amount != 0:
        original = abs(tx.original_amount)
        detail["exchangeCurrency"] = tx.original_currency.upper()
        detail["exchangeAmount"] = original if amount > 0 else -original
    if _text(tx.counterparty):
        detail["payee"] = {"payeeDescription": _text(tx.counterparty)}
    return detail


def to_stored(detail: Mapping[str, Any]) -> dict[str, Any]:
    """A detail as JSON the database can hold exactly: ``Decimal`` as text."""
    return {k: (str(v) if isinstance(v, Decimal) else v) for k, v in detail.items()}


def from_stored(stored: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(stored)
    for key in ("transactionAmount", "exchangeAmount"):
        if key in out:
            out[key] = Decimal(out[key])
    return out


# -- JSON with plain Decimal numbers -----------------------------------------------------------------------------


def plain_number(value: Decimal | int) -> str:
    """A number in plain notation (no exponent, no ``-0``), e.g. ``Decimal('1E+2')`` → ``100``."""
    if isinstance(value, bool):
        raise TypeError("booleans are not amounts")
    if isinstance(value, int):
        return str(value)
    if not value.is_finite():
        raise ValueError("amounts must be finite")
    text = format(value, "f")
    if text.startswith("-") and value == 0:
        text = text[1:]
    return text


def dumps(value: Any) -> bytes:
    """Compact JSON where every ``Decimal`` is a plain JSON number (never a float, never a string)."""
    return _encode(value).encode("utf-8")


def _encode(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k), ensure_ascii=False)}:{_encode(v)}"
                              for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_encode(v) for v in value) + "]"
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Decimal | int):
        return plain_number(value)
    raise TypeError(f"cannot encode {type(value).__name__} in a statement")


# -- cutting batches ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pending:
    """One stored transaction not yet in a statement, as the planner sees it."""

    row_id: int
    booking_date: date
    amount: Decimal
    detail: Mapping[str, Any]  # as stored (amounts as text)


@dataclass(frozen=True, slots=True)
class Batch:
    rows: tuple[Pending, ...]
    late: bool
    ledger_balance: Decimal
    balance_date: date

    @property
    def first_date(self) -> date:
        return self.rows[0].booking_date

    @property
    def last_date(self) -> date:
        return self.rows[-1].booking_date


def plan_batches(
    pending: Sequence[Pending],
    *,
    balance: Decimal,
    batch_size: int,
    today: date,
    last_planned: date | None,
) -> list[Batch]:
    """Cut the account's pending transactions into statements, in send order, each with its ending balance.

    ``pending`` is every stored transaction not yet in a statement (in the provider's order within a day);
    ``balance`` the provider's current booked balance, which already includes all of them; ``last_planned`` the
    newest ``datePosted`` already cut into a statement. Transactions dated after ``today`` (UTC) wait; they still
    count in the balance computation, as they will be sent after everything planned now.
    """
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be between 1 and {MAX_BATCH_SIZE}")
    ordered = sorted(pending, key=lambda p: (p.booking_date, p.row_id))
    total = sum((p.amount for p in ordered), Decimal(0))
    sendable = [p for p in ordered if p.booking_date <= today]

    groups: list[tuple[list[Pending], bool]] = []
    for row in sendable:
        late = last_planned is not None and row.booking_date < last_planned
        if groups:
            current, current_late = groups[-1]
            if (len(current) < batch_size and current_late == late
                    and row.booking_date - current[0].booking_date <= MAX_SPAN):
                current.append(row)
                continue
        groups.append(([row], late))

    batches: list[Batch] = []
    sent = Decimal(0)
    newest = last_planned
    for rows, late in groups:
        sent += sum((p.amount for p in rows), Decimal(0))
        # The balance after this batch: today's balance minus everything that will be sent after it.
        ledger = balance - (total - sent)
        newest = rows[-1].booking_date if newest is None else max(newest, rows[-1].booking_date)
        batches.append(Batch(tuple(rows), late, ledger, newest))
    return batches


def transactions_body(bank_account_id: str, sage_bank_id: str, batch: Batch) -> bytes:
    """The ``POST /v1/statements`` body of one batch (spec 3.5.2)."""
    details = [from_stored(p.detail) for p in batch.rows]
    credit = sum((d["transactionAmount"] for d in details if d["transactionAmount"] > 0), Decimal(0))
    debit = sum((d["transactionAmount"] for d in details if d["transactionAmount"] < 0), Decimal(0))
    when = sage_date(batch.balance_date)
    body = {"data": {
        "principalId": bank_account_id,
        "bankId": sage_bank_id,
        "expected": {
            "transactionDetailsCount": len(details),
            "accountDetailsCount": 1,
            "transactionCreditSum": credit,
            "transactionDebitSum": debit,
        },
        "accountDetails": [{
            "bankAccountId": bank_account_id,
            "status": "active",
            "balances": {
                "ledgerBalance": batch.ledger_balance,
                "ledgerBalanceDate": when,
                "availableBalance": batch.ledger_balance,
                "availableBalanceDate": when,
            },
        }],
        "transactionDetails": details,
    }}
    return dumps(body)


def auth_required_body(bank_account_id: str, sage_bank_id: str) -> bytes:
    """The status-only statement that tells Sage the person must re-authorise (spec 3.5.6)."""
    return dumps({"data": {
        "principalId": bank_account_id,
        "bankId": sage_bank_id,
        "expected": {"transactionDetailsCount": 0, "accountDetailsCount": 1, "transactionCreditSum": 0,
                     "transactionDebitSum": 0},
        "accountDetails": [{"bankAccountId": bank_account_id, "status": "authRequired", "balances": {}}],
        "transactionDetails": [],
    }})


def chunks(values: Sequence[Any], size: int = 500) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]
