"""Statement bodies and batch cutting on their own (pure functions), checked by the emulator's rule checker."""

from __future__ import annotations

import json
import random
import uuid
from datetime import date, timedelta
from decimal import Decimal

import pytest

from connector.feed import statements as st
from connector.testing.sage import Problem, check_statement, parse_json
from connector.types import Transaction

TODAY = date(2025, 3, 31)
ACCOUNT, BANK = "4a7c1d0e-9b2f-4e3a-8c5d-6f1e2a3b4c5d", "10aaeee6-4691-4443-8198-df39aaa8007c"


def pending(rows: list[tuple[date, str]]) -> list[st.Pending]:
    out = []
    for n, (day, amount) in enumerate(rows, start=1):
        tx = Transaction(f"p{n}", day, Decimal(amount), f"tx {n}")
        uid = st.unique_id(ACCOUNT, "demo", tx.provider_transaction_id)
        out.append(st.Pending(n, day, tx.amount, st.to_stored(st.transaction_detail(ACCOUNT, uid, tx))))
    return out


def test_unique_id_is_uuid5_over_account_provider_and_transaction():
    uid = st.unique_id(ACCOUNT, "powens", "tx-42")
    assert uid == str(uuid.uuid5(st.UNIQUE_ID_NAMESPACE, f"{ACCOUNT}\npowens\ntx-42"))
    assert uuid.UUID(uid).version == 5
    assert st.unique_id(ACCOUNT, "powens", "tx-42") == uid  # stable across reads and resends
    assert st.unique_id("another-bank-account", "powens", "tx-42") != uid  # a reconnect gets new ids
    assert st.unique_id(ACCOUNT, "connectpay", "tx-42") != uid


@pytest.mark.parametrize(("value", "text"), [
    (Decimal("1E+2"), "100"), (Decimal("-0.00"), "0.00"), (Decimal("1234.50"), "1234.50"),
    (Decimal("-40.10"), "-40.10"), (Decimal("0.000001"), "0.000001"), (7, "7"),
])
def test_amounts_are_plain_json_numbers(value, text):
    assert st.plain_number(value) == text
    assert st.dumps({"a": value}) == f'{{"a":{text}}}'.encode()


def test_non_finite_amounts_are_refused():
    with pytest.raises(ValueError):
        st.plain_number(Decimal("NaN"))
    with pytest.raises(TypeError):
        st.dumps({"a": 1.5})  # floats never reach a statement


def test_transaction_detail_fields():
    tx = Transaction("t1", date(2025, 1, 2), Decimal("-40.10"), "  Card   payment\n Coffee ",
                     value_date=date(2025, 1, 1), currency="EUR", original_amount=Decimal("35.00"),
                     original_currency="gbp", reference="E2E-1", counterparty="Demo Coffee Ltd",
                     narrative=("line one", "", "line two", "line three"))
    detail = st.transaction_detail(ACCOUNT, "u1", tx)
    assert detail == {
        "uniqueId": "u1", "bankAccountId": ACCOUNT, "transactionAmount": Decimal("-40.10"),
        "transactionType": "DEBIT", "transactionStatus": "posted", "datePosted": "2025-01-02T12:00:00.000Z",
        "description": "Card payment Coffee", "dateUserInitiated": "2025-01-01T12:00:00.000Z",
        "narrative1": "line one", "narrative2": "line two", "referenceNumber": "E2E-1",
        "exchangeCurrency": "GBP", "exchangeAmount": Decimal("-35.00"),
        "payee": {"payeeDescription": "Demo Coffee Ltd"}}
    bare = st.transaction_detail(ACCOUNT, "u2", Transaction("t2", date(2025, 1, 2), Decimal(5), "  ",
                                                            counterparty="Client"))
    assert bare["description"] == "Client" and bare["transactionType"] == "CREDIT"
    assert set(bare) == {"uniqueId", "bankAccountId", "transactionAmount", "transactionType", "transactionStatus",
                         "datePosted", "description", "payee"}
    same_currency = st.transaction_detail(ACCOUNT, "u3", Transaction(
        "t3", date(2025, 1, 2), Decimal(5), "x", currency="EUR", original_amount=Decimal(5),
        original_currency="EUR"))
    assert "exchangeAmount" not in same_currency
    assert st.transaction_detail(ACCOUNT, "u4", Transaction("t4", date(2025, 1, 2), Decimal(-1), ""))[
        "description"] == "Debit"
    later = st.transaction_detail(ACCOUNT, "u5", Transaction("t5", date(2025, 1, 3), Decimal(1), "x",
                                                             value_date=date(2025, 1, 6)))
    assert "dateUserInitiated" not in later  # a value date after booking is not when the person acted


