"""ConnectPay JSON → connector domain types. The ONLY module that knows ConnectPay field names (connectpay.md §5.6).

Every function here is pure: it takes decoded JSON and returns typed values, or raises :class:`MappingError` naming
the JSON path of the first missing/ill-typed required field (the path is safe to log; values never are).
Shapes are modelled on Berlin Group NextGenPSD2 (connectpay.md §5.1), with the aliases listed in the spec.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any

from connector.types import Account, AccountType, Balance, Transaction

log = logging.getLogger("plugins.connectpay.mapping")

MULTI_CURRENCY = "XXX"
# Balance types in the order that gives the booked (ledger) balance, connectpay.md §5.5.
LEDGER_ORDER = ("interimBooked", "closingBooked", "expected", "interimAvailable")
APPROXIMATE = frozenset({"expected", "interimAvailable"})


class MappingError(ValueError):
    """A ConnectPay answer lacks a required field or has one of the wrong type (schema drift)."""

    def __init__(self, path: str, problem: str = "missing or invalid") -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


# --- primitives -------------------------------------------------------------------------------------------------


def _obj(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MappingError(path, "not an object")
    return value


def _list(value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise MappingError(path, "not a list")
    return value


def _str(data: Mapping[str, Any], path: str, *names: str, required: bool = True) -> str | None:
    """The first non-empty string among ``names`` (aliases), or ``None``."""
    for name in names:
        value = data.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # ids sometimes arrive as numbers
    if required:
        raise MappingError(f"{path}.{names[0]}")
    return None


def parse_decimal(value: Any, path: str) -> Decimal:
    """Amounts arrive as strings ("-12.30") or JSON numbers; never go through float (OP-29)."""
    if isinstance(value, bool) or value is None:
        raise MappingError(path)
    try:
        result = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        raise MappingError(path, "not a number") from None
    if not result.is_finite():
        raise MappingError(path, "not a number")
    return result


def parse_seconds(value: Any, path: str) -> int | None:
    """Lifetimes are numbers or numeric strings (``refresh_token_expires_in`` is a string in the docs, OP-29)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise MappingError(path, "not a number")
    try:
        seconds = int(Decimal(str(value).strip()))
    except (InvalidOperation, ValueError):
        raise MappingError(path, "not a number") from None
    if seconds < 0:
        raise MappingError(path, "negative")
    return seconds


def parse_date(value: Any, path: str) -> date:
    """A bank date as written: ``YYYY-MM-DD``, or the date part of a datetime (never converted through UTC)."""
    if not isinstance(value, str) or len(value) < 10:
        raise MappingError(path)
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        raise MappingError(path, "not a date") from None


def parse_datetime(value: Any) -> datetime | None:
    """An instant from ConnectPay or from our own stored state; a missing offset means UTC."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _currency(value: Any, path: str) -> str:
    if not isinstance(value, str) or len(value.strip()) != 3 or not value.strip().isalpha():
        raise MappingError(path, "not a currency code")
    return value.strip().upper()


def _amount(data: Any, path: str) -> tuple[Decimal, str]:
    obj = _obj(data, path)
    return parse_decimal(obj.get("amount"), f"{path}.amount"), _currency(obj.get("currency"), f"{path}.currency")


# --- tokens and sign-in -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenSet:
    """An OAuth token answer (code exchange or refresh, connectpay.md §3.5)."""

    access_token: str
    refresh_token: str | None
    expires_in: int | None
    refresh_expires_in: int | None
    scope: str | None
    customer_name: str | None

    def __repr__(self) -> str:  # tokens never reach a log through repr()
        return f"TokenSet(expires_in={self.expires_in}, refresh_expires_in={self.refresh_expires_in})"


def parse_token_response(data: Any) -> TokenSet:
    obj = _obj(data, "$")
    token_type = _str(obj, "$", "token_type", required=False)
    if token_type is not None and token_type.lower() != "bearer":
        raise MappingError("$.token_type", "not Bearer")
    return TokenSet(
        access_token=_str(obj, "$", "access_token", "accessToken") or "",
        refresh_token=_str(obj, "$", "refresh_token", "refreshToken", required=False),
        expires_in=parse_seconds(obj.get("expires_in", obj.get("expiresIn")), "$.expires_in"),
        refresh_expires_in=parse_seconds(
            obj.get("refresh_token_expires_in", obj.get("refreshTokenExpiresIn")), "$.refresh_token_expires_in"
        ),
        scope=_str(obj, "$", "scope", required=False),
        customer_name=_str(obj, "$", "client_customer_name", required=False),
    )


@dataclass(frozen=True, slots=True)
class LoginResult:
    """The answer to the BaaS login (S1): a challenge to pass, or (refused by us) tokens without one."""

    challenge_required: bool
    authorisation_event_id: str | None
    has_tokens: bool


def parse_baas_login(data: Any) -> LoginResult:
    obj = _obj(data, "$")
    status = _str(obj, "$", "challengeStatus", required=False)
    required = status is not None and status.lower() == "required"
    event_id = _str(obj, "$", "authorisationEventId", required=required)
    has_tokens = bool(_str(obj, "$", "access_token", "accessToken", required=False))
    return LoginResult(required, event_id, has_tokens)


@dataclass(frozen=True, slots=True)
class UserTokens:
    """A BaaS user token pair (verify S3 or refresh S5)."""

    access_token: str
    refresh_token: str | None
    expires_in: int | None
    user_id: str | None

    def __repr__(self) -> str:
        return f"UserTokens(expires_in={self.expires_in})"


def parse_user_tokens(data: Any) -> UserTokens:
    obj = _obj(data, "$")
    return UserTokens(
        access_token=_str(obj, "$", "access_token", "accessToken") or "",
        refresh_token=_str(obj, "$", "refresh_token", "refreshToken", required=False),
        expires_in=parse_seconds(obj.get("expires_in", obj.get("expiresIn")), "$.expires_in"),
        user_id=_str(obj, "$", "userId", "user_id", required=False),
    )


def parse_sca_verify(data: Any) -> UserTokens:
    """S3: ``scaStatus`` must be ``finalised`` (the only success value, B5) and carry the user's tokens and id."""
    obj = _obj(data, "$")
    status = _str(obj, "$", "scaStatus")
    if (status or "").lower() != "finalised":
        raise MappingError("$.scaStatus", "not finalised")
    tokens = parse_user_tokens(obj)
    if not tokens.user_id:
        raise MappingError("$.userId")
    return tokens


