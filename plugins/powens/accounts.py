"""The end of a journey: the account page, the one activation call, the permanent user and the grant (§7, §11
steps 8-13, §12 step 6)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from connector.hookspecs import Flow
from connector.types import Choice, ChooseAccounts, Done, Failed, FlowEvent, Grant, StepResult

from . import errors, mapping
from .client import PowensAPIError, PowensBadAnswer, PowensClient, Retry
from .config import Settings, bank_options
from .tokens import token_from

log = logging.getLogger("plugins.powens")

ACTION_ADD_SOURCE = "add_source"


class JourneyCall(Protocol):
    """A Powens call with the journey's token (temporary user, or the consent's permanent one)."""

    def __call__(self, flow: Flow, method: str, path: str, **kwargs: Any) -> Awaitable[Any]: ...


class AccountSteps:
    def __init__(self, settings: Settings, client: PowensClient, call: JourneyCall) -> None:
        self._settings = settings
        self._client = client
        self._call = call

    async def listed(self, flow: Flow, params: Mapping[str, str]) -> list[dict[str, Any]]:
        try:
            answer = await self._call(
                flow, "GET", f"/users/me/connections/{flow.state['connection_id']}/accounts", params=params
            )
        except PowensAPIError as exc:
            if exc.code_cf == "noaccount":  # no account at all (400 or 409 depending on the spec, §7.1)
                return []
            raise
        return accounts_of(answer)

    async def choose(self, flow: Flow, *, more: bool, error: str | None = None) -> StepResult:
        """Every account of the connection, ``?all`` included, nothing ticked (§7.2); "Add more accounts" while an
        enabled source remains (§11 step 9)."""
        st = flow.state
        options = bank_options(flow.bank)
        accounts = mapping.accounts(
            await self.listed(flow, {"all": ""}), connector_uuid=connector_uuid(flow),
            account_types=options.account_types,
        )
        st["phase"], st["offered"] = "choose", [a.provider_account_id for a in accounts]
        more = more and options.offer_more_sources
        # The heading already says "Choose the accounts to share with Sage": the intro only adds what is new.
        intro = (
            "Some accounts, such as savings, need a separate sign-in. To add them, select Add more accounts."
            if more else None
        )
        if not accounts and error is None:
            error = "Your bank didn't share any account yet."
        return ChooseAccounts(
            accounts=accounts,
            intro=intro,
            preselected=False,
            selected=[i for i in st.get("chosen") or () if i in st["offered"]],
            secondary_actions=(Choice(ACTION_ADD_SOURCE, "Add more accounts"),) if more else (),
            error=error,
        )

    async def activate(
        self, flow: Flow, event: FlowEvent, again: Callable[[str], Awaitable[StepResult]]
    ) -> StepResult:
        """Activate the chosen accounts in one call, make the user permanent, check, and hand over the grant.

        :param again: shows the account page again with an error.
        """
        st = flow.state
        chosen = list(dict.fromkeys(str(v) for v in event.values.get("account", [])))
        if not chosen:
            return await again("Choose at least one account to continue.")
        if not set(chosen) <= set(st.get("offered") or ()):
            return await again("Choose from the accounts listed.")
        connection_id = st["connection_id"]
        # One call, after every source the person wanted has been added (§7.2).
        await self._call(
            flow, "PUT", f"/users/me/connections/{connection_id}/accounts/{','.join(chosen)}",
            params={"all": ""}, body={"disabled": False},
        )
        permanent = await self.make_permanent(flow)
        answer = await self._client.request("GET", f"/users/me/connections/{connection_id}/accounts", token=permanent)
        uuid = connector_uuid(flow)
        # No type filter: every enabled account must be one the person chose, or the check below fails.
        enabled = mapping.accounts(accounts_of(answer), connector_uuid=uuid)
        if {a.provider_account_id for a in enabled} != set(chosen):
            log.error("powens activated accounts differ from the choice", extra={"connection_id": connection_id})
            return Failed(errors.provider_error("powens_accounts_mismatch"))
        st.pop("token", None)  # the temporary token is spent; the permanent one only goes to the core's grant
        st["phase"] = "done"
        return Done(
            Grant(
                secrets={
                    "token": permanent,
                    "id_user": st.get("id_user"),
                    "connection_id": connection_id,
                    "connector_uuid": uuid,
                },
                accounts=enabled,
                provider_consent_id=str(connection_id),
                expires_at=mapping.parse_datetime(st.get("expires_at")),
            )
        )

    async def make_permanent(self, flow: Flow) -> str:
        """``POST /auth/token/access`` with the temporary token as ``code``; on a 400/401, a temporary code from
        ``/auth/token/code`` is exchanged once instead (§16 OP-4)."""

        async def exchange(code: str) -> str:
            answer = await self._client.request(
                "POST", "/auth/token/access",
                body={
                    "grant_type": "authorization_code",
                    "client_id": self._settings.client_id,
                    "client_secret": self._settings.client_secret,
                    "code": code,
                },
                retry=Retry.THROTTLE,
            )
            token = token_from(answer)
            if not token:
                raise PowensBadAnswer("no token in the exchange answer")
            return token

        try:
            return await exchange(flow.state["token"])
        except PowensAPIError as exc:
            if exc.status not in (400, 401):
                raise
        answer = await self._call(flow, "GET", "/auth/token/code", params={"type": "singleAccess"})
        code = answer.get("code") if isinstance(answer, dict) else None
        if not isinstance(code, str) or not code:
            raise PowensBadAnswer("no temporary code")
        return await exchange(code)

    async def finish_reauth(self, flow: Flow) -> StepResult:
        """The connection is fine again: same connection, same accounts, nothing activated (§12)."""
        consent = flow.consent
        assert consent is not None
        st = flow.state
        accounts = mapping.accounts(await self.listed(flow, {}), connector_uuid=connector_uuid(flow))
        st["phase"] = "done"
        return Done(
            Grant(
                secrets=dict(consent.secrets),  # re-read: a renewal during the journey replaced the token
                accounts=accounts or list(flow.linked_accounts),
                provider_consent_id=str(st["connection_id"]),
                expires_at=mapping.parse_datetime(st.get("expires_at")),
            )
        )


def accounts_of(answer: Any) -> list[dict[str, Any]]:
    found = mapping.account_list(answer)
    if found is None:
        raise PowensBadAnswer("no accounts list")
    return found


def connector_uuid(flow: Flow) -> str:
    return mapping.connector_uuid(
        flow.consent.secrets if flow.consent is not None else None, flow.state.get("connector"),
        flow.bank.provider_bank,
    )