def test_batches_respect_size_and_the_14_day_span():
    rows = pending([(date(2025, 1, 1) + timedelta(days=d), "-1.00") for d in range(60)])
    batches = st.plan_batches(rows, balance=Decimal(100), batch_size=100, today=TODAY, last_planned=None)
    assert [len(b.rows) for b in batches] == [15, 15, 15, 15]
    assert all((b.last_date - b.first_date).days == 14 for b in batches)
    small = st.plan_batches(rows, balance=Decimal(100), batch_size=7, today=TODAY, last_planned=None)
    assert max(len(b.rows) for b in small) == 7 and sum(len(b.rows) for b in small) == 60


def test_balances_are_computed_back_from_the_current_balance():
    rows = pending([(date(2025, 3, 1), "10.00"), (date(2025, 3, 2), "-3.00"), (date(2025, 3, 3), "5.00"),
                    (date(2025, 4, 2), "1000.00")])  # the last is dated after today: it waits
    batches = st.plan_batches(rows, balance=Decimal("1012.00"), batch_size=2, today=TODAY, last_planned=None)
    assert [b.ledger_balance for b in batches] == [Decimal("7.00"), Decimal("12.00")]
    assert [len(b.rows) for b in batches] == [2, 1]


def test_late_booked_transactions_go_in_a_batch_of_their_own():
    rows = pending([(date(2025, 3, 5), "-2.00"), (date(2025, 3, 6), "-3.00"), (date(2025, 3, 20), "4.00")])
    batches = st.plan_batches(rows, balance=Decimal(50), batch_size=100, today=TODAY,
                              last_planned=date(2025, 3, 10))
    assert [(b.late, len(b.rows)) for b in batches] == [(True, 2), (False, 1)]
    assert batches[0].balance_date == date(2025, 3, 10)  # the newest date already sent
    assert batches[0].ledger_balance == Decimal(46) and batches[1].ledger_balance == Decimal(50)


def test_random_histories_always_make_statements_sage_accepts():
    rng = random.Random(7)
    for _ in range(30):
        start = TODAY - timedelta(days=rng.randint(1, 120))
        rows = []
        for _ in range(rng.randint(1, 400)):
            day = start + timedelta(days=rng.randint(0, (TODAY - start).days + 2))
            cents = rng.choice([-1, 1]) * rng.randint(1, 10**7)
            rows.append((day, str(Decimal(cents) / 100)))
        size = rng.choice([1, 5, 10, 100, 1000])
        balance = Decimal(rng.randint(-10**6, 10**6)) / 100
        batches = st.plan_batches(pending(rows), balance=balance, batch_size=size, today=TODAY, last_planned=None)
        running = None
        for batch in batches:
            body = parse_json(st.transactions_body(ACCOUNT, BANK, batch))
            check_statement(body, batch_size=size, today=TODAY)
            total = sum((Decimal(p.amount) for p in batch.rows), Decimal(0))
            ledger = body["data"]["accountDetails"][0]["balances"]["ledgerBalance"]
            if running is not None:
                assert ledger == running + total
            running = ledger
        future = sum((Decimal(a) for d, a in rows if d > TODAY), Decimal(0))
        if batches:
            assert running == balance - future


def test_auth_required_body_is_the_status_only_statement():
    raw = st.auth_required_body(ACCOUNT, BANK)
    check_statement(parse_json(raw), today=TODAY)
    assert json.loads(raw)["data"]["accountDetails"] == [
        {"bankAccountId": ACCOUNT, "status": "authRequired", "balances": {}}]


def test_the_emulator_checker_catches_a_broken_batch():
    [batch] = st.plan_batches(pending([(date(2025, 3, 1), "10.00")]), balance=Decimal(10), batch_size=10,
                              today=TODAY, last_planned=None)
    body = parse_json(st.transactions_body(ACCOUNT, BANK, batch))
    body["data"]["expected"]["transactionCreditSum"] = Decimal(11)
    with pytest.raises(Problem):
        check_statement(body, today=TODAY)
