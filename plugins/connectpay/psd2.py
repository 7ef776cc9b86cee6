"""psd2 mode: OAuth authorization code at ConnectPay's own page, rotating refresh tokens, AIS reads on the mTLS host.

Journey (connectpay.md §3.2): ``start`` → :class:`Redirect` to the authorize URL → the core checks and consumes
``state`` and hands us the callback → code exchange → account list → :class:`ChooseAccounts` → :class:`Done`.

Consent secrets (stored encrypted by the core)::

    {"mode": "psd2", "access_token", "access_expires_at", "refresh_token", "refresh_expires_at",
     "scope", "customer_name"}
"""

from __future__ import annotations

import base64
import logging
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from connector.hookspecs import ConsentSession, Flow
from connector.types import (
    Account,
    AccountRead,
    ChooseAccounts,
    Done,
    Failed,
    FlowEvent,
    Grant,
    JourneyKind,
    ProviderError,
    Redirect,
    StepResult,
    TemporaryError,
)
from plugins.connectpay import errors
from plugins.connectpay.client import Reply
from plugins.connectpay.mapping import (
    AccountRecord,
    MappingError,
    TokenSet,
    parse_accounts,
    parse_balance_list,
    parse_datetime,
    parse_token_response,
    parse_transactions,
)
from plugins.connectpay.runtime import (
    Runtime,
    account_to_state,
    chosen,
    iso,
    ledger_balance,
    match_linked,
    missing_linked,
    names,
    next_sync_point,
    offered_accounts,
    read_all_pages,
    window_start,
)

log = logging.getLogger("plugins.connectpay.psd2")

SKEW = timedelta(seconds=60)  # expiry instants are counted from when the request was sent, minus this (§3.5)
REFRESH_MARGIN = timedelta(seconds=120)  # refresh before a data call whose token expires this soon (§3.6)
DEFAULT_ACCESS = timedelta(hours=1)
DEFAULT_REFRESH = timedelta(days=30)
EXPLANATION = "ConnectPay's own page opens next, where you sign in and choose what to share."


