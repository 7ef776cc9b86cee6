"""Authorisation journeys: from ``/auth`` or ``/authrefresh`` through the provider's steps to the PATCH and back.

Every check of spec 2.4–2.6 happens here, in the order the spec gives; every single-use value (authorisation id,
provider ``state``) is consumed by one conditional UPDATE so the database decides who wins a race.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from tortoise.exceptions import BaseORMException
from tortoise.expressions import F
from tortoise.transactions import in_transaction

from connector.config import Settings
from connector.errors import PageError
from connector.hookspecs import Flow, Provider
from connector.journey import consents
from connector.journey.pages import Page, check_form, chosen_accounts, error_page, page_of, with_errors
from connector.security.crypto import SecretBox, SecretError
from connector.security.redirects import compose_redirect, redirect_allowed, state_valid
from connector.storage import models, storable
from connector.types import (
    ChooseAccounts,
    Declined,
    Done,
    Failed,
    FlowEvent,
    Form,
    JourneyKind,
    ProviderError,
    Redirect,
    StepResult,
    Wait,
)

log = logging.getLogger("connector.journey")

STATE_BYTES = 32


class AuthorisationPatcher(Protocol):
    async def patch_authorisation(self, authorisation_id: str, bank_accounts: list[dict] | None) -> None: ...


@dataclass(frozen=True, slots=True)
class Next:
    """Where the browser goes after a post or callback: a journey page, or back to Sage."""

    url: str


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _canonical_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower() and len(value) == 36
    except ValueError:
        return False


#: How a journey ends, as the ``outcome`` label of ``connector_journeys_total``; any other code is a provider's.
JOURNEY_OUTCOMES = frozenset({"done", "cancelled", "declined", "different_user", "sage_unavailable", "unknown_bank"})


class Journeys:
    def __init__(
        self,
        settings: Settings,
        providers: Mapping[str, Provider],
        box: SecretBox,
        sage: AuthorisationPatcher,
        *,
        clock: Callable[[], datetime] = _utcnow,
        on_consent_restored: Callable[[], Awaitable[None]] | None = None,
        metrics: Any = None,
    ) -> None:
        """``metrics``: the app's :class:`connector.metrics.Metrics`, which counts how journeys end."""
        self.settings = settings
        self.metrics = metrics
        self.on_consent_restored = on_consent_restored
        self.providers = providers
        self.box = box
        self.sage = sage
        self.clock = clock
        security = settings.security
        self.ttl = timedelta(seconds=security["authorisation_ttl_seconds"])
        self.idle = timedelta(seconds=security["journey_idle_seconds"])

    # --- Entering: /auth and /authrefresh --------------------------------------------------------------------

    async def begin(self, kind: JourneyKind, query: Mapping[str, Sequence[str]], client_ip: str
                    ) -> tuple[str, Next]:
        """Check the request, consume the authorisation id and start the provider; return the journey handle and
        where the browser goes (the journey's page, or straight back to Sage when the provider finished at once)."""
        names = ["redirect_uri", "state", "authorisation_id", "bank"]
        if kind is JourneyKind.REAUTHORISATION:
            names += ["externalId"]
        redirect_uri = _single(query, "redirect_uri")
        security = self.settings.security
        if not redirect_uri or not redirect_allowed(
            redirect_uri, security["redirect_hosts"], allow_loopback=security["allow_loopback_redirects"]
        ):
            raise PageError("redirect_refused")
        state = _single(query, "state")
        if not state or not state_valid(state):
            raise PageError("bad_request")
        back = compose_redirect(redirect_uri, state)
        values = {name: _single(query, name) for name in names}
        if any(v is None or v == "" for v in values.values()):
            raise PageError("bad_request", back_url=back)
        authorisation_id, bank_id = values["authorisation_id"], values["bank"]
        assert authorisation_id is not None and bank_id is not None
        if not _canonical_uuid(authorisation_id):
            raise PageError("bad_request", back_url=back)
        authorisation_id = authorisation_id.lower()  # stored lower-case by the notification (connector.inbox)

        await self._check_throttle(client_ip, back)
        announced = await models.Authorisation.get_or_none(id=authorisation_id)
        if announced is None:
            await self._count_failure(client_ip)
            raise PageError("not_announced", back_url=back)
        if announced.sage_bank_id != bank_id:
            raise PageError("bank_mismatch", back_url=back)
        bank = self.settings.bank(bank_id)
        if bank is None or bank.provider not in self.providers:
            raise PageError("unknown_bank", back_url=back)

        consent: models.Consent | None = None
        external_id = None
        if kind is JourneyKind.REAUTHORISATION:
            external_id = values["externalId"]
            consent = await self._consent_for_refresh(external_id or "", _single(query, "bankaccount"), bank_id, back)

        now = self.clock()
        # Consuming the id and creating the journey commit together: a failure between them must not burn the id.
        async with in_transaction():
            used = await models.Authorisation.filter(
                id=authorisation_id, used_at__isnull=True, expires_at__gt=now
            ).update(used_at=now)
            if used != 1:
                fresh = await models.Authorisation.get(id=authorisation_id)
                raise PageError("link_used" if fresh.used_at else "link_expired", back_url=back)

            handle = secrets.token_urlsafe(STATE_BYTES)
            journey = await models.Journey.create(
                handle=handle,
                authorisation_id=authorisation_id,
                kind=kind.value,
                sage_bank_id=bank_id,
                provider=bank.provider,
                redirect_uri=redirect_uri,
                state=state,
                consent_id=consent.id if consent else None,
                external_id=external_id,
                created_at=now,
                updated_at=now,
                expires_at=now + self.ttl,
            )
        log.info("journey started", extra={"journey": _ref(journey.handle), "kind": kind.value,
                                           "provider": bank.provider})
        flow = await self._flow(journey, {}, client_ip)
        result = await self._call(self.providers[bank.provider].start(flow))
        return handle, await self._settle(journey, flow, result)

    async def _consent_for_refresh(
        self, external_id: str, bank_account_id: str | None, bank_id: str, back: str
    ) -> models.Consent:
        account = await models.Account.get_or_none(external_id=external_id).prefetch_related("consent") \
            if len(external_id) <= 36 and storable(external_id) else None  # longer than any we issue (and the column)
        if account is None or account.consent.status in ("revoked", "pending"):
            raise PageError("account_mismatch", back_url=back)
        if account.consent.sage_bank_id != bank_id:
            raise PageError("bank_mismatch", back_url=back)
        if bank_account_id:
            links = await models.LinkedAccount.filter(account_id=account.id).values_list("bank_account_id", flat=True)
            if links and bank_account_id not in links:
                raise PageError("account_mismatch", back_url=back)
        return account.consent

    # --- Walking the journey ---------------------------------------------------------------------------------

    async def load(self, handle: str, client_ip: str | None = None) -> tuple[models.Journey, Page]:
        journey = await models.Journey.get_or_none(handle=handle) if 0 < len(handle) <= 64 and storable(handle) \
            else None
        if journey is None:
            if client_ip is not None:
                await self._guessed(client_ip)
            raise PageError("journey_not_found")
        back = compose_redirect(journey.redirect_uri, journey.state)
        if journey.status == "done":
            raise PageError("link_used", back_url=back)
        now = self.clock()
        if journey.status == "active" and (now >= journey.expires_at or now - journey.updated_at >= self.idle):
            raise PageError("journey_expired", back_url=back)
        page = self.box.open_json(journey.page_sealed, f"journey.page_sealed:{handle}") if journey.page_sealed \
            else error_page("internal_error")
        return journey, page

    def back_url(self, journey: models.Journey) -> str:
        return compose_redirect(journey.redirect_uri, journey.state)

    async def post(self, handle: str, form: Mapping[str, Sequence[str]], client_ip: str) -> Next:
        """A person's post on their current page."""
        journey, page = await self.load(handle, client_ip)
        if journey.status != "active":
            return Next(self.page_url(handle))
        if "cancel" in form:
            return await self._event(journey, FlowEvent("cancel"), client_ip)
        action = (form.get("action") or [""])[0]
        values = {k: v for k, v in form.items() if k not in ("action", "cancel")}
        kind = page["type"]
        secondary = {c["value"] for c in page.get("secondary", [])}
        if kind == "form":
            if action in secondary:
                return await self._event(journey, FlowEvent("submit", action, {}), client_ip)
            if action != page["action"]:
                return Next(self.page_url(handle))
            errors = check_form(page, values)
            if errors:
                await self._save_page(journey, with_errors(page, errors, values))
                return Next(self.page_url(handle))
            return await self._event(journey, FlowEvent("submit", action, values), client_ip)
        if kind == "accounts":
            chosen = chosen_accounts(page, values)
            if chosen is None:
                return Next(self.page_url(handle))
            if action in secondary:
                return await self._event(journey, FlowEvent("choose_accounts", action, {"account": chosen}), client_ip)
            if not chosen:
                await self._save_page(journey, dict(page, error="Choose at least one account to share."))
                return Next(self.page_url(handle))
            return await self._event(journey, FlowEvent("choose_accounts", "", {"account": chosen}), client_ip)
        if kind == "wait":
            return await self._event(journey, FlowEvent("poll"), client_ip)
        return Next(self.page_url(handle))

    async def poll(self, handle: str, client_ip: str) -> Next:
        journey, page = await self.load(handle, client_ip)
        if journey.status != "active" or page["type"] != "wait":
            return Next(self.page_url(handle))
        return await self._event(journey, FlowEvent("poll"), client_ip)

    async def callback(self, provider: str, query: Mapping[str, Sequence[str]], client_ip: str) -> Next:
        """The provider sent the person back: match ``state`` (single use, this provider only) to its journey."""
        state = _single(query, "state")
        if not state or len(state) > 64 or not storable(state):
            await self._guessed(client_ip)
            raise PageError("journey_not_found")
        now = self.clock()
        used = await models.CallbackState.filter(
            value=state, provider=provider, used_at__isnull=True, expires_at__gt=now
        ).update(used_at=now)
        if used != 1:
            log.warning("provider callback with an unknown, used, foreign or expired state",
                        extra={"provider": provider})
            if await models.CallbackState.exists(value=state, provider=provider):
                raise PageError("link_used")
            await self._guessed(client_ip)
            raise PageError("journey_not_found")
        row = await models.CallbackState.get(value=state)
        journey, _ = await self.load(row.journey_handle)
        if journey.status != "active":
            return Next(self.page_url(journey.handle))
        return await self._event(journey, FlowEvent("callback", "", dict(query)), client_ip)

    def page_url(self, handle: str) -> str:
        return f"{self.settings.public_url}/journey/{handle}"

    # --- Internals -------------------------------------------------------------------------------------------

    async def _event(self, journey: models.Journey, event: FlowEvent, client_ip: str) -> Next:
        provider = self.providers.get(journey.provider)
        if provider is None:
            await self._save_page(journey, error_page("unknown_bank"), status="failed")
            return Next(self.page_url(journey.handle))
        flow = await self._flow(journey, self._flow_state(journey), client_ip)
        if event.kind == "cancel":
            try:
                await self._call(provider.resume(flow, event))
            except Exception:  # a provider failing to clean up must not keep the person here
                log.exception("provider failed while cancelling", extra={"provider": journey.provider})
            await self._save_page(journey, error_page("cancelled"), status="failed", flow=flow)
            return Next(self.page_url(journey.handle))
        result = await self._call(provider.resume(flow, event))
        return await self._settle(journey, flow, result)

    async def _call(self, pending: Any) -> StepResult:
        try:
            return await pending
        except ProviderError as exc:
            return Failed(exc)
        except Exception:
            log.exception("provider raised an unexpected error")
            return Failed(ProviderError("provider_error", "Something went wrong while connecting to your bank."))

    async def _settle(self, journey: models.Journey, flow: Flow, result: StepResult) -> Next:
        if isinstance(result, Done):
            return await self._finish(journey, flow, result)
        if isinstance(result, Failed):
            err = result.error
            log.info("journey failed at the provider", extra={"journey": _ref(journey.handle), "code": err.code})
            code = "declined" if isinstance(err, Declined) else err.code
            await self._save_page(journey, error_page(code, message=err.message, detail=err.detail),
                                  status="failed", flow=flow)
            return Next(self.page_url(journey.handle))
        if not isinstance(result, (Form, Redirect, Wait, ChooseAccounts)):
            raise TypeError(f"provider {journey.provider} returned {type(result).__name__}, not a step result")
        await self._save_page(journey, page_of(result), flow=flow)
        return Next(self.page_url(journey.handle))

    async def _finish(self, journey: models.Journey, flow: Flow, done: Done) -> Next:
        grant = done.grant
        provider = self.providers[journey.provider]
        back = self.back_url(journey)
        claimed = await models.Journey.filter(handle=journey.handle, status="active").update(status="finishing")
        if claimed != 1:
            return Next(self.page_url(journey.handle))
        if journey.kind == JourneyKind.REAUTHORISATION.value:
            return await self._finish_refresh(journey, flow, grant, back)
        consent = await consents.create_consent(journey.provider, journey.sage_bank_id, grant, self.box)
        rows = await models.Account.filter(consent_id=consent.id).order_by("id")
        body = [consents.patch_account(r, self.box) for r in rows]
        try:
            await self.sage.patch_authorisation(journey.authorisation_id, body)
        except Exception as exc:
            log.warning("PATCH authorisation failed; nothing linked", extra={"error": type(exc).__name__})
            session = consents.StoredConsent(consent, self.settings.bank(journey.sage_bank_id).info(), self.box)
            try:
                await provider.revoke(session)
            except Exception:
                log.warning("revoking the unlinked consent failed", extra={"provider": journey.provider})
            await consent.delete()
            await self._save_page(journey, error_page("sage_unavailable"), status="failed", flow=flow)
            return Next(self.page_url(journey.handle))
        await models.Consent.filter(id=consent.id).update(status="active")
        await self._save_page(journey, error_page("done"), status="done", flow=flow)
        log.info("onboarding linked", extra={"journey": _ref(journey.handle), "accounts": len(rows)})
        return Next(back)

    async def _finish_refresh(self, journey: models.Journey, flow: Flow, grant: Any, back: str) -> Next:
        consent = await models.Consent.get(id=journey.consent_id)
        linked = await models.Account.filter(consent_id=consent.id).values_list("provider_account_id", flat=True)
        offered = {a.provider_account_id for a in grant.accounts}
        if not set(linked) <= offered:
            await self._save_page(journey, error_page("different_user"), status="failed", flow=flow)
            return Next(self.page_url(journey.handle))
        try:
            await self.sage.patch_authorisation(journey.authorisation_id, None)
        except Exception as exc:
            log.warning("PATCH re-authorisation failed", extra={"error": type(exc).__name__})
            await self._save_page(journey, error_page("sage_unavailable"), status="failed", flow=flow)
            return Next(self.page_url(journey.handle))
        await models.Consent.filter(id=consent.id).update(
            secrets_sealed=self.box.seal_json(dict(grant.secrets), consents.secrets_aad(consent.id)),
            status="active",
            status_reason="",
            expires_at=grant.expires_at,
            provider_consent_id=grant.provider_consent_id or consent.provider_consent_id,
            version=consent.version + 1,
        )
        await consents.store_accounts(consent.id, grant.accounts, self.box)
        await models.LinkedAccount.filter(
            account__consent_id=consent.id, feed_state="auth_required", deleted_at__isnull=True
        ).update(feed_state="live", feed_reason="")
        await self._save_page(journey, error_page("done"), status="done", flow=flow)
        log.info("re-authorisation done", extra={"journey": _ref(journey.handle)})
        if self.on_consent_restored:
            await self.on_consent_restored()  # catch up on what the feed missed while the consent was lost
        return Next(back)

    async def _flow(self, journey: models.Journey, state: dict[str, Any], client_ip: str) -> Flow:
        bank = self.settings.bank(journey.sage_bank_id)
        assert bank is not None
        consent_session = None
        linked = []
        if journey.consent_id:
            row = await models.Consent.get(id=journey.consent_id)
            consent_session = consents.StoredConsent(row, bank.info(), self.box)
            linked = [consents.to_domain(a, self.box) for a in await models.Account.filter(consent_id=row.id)]

        async def issue_state() -> str:
            value = secrets.token_urlsafe(STATE_BYTES)
            await models.CallbackState.create(value=value, journey_handle=journey.handle, provider=journey.provider,
                                              expires_at=journey.expires_at)
            return value

        return Flow(
            journey_id=_ref(journey.handle),
            kind=JourneyKind(journey.kind),
            bank=bank.info(),
            state=state,
            client_ip=client_ip,
            issue_state=issue_state,
            consent=consent_session,
            linked_accounts=linked,
        )

    def _flow_state(self, journey: models.Journey) -> dict[str, Any]:
        if not journey.flow_state_sealed:
            return {}
        try:
            return self.box.open_json(journey.flow_state_sealed, f"journey.flow_state_sealed:{journey.handle}")
        except SecretError:
            log.error("journey state could not be decrypted", extra={"journey": _ref(journey.handle)})
            raise PageError("internal_error", back_url=self.back_url(journey)) from None

    async def _save_page(self, journey: models.Journey, page: Page, *, status: str | None = None,
                         flow: Flow | None = None) -> None:
        changes: dict[str, Any] = {
            "page_sealed": self.box.seal_json(page, f"journey.page_sealed:{journey.handle}"),
            "updated_at": self.clock(),
            "version": journey.version + 1,
        }
        if flow is not None:
            changes["flow_state_sealed"] = self.box.seal_json(flow.state,
                                                              f"journey.flow_state_sealed:{journey.handle}")
        if status:
            changes["status"] = status
        await models.Journey.filter(handle=journey.handle).update(**changes)
        journey.version += 1
        if status in ("done", "failed") and self.metrics is not None:
            # Provider error codes are the provider's own: one label for them keeps the series few.
            outcome = page.get("code", "") if page.get("code") in JOURNEY_OUTCOMES else "provider_error"
            self.metrics.journeys.labels(journey.kind, outcome).inc()

    # --- Throttling guesses (U3) -----------------------------------------------------------------------------

    async def _check_throttle(self, client_ip: str, back: str | None) -> None:
        minute = int(self.clock().timestamp() // 60)
        row = await models.FailedLookup.get_or_none(client=client_ip[:64], minute=minute)
        if row and row.count >= self.settings.security["max_failed_lookups"]:
            raise PageError("too_many_attempts", back_url=back)

    async def _guessed(self, client_ip: str) -> None:
        """An unknown journey handle or callback state: 429 past the limit, else counted (U3)."""
        await self._check_throttle(client_ip, None)
        await self._count_failure(client_ip)

    async def _count_failure(self, client_ip: str) -> None:
        minute = int(self.clock().timestamp() // 60)
        try:
            row, _ = await models.FailedLookup.get_or_create(client=client_ip[:64], minute=minute)
            await models.FailedLookup.filter(id=row.id).update(count=F("count") + 1)
        except BaseORMException:
            log.warning("could not count a failed lookup")


def _ref(handle: str) -> str:
    """A journey reference for logs: the handle itself is a bearer secret and never logged."""
    return hashlib.sha256(handle.encode()).hexdigest()[:16]


def _single(query: Mapping[str, Sequence[str]], name: str) -> str | None:
    """A parameter given exactly once; a repeated one counts as missing (spec 7.14)."""
    values = query.get(name) or []
    return values[0] if len(values) == 1 else None
