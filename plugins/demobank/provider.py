"""Demo Bank's provider class. What the person types picks the path:

========================  =====================================================================
user name                 what happens
========================  =====================================================================
anything else             signed in; the accounts are offered
``otp``                   a one-time code is asked (the code is ``123456``; anything else is wrong)
``redirect``              the person is sent "to the bank" full window and comes straight back
``decoupled``             a waiting page: approve in the bank's app (approved after two checks)
``locked``                the account is locked at the bank (the person must act)
``down``                  the bank is unavailable (temporary)
``expire``                links, but the consent is lost at the first feed read
========================  =====================================================================

Any user name with the password ``wrong`` is refused, and the form is shown again.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any, ClassVar

from connector.hookspecs import BankInfo, ConsentSession, Flow, ProviderServices
from connector.types import (
    Account,
    AccountRead,
    ActionRequired,
    ChooseAccounts,
    Choice,
    Declined,
    Done,
    Failed,
    Field,
    FlowEvent,
    Form,
    Grant,
    ProviderError,
    Redirect,
    Step,
    StepResult,
    TemporaryError,
    Wait,
)
from plugins.demobank import mapping

OTP = "123456"
APPROVE_AFTER_POLLS = 2


def sign_in_form(bank: BankInfo, error: str | None = None, user: str | None = None) -> Form:
    return Form(
        title=f"Sign in to {bank.name}",
        intro="Use the details you use for online banking. Demo Bank is a test bank: any name works.",
        fields=(
            Field("username", "User name", autocomplete="username", value=user),
            Field("password", "Password", kind="password"),
        ),
        action="sign_in",
        submit_label="Sign in",
        error=error,
    )


def otp_form(error: str | None = None) -> Form:
    return Form(
        title="Enter your security code",
        intro="We've sent a 6-digit code to your phone. Demo Bank's code is 123456.",
        fields=(Field("code", "Security code", kind="otp", pattern=r"\d{6}",
                      description="The 6 digits from the text message"),),
        action="verify",
        submit_label="Confirm",
        error=error,
        field_errors={"code": error} if error else {},
        step=Step.VERIFY,
        secondary_actions=(Choice("resend", "Send a new code"),),
    )


class DemoBank:
    name: ClassVar[str] = "demobank"
    title: ClassVar[str] = "Demo Bank"
    template_dir: ClassVar[Path | None] = None

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
        for key in config:
            if key != "history_days":
                yield key, "unknown key (Demo Bank takes only history_days)"
        days = config.get("history_days", 90)
        if not isinstance(days, int) or not 1 <= days <= 3650:
            yield "history_days", "must be a whole number of days from 1 to 3650"

    @classmethod
    def check_bank(cls, bank: BankInfo) -> Iterable[tuple[str, str]]:
        if bank.options:
            yield "options", "Demo Bank takes no options"

    def __init__(self, config: Mapping[str, Any], services: ProviderServices) -> None:
        self.history = timedelta(days=config.get("history_days", 90))
        self.services = services

    async def start(self, flow: Flow) -> StepResult:
        return sign_in_form(flow.bank)

    async def resume(self, flow: Flow, event: FlowEvent) -> StepResult:
        state = flow.state
        if event.kind == "cancel":
            return Failed(Declined("demobank_cancelled", "You cancelled."))
        if event.kind == "submit" and event.action == "sign_in":
            return await self._sign_in(flow, event.first("username").strip().lower(), event.first("password"))
        if event.kind == "submit" and event.action == "verify":
            if event.first("code") != OTP:
                return otp_form("That code isn't right. Check the text message and try again.")
            return self._accounts(state)
        if event.kind == "submit" and event.action == "resend":
            return otp_form()
        if event.kind == "callback":
            if event.first("result") != "approve":
                return Failed(Declined("demobank_denied", "You didn't allow access at Demo Bank."))
            return self._accounts(state)
        if event.kind == "poll":
            state["polls"] = state.get("polls", 0) + 1
            if state["polls"] < APPROVE_AFTER_POLLS:
                return self._waiting()
            return self._accounts(state)
        if event.kind == "choose_accounts":
            # The consent covers what the person ticked; on re-authorisation every account is offered again.
            chosen = set(event.values.get("account", ()))
            accounts = [a for a in mapping.accounts_for(state["user"]) if a.provider_account_id in chosen]
            return Done(Grant(
                secrets={"user": state["user"], "token": secrets.token_urlsafe(16)},
                accounts=accounts,
                provider_consent_id=state["user"],
            ))
        return Failed(ProviderError("demobank_unexpected", "Something unexpected happened. Please start again."))

    async def _sign_in(self, flow: Flow, user: str, password: str) -> StepResult:
        if password == "wrong":
            return sign_in_form(flow.bank, "Your bank didn't accept these details. Check them and try again.", user)
        if user == "locked":
            return Failed(ActionRequired("demobank_locked", "Your online banking is locked. Contact Demo Bank to "
                                         "unlock it, then try again."))
        if user == "down":
            return Failed(TemporaryError("demobank_unavailable", "Demo Bank isn't available right now. Please try "
                                         "again in a few minutes.", retry_after=60))
        flow.state["user"] = user
        if user == "otp":
            return otp_form()
        if user == "redirect":
            state = await flow.issue_state()
            return Redirect(f"{self.services.callback_url()}?state={state}&result=approve",
                            "Demo Bank's own page opens next, where you approve access.")
        if user == "decoupled":
            return self._waiting()
        return self._accounts(flow.state)

    def _waiting(self) -> Wait:
        return Wait("Approve in your banking app", "Open the Demo Bank app on your phone and approve the request. "
                    "This page continues by itself once you have.")

    def _accounts(self, state: dict[str, Any]) -> StepResult:
        return ChooseAccounts(mapping.accounts_for(state["user"]))

    async def list_accounts(self, consent: ConsentSession) -> Sequence[Account]:
        return mapping.accounts_for(self._user(consent))

    async def read_account(self, consent: ConsentSession, account: Account, since: date,
                           sync_point: str | None) -> AccountRead:
        user = self._user(consent)
        today = date.today()
        first = date.fromisoformat(sync_point) if sync_point else max(since, today - self.history)
        booked = mapping.transactions_between(account.provider_account_id, first, today - timedelta(days=1))
        return AccountRead(
            balance=mapping.balance_for(user, account.provider_account_id, today - timedelta(days=1)),
            booked=booked,
            sync_point=today.isoformat(),
        )

    def _user(self, consent: ConsentSession) -> str:
        user = consent.secrets.get("user")
        if not user or consent.secrets.get("revoked"):
            raise ActionRequired("demobank_consent_lost", "Your Demo Bank connection has ended. Reconnect it.")
        if user == "expire":
            raise ActionRequired("demobank_consent_expired", "Your Demo Bank consent has expired. Reconnect it.")
        return str(user)

    async def revoke(self, consent: ConsentSession) -> None:
        await consent.save_secrets({"revoked": True})

    async def close(self) -> None:
        return None
