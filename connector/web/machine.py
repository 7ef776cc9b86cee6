"""Endpoints Sage's machines call: ``POST /notification`` and ``GET /availableaccounts``.

Checks run in the order of spec 2.3: size, custom header, token, content type, JSON, envelope. Then the notification
is stored and answered; the work it triggers runs after the answer.
"""

from __future__ import annotations

import hmac
import json
import logging
from urllib.parse import urlsplit

from sanic import Blueprint, Request
from sanic.response import HTTPResponse
from sanic.response import json as json_response
from sanic_ext import openapi

from connector.errors import ApiError
from connector.inbox import EnvelopeError
from connector.journey import consents
from connector.security.tokens import TokenError, www_authenticate
from connector.storage import models, storable
from connector.tasks import spawn
from connector.types import ProviderError, WebhookRequest
from connector.web import apidoc

log = logging.getLogger("connector.web")

bp = Blueprint("machine")


@bp.before_server_start
async def document(app, _=None) -> None:
    apidoc.describe(app)  # components and security schemes of /docs/openapi.json

MAX_NOTIFICATION_BYTES = 64 * 1024
EXTERNAL_ID_MAX = 36  # models.Account.external_id


async def _verify(request: Request, scope: str) -> dict:
    try:
        claims = await request.app.ctx.verifier.verify(request.headers.get("authorization"), scope)
    except TokenError as err:
        log.info("token refused", extra={"reason": err.reason, "path": request.path})
        request.app.ctx.metrics.token_failures.labels(err.reason).inc()
        raise ApiError(err.error, err.message, headers={"WWW-Authenticate": www_authenticate(err)}) from None
    return dict(claims)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: Python accepts them, JSON (and PostgreSQL) don't


def _check_header(request: Request) -> None:
    name, expected = request.app.ctx.notification_header
    values = request.headers.getall(name, [])
    given = values[0].encode("utf-8", "surrogateescape") if len(values) == 1 else b""
    # compare_digest on bytes: the time taken does not depend on where the values differ.
    if not hmac.compare_digest(given, expected.encode()):
        raise ApiError("invalid_notification_header")


