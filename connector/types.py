"""Domain types shared by the core and every provider plugin.

These are plain typed classes with no behaviour tied to storage or HTTP: a provider plugin maps its own JSON to them
in exactly one module (``plugins/<name>/mapping.py``), and the core checks the result against Sage's rules.

Money is always :class:`~decimal.Decimal` (never float); bank dates are :class:`datetime.date` values as the bank
gives them (never round-tripped through UTC).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal

__all__ = [
    "Account",
    "AccountType",
    "AccountRead",
    "ActionRequired",
    "Balance",
    "Choice",
    "Declined",
    "ChooseAccounts",
    "Done",
    "Failed",
    "Field",
    "FlowEvent",
    "Form",
    "Grant",
    "JourneyKind",
    "ProviderError",
    "Redirect",
    "Step",
    "StepResult",
    "TemporaryError",
    "Transaction",
    "Wait",
    "WebhookRequest",
    "WebhookResult",
]


class AccountType(str, enum.Enum):
    """Sage's account types (``/availableaccounts``); providers map theirs to one of these."""

    BUSINESS = "business"
    PERSONAL = "personal"
    SAVINGS = "savings"
    CREDIT_CARD = "creditCard"
    LOAN = "loan"
    CORPORATE = "corporate"


@dataclass(frozen=True, slots=True)
class Balance:
    """The account's current booked balance as the provider reports it, signed (negative when overdrawn)."""

    amount: Decimal
    currency: str
    as_of: datetime | None = None


@dataclass(frozen=True, slots=True)
class Account:
    """One account a consent gives access to.

    ``provider_account_id`` is the provider's own stable id; the core mints Sage's ``bankAccountExternalId`` for it.
    ``bank_identifier`` and ``account_identifier`` must be stable and never empty: Sage de-duplicates on the pair.
    """

    provider_account_id: str
    name: str
    bank_identifier: str
    account_identifier: str
    currency: str
    account_type: AccountType = AccountType.BUSINESS
    branch_identifier: str = ""
    balance: Balance | None = None
    iban: str | None = None

    @property
    def masked_identifier(self) -> str:
        """The last four characters of the account identifier, for display."""
        return self.account_identifier[-4:]


@dataclass(frozen=True, slots=True)
class Transaction:
    """One booked transaction. Pending transactions never appear here (product Decision 7).

    ``provider_transaction_id`` must be stable across reads: Sage's ``uniqueId`` is derived from it.
    ``amount`` is signed: credits positive, debits negative.
    """

    provider_transaction_id: str
    booking_date: date
    amount: Decimal
    description: str
    value_date: date | None = None
    currency: str | None = None
    original_amount: Decimal | None = None
    original_currency: str | None = None
    reference: str | None = None
    counterparty: str | None = None
    narrative: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AccountRead:
    """What one feed read of an account returns.

    :ivar balance: the current booked balance, or ``None`` when the provider has none (the feed then holds).
    :ivar booked: booked transactions changed since the sync point given to the read, in any order.
    :ivar removed: provider ids of transactions the bank deleted since that point.
    :ivar sync_point: an opaque string the core stores and hands back on the next read (a date, a cursor...).
    """

    balance: Balance | None
    booked: Sequence[Transaction]
    removed: Sequence[str] = ()
    sync_point: str | None = None


# --- The authorisation journey -----------------------------------------------------------------------------------


class JourneyKind(str, enum.Enum):
    ONBOARDING = "onboarding"
    REAUTHORISATION = "reauthorisation"


class Step(str, enum.Enum):
    """Where the person is in the journey; the core shows it as a step indicator."""

    SIGN_IN = "sign_in"
    VERIFY = "verify"
    CHOOSE_ACCOUNTS = "choose_accounts"
    FINISH = "finish"


@dataclass(frozen=True, slots=True)
class Choice:
    value: str
    label: str


@dataclass(frozen=True, slots=True)
class Field:
    """One input of a :class:`Form`.

    ``kind`` picks the control: ``text``, ``password``, ``number`` (digits), ``date``, ``list`` (with ``choices``),
    ``otp`` (a one-time code: numeric keyboard and ``autocomplete="one-time-code"``) or ``hidden``.
    ``pattern`` is a regular expression the value must match in full; it is checked in the page and again on the
    server by the core before the plugin sees the value.
    """

    name: str
    label: str
    kind: Literal["text", "password", "number", "date", "list", "otp", "hidden", "email"] = "text"
    required: bool = True
    description: str | None = None
    pattern: str | None = None
    choices: Sequence[Choice] = ()
    value: str | None = None
    autocomplete: str | None = None


@dataclass(frozen=True, slots=True)
class Form:
    """Show a form in our page; the person's answer comes back as a ``submit`` event with ``action``."""

    title: str
    fields: Sequence[Field]
    action: str
    submit_label: str = "Continue"
    intro: str | None = None
    error: str | None = None
    field_errors: Mapping[str, str] = field(default_factory=dict)
    step: Step = Step.SIGN_IN
    secondary_actions: Sequence[Choice] = ()


