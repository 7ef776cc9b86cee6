"""Powens webhooks: HMAC ``BI-Signature`` check and what to refresh (powens.md §9.3, §9.4, §16 OP-9).

``BI-Signature = base64(HMAC-SHA256(secret, METHOD "." PATH "." BI-Signature-Date "." RAW_BODY))`` where ``PATH`` is
the path the core builds from ``server.public_url`` (never the ``Host`` header, so a proxy cannot change the
verdict). The comparison is constant-time, on the decoded bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import zlib
from collections.abc import Mapping
from typing import Any

from connector.types import WebhookRequest, WebhookResult

MAX_BODY = 32 * 1024 * 1024  # §9.4: a first sync can send several MB


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.casefold()
    for key, value in headers.items():
        if key.casefold() == wanted:
            return value
    return None


def _gunzip(body: bytes) -> bytes:
    """Decompress under the same cap as the raw body, so a small bomb cannot expand past it."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, MAX_BODY + 1)
    except zlib.error:
        raise ValueError("the gzip body is corrupt") from None
    if len(out) > MAX_BODY or inflater.unconsumed_tail:
        raise ValueError("the decompressed body is too large")
    return out


def signature(secret: str, method: str, path: str, date: str, body: bytes) -> str:
    """The ``BI-Signature`` value for these parts (also used by the emulator and tests)."""
    message = f"{method.upper()}.{path}.{date}.".encode() + body
    return base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()


def verify(secret: str | None, request: WebhookRequest) -> WebhookResult:
    """:raises PermissionError: no secret configured, a header missing, or a signature that does not match.
    :raises ValueError: a body that is not a JSON object (checked only after the signature)."""
    if not secret:
        raise PermissionError("signature_missing: no webhook secret is configured")
    given = _header(request.headers, "BI-Signature")
    date = _header(request.headers, "BI-Signature-Date")
    if not given or not date:
        raise PermissionError("signature_missing")
    body = request.body
    gzipped = (_header(request.headers, "Content-Encoding") or "").strip().casefold() == "gzip"
    # Some servers inflate gzip bodies themselves and keep the header: only inflate what still looks compressed.
    if gzipped and body[:2] == b"\x1f\x8b":
        try:
            body = _gunzip(body)
        except ValueError:
            raise PermissionError("signature_invalid") from None  # cannot be what was signed
    try:
        decoded = base64.b64decode(given.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise PermissionError("signature_invalid") from None
    expected = base64.b64decode(signature(secret, request.method, request.path, date, body))
    if not hmac.compare_digest(decoded, expected):
        raise PermissionError("signature_invalid")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the webhook body is not JSON") from None
    if not isinstance(payload, dict):
        raise ValueError("the webhook body is not a JSON object")
    return WebhookResult(dedupe_key=_dedupe_key(payload, body), provider_consent_ids=_connection_ids(payload))


def _dedupe_key(payload: Mapping[str, Any], body: bytes) -> str:
    ident = payload.get("id_webhook_data")
    if isinstance(ident, (int, str)) and not isinstance(ident, bool) and str(ident):
        return f"powens:{ident}"
    # No delivery id: the same body is the same delivery (§9.4 step 4).
    return "powens:sha256:" + hashlib.sha256(body).hexdigest()


def _connection_ids(payload: Mapping[str, Any]) -> list[str]:
    """Connections whose accounts should be read again: ``connection.id`` (CONNECTION_SYNCED, CONNECTION_DELETED,
    ACCOUNTS_FETCHED) or the account's ``id_connection`` (ACCOUNT_SYNCED, ACCOUNT_*). Powens names the event by
    the URL it posts to, not in the body, so the shape decides."""
    found: list[str] = []
    connection = payload.get("connection")
    if isinstance(connection, dict) and _is_id(connection.get("id")):
        found.append(str(connection["id"]))
    if _is_id(payload.get("id_connection")):
        found.append(str(payload["id_connection"]))
    for account in payload.get("accounts") or []:
        if isinstance(account, dict) and _is_id(account.get("id_connection")):
            found.append(str(account["id_connection"]))
    return list(dict.fromkeys(found))


def _is_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.isdigit())
