"""Webhooks (§9.3, §9.4; security W2, W3): signed deliveries from the emulator to a real listener on loopback that
hands them to the provider as the core will (``PATH`` from the public URL, not from the request)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import date
from typing import Any

import pytest
from aiohttp import web
from powens_helpers import PUBLIC_URL, MemoryConsent

from connector.outbound import CoreServices
from connector.testing.powens import PowensEmulator, dumps
from connector.types import ActionRequired, Done, WebhookRequest, WebhookResult
from plugins.powens import Powens
from plugins.powens.webhook import signature

PREFIX = "/bank-feeds"  # the public URL has a path prefix that a proxy strips before our listener
PUBLIC_PATH = f"{PREFIX}/providers/powens/webhook"


class Listener:
    """A stand-in for the core's ``POST /providers/powens/webhook`` route."""

    def __init__(self, provider: Powens) -> None:
        self.provider = provider
        self.results: list[WebhookResult] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        hook = WebhookRequest(method=request.method, path=PUBLIC_PATH, headers=dict(request.headers),
                              body=await request.read(), client_ip=request.remote or "")
        try:
            result = await self.provider.webhook(hook)
        except PermissionError as exc:
            return web.json_response({"error": str(exc).split(":")[0]}, status=401)
        except ValueError:
            return web.json_response({"error": "malformed"}, status=400)
        self.results.append(result)
        return web.json_response({"dedupe_key": result.dedupe_key})