@dataclass(frozen=True, slots=True)
class Redirect:
    """Send the person, full window, to a provider or bank page (never inside an iframe, product Decision 11).

    The core shows ``explanation`` (one sentence saying the bank's page opens next) and a button that opens
    ``url`` in the top window. The person comes back through the provider's callback route.
    """

    url: str
    explanation: str
    button_label: str = "Continue to your bank"
    step: Step = Step.SIGN_IN


@dataclass(frozen=True, slots=True)
class Wait:
    """Show a waiting page that checks again by itself (and has a button when JavaScript is off).

    Each check is a ``poll`` event; ``poll_seconds`` is the delay between checks.
    """

    title: str
    message: str
    poll_seconds: int = 3
    step: Step = Step.VERIFY


@dataclass(frozen=True, slots=True)
class ChooseAccounts:
    """Show the accounts found and let the person pick which to share; the answer is a ``choose_accounts`` event
    whose ``values["account"]`` lists the chosen ``provider_account_id``\\ s (checked by the core against this list).

    ``secondary_actions`` offers more, e.g. ``Choice("add_source", "Add accounts from another service")``.
    ``selected`` keeps the person's ticks when the page comes back (after adding a source, say).

    .. versionadded:: 1 ``selected``
    """

    accounts: Sequence[Account]
    title: str = "Choose the accounts to share with Sage"
    intro: str | None = None
    preselected: bool = True
    selected: Sequence[str] | None = None  # ids ticked when the page opens; ``None``: all of them if preselected
    secondary_actions: Sequence[Choice] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    """What a finished journey hands the core to store.

    :ivar secrets: tokens and other provider secrets; stored encrypted, handed back to every later call for this
        consent. Never typed credentials or one-time codes.
    :ivar accounts: every account of the consent (the onboarding PATCH lists them all, product Decision 4).
    :ivar provider_consent_id: the provider's own id for the consent (connection id, user id...), if any.
    :ivar expires_at: when the provider consent lapses, if known (shown in ``feed status``).
    """

    secrets: Mapping[str, Any]
    accounts: Sequence[Account]
    provider_consent_id: str | None = None
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Done:
    """The journey succeeded: the core stores the grant, PATCHes Sage and returns the person to Sage."""

    grant: Grant


@dataclass(frozen=True, slots=True)
class Failed:
    """The journey cannot go on: the core shows ``error`` in plain words with the way back to Sage. No PATCH."""

    error: ProviderError


StepResult = Form | Redirect | Wait | ChooseAccounts | Done | Failed


@dataclass(frozen=True, slots=True)
class FlowEvent:
    """Something that moves a journey on.

    :ivar kind: ``submit`` (the person posted a form), ``choose_accounts``, ``poll`` (a waiting page checked
        again), ``callback`` (the provider sent the person back to our callback URL) or ``cancel``.
    :ivar action: the form's ``action`` (for ``submit``), or the secondary action chosen.
    :ivar values: form fields or callback query parameters; each name maps to its list of values.
    """

    kind: Literal["submit", "choose_accounts", "poll", "callback", "cancel"]
    action: str = ""
    values: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def first(self, name: str, default: str = "") -> str:
        found = self.values.get(name)
        return found[0] if found else default


# --- Webhooks -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    """A provider webhook as received on ``POST /providers/<name>/webhook`` (body already size-capped).

    ``path`` is the path as built from ``server.public_url`` (not from the ``Host`` header), for signatures.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    client_ip: str


@dataclass(frozen=True, slots=True)
class WebhookResult:
    """A verified webhook. ``dedupe_key`` is stored under a unique constraint: a repeat is answered and ignored.

    ``provider_consent_ids`` name the consents whose accounts the feed should read again soon.
    """

    dedupe_key: str
    provider_consent_ids: Sequence[str] = ()


# --- Errors -----------------------------------------------------------------------------------------------------


class ProviderError(Exception):
    """A failure at the provider, with a stable ``code`` and a plain-language ``message`` for the person.

    Subclasses say what resolves it: :class:`ActionRequired` (the person must act: the feed sends one
    ``authRequired`` statement) and :class:`TemporaryError` (retry later with backoff; send nothing).
    ``detail`` is the provider's own text, shown only beside the plain message and never logged with secrets.
    """

    person_must_act = False

    def __init__(
        self,
        code: str,
        message: str,
        *,
        detail: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.detail = detail
        self.retry_after = retry_after


class ActionRequired(ProviderError):
    """The consent is lost or the bank needs the person (wrong password, SCA, expired refresh token...)."""

    person_must_act = True


class Declined(ProviderError):
    """The person declined or cancelled at the provider or bank: not a failure, nothing to retry.

    .. versionadded:: 1
    """


class TemporaryError(ProviderError):
    """The provider or bank is unavailable or throttling; nothing is wrong with the consent."""