def parse_user_status(data: Any) -> str:
    return (_str(_obj(data, "$"), "$", "status") or "").lower()


# --- accounts and balances --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerBalance:
    """The booked balance chosen for one currency, and how it was found (for the closingBooked adjustment)."""

    balance: Balance
    balance_type: str
    reference_date: date | None


@dataclass(frozen=True, slots=True)
class AccountRecord:
    """One linkable account (one currency of a ConnectPay account) plus what the plugin needs beside it."""

    account: Account
    resource_id: str
    currency_filter: str | None  # set for one currency of a multi-currency account
    offered: bool
    client_id: str | None
    ledger: LedgerBalance | None


def account_id(resource_id: str, currency: str | None) -> str:
    return f"{resource_id}:{currency}" if currency else resource_id


def parse_balances(items: Any, path: str) -> list[tuple[str, Decimal, str, date | None, datetime | None]]:
    """Berlin Group ``balances[]`` → (type, amount, currency, referenceDate, lastChangeDateTime); unreadable entries
    are errors because a wrong balance is worse than none."""
    found = []
    for i, raw in enumerate(_list(items, path)):
        at = f"{path}[{i}]"
        obj = _obj(raw, at)
        kind = _str(obj, at, "balanceType") or ""
        amount, currency = _amount(obj.get("balanceAmount"), f"{at}.balanceAmount")
        ref = obj.get("referenceDate")
        found.append((kind, amount, currency, parse_date(ref, f"{at}.referenceDate") if ref else None,
                      parse_datetime(obj.get("lastChangeDateTime"))))
    return found


def select_ledger(
    balances: Sequence[tuple[str, Decimal, str, date | None, datetime | None]], currency: str, read_at: datetime
) -> LedgerBalance | None:
    """The booked balance in ``currency``, first present of :data:`LEDGER_ORDER` (connectpay.md §5.5)."""
    by_type = {kind: b for b in balances if (kind := b[0]) and b[2] == currency}
    for kind in LEDGER_ORDER:
        if kind in by_type:
            _, amount, cur, ref, changed = by_type[kind]
            if kind in APPROXIMATE:
                log.info("balance taken from %s (approximate)", kind)
            as_of = changed or (datetime.combine(ref, time.min, tzinfo=UTC) if ref else read_at)
            return LedgerBalance(Balance(amount, cur, as_of), kind, ref)
    return None


_ACCOUNT_TYPES = {
    "SVGS": AccountType.SAVINGS,
    "CARD": AccountType.CREDIT_CARD,
    "LOAN": AccountType.LOAN,
}


def _account_type(obj: Mapping[str, Any]) -> AccountType:
    cash = str(obj.get("cashAccountType") or "").upper()
    if cash in _ACCOUNT_TYPES:
        return _ACCOUNT_TYPES[cash]
    if str(obj.get("usage") or "").upper() == "PRIV":
        return AccountType.PERSONAL
    return AccountType.BUSINESS


