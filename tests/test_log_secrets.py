"""No secret reaches a log line (security.md L1): run flows with DEBUG logs captured, then look for every secret
the run used — Sage credentials, the notification header, tokens, typed passwords, one-time codes, journey handles,
provider states and full account numbers."""

from __future__ import annotations

import json
import logging
from urllib.parse import parse_qs, urlsplit

from connector.logs import JsonFormatter
from connector.storage import models


def all_log_text(records: list[logging.LogRecord]) -> str:
    formatter = JsonFormatter()
    lines = []
    for record in records:
        lines.append(formatter.format(record))
        lines.append(record.getMessage())
        lines.append(json.dumps({k: str(v) for k, v in record.__dict__.items()}, default=str))
    return "\n".join(lines)


async def test_no_secret_in_any_log_line(sage, connector, sage_calls, browser, http, caplog):
    caplog.set_level(logging.DEBUG)
    password = "pw-Zq81-unique-password"
    notification_token = sage.identity.notification_token()
    headers = sage_calls.headers(token=notification_token)
    authorisation_id = await sage_calls.announce()
    status, _ = await sage_calls.notify({"type": "resourceCreated",
                                         "resource": {"id": "5b7c3e0e-6c1e-4d7e-9f5e-3a1d2b4c5e6f",
                                                      "type": "authorisation"},
                                         "additionalData": {"bankId": "10aaeee6-4691-4443-8198-df39aaa8007c"}},
                                        headers=headers)
    assert status == 200
    page = await browser.get(sage_calls.auth_url(authorisation_id))
    handle = page.forms[0].action.rsplit("/", 1)[1]
    page = await browser.submit(page, {"User name": "otp", "Password": password}, button="Sign in")
    page = await browser.submit(page, {"Security code": "000000"}, button="Confirm")
    page = await browser.submit(page, {"Security code": "123456"}, button="Confirm")
    done = await browser.submit(page, button="Share with Sage")
    sage_state = parse_qs(urlsplit(done.left_to).query)["state"][0]
    patched = sage.patches[0].body["data"]["bankAccounts"]
    # A redirect journey issues a provider state; a refused token and a bad header are logged as refusals.
    auth2 = await sage_calls.announce()
    page = await browser.get(sage_calls.auth_url(auth2))
    page = await browser.submit(page, {"User name": "redirect", "Password": password}, button="Sign in")
    bank_url, _ = page.link("Continue to your bank")
    provider_state = parse_qs(urlsplit(bank_url).query)["state"][0]
    await browser.get(bank_url)
    bad = dict(headers, **{connector.endpoints.notification_header_name: "x" * 40})
    await sage_calls.notify({}, headers=bad)
    await sage_calls.notify({}, headers=sage_calls.headers(token=notification_token[:-4] + "AAAA"))
    token = sage.identity.provider_api_token()
    async with http.get(f"{connector.url}/availableaccounts", params={"externalId": patched[0]["bankAccountExternalId"]},
                        headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
    consent = await models.Consent.first()
    demo_token = connector.app.ctx.box.open_json(consent.secrets_sealed, f"consent.secrets_sealed:{consent.id}")["token"]

    text = all_log_text(caplog.records)
    assert {"journey started", "onboarding linked", "token refused"} <= {r.getMessage() for r in caplog.records}
    secrets = {
        "Sage client secret": sage.client_secret,
        "Sage API key": sage.api_key,
        "notification header value": connector.endpoints.notification_header_value,
        "notification token": notification_token,
        "notification token signature": notification_token.rsplit(".", 1)[1],
        "ProviderAPI token": token,
        "typed password": password,
        "one-time code": "123456",
        "journey handle": handle,
        "provider state": provider_state,
        "Sage state": sage_state,
        "Demo Bank token": demo_token,
        "Sage access token": next(iter(sage.issued_tokens)) if getattr(sage, "issued_tokens", None) else "n/a-token",
        **{f"account number {i}": a["accountIdentifier"] for i, a in enumerate(patched)},
    }
    leaked = [name for name, value in secrets.items() if value and value in text]
    assert leaked == []
