"""The machine API's OpenAPI document (sanic-ext serves it at ``/docs/openapi.json``): shared schemas, security
schemes and response sets for the ``@openapi.definition`` decorators on the machine and operator routes.

Schemas are plain OpenAPI 3.0 JSON Schema, registered once as components and referenced with ``$ref``. The error
body's ``error`` enum is :data:`connector.errors.API_ERRORS`, so the document lists exactly the codes the code has.
Pages a person sees (``/auth``, ``/authrefresh``, ``/journey/...``, provider callbacks) are HTML, not part of the
machine API, and are left out of the document.
"""

from __future__ import annotations

from typing import Any

from sanic import Sanic
from sanic_ext import openapi

from connector.errors import API_ERRORS
from connector.types import AccountType

SAGE_BEARER = "sageBearer"
NOTIFICATION_HEADER = "sageNotificationHeader"

ERROR = "Error"

_STATUS_TEXT = {
    400: "The request is malformed",
    401: "Authentication failed",
    403: "Authenticated, but not allowed",
    404: "Not found",
    413: "The body is too large",
    415: "The body is not JSON",
    429: "Too many requests",
    500: "Internal error; no detail is given",
    503: "Temporarily unavailable; nothing was stored. Retry later (`Retry-After`)",
}

SCHEMAS: dict[str, dict[str, Any]] = {
    ERROR: {
        "type": "object",
        "description": "Every error of a machine endpoint. `error` is a stable code (see the documentation's error "
                       "reference); `message` is a short text for logs, never holding a secret.",
        "required": ["error", "message"],
        "properties": {
            "error": {"type": "string", "enum": sorted(API_ERRORS)},
            "message": {"type": "string"},
        },
        "additionalProperties": False,
    },
    "Accepted": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["accepted"]}},
        "additionalProperties": False,
    },
    "Notification": {
        "type": "object",
        "description": "Sage's notification envelope (spec 2.3). For `resourceCreated` of an `authorisation`, "
                       "`resource.id` must be a UUID and `additionalData.bankId` is required; for a `bankAccount`, "
                       "`additionalData.externalId` is required. Unknown types are stored and ignored.",
        "required": ["type", "resource"],
        "properties": {
            "type": {"type": "string", "minLength": 1, "maxLength": 64, "example": "resourceCreated"},
            "resource": {
                "type": "object",
                "required": ["id", "type"],
                "properties": {
                    "id": {"type": "string", "minLength": 1, "maxLength": 64,
                           "example": "2f1d4d5e-8c1b-4d8e-9a57-1b2c3d4e5f60"},
                    "type": {"type": "string", "minLength": 1, "maxLength": 64, "example": "authorisation"},
                    "url": {"description": "Not used (and never fetched)."},
                },
            },
            "additionalData": {
                "type": "object",
                "nullable": True,
                "properties": {
                    "bankId": {"type": "string", "description": "Required (at most 64 characters) for an authorisation"},
                    "externalId": {"type": "string", "description": "Required for a bank account"},
                    "requestedStartDate": {"type": "string", "description": "An ISO 8601 date-time, when not empty",
                                           "example": "2025-01-01T00:00:00Z"},
                },
            },
        },
    },
    "AvailableAccount": {
        "type": "object",
        "required": ["accountType", "accountName", "externalId", "bankIdentifier", "accountIdentifier",
                     "branchIdentifier"],
        "properties": {
            "accountType": {"type": "string", "enum": [t.value for t in AccountType]},
            "accountName": {"type": "string", "example": "Business Current ••1234"},
            "externalId": {"type": "string"},
            "bankIdentifier": {"type": "string"},
            "accountIdentifier": {"type": "string"},
            "branchIdentifier": {"type": "string"},
        },
        "additionalProperties": False,
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ok"]}},
        "additionalProperties": False,
    },
    "Ready": {
        "type": "object",
        "required": ["status", "checks"],
        "properties": {
            "status": {"type": "string", "enum": ["ready", "not_ready"]},
            "checks": {
                "type": "object",
                "required": ["config", "database", "jwks"],
                "properties": {name: {"type": "boolean"} for name in ("config", "database", "jwks")},
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


ACCEPTED = {"content": _json(ref("Accepted")), "description": "Stored (or already stored): nothing more to do"}
AVAILABLE_ACCOUNTS = {"content": _json({"type": "array", "items": ref("AvailableAccount")}),
                      "description": "Every account of the consent, linked or not"}
HEALTH = {"content": _json(ref("Health")), "description": "The process answers"}
READY = {"content": _json(ref("Ready")), "description": "Ready to serve: config, database and Sage ID keys"}
NOT_READY = {"content": _json(ref("Ready")), "description": "Not ready: `checks` says which dependency failed"}
METRICS = {"content": {"text/plain": {"schema": {"type": "string"}}},
           "description": "Prometheus text exposition format (version 0.0.4)"}

NOTIFICATION_BODY = openapi.definitions.RequestBody(_json(ref("Notification")), required=True,
                                                   description="A Sage notification (at most 64 KiB)")
WEBHOOK_BODY = openapi.definitions.RequestBody(
    {"*/*": {"schema": {"type": "string", "format": "binary"}}}, required=False,
    description="The provider's own webhook body, verified by its plugin")

EXTERNAL_ID = openapi.definitions.Parameter(
    "externalId", openapi.String(minLength=1, maxLength=200), "query", required=True,
    description="One of the `bankAccountExternalId`s we sent to Sage")


def responses(ok: dict[str, Any], *codes: str) -> list[dict[str, Any]]:
    """The responses of one operation: ``ok`` for 200, and the error body for each status of ``codes`` (codes of
    :data:`~connector.errors.API_ERRORS`), its ``error`` narrowed to the codes this operation can answer."""
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(API_ERRORS[code][0], []).append(code)
    out = [{"status": 200, **ok}]
    for status, found in sorted(by_status.items()):
        schema = {"allOf": [ref(ERROR), {"type": "object", "properties": {"error": {"enum": found}}}]}
        out.append({"status": status, "content": _json(schema),
                    "description": f"{_STATUS_TEXT[status]}: " + ", ".join(f"`{c}`" for c in found)})
    return out


def describe(app: Sanic) -> None:
    """Title, components and security schemes of the app's document. The notification header's name is the
    configured one (``sage.notification_header.name``)."""
    spec = getattr(app.ext, "openapi", None) if hasattr(app, "ext") else None
    if spec is None:
        return
    spec.describe("Sage Banking Service connector: machine API", "1",
                  "Endpoints Sage's machines and operators call. Errors are `{error, message}` with a stable code.")
    for name, schema in SCHEMAS.items():
        spec.add_component("schemas", name, schema)
    header = app.ctx.settings.sage["notification_header"]["name"]
    spec.add_security_scheme(
        SAGE_BEARER, "http", scheme="bearer", bearer_format="JWT",
        description="A Sage ID token (RS256, checked against Sage ID's key set, issuer and audience). "
                    "`/notification` needs the scope `WebhooksLambda`, `/availableaccounts` the scope `ProviderAPI`.")
    spec.add_security_scheme(
        NOTIFICATION_HEADER, "apiKey", location="header", name=header,
        description="The custom header Sage adds to every notification (`sage.notification_header`), "
                    "compared in constant time.")
