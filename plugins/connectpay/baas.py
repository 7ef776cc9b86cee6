"""baas mode (BaaS with integrated SCA): our own sign-in form, an SMS code checked through the API, then
partner-level reads for the feed (connectpay.md §4).

Journey: sign-in :class:`Form` → login (S1) → send SMS (S2) → code :class:`Form` → verify (S3, ``finalised``) →
user accounts (S4) → :class:`ChooseAccounts` → logout (S6) → :class:`Done`. The user token (5 minutes) lives only in
``flow.state``, which the core stores encrypted; it is refreshed (S5) when less than 60 s are left, and a session
idle past its expiry makes the person sign in again. Passwords and codes are never stored, logged or re-rendered.

Consent secrets::

    {"mode": "baas", "user_id", "accounts": {provider_account_id: client_id}, "client_ids": [...], "proof_at"}
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping, Sequence
from datetime import date, timedelta
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from connector.hookspecs import ConsentSession, Flow
from connector.types import (
    Account,
    AccountRead,
    ActionRequired,
    Choice,
    ChooseAccounts,
    Done,
    Failed,
    Field,
    FlowEvent,
    Form,
    Grant,
    JourneyKind,
    ProviderError,
    Step,
    StepResult,
    TemporaryError,
)
from plugins.connectpay import errors
from plugins.connectpay.client import Reply
from plugins.connectpay.mapping import (
    AccountRecord,
    MappingError,
    parse_accounts,
    parse_baas_login,
    parse_datetime,
    parse_sca_verify,
    parse_transactions,
    parse_user_status,
    parse_user_tokens,
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

log = logging.getLogger("plugins.connectpay.baas")

REFRESH_MARGIN = timedelta(seconds=60)  # refresh the 5-minute user token when less than this is left (§4.3)
USER_TOKEN_LIFE = timedelta(minutes=5)
WRONG_CREDENTIALS = "The email or password is not right. Check them and try again."
OTP_PATTERN = r"[0-9]{4,8}"


class _SessionEnded(Exception):
    """The ConnectPay user session is over (idle past its expiry, or refused): the person signs in again."""


def encrypt_password(key: rsa.RSAPublicKey, password: str, scheme: str) -> str:
    """RSA-encrypt the password with ConnectPay's public key and standard base64 (B3, OP-20)."""
    if scheme == "pkcs1v15":
        pad: padding.AsymmetricPadding = padding.PKCS1v15()
    else:
        algorithm = hashes.SHA1() if scheme == "oaep-sha1" else hashes.SHA256()
        pad = padding.OAEP(mgf=padding.MGF1(algorithm), algorithm=algorithm, label=None)
    return base64.b64encode(key.encrypt(password.encode("utf-8"), pad)).decode("ascii")


def sign_in_form(email: str | None = None, error: str | None = None,
                 field_errors: Mapping[str, str] | None = None) -> Form:
    return Form(
        title="Sign in to ConnectPay",
        intro="Use the email and password of your ConnectPay user. They are sent to ConnectPay only; we never "
              "keep your password.",
        fields=(
            Field("email", "Email address", kind="email", autocomplete="username", value=email),
            Field("password", "Password", kind="password", autocomplete="current-password"),
        ),
        action="sign_in",
        submit_label="Sign in",
        error=error,
        field_errors=dict(field_errors or {}),
        step=Step.SIGN_IN,
    )


def otp_form(error: str | None = None, *, intro: str | None = None, can_resend: bool = True) -> Form:
    return Form(
        title="Enter the code from your text message",
        intro=intro or "ConnectPay sent a code by text message to the phone of your ConnectPay user.",
        fields=(Field("otp", "Code", kind="otp", autocomplete="one-time-code", pattern=OTP_PATTERN,
                      description="Digits only, as in the text message."),),
        action="verify",
        submit_label="Confirm",
        error=error,
        field_errors={"otp": error} if error else {},
        step=Step.VERIFY,
        secondary_actions=(Choice("resend", "Send a new code"),) if can_resend else (),
    )