@bp.post("/notification")
@openapi.definition(
    summary="Receive a Sage notification",
    description="Sage tells us an authorisation was created, or a bank account was linked or deleted. Checked in "
                "this order: size (64 KiB), the custom header, the Sage ID token (scope `WebhooksLambda`), "
                "`Content-Type`, JSON, envelope. The notification is stored before the answer; a repeat is answered "
                "200 and does nothing.",
    body=apidoc.NOTIFICATION_BODY,
    response=apidoc.responses(apidoc.ACCEPTED, "invalid_request", "invalid_notification_header", "invalid_token",
                              "insufficient_scope", "payload_too_large", "unsupported_media_type", "internal_error",
                              "temporarily_unavailable"),
    secured={apidoc.NOTIFICATION_HEADER: [], apidoc.SAGE_BEARER: []},
)
async def notification(request: Request) -> HTTPResponse:
    if len(request.body) > MAX_NOTIFICATION_BYTES:
        raise ApiError("payload_too_large")
    _check_header(request)
    claims = await _verify(request, "WebhooksLambda")
    content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError("unsupported_media_type")
    try:
        body = json.loads(request.body, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        raise ApiError("invalid_request", "The body is not valid JSON.") from None
    inbox = request.app.ctx.inbox
    try:
        stored = await inbox.store(body, caller=str(claims.get("azp") or claims.get("sub") or ""))
    except EnvelopeError as exc:
        raise ApiError("invalid_request", str(exc)) from None
    label = f"{stored.type}:{stored.resource_type}"
    request.app.ctx.metrics.notifications.labels(label, str(stored.new).lower()).inc()
    if stored.pending:
        spawn(request.app, inbox.process_later(stored))
    return json_response({"status": "accepted"})


@bp.get("/availableaccounts")
@openapi.definition(
    summary="List the accounts of the consent behind one externalId",
    description="Sage asks which accounts it may link, given one of the `bankAccountExternalId`s we sent. Needs a "
                "Sage ID token with the scope `ProviderAPI`. The list is read fresh from the provider; when the "
                "provider can't answer, the last stored list is served.",
    parameter=apidoc.EXTERNAL_ID,
    response=apidoc.responses(apidoc.AVAILABLE_ACCOUNTS, "invalid_request", "invalid_token", "insufficient_scope",
                              "unknown_external_id", "internal_error", "temporarily_unavailable"),
    secured={apidoc.SAGE_BEARER: []},
)
async def available_accounts(request: Request) -> HTTPResponse:
    claims = await _verify(request, "ProviderAPI")
    log.info("availableaccounts called", extra={"caller": claims.get("azp") or claims.get("sub")})
    values = dict.get(request.get_args(keep_blank_values=True), "externalId", [])
    if len(values) != 1 or not values[0] or len(values[0]) > 200:
        raise ApiError("invalid_request", "externalId is required, once.")
    # Longer than any externalId we issue: unknown (and too long for the column's filter validation).
    account = await models.Account.get_or_none(external_id=values[0]).prefetch_related("consent") \
        if len(values[0]) <= EXTERNAL_ID_MAX and storable(values[0]) else None
    if account is None or account.consent.status in ("revoked", "pending") or not account.consent.secrets_sealed:
        raise ApiError("unknown_external_id")
    ctx = request.app.ctx
    consent = account.consent
    provider = ctx.providers.get(consent.provider)
    bank = ctx.settings.bank(consent.sage_bank_id)
    rows = None
    if provider is not None and bank is not None:
        try:
            fresh = await provider.list_accounts(consents.StoredConsent(consent, bank.info(), ctx.box))
            rows = sorted(await consents.store_accounts(consent.id, fresh, ctx.box), key=lambda row: row.id)
        except ProviderError as exc:
            # Spec 7.34: serve the last stored list when the provider can't answer.
            log.warning("provider unavailable; serving the stored account list", extra={"code": exc.code})
    if rows is None:
        rows = await models.Account.filter(consent_id=consent.id).order_by("id")
    return json_response([
        {
            "accountType": row.account_type,
            "accountName": row.display_name,
            "externalId": row.external_id,
            **{k: v for k, v in consents.patch_account(row, ctx.box).items()
               if k in ("bankIdentifier", "accountIdentifier", "branchIdentifier")},
        }
        for row in rows
    ])


MAX_WEBHOOK_BYTES = 32 * 1024 * 1024


@bp.post("/providers/<provider:str>/webhook")
@openapi.definition(
    summary="Receive a provider's webhook",
    description="For providers whose plugin implements `webhook` (e.g. Powens). The provider plugin verifies the "
                "signature in its own way, so no Sage credential is involved; the body is the provider's own "
                "(at most 32 MiB). A repeat (same dedupe key) is answered 200 and does nothing.",
    body=apidoc.WEBHOOK_BODY,
    response=apidoc.responses(apidoc.ACCEPTED, "invalid_request", "invalid_token", "not_found", "payload_too_large",
                              "internal_error", "temporarily_unavailable"),
)
async def provider_webhook(request: Request, provider: str) -> HTTPResponse:
    """A provider's webhook: the provider verifies it; the core stores its dedupe key once and wakes the feed."""
    ctx = request.app.ctx
    receiver = getattr(ctx.providers.get(provider), "webhook", None)
    if receiver is None:
        raise ApiError("not_found")
    if len(request.body) > MAX_WEBHOOK_BYTES:
        raise ApiError("payload_too_large")
    path = urlsplit(ctx.settings.public_url).path.rstrip("/") + request.path
    incoming = WebhookRequest(request.method, path, {k.lower(): v for k, v in request.headers.items()},
                              request.body, request.remote_addr or request.ip)
    try:
        result = await receiver(incoming)
    except PermissionError:
        raise ApiError("invalid_token", "The webhook signature is missing or wrong.") from None
    except ValueError as exc:
        raise ApiError("invalid_request", str(exc)[:200]) from None
    new = await ctx.inbox.store_webhook(provider, result)
    ctx.metrics.notifications.labels(f"providerWebhook:{provider}", str(new).lower()).inc()
    return json_response({"status": "accepted"})
