"""Response headers on every route, error routes included (security.md P3, P5, P7, O9), and no stack trace in any
error answer (L2). Everything is requested over real HTTP from a running connector.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from connector.storage import models
from connector.testing.driver import Page
from connector.testing.fixtures import SageCalls

PAGE_ANCESTORS = "frame-ancestors 'self' http://127.0.0.1:* http://localhost:*"
NO_ANCESTORS = "frame-ancestors 'none'"
EVIL = "https://evil.example"
STACK_MARKERS = ("Traceback", 'File "', ".py", "line ", "Error:", "SecretError", "InvalidTag", "Exception")


async def request(http, method: str, url: str, **kwargs):
    headers = {"Origin": EVIL, **kwargs.pop("headers", {})}
    async with http.request(method, url, allow_redirects=False, headers=headers, **kwargs) as resp:
        return resp.status, resp.headers, await resp.read()


def assert_common(status: int, headers, where: str) -> None:
    assert headers.get("X-Content-Type-Options") == "nosniff", where
    assert headers.get("Cache-Control") == "no-store", where
    assert headers.get("Referrer-Policy") == "no-referrer", where
    assert "X-Frame-Options" not in headers, where
    assert "Access-Control-Allow-Origin" not in headers, where
    assert "Access-Control-Allow-Credentials" not in headers, where
    assert "Set-Cookie" not in headers, where
    csp = headers.get("Content-Security-Policy", "")
    assert len(headers.getall("Content-Security-Policy")) == 1, where
    for directive in ("default-src 'self'", "object-src 'none'", "base-uri 'none'", "script-src 'self'"):
        assert directive in csp, (where, directive)
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, where


def frame_ancestors(headers) -> str:
    return next(d.strip() for d in headers["Content-Security-Policy"].split(";") if "frame-ancestors" in d)


async def journey_url(sage_calls: SageCalls, http) -> str:
    authorisation_id = await sage_calls.announce()
    status, _, body = await request(http, "GET", sage_calls.auth_url(authorisation_id))
    assert status == 200
    return Page("", status, body.decode()).forms[0].action


async def test_pages_of_the_journey_may_be_framed_by_sage_only(sage_calls, http):
    url = await journey_url(sage_calls, http)
    announced = await sage_calls.announce()
    used = await sage_calls.announce()
    assert (await request(http, "GET", sage_calls.auth_url(used)))[0] == 200
    base = sage_calls.connector_url
    cases = [
        ("GET", sage_calls.auth_url(announced), 200),
        ("GET", url, 200),
        ("GET", sage_calls.auth_url(str(uuid.uuid4())), 403),
        ("GET", sage_calls.auth_url(used), 410),
        ("GET", sage_calls.auth_url(announced, redirect_uri="https://evil.example/"), 400),
        ("GET", sage_calls.auth_url(announced, state="<b>"), 400),
        ("GET", sage_calls.auth_url(announced, path="/authrefresh"), 400),
        ("GET", f"{base}/journey/{'a' * 43}", 404),
        ("POST", f"{base}/journey/{'a' * 43}", 404),
        ("GET", f"{base}/providers/demobank/callback?state=x", 404),
        ("GET", f"{base}/providers/nobody/callback", 404),
        ("OPTIONS", sage_calls.auth_url(announced), 405),
        ("POST", sage_calls.auth_url(announced), 405),
    ]
    for method, target, expected in cases:
        status, headers, _ = await request(http, method, target)
        assert status == expected, (method, target)
        assert headers["Content-Type"].startswith("text/html"), target
        assert_common(status, headers, target)
        assert frame_ancestors(headers) == PAGE_ANCESTORS, target
        assert "form-action 'self'" in headers["Content-Security-Policy"], target


async def test_posts_answer_303_with_the_same_headers(sage_calls, http):
    url = await journey_url(sage_calls, http)
    status, headers, _ = await request(http, "POST", url, data={"action": "sign_in", "username": "u", "password": "p"})
    assert (status, headers["Location"]) == (303, url)
    assert_common(status, headers, url)


async def test_machine_endpoints_and_unknown_paths_may_not_be_framed(sage, sage_calls, http):
    base = sage_calls.connector_url
    notify = sage_calls.headers()
    provider = {"Authorization": f"Bearer {sage.identity.provider_api_token()}"}
    cases = [
        ("POST", "/notification", {"headers": notify, "data": json.dumps(
            {"type": "x", "resource": {"id": "1", "type": "y"}})}, 200),
        ("POST", "/notification", {}, 401),
        ("POST", "/notification", {"headers": notify, "data": b"{"}, 400),
        ("POST", "/notification", {"headers": notify, "data": b" " * (64 * 1024 + 1)}, 413),
        ("POST", "/notification", {"headers": {**notify, "Content-Type": "text/plain"}, "data": b"{}"}, 415),
        ("GET", "/notification", {}, 405),
        ("GET", "/availableaccounts", {}, 401),
        ("GET", "/availableaccounts", {"headers": {"Authorization": f"Bearer {sage.identity.notification_token()}"}},
         403),
        ("GET", "/availableaccounts", {"headers": provider}, 400),
        ("GET", f"/availableaccounts?externalId={uuid.uuid4()}", {"headers": provider}, 404),
        ("GET", "/nothing-here", {}, 404),
        ("GET", "/auth/../etc/passwd", {}, 404),
        ("GET", "/health", {}, 200),
        ("GET", "/ready", {}, (200, 503)),
        ("GET", "/metrics", {}, 200),
        ("GET", "/static/connector.css", {}, 200),
        ("GET", "/static/../connector/app.py", {}, 404),
        ("GET", "/journey", {}, 404),
        ("OPTIONS", "/notification", {"headers": {"Access-Control-Request-Method": "POST"}}, 405),
    ]
    for method, path, kwargs, expected in cases:
        status, headers, body = await request(http, method, base + path, **kwargs)
        assert status in (expected if isinstance(expected, tuple) else (expected,)), (method, path, body[:200])
        assert_common(status, headers, path)
        assert frame_ancestors(headers) == NO_ANCESTORS, (method, path)
        assert "form-action 'none'" in headers["Content-Security-Policy"], path
        if status >= 400 and path.startswith(("/notification", "/availableaccounts")):
            assert headers["Content-Type"].startswith("application/json"), path
            assert set(json.loads(body)) == {"error", "message"}, path


async def test_hsts_is_sent_when_the_public_url_is_https(connector_factory, http):
    secure = await connector_factory(extra={"server": {"public_url": "https://connector.example"}})
    status, headers, _ = await request(http, "GET", f"http://127.0.0.1:{secure.port}/nothing-here")
    assert status == 404
    assert headers["Strict-Transport-Security"].startswith("max-age=")


async def test_no_hsts_on_plain_http_loopback(connector, http):
    _, headers, _ = await request(http, "GET", f"{connector.url}/nothing-here")
    assert "Strict-Transport-Security" not in headers


# --- L2: no stack trace in any error answer --------------------------------------------------------------------------


def assert_no_trace(body: bytes, where: str) -> None:
    text = body.decode(errors="replace")
    for marker in STACK_MARKERS:
        assert marker not in text, (where, marker)


async def test_a_crash_behind_a_page_is_a_plain_500_page(sage_calls, http):
    url = await journey_url(sage_calls, http)
    handle = url.rsplit("/", 1)[1]
    await models.Journey.filter(handle=handle).update(page_sealed=b"\x01not a sealed value at all")
    status, headers, body = await request(http, "GET", url)
    assert status == 500
    page = Page(url, status, body.decode())
    assert page.h1 == "Something went wrong on our side"
    assert_no_trace(body, url)
    assert_common(status, headers, url)
    assert frame_ancestors(headers) == PAGE_ANCESTORS


async def test_a_crash_behind_availableaccounts_is_a_plain_500_json(sage, sage_calls, browser, http):
    external_id = (await sage_calls.onboard(browser, "ivy")).external_ids[0]
    await models.Account.filter(external_id=external_id).update(account_identifier_sealed=b"\x01broken")
    status, headers, body = await request(http, "GET", f"{sage_calls.connector_url}/availableaccounts?"
                                          f"externalId={external_id}",
                                          headers={"Authorization": f"Bearer {sage.identity.provider_api_token()}"})
    assert status == 500
    assert json.loads(body) == {"error": "internal_error", "message": "Internal error."}
    assert_no_trace(body, "/availableaccounts")
    assert frame_ancestors(headers) == NO_ANCESTORS


async def test_oversized_or_broken_requests_get_a_plain_answer(sage_calls, connector, http):
    notify = sage_calls.headers()
    # A 100 KB Authorization header is refused by the server before any token parsing.
    big = {**notify, "Authorization": "Bearer " + "a" * 100_000}
    status, _, body = await request(http, "POST", f"{connector.url}/notification", headers=big, data=b"{}")
    assert 400 <= status < 500
    assert_no_trace(body, "big header")
    # A request the server can't parse, on a plain socket.
    reader, writer = await asyncio.open_connection("127.0.0.1", connector.port)
    writer.write(b"POST /notification HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\nConnection: close\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 4"), data[:40]
    head, _, body = data.partition(b"\r\n\r\n")
    assert_no_trace(body, "bad request")
    assert json.loads(body)["error"] == "invalid_request"
    assert b"frame-ancestors 'none'" in head


@pytest.mark.parametrize("path", ["/auth", "/authrefresh"])
async def test_expired_journey_and_link_pages_carry_the_headers(sage_calls, http, path):
    url = await journey_url(sage_calls, http)
    handle = url.rsplit("/", 1)[1]
    await models.Journey.filter(handle=handle).update(expires_at=datetime.now(UTC) - timedelta(seconds=1))
    status, headers, _ = await request(http, "GET", url)
    assert status == 410
    assert_common(status, headers, url)
    assert frame_ancestors(headers) == PAGE_ANCESTORS
    status, headers, _ = await request(http, "GET", sage_calls.auth_url(str(uuid.uuid4()), path=path))
    assert status in (400, 403)
    assert frame_ancestors(headers) == PAGE_ANCESTORS