def _masked(iban: str) -> str:
    return f"ConnectPay account ••{iban[-4:]}"


def parse_accounts(data: Any, *, read_at: datetime) -> list[AccountRecord]:
    """``{"accounts": [...]}`` (psd2 ``/ob/accounts``, baas user and client lists) → one record per linkable
    currency. Accounts that are not ``enabled`` or not at ``aggregation`` level are returned with ``offered=False``."""
    obj = _obj(data, "$")
    records: list[AccountRecord] = []
    for i, raw in enumerate(_list(obj.get("accounts"), "$.accounts")):
        at = f"$.accounts[{i}]"
        acc = _obj(raw, at)
        resource_id = _str(acc, at, "resourceId", "accountId", "id") or ""
        iban = _str(acc, at, "iban", required=False)
        status = (_str(acc, at, "status", required=False) or "enabled").lower()
        level = (_str(acc, at, "accountLevel", required=False) or "aggregation").lower()
        offered = status == "enabled" and level == "aggregation"
        client_id = _str(acc, at, "clientId", "baasClientId", required=False)
        balances = parse_balances(acc.get("balances"), f"{at}.balances")
        raw_currency = acc.get("currency")
        declared = _currency(raw_currency, f"{at}.currency") if raw_currency else None
        balance_currencies = list(dict.fromkeys(b[2] for b in balances))
        # OP-27: a Sage account has one currency, so XXX or several balance currencies → one account per currency.
        multi = declared == MULTI_CURRENCY or len(balance_currencies) > 1
        if multi:
            currencies = balance_currencies
            if not currencies:
                raise MappingError(f"{at}.balances", "multi-currency account without balances")
        else:
            currencies = [declared or (balance_currencies[0] if balance_currencies else "")]
            if not currencies[0]:
                raise MappingError(f"{at}.currency")
        base_name = _str(acc, at, "name", "displayName", "product", required=False) or (
            _masked(iban) if iban else "ConnectPay account"
        )
        bank_identifier = _str(acc, at, "bic", required=False) or "CONNECTPAY"
        for currency in currencies:
            suffix = currency if multi else None
            identifier = iban or resource_id
            account = Account(
                provider_account_id=account_id(resource_id, suffix),
                name=f"{base_name} ({currency})" if multi else base_name,
                bank_identifier=bank_identifier.upper(),
                # Sage de-duplicates on (bank, account): one IBAN shared by several currencies needs the currency
                # in the identifier; it goes first so the last four characters stay the IBAN's.
                account_identifier=f"{currency}:{identifier}" if multi else identifier,
                currency=currency,
                account_type=_account_type(acc),
                iban=iban,
                balance=None,
            )
            ledger = select_ledger(balances, currency, read_at)
            if ledger is not None:
                account = replace(account, balance=ledger.balance)
            records.append(AccountRecord(account, resource_id, suffix, offered, client_id, ledger))
    return records


def parse_balance_list(data: Any, currency: str, read_at: datetime) -> LedgerBalance | None:
    """The optional balances endpoint: ``{"account": {...}, "balances": [...]}``."""
    obj = _obj(data, "$")
    return select_ledger(parse_balances(obj.get("balances"), "$.balances"), currency, read_at)


# --- transactions / payment entries -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReportPage:
    """One page of an ``accountReport``: the raw booked entries (mapped later, once all pages are in, so synthetic
    ids can count identical entries of a day) and the next link, if any."""

    booked: list[Mapping[str, Any]]
    next_href: str | None
    size: int
    fingerprint: tuple[str, ...]


def parse_report_page(data: Any) -> ReportPage:
    obj = _obj(data, "$")
    report = _obj(obj.get("transactions"), "$.transactions")
    booked_raw = _list(report.get("booked"), "$.transactions.booked")
    booked = [_obj(e, f"$.transactions.booked[{i}]") for i, e in enumerate(booked_raw)]
    links = report.get("_links") or obj.get("_links") or {}
    next_href = None
    if isinstance(links, Mapping):
        nxt = links.get("next")
        if isinstance(nxt, Mapping) and isinstance(nxt.get("href"), str) and nxt["href"].strip():
            next_href = nxt["href"].strip()
        elif isinstance(nxt, str) and nxt.strip():
            next_href = nxt.strip()
    pending = _list(report.get("pending"), "$.transactions.pending")
    fingerprint = tuple(
        str(e.get("transactionId") or e.get("entryReference") or hashlib.sha256(repr(sorted(e.items())).encode())
            .hexdigest()) for e in booked
    )
    return ReportPage(booked, next_href, len(booked) + len(pending), fingerprint)


