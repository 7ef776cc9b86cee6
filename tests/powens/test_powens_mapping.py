"""Mapping Powens JSON to the domain types, and the field rules of §2.6/§2.7."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest

from connector.types import AccountType
from plugins.powens import mapping
from plugins.powens.client import loads
from plugins.powens.fields import fields_to_show, parse_fields, to_form_fields, validate

UUID = "5f0c1e2a-8a3b-4c5d-9e6f-7a8b9c0d1e2f"


@pytest.mark.parametrize(
    ("kind", "usage", "expected"),
    [
        ("checking", "ORGA", AccountType.BUSINESS),
        ("checking", "PRIV", AccountType.PERSONAL),
        ("checking", None, AccountType.BUSINESS),
        ("savings", "PRIV", AccountType.SAVINGS),
        ("deposit", "ORGA", AccountType.SAVINGS),
        ("card", "PRIV", AccountType.CREDIT_CARD),
        ("loan", "PRIV", AccountType.LOAN),
        ("market", "PRIV", AccountType.BUSINESS),
        (None, None, AccountType.BUSINESS),
    ],
)
def test_account_type(kind: str | None, usage: str | None, expected: AccountType) -> None:
    assert mapping.account_type({"type": kind, "usage": usage}) is expected


def test_account_type_in_the_documented_object_form() -> None:
    raw = {"id": 3, "type": {"id": 1, "name": "checking"}, "usage": "PRIV"}
    assert mapping.account_type(raw) is AccountType.PERSONAL
    assert [a.provider_account_id for a in mapping.accounts([raw], connector_uuid=UUID, account_types=("checking",))] \
        == ["3"]
    assert mapping.accounts([raw], connector_uuid=UUID, account_types=("card",)) == []


def test_accounts_leave_out_deleted_ones() -> None:
    kept, gone = {"id": 1, "type": "checking"}, {"id": 2, "type": "checking", "deleted": "2025-01-05 00:00:00"}
    assert [a.provider_account_id for a in mapping.accounts([kept, gone], connector_uuid=UUID)] == ["1"]


def test_connector_uuid_prefers_the_one_saved_with_the_consent() -> None:
    assert mapping.connector_uuid({"connector_uuid": "saved"}, "current", "configured") == "saved"
    assert mapping.connector_uuid({}, "current", "configured") == "current"
    assert mapping.connector_uuid(None, None, "configured") == "configured"


def test_account_identifiers_are_stable_and_never_empty() -> None:
    before = {"id": 7, "name": "Current", "number": "XXXX 1234", "iban": None, "currency": {"id": "EUR"}}
    after = {**before, "iban": "FR76 3000 1007 9412 3456 7890 185", "balance": Decimal("10.5")}
    a, b = mapping.account(before, connector_uuid=UUID), mapping.account(after, connector_uuid=UUID)
    assert a.account_identifier == b.account_identifier == "XXXX1234"  # number first (Sage 7.33)
    assert a.bank_identifier == b.bank_identifier == UUID
    assert b.iban == "FR7630001007941234567890185"
    bare = mapping.account({"id": 8, "name": "X"}, connector_uuid=UUID)
    assert bare.account_identifier == "powens-8" and bare.currency == "EUR" and bare.balance is None
    with_bic = mapping.account({"id": 9, "bic": "AGRIFRPP", "iban": "FR76"}, connector_uuid=UUID)
    assert with_bic.bank_identifier == "AGRIFRPP"


def test_balance_and_amounts_are_exact_decimals() -> None:
    raw = loads(b'{"id": 1, "balance": 0.1, "currency": {"id": "eur"}, "last_update": "2025-01-02 06:00:00"}')
    balance = mapping.balance(raw)
    assert balance is not None and balance.amount == Decimal("0.1") and balance.currency == "EUR"
    assert balance.as_of == datetime(2025, 1, 2, 6, tzinfo=UTC)
    tx = mapping.transaction(loads(b'{"id": 5, "date": "2025-01-02", "value": -12.30, "wording": "x"}'))
    assert tx.amount == Decimal("-12.30")


def test_transaction_mapping() -> None:
    raw: dict[str, Any] = {"id": 555, "id_account": 1, "date": "2025-01-02", "rdate": "2025-01-01",
                           "vdate": "2025-01-03", "value": Decimal("-12.5"), "original_wording": "",
                           "simplified_wording": "Cafe", "wording": "My cafe", "coming": False, "deleted": None,
                           "original_value": Decimal("-14.1"), "original_currency": {"id": "USD"},
                           "counterparty": {"label": "CAFE SARL"}, "last_update": "2025-01-02T06:00:00Z"}
    tx = mapping.transaction(raw, currency="EUR")
    assert tx.provider_transaction_id == "555"
    assert tx.booking_date == date(2025, 1, 2) and tx.value_date == date(2025, 1, 3)
    assert tx.description == "Cafe"  # original_wording empty: the simplified one
    assert tx.original_amount == Decimal("-14.1") and tx.original_currency == "USD"
    assert tx.counterparty == "CAFE SARL" and tx.currency == "EUR"
    assert mapping.is_booked(raw) and not mapping.is_deleted(raw)
    assert not mapping.is_booked({**raw, "coming": True})
    assert mapping.is_deleted({**raw, "deleted": "2025-01-05 00:00:00"})
    with pytest.raises(mapping.MappingError):
        mapping.transaction({"id": 1, "value": 1})


def test_datetimes_both_forms_utc() -> None:
    assert mapping.parse_datetime("2025-01-02 06:00:00") == datetime(2025, 1, 2, 6, tzinfo=UTC)
    assert mapping.parse_datetime("2025-01-02T07:00:00+01:00") == datetime(2025, 1, 2, 6, tzinfo=UTC)
    assert mapping.parse_datetime("nope") is None
    assert mapping.format_datetime(datetime(2025, 1, 2, 6, tzinfo=UTC)) == "2025-01-02 06:00:00"


FIELDS = parse_fields([
    {"name": "login", "label": "Login", "type": "text", "required": True,
     "auth_mechanisms": ["credentials"], "connector_sources": ["directaccess"]},
    {"name": "password", "label": "Password", "type": "password", "required": True,
     "auth_mechanisms": ["credentials"], "connector_sources": ["directaccess"]},
    {"name": "website", "label": "Website", "type": "list", "required": True,
     "auth_mechanisms": ["credentials", "webauth"], "connector_sources": ["directaccess", "openapi"],
     "values": [{"label": "Personal", "value": "par"}]},
])


@pytest.mark.parametrize(
    ("source", "mechanism", "added", "shown"),
    [
        ("directaccess", "credentials", [], ["login", "password", "website"]),
        ("openapi", "webauth", ["directaccess"], []),
        ("openapi", "webauth", [], ["website"]),
        ("directaccess", "credentials", ["openapi"], ["login", "password"]),
    ],
)
def test_fields_to_show_worked_example(source: str, mechanism: str, added: list[str], shown: list[str]) -> None:
    assert [f["name"] for f in fields_to_show(FIELDS, source, mechanism, added)] == shown


def test_field_rendering_and_validation() -> None:
    specs = parse_fields([
        {"name": "code", "label": "Code", "type": "text", "regex": r"^\d{6}$", "ephemeral": True},
        {"name": "born", "label": "Birth date", "type": "date", "required": False},
        {"name": "kind", "label": "Kind", "type": "hidden", "value": "pro"},
        {"name": "pin", "label": "PIN", "type": "number"},
        {"name": "odd", "label": "Odd", "type": "captcha", "regex": "(?<bad"},
    ])
    fields = to_form_fields(specs)
    assert [(f.name, f.kind) for f in fields] == [("code", "otp"), ("born", "date"), ("kind", "hidden"),
                                                  ("pin", "number"), ("odd", "text")]
    assert fields[2].value == "pro" and not fields[2].required
    assert fields[4].pattern is None  # a regex Python cannot compile is left to Powens
    values, errors = validate(specs, {"code": ["12345"], "born": ["31/01/2024"], "kind": ["tampered"],
                                      "pin": ["12a"], "odd": ["anything"]})
    assert set(errors) == {"code", "born", "pin"}
    assert values == {"kind": "pro", "odd": "anything"}
    values, errors = validate(specs, {"code": ["123456"], "pin": ["42"], "odd": ["x"]})
    assert errors == {} and values == {"code": "123456", "kind": "pro", "pin": "42", "odd": "x"}