class Psd2:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._reads: dict[str, deque[datetime]] = {}

    # --- journey ------------------------------------------------------------------------------------------------

    def authorize_url(self, state: str, nonce: str) -> str:
        """The authorize URL (§3.3), parameters in the documented order, ``flowId`` spelled as configured."""
        p = self.rt.settings.psd2
        params = [
            ("client_id", self.rt.settings.client_id),
            (p.flow_id_param, "GetPSD2AuthCode"),
            ("nonce", nonce),
            ("scope", p.scope),
            ("state", state),
            ("redirect_url", self.rt.callback_url),
            ("response_type", "code"),
        ]
        return f"{p.authorize_url}?{urlencode(params, quote_via=quote)}"

    async def start(self, flow: Flow) -> StepResult:
        # The core issues, stores and later consumes state; the nonce is ours (GUID v4, anti-replay at ConnectPay).
        nonce = str(uuid.uuid4())
        state = await flow.issue_state()
        flow.state.update({"mode": "psd2", "step": "authorize", "nonce": nonce})
        return Redirect(url=self.authorize_url(state, nonce), explanation=EXPLANATION,
                        button_label="Continue to ConnectPay")

    async def resume(self, flow: Flow, event: FlowEvent) -> StepResult:
        step = flow.state.get("step")
        if event.kind == "cancel":
            await self._drop_tokens(flow)
            return Failed(errors.cancelled())
        if event.kind == "callback" and step == "authorize":
            return await self._callback(flow, event)
        if event.kind == "choose_accounts" and step == "choose":
            return self._choose(flow, event)
        log.warning("psd2 event out of step", extra={"event": event.kind, "step": step})
        await self._drop_tokens(flow)
        return Failed(errors.session_out_of_step())

    async def _callback(self, flow: Flow, event: FlowEvent) -> StepResult:
        # One callback per journey: from here on a replayed callback is out of step (state is single use too).
        flow.state["step"] = "exchanging"
        error = event.first("error")
        if error:
            log.info("ConnectPay callback carried an error", extra={"error": error[:40]})
            return Failed(errors.denied() if error == "access_denied" else errors.callback_error(detail=error[:200]))
        issuer = event.first("iss")
        if issuer and not self._expected_issuer(issuer):
            # RFC 9207 mix-up defence (security.md O3): a foreign issuer's code is never exchanged.
            log.warning("ConnectPay callback with a foreign issuer refused")
            return Failed(errors.callback_error(detail="unexpected iss"))
        code = event.first("code")
        if not code:
            return Failed(errors.callback_error(detail="callback without code"))
        try:
            tokens, sent_at = await self._exchange(code)
            secrets = self._secrets(tokens, sent_at, None)
        except ProviderError as exc:
            return Failed(exc)
        if tokens.scope is not None and "psd2-ais" not in tokens.scope.split():
            await self._revoke_token(secrets["refresh_token"])
            return Failed(errors.scope_missing())
        try:
            records = await self._link_time_accounts(secrets["access_token"], flow.client_ip)
        except ProviderError as exc:
            await self._revoke_token(secrets["refresh_token"])  # no orphan grant at ConnectPay
            return Failed(exc)
        offered = [r.account for r in records if r.offered]

        if flow.kind is JourneyKind.REAUTHORISATION and flow.consent is not None:
            return await self._finish_reauthorisation(flow, flow.consent, secrets, offered)
        if not offered:
            await self._revoke_token(secrets["refresh_token"])
            return Failed(errors.no_accounts())
        flow.state.update({"step": "choose", "tokens": secrets, "offered": [account_to_state(a) for a in offered]})
        return self._choice(secrets, offered)

    def _expected_issuer(self, issuer: str) -> bool:
        """``iss`` must name the server we sent the person to (its origin or the 1-way base URL)."""
        parts = urlsplit(self.rt.settings.psd2.authorize_url)
        expected = {f"{parts.scheme}://{parts.netloc}", self.rt.settings.tls_base_url}
        return issuer.rstrip("/") in {e.rstrip("/") for e in expected}

    def _choice(self, secrets: Mapping[str, Any], offered: Sequence[Account], error: str | None = None
                ) -> ChooseAccounts:
        customer = secrets.get("customer_name")
        intro = f"Accounts of {customer} at ConnectPay." if customer else None
        return ChooseAccounts(accounts=offered, intro=intro, error=error)

    def _choose(self, flow: Flow, event: FlowEvent) -> StepResult:
        offered = offered_accounts(flow.state)
        picked = chosen(offered, event.values.get("account", ()))
        secrets = flow.state.get("tokens") or {}
        if not picked:
            return self._choice(secrets, offered, error="Choose at least one account to share.")
        flow.state["step"] = "done"
        flow.state.pop("tokens", None)  # handed to the core in the grant; no copy stays in the journey
        # Grant.accounts = the chosen accounts: the consent we keep is what the person agreed to share with Sage
        # (the ConnectPay token reaches the whole Customer, but unchosen accounts must not reach the PATCH).
        return Done(Grant(secrets=secrets, accounts=picked, provider_consent_id=None,
                          expires_at=parse_datetime(secrets.get("refresh_expires_at"))))

    async def _finish_reauthorisation(
        self, flow: Flow, consent: ConsentSession, secrets: dict[str, Any], offered: list[Account]
    ) -> StepResult:
        """§3.10: accept only if every linked account is reachable; store the new pair, then revoke the old one."""
        missing = missing_linked(flow.linked_accounts, offered)
        if missing:
            await self._revoke_token(secrets["refresh_token"])
            return Failed(errors.accounts_missing(names(missing)))
        async with consent.lock():
            old = consent.secrets.get("refresh_token")
            # Saved before the old token is revoked, so a feed run never finds a revoked token in storage.
            await consent.save_secrets(secrets)
        if old and old != secrets["refresh_token"]:
            await self._revoke_token(old)
        flow.state["step"] = "done"
        return Done(Grant(secrets=secrets, accounts=match_linked(flow.linked_accounts, offered),
                          provider_consent_id=consent.provider_consent_id,
                          expires_at=parse_datetime(secrets.get("refresh_expires_at"))))

    async def _drop_tokens(self, flow: Flow) -> None:
        tokens = flow.state.pop("tokens", None)
        if isinstance(tokens, Mapping) and tokens.get("refresh_token"):
            await self._revoke_token(tokens["refresh_token"])

    async def _link_time_accounts(self, access_token: str, client_ip: str) -> list[AccountRecord]:
        reply = await self.rt.mtls.call(
            "GET", self.rt.settings.psd2.accounts_path, params={"withBalance": "true"},
            headers={"Authorization": f"Bearer {access_token}", "PSU-IP-Address": client_ip},
        )
        if reply.status in (401, 403):
            # A fresh token refused: the DevApp lacks the AIS product or the read path is wrong (OP-7).
            log.error("ConnectPay refused a fresh token on the accounts read", extra={"status": reply.status})
            raise errors.client_refused(reply.detail())
        return self._accounts(reply)

    # --- tokens -------------------------------------------------------------------------------------------------

    def _basic(self) -> str:
        raw = f"{self.rt.settings.client_id}:{self.rt.settings.client_secret}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    async def _post_token(self, form: Mapping[str, str]) -> tuple[Reply, datetime]:
        sent_at = self.rt.now()
        reply = await self.rt.mtls.call("POST", self.rt.settings.psd2.token_path, form=form,
                                        headers={"Authorization": self._basic()})
        return reply, sent_at

    def _tokens(self, reply: Reply) -> TokenSet:
        try:
            return parse_token_response(reply.json())
        except MappingError as exc:
            log.error("ConnectPay token answer not understood", extra={"json_path": exc.path})
            raise errors.unreadable(f"token answer: {exc.path}") from None

    async def _exchange(self, code: str) -> tuple[TokenSet, datetime]:
        reply, sent_at = await self._post_token({"grant_type": "authorization_code", "code": code})
        if reply.ok:
            return self._tokens(reply), sent_at
        error, _ = reply.error()
        if error in ("invalid_client", "unauthorized_client") or reply.status == 401:
            log.error("ConnectPay refused our client credentials", extra={"status": reply.status})
            raise errors.client_refused(reply.detail())
        if error == "invalid_grant":
            raise errors.code_refused(reply.detail())
        raise errors.request_refused(reply.detail())

    def _secrets(self, tokens: TokenSet, sent_at: datetime, previous: Mapping[str, Any] | None) -> dict[str, Any]:
        access_life = timedelta(seconds=tokens.expires_in) if tokens.expires_in else DEFAULT_ACCESS
        secrets: dict[str, Any] = {
            "mode": "psd2",
            "access_token": tokens.access_token,
            "access_expires_at": iso(sent_at + access_life - SKEW),
            "scope": tokens.scope or (previous or {}).get("scope"),
            "customer_name": tokens.customer_name or (previous or {}).get("customer_name"),
        }
        if tokens.refresh_token:
            refresh_life = (timedelta(seconds=tokens.refresh_expires_in) if tokens.refresh_expires_in
                            else DEFAULT_REFRESH)
            secrets["refresh_token"] = tokens.refresh_token
            secrets["refresh_expires_at"] = iso(sent_at + refresh_life - SKEW)
        elif previous is not None:  # tolerance: an answer without a new refresh token keeps the old one (§3.6)
            secrets["refresh_token"] = previous.get("refresh_token")
            secrets["refresh_expires_at"] = previous.get("refresh_expires_at")
        else:
            raise errors.unreadable("token answer without refresh_token")
        return secrets

    def _needs_refresh(self, secrets: Mapping[str, Any]) -> bool:
        expires = parse_datetime(secrets.get("access_expires_at"))
        return not secrets.get("access_token") or expires is None or expires - self.rt.now() < REFRESH_MARGIN

    async def access_token(self, consent: ConsentSession, *, rejected: str | None = None) -> str:
        """A usable access token, refreshing under the consent lock when it expires within 120 s, or when
        ``rejected`` (a token ConnectPay just answered 401 to) is still the stored one (O8, §3.6)."""
        current = consent.secrets
        if rejected is None and not self._needs_refresh(current):
            return str(current["access_token"])
        async with consent.lock():
            current = dict(consent.secrets)  # re-read: another task may have refreshed while we waited
            if rejected is not None and current.get("access_token") not in (None, rejected):
                return str(current["access_token"])
            if rejected is None and not self._needs_refresh(current):
                return str(current["access_token"])
            fresh = await self._refresh(current)
            # Rotation invalidated the old refresh token: persist the new pair before anything uses it.
            await consent.save_secrets(fresh)
            return str(fresh["access_token"])

    async def _refresh(self, secrets: Mapping[str, Any]) -> dict[str, Any]:
        refresh_token = secrets.get("refresh_token")
        if not refresh_token:
            raise errors.consent_lost("no refresh token stored")
        expires = parse_datetime(secrets.get("refresh_expires_at"))
        if expires is not None and expires <= self.rt.now():
            raise errors.consent_expired()  # lapsed by our clock: no call is made (§9)
        form = {"grant_type": "refresh_token", "refresh_token": str(refresh_token)}
        after_timeout = False
        try:
            reply, sent_at = await self._post_token(form)
        except TemporaryError as exc:
            if exc.code != "connectpay_timeout":
                raise
            # The first try may have rotated the token at ConnectPay; one retry tells us (§3.6).
            after_timeout = True
            reply, sent_at = await self._post_token(form)
        if reply.ok:
            return self._secrets(self._tokens(reply), sent_at, secrets)
        error, _ = reply.error()
        if error == "invalid_grant":
            log.warning("ConnectPay refused the refresh token" + (" after timeout" if after_timeout else ""))
            raise errors.consent_lost(reply.detail())
        if error in ("invalid_client", "unauthorized_client") or reply.status == 401:
            log.error("ConnectPay refused our client credentials", extra={"status": reply.status})
            raise errors.client_refused(reply.detail())
        raise errors.request_refused(reply.detail())

    async def _revoke_token(self, refresh_token: str | None) -> None:
        """RFC 7009 revoke (OP-6). Never raises: failures are logged and the caller erases secrets anyway."""
        if not refresh_token:
            return
        try:
            reply = await self.rt.mtls.call(
                "POST", self.rt.settings.psd2.revoke_path,
                form={"token": refresh_token, "token_type_hint": "refresh_token"},
                headers={"Authorization": self._basic()},
            )
        except ProviderError as exc:
            log.warning("ConnectPay revoke failed", extra={"code": exc.code})
            return
        error, _ = reply.error()
        if reply.ok or error in ("invalid_token", "invalid_grant"):
            return
        log.warning("ConnectPay revoke refused", extra={"status": reply.status, "code": error})

    async def revoke(self, consent: ConsentSession) -> None:
        async with consent.lock():
            await self._revoke_token(consent.secrets.get("refresh_token"))

    # --- feed ---------------------------------------------------------------------------------------------------

    async def _authed(self, consent: ConsentSession, template: str, **kwargs: Any) -> Reply:
        """A data call with the consent's access token: refresh first when due; after a 401, refresh once and retry
        once; a second 401, or a 403, means the consent is lost (§7.2)."""
        token = await self.access_token(consent)
        reply = await self.rt.mtls.call("GET", template, headers={"Authorization": f"Bearer {token}"}, **kwargs)
        if reply.status == 401:
            token = await self.access_token(consent, rejected=token)
            reply = await self.rt.mtls.call("GET", template, headers={"Authorization": f"Bearer {token}"}, **kwargs)
            if reply.status == 401:
                raise errors.consent_lost(reply.detail())
        if reply.status == 403:
            raise errors.consent_lost(reply.detail())
        return reply

    def _accounts(self, reply: Reply) -> list[AccountRecord]:
        if not reply.ok:
            raise self._data_failure(reply)
        try:
            return parse_accounts(reply.json(), read_at=self.rt.now())
        except MappingError as exc:
            log.error("ConnectPay accounts answer not understood", extra={"json_path": exc.path})
            raise errors.unreadable(f"accounts: {exc.path}") from None

    @staticmethod
    def _data_failure(reply: Reply) -> ProviderError:
        if reply.status == 404:
            return errors.account_unavailable(reply.detail())
        if reply.status in (401, 403):
            return errors.consent_lost(reply.detail())
        log.error("ConnectPay refused a data request", extra={"status": reply.status, "path": reply.template})
        return errors.request_refused(reply.detail())

    async def _records(self, consent: ConsentSession) -> list[AccountRecord]:
        reply = await self._authed(consent, self.rt.settings.psd2.accounts_path, params={"withBalance": "true"})
        return self._accounts(reply)

    async def list_accounts(self, consent: ConsentSession) -> list[Account]:
        return [r.account for r in await self._records(consent) if r.offered]

    def _count_read(self, account: Account) -> None:
        """At most ``max_unattended_reads_per_day`` feed reads per account in any 24 h (OP-25; 0 = no cap)."""
        cap = self.rt.settings.psd2.max_unattended_reads_per_day
        if cap <= 0:
            return
        now = self.rt.now()
        reads = self._reads.setdefault(account.provider_account_id, deque())
        while reads and now - reads[0] >= timedelta(days=1):
            reads.popleft()
        if len(reads) >= cap:
            wait = (reads[0] + timedelta(days=1) - now).total_seconds()
            raise TemporaryError("connectpay_read_cap",
                                 "This account was read as often as ConnectPay allows today. It is read again later.",
                                 retry_after=max(wait, 1.0))
        reads.append(now)

    async def read_account(
        self, consent: ConsentSession, account: Account, since: date, sync_point: str | None
    ) -> AccountRead:
        self._count_read(account)
        p = self.rt.settings.psd2
        records = await self._records(consent)
        record = next((r for r in records if r.account.provider_account_id == account.provider_account_id), None)
        if record is None or not record.offered:
            raise errors.account_unavailable("account not in the consent's account list, or not enabled")
        ledger = record.ledger
        if p.balances_path:
            reply = await self._authed(consent, p.balances_path, path_params={"accountId": record.resource_id})
            if not reply.ok:
                raise self._data_failure(reply)
            try:
                ledger = parse_balance_list(reply.json(), record.account.currency, self.rt.now()) or ledger
            except MappingError as exc:
                raise errors.unreadable(f"balances: {exc.path}") from None

        start = window_start(since, sync_point, p.overlap_days)

        async def fetch(url: str | None, page_no: int) -> Reply:
            if url is not None:
                return await self._authed(consent, p.transactions_path, url=url)
            params = {"dateFrom": start.isoformat(), "sortOrder": "asc", "pageNo": str(page_no),
                      "pageSize": str(p.page_size)}
            return await self._authed(consent, p.transactions_path, path_params={"accountId": record.resource_id},
                                      params=params)

        entries = await read_all_pages(self.rt.mtls, fetch, p.page_size, self._data_failure)
        try:
            booked = parse_transactions(entries, record.currency_filter)
        except MappingError as exc:
            log.error("ConnectPay transaction not understood", extra={"json_path": exc.path})
            raise errors.unreadable(f"transactions: {exc.path}") from None
        return AccountRead(balance=ledger_balance(ledger, booked, start), booked=booked,
                           sync_point=next_sync_point(booked, sync_point, start))