def _counterparty(entry: Mapping[str, Any], outgoing: bool) -> str | None:
    first, second = ("creditorName", "debtorName") if outgoing else ("debtorName", "creditorName")
    ultimate = ("ultimateCreditor", "ultimateDebtor") if outgoing else ("ultimateDebtor", "ultimateCreditor")
    return _str(entry, "$", first, second, *ultimate, required=False)


def _description(entry: Mapping[str, Any], counterparty: str | None) -> str:
    text = _str(entry, "$", "remittanceInformationUnstructured", required=False)
    if text:
        return text
    parts = entry.get("remittanceInformationUnstructuredArray")
    if isinstance(parts, list):
        joined = " ".join(p.strip() for p in parts if isinstance(p, str) and p.strip())
        if joined:
            return joined
    structured = entry.get("remittanceInformationStructured")
    reference = structured.get("reference") if isinstance(structured, Mapping) else None
    if isinstance(reference, str) and reference.strip():
        return reference.strip()
    if isinstance(structured, str) and structured.strip():
        return structured.strip()
    return _str(entry, "$", "additionalInformation", required=False) or counterparty or "ConnectPay transaction"


def parse_transactions(entries: Iterable[Mapping[str, Any]], currency: str | None = None) -> list[Transaction]:
    """Booked entries → transactions, booked only (product decision 7), optionally one currency (OP-27).

    Entries are sorted by booking date, value date, then position; synthetic ids (``h:`` + SHA-256) count identical
    entries of one day so two equal coffees stay two (lessons.md #1).
    """
    mapped: list[tuple[date, date | None, int, Mapping[str, Any], Decimal, str]] = []
    for i, entry in enumerate(entries):
        at = f"$.transactions.booked[{i}]"
        status = entry.get("status")
        if isinstance(status, str) and status.lower() != "booked":
            continue  # pending entries wait until they are booked
        amount, cur = _amount(entry.get("transactionAmount"), f"{at}.transactionAmount")
        if currency is not None and cur != currency:
            continue
        indicator = str(entry.get("creditDebitIndicator") or "").upper()
        if indicator == "DBIT" and amount > 0:
            amount = -amount
        raw_booking = entry.get("bookingDate") or entry.get("valueDate")
        booking = parse_date(raw_booking, f"{at}.bookingDate")
        value = parse_date(entry["valueDate"], f"{at}.valueDate") if entry.get("valueDate") else None
        mapped.append((booking, value, i, entry, amount, cur))
    mapped.sort(key=lambda m: (m[0], m[1] or m[0], m[2]))

    seen: dict[str, int] = {}
    result: list[Transaction] = []
    for booking, value, _, entry, amount, cur in mapped:
        counterparty = _counterparty(entry, amount < 0)
        description = _description(entry, counterparty)
        tx_id = _str(entry, "$", "transactionId", "entryReference", required=False)
        if tx_id is None:
            basis = "|".join([booking.isoformat(), value.isoformat() if value else "", str(amount), cur,
                              description, counterparty or ""])
            ordinal = seen.get(basis, 0)
            seen[basis] = ordinal + 1
            tx_id = "h:" + hashlib.sha256(f"{basis}|{ordinal}".encode()).hexdigest()
            log.warning("transaction without an id: synthetic id used (less stable)")
        e2e = _str(entry, "$", "endToEndId", required=False)
        result.append(
            Transaction(
                provider_transaction_id=tx_id,
                booking_date=booking,
                amount=amount,
                description=description,
                value_date=value,
                currency=cur,
                reference=e2e if e2e and e2e.upper() != "NOTPROVIDED" else None,
                counterparty=counterparty,
            )
        )
    return result


# --- errors -----------------------------------------------------------------------------------------------------


def parse_error(data: Any) -> tuple[str | None, str | None]:
    """(code, message) from an error body: RFC 6749, Berlin Group ``tppMessages``, or a generic shape (§7.1).

    The message is cut to 200 characters; it is the provider's text and goes only into ``detail``.
    """
    if not isinstance(data, Mapping):
        return None, None
    code: Any = None
    message: Any = None
    if isinstance(data.get("error"), str):
        code, message = data["error"], data.get("error_description")
    elif isinstance(data.get("tppMessages"), list) and data["tppMessages"]:
        first = data["tppMessages"][0]
        if isinstance(first, Mapping):
            code, message = first.get("code"), first.get("text")
    else:
        code = data.get("code") or data.get("errorCode")
        message = data.get("message") or data.get("description") or data.get("title") or data.get("detail")
    code = str(code) if isinstance(code, (str, int)) and not isinstance(code, bool) else None
    message = str(message)[:200] if isinstance(message, str) else None
    return code, message