@pytest.fixture
async def listener(powens: PowensEmulator) -> AsyncIterator[Listener]:
    provider = Powens(powens.config(), CoreServices(PUBLIC_URL + PREFIX, "powens"))
    hook = Listener(provider)
    app = web.Application()
    app.router.add_post("/providers/powens/webhook", hook.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook.url = f"http://127.0.0.1:{runner.addresses[0][1]}/providers/powens/webhook"
    yield hook
    await runner.cleanup()
    await provider.close()


def connection_id(linked: tuple[MemoryConsent, Done]) -> int:
    return int(linked[1].grant.provider_consent_id or 0)


async def test_connection_synced(powens: PowensEmulator, listener: Listener,
                                 linked: tuple[MemoryConsent, Done]) -> None:
    cid = connection_id(linked)
    headers, body = powens.build_webhook("CONNECTION_SYNCED", cid, path=PUBLIC_PATH, id_webhook_data=987654)
    assert await powens.deliver(listener.url, headers, body) == 200
    (result,) = listener.results
    assert result.dedupe_key == "powens:987654"
    assert list(result.provider_consent_ids) == [str(cid)]
    assert str(cid) == linked[1].grant.provider_consent_id


async def test_account_synced_names_its_connection(powens: PowensEmulator, listener: Listener,
                                                   linked: tuple[MemoryConsent, Done]) -> None:
    cid = connection_id(linked)
    headers, body = powens.build_webhook("ACCOUNT_SYNCED", cid, path=PUBLIC_PATH)
    assert await powens.deliver(listener.url, headers, body) == 200
    assert list(listener.results[0].provider_consent_ids) == [str(cid)]


async def test_duplicate_delivery_has_the_same_dedupe_key(powens: PowensEmulator, listener: Listener,
                                                          linked: tuple[MemoryConsent, Done]) -> None:
    headers, body = powens.build_webhook("CONNECTION_SYNCED", connection_id(linked), path=PUBLIC_PATH)
    assert await powens.deliver(listener.url, headers, body) == 200
    assert await powens.deliver(listener.url, headers, body) == 200  # a retry keeps its first date (§16 OP-9)
    first, second = listener.results
    assert first.dedupe_key == second.dedupe_key


async def test_changed_body_byte_is_refused(powens: PowensEmulator, listener: Listener,
                                            linked: tuple[MemoryConsent, Done]) -> None:
    headers, body = powens.build_webhook("CONNECTION_SYNCED", connection_id(linked), path=PUBLIC_PATH)
    tampered = body.replace(b'"id_webhook_data": ', b'"id_webhook_data": 1', 1)
    assert await powens.deliver(listener.url, headers, tampered) == 401
    assert listener.results == []


async def test_wrong_secret_path_or_date_is_refused(powens: PowensEmulator, listener: Listener,
                                                    linked: tuple[MemoryConsent, Done]) -> None:
    cid = connection_id(linked)
    body = dumps({"id_webhook_data": 1, **powens.payload("CONNECTION_SYNCED", cid)})
    wrong_secret = powens.sign(PUBLIC_PATH, body, secret="not-the-secret")
    # Signed over the path the listener sees, not the configured public path: a proxy must not change the verdict.
    wrong_path = powens.sign("/providers/powens/webhook", body)
    wrong_date = {**powens.sign(PUBLIC_PATH, body), "BI-Signature-Date": "2020-01-01T00:00:00Z"}
    for headers in (wrong_secret, wrong_path, wrong_date):
        assert await powens.deliver(listener.url, headers, body) == 401
    assert listener.results == []


@pytest.mark.parametrize("missing", ["BI-Signature", "BI-Signature-Date"])
async def test_missing_header(powens: PowensEmulator, listener: Listener, linked: tuple[MemoryConsent, Done],
                              missing: str) -> None:
    headers, body = powens.build_webhook("CONNECTION_SYNCED", connection_id(linked), path=PUBLIC_PATH)
    del headers[missing]
    assert await powens.deliver(listener.url, headers, body) == 401


async def test_signature_not_base64(powens: PowensEmulator, listener: Listener,
                                    linked: tuple[MemoryConsent, Done]) -> None:
    headers, body = powens.build_webhook("CONNECTION_SYNCED", connection_id(linked), path=PUBLIC_PATH)
    headers["BI-Signature"] = "%%%not base64%%%"
    assert await powens.deliver(listener.url, headers, body) == 401


async def test_signed_but_malformed_body(powens: PowensEmulator, listener: Listener) -> None:
    body = b'{"id_webhook_data": 5, "connection": '
    assert await powens.deliver(listener.url, powens.sign(PUBLIC_PATH, body), body) == 400
    array = b"[1, 2]"
    assert await powens.deliver(listener.url, powens.sign(PUBLIC_PATH, array), array) == 400


async def test_gzip_body_is_verified_decompressed(powens: PowensEmulator, listener: Listener,
                                                  linked: tuple[MemoryConsent, Done]) -> None:
    headers, body = powens.build_webhook("CONNECTION_SYNCED", connection_id(linked), path=PUBLIC_PATH,
                                         id_webhook_data=42, gzip=True)
    assert await powens.deliver(listener.url, headers, body) == 200
    assert listener.results[0].dedupe_key == "powens:42"


async def test_without_delivery_id_the_body_hash_dedupes(powens: PowensEmulator) -> None:
    provider = Powens(powens.config(), CoreServices(PUBLIC_URL, "powens"))
    body = b'{"user": {"id": 1}}'
    request = WebhookRequest("POST", "/providers/powens/webhook", powens.sign("/providers/powens/webhook", body),
                             body, "127.0.0.1")
    first = await provider.webhook(request)
    again = await provider.webhook(request)
    assert first.dedupe_key.startswith("powens:sha256:") and first.dedupe_key == again.dedupe_key
    assert list(first.provider_consent_ids) == []
    await provider.close()


async def test_no_secret_configured_refuses_everything(powens: PowensEmulator) -> None:
    config: dict[str, Any] = powens.config()
    del config["webhook_secret"]
    provider = Powens(config, CoreServices(PUBLIC_URL, "powens"))
    body = b"{}"
    with pytest.raises(PermissionError):
        await provider.webhook(WebhookRequest("POST", "/p", powens.sign("/p", body), body, "127.0.0.1"))
    await provider.close()


def test_signature_matches_the_documented_example() -> None:
    # §9.3: base64(hmac_sha256(secret, "POST./providers/powens/webhook.<date>.<body>")).
    import base64
    import hashlib
    import hmac

    body = b'{"id_webhook_data":987654}'
    message = b"POST./providers/powens/webhook.2025-01-02T06:00:00Z." + body
    expected = base64.b64encode(hmac.new(b"k", message, hashlib.sha256).digest()).decode()
    assert signature("k", "post", "/providers/powens/webhook", "2025-01-02T06:00:00Z", body) == expected


async def test_raw_gzip_body_as_a_server_keeps_it(powens: PowensEmulator,
                                                  linked: tuple[MemoryConsent, Done]) -> None:
    provider = Powens(powens.config(), CoreServices(PUBLIC_URL, "powens"))
    headers, body = powens.build_webhook("CONNECTION_SYNCED", connection_id(linked),
                                         path="/providers/powens/webhook", id_webhook_data=7, gzip=True)
    assert body[:2] == b"\x1f\x8b"
    result = await provider.webhook(WebhookRequest("POST", "/providers/powens/webhook", headers, body, "127.0.0.1"))
    assert result.dedupe_key == "powens:7"
    await provider.close()


async def test_background_sync_notifies_then_the_feed_sees_the_state(
    powens: PowensEmulator, listener: Listener, provider: Powens, linked: tuple[MemoryConsent, Done]
) -> None:
    consent, done = linked
    cid = connection_id(linked)
    powens.webhook_url, powens.webhook_signed_path = listener.url, PUBLIC_PATH
    assert await powens.background_sync(cid, state="SCARequired") == 200
    assert list(listener.results[-1].provider_consent_ids) == [consent.provider_consent_id]
    account = done.grant.accounts[0]
    with pytest.raises(ActionRequired):
        await provider.read_account(consent, account, date(2000, 1, 1), None)
    # Fixed by a re-authorisation elsewhere; the next sync brings new transactions and another delivery.
    assert await powens.background_sync(cid, new_transactions=2) == 200
    read = await provider.read_account(consent, account, date(2000, 1, 1), None)
    assert len(read.booked) == 5
    assert listener.results[-1].dedupe_key != listener.results[-2].dedupe_key