class Baas:
    def __init__(self, rt: Runtime, public_key: rsa.RSAPublicKey) -> None:
        self.rt = rt
        self.s = rt.settings.baas
        self._public_key = public_key

    # --- headers ------------------------------------------------------------------------------------------------

    def _partner_key(self) -> str:
        raw = base64.b64encode(f"{self.s.client_key}:{self.s.client_secret}".encode()).decode()
        return f"{self.s.api_key_prefix}{raw}"

    def _partner(self, client_ip: str | None = None) -> dict[str, str]:
        headers = {"x-connectpay-api-key": self._partner_key()}
        if client_ip:
            headers[self.s.ip_header] = client_ip
        return headers

    def _user(self, flow: Flow, token: str) -> dict[str, str]:
        # User calls carry the user's Bearer, the person's IP and the partner key too (B1, B4, OP-17).
        return {"Authorization": f"Bearer {token}", **self._partner(flow.client_ip)}

    # --- journey ------------------------------------------------------------------------------------------------

    async def start(self, flow: Flow) -> StepResult:
        flow.state.update({"mode": "baas", "step": "sign_in", "credential_attempts": 0, "resends": 0})
        return sign_in_form()

    async def resume(self, flow: Flow, event: FlowEvent) -> StepResult:
        step = flow.state.get("step")
        if event.kind == "cancel":
            await self._logout(flow)
            return Failed(errors.cancelled())
        try:
            if event.kind == "submit" and event.action == "sign_in" and step == "sign_in":
                return await self._sign_in(flow, event)
            if event.kind == "submit" and event.action == "verify" and step == "otp":
                return await self._verify(flow, event)
            if event.kind == "submit" and event.action == "resend" and step == "otp":
                return await self._resend(flow)
            if event.kind == "choose_accounts" and step == "choose":
                return await self._choose(flow, event)
        except _SessionEnded:
            await self._logout(flow)
            self._restart(flow)
            return sign_in_form(flow.state.get("email"),
                                error="Your ConnectPay session ended after a few minutes without activity. "
                                      "Please sign in again.")
        except ProviderError as exc:
            await self._logout(flow)
            return Failed(exc)
        log.warning("baas event out of step", extra={"event": event.kind, "action": event.action, "step": step})
        await self._logout(flow)
        return Failed(errors.session_out_of_step())

    def _restart(self, flow: Flow) -> None:
        for key in ("event_id", "wrong_otps", "user", "offered", "accounts"):
            flow.state.pop(key, None)
        flow.state["step"] = "sign_in"

    async def _sign_in(self, flow: Flow, event: FlowEvent) -> StepResult:
        email = event.first("email").strip()
        password = event.first("password")
        if not email or not password:
            missing = {k: "Enter your " + ("email address" if k == "email" else "password")
                       for k, v in (("email", email), ("password", password)) if not v}
            return sign_in_form(email, error="Some details are missing.", field_errors=missing)
        attempts = int(flow.state.get("credential_attempts", 0))
        if attempts >= self.s.max_credential_attempts:
            return Failed(errors.too_many_attempts())  # protects the person's ConnectPay user from a lock-out
        flow.state["credential_attempts"] = attempts + 1
        flow.state["email"] = email
        body = {"email": email, "password": encrypt_password(self._public_key, password, self.s.password_padding)}
        del password
        try:
            reply = await self.rt.tls.call("POST", self.s.login_path, json_body=body,
                                           headers=self._partner(flow.client_ip))
        except TemporaryError as exc:
            return sign_in_form(email, error=exc.message)
        if reply.status == 401:
            log.error("ConnectPay refused our partner key at login")
            return Failed(errors.client_refused(reply.detail()))
        if not reply.ok:
            return sign_in_form(email, error=WRONG_CREDENTIALS)  # neutral: never say which field was wrong
        try:
            login = parse_baas_login(reply.json())
        except MappingError as exc:
            return Failed(errors.unreadable(f"login: {exc.path}"))
        if not login.challenge_required:
            # The second factor is mandatory: without a finalised SCA nothing proves the accounts are theirs.
            log.warning("ConnectPay login answered without an SCA challenge; not linking",
                        extra={"tokens": login.has_tokens})
            return Failed(errors.sca_missing())
        flow.state.update({"event_id": login.authorisation_event_id, "wrong_otps": 0})
        sent = await self._send_code(flow)
        flow.state["step"] = "otp"
        if sent is not None:
            return otp_form(sent, can_resend=self._can_resend(flow))
        return otp_form(can_resend=self._can_resend(flow))

    async def _send_code(self, flow: Flow) -> str | None:
        """S2: ask ConnectPay to text a code. Returns an error text for the code form, or ``None`` when sent."""
        try:
            reply = await self.rt.tls.call("POST", self.s.sca_initiate_path,
                                           path_params={"authorisationEventId": str(flow.state["event_id"])},
                                           headers=self._partner(flow.client_ip))
        except TemporaryError:
            return "We could not send the code just now. Press “Send a new code” to try again."
        if reply.status == 401:
            raise errors.client_refused(reply.detail())
        if not reply.ok:
            raise errors.request_refused(reply.detail())
        return None

    def _can_resend(self, flow: Flow) -> bool:
        return int(flow.state.get("resends", 0)) < self.s.max_code_resends

    async def _resend(self, flow: Flow) -> StepResult:
        if not self._can_resend(flow):
            return otp_form("You cannot ask for more codes in this sign-in. Use the last code you received, or "
                            "cancel and start again.", can_resend=False)
        flow.state["resends"] = int(flow.state.get("resends", 0)) + 1
        problem = await self._send_code(flow)
        if problem:
            return otp_form(problem, can_resend=self._can_resend(flow))
        return otp_form(intro="We asked ConnectPay to send you a new code by text message.",
                        can_resend=self._can_resend(flow))

    async def _verify(self, flow: Flow, event: FlowEvent) -> StepResult:
        otp = event.first("otp").strip()
        if not otp.isdigit():
            return otp_form("Enter the code from the text message, digits only.", can_resend=self._can_resend(flow))
        sent_at = self.rt.now()
        try:
            reply = await self.rt.tls.call("POST", self.s.sca_verify_path,
                                           json_body={"authorisationEventId": flow.state["event_id"], "otp": otp},
                                           headers=self._partner(flow.client_ip))
        except TemporaryError as exc:
            return otp_form(exc.message, can_resend=self._can_resend(flow))
        del otp
        if reply.status == 401:
            raise errors.client_refused(reply.detail())
        if not reply.ok:
            return self._wrong_code(flow, reply)
        try:
            tokens = parse_sca_verify(reply.json())
        except MappingError as exc:
            log.error("ConnectPay verify answer not understood", extra={"json_path": exc.path})
            raise errors.unreadable(f"verify: {exc.path}") from None
        life = timedelta(seconds=tokens.expires_in) if tokens.expires_in else USER_TOKEN_LIFE
        flow.state["user"] = {"access_token": tokens.access_token, "refresh_token": tokens.refresh_token,
                              "expires_at": iso(sent_at + life), "user_id": tokens.user_id}
        flow.state.pop("event_id", None)
        return await self._after_sca(flow)

    def _wrong_code(self, flow: Flow, reply: Reply) -> StepResult:
        code, _ = reply.error()
        code = (code or "").upper()
        if code == "OTP_EXPIRED":
            return otp_form("This code has expired. Press “Send a new code” to get another one.",
                            can_resend=self._can_resend(flow))
        if reply.status == 404 or code == "AUTHORISATION_EVENT_INVALID":
            self._restart(flow)
            return sign_in_form(flow.state.get("email"), error="This sign-in has expired. Please sign in again.")
        wrong = int(flow.state.get("wrong_otps", 0)) + 1
        flow.state["wrong_otps"] = wrong
        if wrong >= self.s.max_otp_attempts:
            self._restart(flow)  # at most 3 wrong codes per challenge, then back to the sign-in (§4.3)
            return sign_in_form(flow.state.get("email"),
                                error="The code was wrong too many times. Sign in again to get a new code.")
        return otp_form("That code is not right. Check the text message and try again.",
                        can_resend=self._can_resend(flow))

    async def _after_sca(self, flow: Flow) -> StepResult:
        user = flow.state["user"]
        consent = flow.consent
        reauth = flow.kind is JourneyKind.REAUTHORISATION and consent is not None
        if reauth and consent is not None:
            linked_user = consent.secrets.get("user_id") or consent.provider_consent_id
            if linked_user and linked_user != user["user_id"]:
                raise errors.different_user()
        token = await self._user_token(flow)
        reply = await self.rt.tls.call("GET", self.s.user_accounts_path, headers=self._user(flow, token))
        if reply.status == 401:
            raise _SessionEnded
        if not reply.ok:
            raise errors.request_refused(reply.detail())
        records = self._parse(reply)
        offered = [r for r in records if r.offered]
        if any(not r.client_id for r in offered):
            raise errors.unreadable("account without clientId")
        accounts = [r.account for r in offered]
        clients = {r.account.provider_account_id: str(r.client_id) for r in offered}

        if reauth and consent is not None:
            missing = missing_linked(flow.linked_accounts, accounts)
            if missing:
                raise errors.accounts_missing(names(missing))
            matched = match_linked(flow.linked_accounts, accounts)
            await self._logout(flow)
            flow.state["step"] = "done"
            return Done(self._grant(user["user_id"], matched, clients))
        if not accounts:
            raise errors.no_accounts()
        flow.state.update({"step": "choose", "offered": [account_to_state(a) for a in accounts],
                           "accounts": clients})
        return ChooseAccounts(accounts=accounts)

    async def _choose(self, flow: Flow, event: FlowEvent) -> StepResult:
        offered = offered_accounts(flow.state)
        picked = chosen(offered, event.values.get("account", ()))
        if not picked:
            return ChooseAccounts(accounts=offered, error="Choose at least one account to share.")
        await self._user_token(flow)  # an idle session past its 5 minutes means signing in again (§4.3)
        await self._logout(flow)
        flow.state["step"] = "done"
        return Done(self._grant(str(flow.state.get("user_id") or ""), picked, flow.state.get("accounts") or {}))

    def _grant(self, user_id: str, accounts: Sequence[Account], clients: Mapping[str, str]) -> Grant:
        mine = {a.provider_account_id: clients[a.provider_account_id] for a in accounts
                if a.provider_account_id in clients}
        secrets = {"mode": "baas", "user_id": user_id, "accounts": mine,
                   "client_ids": sorted(set(mine.values())), "proof_at": iso(self.rt.now())}
        return Grant(secrets=secrets, accounts=list(accounts), provider_consent_id=user_id or None)

    async def _user_token(self, flow: Flow) -> str:
        """The user token, refreshed (S5) when less than 60 s are left; an expired one ends the session."""
        user = flow.state.get("user")
        if not isinstance(user, dict):
            raise _SessionEnded
        expires = parse_datetime(user.get("expires_at"))
        now = self.rt.now()
        if expires is None or expires <= now:
            raise _SessionEnded
        if expires - now >= REFRESH_MARGIN:
            return str(user["access_token"])
        if not user.get("refresh_token"):
            raise _SessionEnded
        reply = await self.rt.tls.call("POST", self.s.token_refresh_path,
                                       json_body={"refresh_token": user["refresh_token"]},
                                       headers=self._user(flow, str(user["access_token"])))
        if reply.status in (400, 401, 403):
            raise _SessionEnded
        if not reply.ok:
            raise errors.request_refused(reply.detail())
        try:
            tokens = parse_user_tokens(reply.json())
        except MappingError as exc:
            raise errors.unreadable(f"user token refresh: {exc.path}") from None
        life = timedelta(seconds=tokens.expires_in) if tokens.expires_in else USER_TOKEN_LIFE
        user.update({"access_token": tokens.access_token, "expires_at": iso(now + life),
                     "refresh_token": tokens.refresh_token or user["refresh_token"]})
        return tokens.access_token

    async def _logout(self, flow: Flow) -> None:
        """S6, best effort: ConnectPay asks platforms to end user sessions they no longer need (B4)."""
        user = flow.state.pop("user", None)
        if not isinstance(user, dict) or not user.get("access_token"):
            return
        flow.state["user_id"] = user.get("user_id")
        expires = parse_datetime(user.get("expires_at"))
        if expires is not None and expires <= self.rt.now():
            return  # already over at ConnectPay
        try:
            reply = await self.rt.tls.call("POST", self.s.logout_path, headers=self._user(flow, user["access_token"]))
        except ProviderError as exc:
            log.warning("ConnectPay logout failed", extra={"code": exc.code})
            return
        if not reply.ok:
            log.warning("ConnectPay logout refused", extra={"status": reply.status})

    def _parse(self, reply: Reply) -> list[AccountRecord]:
        try:
            return parse_accounts(reply.json(), read_at=self.rt.now())
        except MappingError as exc:
            log.error("ConnectPay accounts answer not understood", extra={"json_path": exc.path})
            raise errors.unreadable(f"accounts: {exc.path}") from None

    # --- feed (partner key only, no person present) -------------------------------------------------------------

    @staticmethod
    def _partner_failure(reply: Reply, *, account: bool) -> ProviderError:
        if reply.status == 401:
            log.error("ConnectPay refused our partner key", extra={"path": reply.template})
            return errors.client_refused(reply.detail())
        if reply.status in (403, 404):
            # The client or account is no longer ours to read (§9).
            return errors.account_unavailable(reply.detail()) if account else errors.consent_lost(reply.detail())
        return errors.request_refused(reply.detail())

    async def _check_user(self, consent: ConsentSession) -> None:
        user_id = consent.secrets.get("user_id")
        max_age = self.s.max_ownership_age_days
        proof = parse_datetime(consent.secrets.get("proof_at"))
        if max_age and (proof is None or self.rt.now() - proof > timedelta(days=max_age)):
            raise ActionRequired("connectpay_proof_expired",
                                 "Please sign in to ConnectPay again to confirm these accounts are still yours.")
        if not self.s.user_status_path or not user_id:
            return
        reply = await self.rt.tls.call("GET", self.s.user_status_path, path_params={"userId": str(user_id)},
                                       headers=self._partner())
        if reply.status == 404:
            raise errors.user_blocked(reply.detail())
        if not reply.ok:
            raise self._partner_failure(reply, account=False)
        try:
            status = parse_user_status(reply.json())
        except MappingError as exc:
            raise errors.unreadable(f"user status: {exc.path}") from None
        if status != "active":
            raise errors.user_blocked(f"user status {status}")

    async def _client_records(self, client_id: str, *, account: bool) -> list[AccountRecord]:
        reply = await self.rt.tls.call("GET", self.s.client_accounts_path, path_params={"clientId": client_id},
                                       headers=self._partner())
        if not reply.ok:
            raise self._partner_failure(reply, account=account)
        return self._parse(reply)

    async def list_accounts(self, consent: ConsentSession) -> list[Account]:
        await self._check_user(consent)
        found: list[Account] = []
        for client_id in consent.secrets.get("client_ids") or []:
            found += [r.account for r in await self._client_records(str(client_id), account=False) if r.offered]
        return found

    def _client_of(self, consent: ConsentSession, account: Account) -> str:
        clients: Mapping[str, Any] = consent.secrets.get("accounts") or {}
        client = clients.get(account.provider_account_id)
        if client is None and len(consent.secrets.get("client_ids") or []) == 1:
            client = consent.secrets["client_ids"][0]  # an account that appeared later under the same client
        if client is None:
            raise errors.account_unavailable("account not linked to a known client")
        return str(client)

    async def read_account(
        self, consent: ConsentSession, account: Account, since: date, sync_point: str | None
    ) -> AccountRead:
        client_id = self._client_of(consent, account)
        records = await self._client_records(client_id, account=True)
        record = next((r for r in records if r.account.provider_account_id == account.provider_account_id), None)
        if record is None or not record.offered:
            raise errors.account_unavailable("account missing from the client's list, closed or blocked")
        start = window_start(since, sync_point, self.s.overlap_days)
        path_params = {"clientId": client_id, "accountId": record.resource_id}

        async def fetch(url: str | None, page_no: int) -> Reply:
            if url is not None:
                return await self.rt.tls.call("GET", self.s.payment_entries_path, url=url, headers=self._partner())
            params = {"bookingStatus": "booked", "dateFrom": start.isoformat(), "sortOrder": "asc",
                      "pageNo": str(page_no), "pageSize": str(self.s.page_size)}
            return await self.rt.tls.call("GET", self.s.payment_entries_path, path_params=path_params,
                                          params=params, headers=self._partner())

        entries = await read_all_pages(self.rt.tls, fetch, self.s.page_size,
                                       lambda r: self._partner_failure(r, account=True))
        try:
            booked = parse_transactions(entries, record.currency_filter)  # drops pending: product decision 7
        except MappingError as exc:
            raise errors.unreadable(f"payment entries: {exc.path}") from None
        return AccountRead(balance=ledger_balance(record.ledger, booked, start), booked=booked,
                           sync_point=next_sync_point(booked, sync_point, start))

    async def revoke(self, consent: ConsentSession) -> None:
        # Nothing to revoke: the feed uses the partner key, no person token is kept (§8). The core erases secrets.
        return None
