"""Demo Bank's "API answers" mapped to the shared domain types (the one place per provider where this happens).

Demo Bank has no API: its accounts and transactions are derived from the sign-in name, so the same person always
sees the same data and a test can predict it.
"""

from __future__ import annotations

import hashlib
from datetime import date, timedelta
from decimal import Decimal

from connector.types import Account, AccountType, Balance, Transaction

OPENING_BALANCE = Decimal("1000.00")


def accounts_for(user: str) -> list[Account]:
    digits = str(int(hashlib.sha256(user.encode()).hexdigest(), 16))[:8]
    return [
        Account(f"{user}-current", "Business Current", "040004", f"1{digits[1:]}", "GBP", AccountType.BUSINESS,
                balance=balance_for(user, f"{user}-current", date.today())),
        Account(f"{user}-savings", "Business Savings", "040004", f"2{digits[1:]}", "GBP", AccountType.SAVINGS,
                balance=balance_for(user, f"{user}-savings", date.today())),
    ]


def _amount(account_id: str, day: date) -> Decimal:
    """A deterministic signed amount for one account and day: mostly small debits, a credit every fifth day."""
    seed = int(hashlib.sha256(f"{account_id}:{day.isoformat()}".encode()).hexdigest()[:8], 16)
    pence = 100 + seed % 9900
    return Decimal(pence) / 100 if day.toordinal() % 5 == 0 else -Decimal(pence) / 100


def transactions_between(account_id: str, first: date, last: date) -> list[Transaction]:
    """One booked transaction per day from ``first`` to ``last`` included."""
    out = []
    day = first
    while day <= last:
        out.append(Transaction(
            provider_transaction_id=f"{account_id}:{day.isoformat()}",
            booking_date=day,
            amount=_amount(account_id, day),
            description="Card payment, Demo Coffee" if day.toordinal() % 5 else "Transfer from Demo Customer",
            currency="GBP",
        ))
        day += timedelta(days=1)
    return out


def balance_for(user: str, account_id: str, today: date) -> Balance:
    """Today's balance: the opening balance plus every transaction of the last year."""
    history = transactions_between(account_id, today - timedelta(days=365), today)
    return Balance(OPENING_BALANCE + sum((t.amount for t in history), Decimal(0)), "GBP")
