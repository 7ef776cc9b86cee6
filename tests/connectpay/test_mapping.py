"""plugins/connectpay/mapping.py on its own: ConnectPay JSON → domain types, aliases, schema drift."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest

from connector.types import AccountType
from plugins.connectpay.mapping import (
    MappingError,
    parse_accounts,
    parse_baas_login,
    parse_error,
    parse_report_page,
    parse_sca_verify,
    parse_token_response,
    parse_transactions,
)

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def test_token_response_accepts_string_and_number_lifetimes() -> None:
    tokens = parse_token_response({"token_type": "bearer", "access_token": "SECRET-A", "refresh_token": "SECRET-R",
                                   "expires_in": 3600, "refresh_token_expires_in": "2592000",
                                   "scope": "psd2-ais", "client_customer_name": "Ac…td"})
    assert (tokens.expires_in, tokens.refresh_expires_in, tokens.customer_name) == (3600, 2592000, "Ac…td")
    assert "SECRET" not in repr(tokens)  # tokens never reach a log through repr()
    with pytest.raises(MappingError) as missing:
        parse_token_response({"token_type": "Bearer"})
    assert missing.value.path == "$.access_token"
    with pytest.raises(MappingError):
        parse_token_response({"token_type": "MAC", "access_token": "a"})
    with pytest.raises(MappingError):
        parse_token_response({"access_token": "a", "expires_in": "soon"})


def test_baas_login_and_verify() -> None:
    login = parse_baas_login({"challengeStatus": "Required", "authorisationEventId": "e-1"})
    assert (login.challenge_required, login.authorisation_event_id) == (True, "e-1")
    assert parse_baas_login({"accessToken": "t"}).has_tokens
    verified = parse_sca_verify({"scaStatus": "finalised", "accessToken": "t", "expiresIn": "300", "userId": "u"})
    assert (verified.access_token, verified.expires_in, verified.user_id) == ("t", 300, "u")
    with pytest.raises(MappingError):
        parse_sca_verify({"scaStatus": "started", "access_token": "t", "userId": "u"})


def _account(**fields: Any) -> dict[str, Any]:
    base = {"resourceId": "A1", "iban": "LT601010012345678901", "currency": "EUR", "name": "Main",
            "balances": [{"balanceType": "interimBooked", "balanceAmount": {"amount": "10.50", "currency": "EUR"},
                          "referenceDate": "2024-05-31"}]}
    base.update(fields)
    return base


def test_accounts_aliases_types_and_offering() -> None:
    records = parse_accounts({"accounts": [
        _account(),
        _account(resourceId=None, accountId="A2", status="blocked", cashAccountType="SVGS", name=None,
                 displayName="Savings"),
        _account(resourceId=None, id="A3", accountLevel="sub-account", usage="PRIV"),
        _account(resourceId="A4", name=None, balances=[]),
    ]}, read_at=NOW)
    assert [r.account.provider_account_id for r in records] == ["A1", "A2", "A3", "A4"]
    assert [r.offered for r in records] == [True, False, False, True]
    assert records[1].account.account_type is AccountType.SAVINGS and records[1].account.name == "Savings"
    assert records[2].account.account_type is AccountType.PERSONAL
    assert records[3].account.name == "ConnectPay account ••8901" and records[3].account.balance is None
    main = records[0].account
    assert (main.bank_identifier, main.account_identifier) == ("CONNECTPAY", "LT601010012345678901")
    assert main.balance is not None and main.balance.amount == Decimal("10.50")
    assert main.balance.as_of == datetime(2024, 5, 31, tzinfo=UTC)


def test_multi_currency_split() -> None:
    (eur, usd) = parse_accounts({"accounts": [_account(resourceId="M-XXX", currency="XXX", balances=[
        {"balanceType": "closingBooked", "balanceAmount": {"amount": 5, "currency": "EUR"}},
        {"balanceType": "interimAvailable", "balanceAmount": {"amount": "7.25", "currency": "USD"}},
    ])]}, read_at=NOW)
    assert (eur.account.provider_account_id, eur.currency_filter, eur.account.currency) == ("M-XXX:EUR", "EUR", "EUR")
    assert usd.account.account_identifier == "USD:LT601010012345678901"  # distinct for Sage, same last four
    assert usd.account.masked_identifier == "8901"
    assert eur.ledger is not None and eur.ledger.balance_type == "closingBooked"
    assert usd.account.balance is not None and usd.account.balance.amount == Decimal("7.25")


def test_accounts_schema_drift_names_the_path() -> None:
    with pytest.raises(MappingError) as caught:
        parse_accounts({"accounts": [_account(balances=[{"balanceType": "interimBooked"}])]}, read_at=NOW)
    assert caught.value.path == "$.accounts[0].balances[0].balanceAmount"
    with pytest.raises(MappingError):
        parse_accounts({"accounts": [_account(resourceId=None)]}, read_at=NOW)


def test_transactions_rules() -> None:
    entries = [
        {"entryReference": "ref-2", "bookingDate": "2024-05-02T23:30:00+03:00",
         "transactionAmount": {"amount": 12, "currency": "EUR"}, "debtorName": "Payer",
         "remittanceInformationUnstructuredArray": ["Invoice", "42"]},
        {"transactionId": "t-1", "bookingDate": "2024-05-01", "valueDate": "2024-04-30",
         "transactionAmount": {"amount": "-3.10", "currency": "EUR"}, "creditorName": "Shop",
         "endToEndId": "E2E"},
        {"transactionId": "t-p", "status": "pending", "bookingDate": "2024-05-03",
         "transactionAmount": {"amount": "1", "currency": "EUR"}},
        {"transactionId": "t-usd", "bookingDate": "2024-05-03",
         "transactionAmount": {"amount": "1", "currency": "USD"}},
        {"valueDate": "2024-05-04", "transactionAmount": {"amount": "-1", "currency": "EUR"},
         "remittanceInformationStructured": {"reference": "RF18"}},
    ]
    txs = parse_transactions(entries, "EUR")
    assert [t.provider_transaction_id for t in txs[:2]] == ["t-1", "ref-2"]
    first, second, third = txs
    assert (first.booking_date, first.value_date, first.amount) == (date(2024, 5, 1), date(2024, 4, 30),
                                                                     Decimal("-3.10"))
    assert (first.counterparty, first.description, first.reference) == ("Shop", "Shop", "E2E")
    assert second.booking_date == date(2024, 5, 2)  # the date as written, not converted through UTC
    assert (second.description, second.counterparty) == ("Invoice 42", "Payer")
    assert third.booking_date == date(2024, 5, 4) and third.description == "RF18"
    assert third.provider_transaction_id.startswith("h:")
    assert len(parse_transactions(entries)) == 4  # without a currency filter, only the pending one is dropped


def test_report_page_and_errors() -> None:
    page = parse_report_page({"transactions": {"booked": [{"transactionId": "x"}], "pending": [{}],
                                               "_links": {"next": {"href": "/next"}}}})
    assert (page.next_href, page.size, page.fingerprint) == ("/next", 2, ("x",))
    with pytest.raises(MappingError):
        parse_report_page({"accounts": []})
    assert parse_error({"error": "invalid_grant", "error_description": "gone"}) == ("invalid_grant", "gone")
    assert parse_error({"tppMessages": [{"category": "ERROR", "code": "CONSENT_EXPIRED", "text": "t"}]}) == (
        "CONSENT_EXPIRED", "t")
    assert parse_error({"errorCode": 42, "message": "m" * 300}) == ("42", "m" * 200)
    assert parse_error("not json") == (None, None)
