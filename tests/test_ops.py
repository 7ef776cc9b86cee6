"""Operator endpoints: health, readiness and metrics."""

from __future__ import annotations


async def test_health_answers(connector, http):
    async with http.get(f"{connector.url}/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]


async def test_ready_checks_database_and_jwks(connector, http):
    async with http.get(f"{connector.url}/ready") as resp:
        body = await resp.json()
    assert resp.status == 200, body
    assert body["checks"] == {"config": True, "database": True, "jwks": True}


async def test_ready_fails_when_the_key_set_cannot_be_fetched(sage, connector_factory, http):
    connector = await connector_factory(extra={"sage": {"jwks_url": "http://127.0.0.1:9/.well-known/jwks.json"}})
    async with http.get(f"{connector.url}/ready") as resp:
        body = await resp.json()
    assert resp.status == 503
    assert body["checks"]["jwks"] is False


async def test_metrics_count_requests_and_token_failures(connector, sage_calls, http):
    await sage_calls.announce()
    status, _ = await sage_calls.notify({}, headers=sage_calls.headers(token="not.a.token"))
    assert status == 401
    async with http.get(f"{connector.url}/metrics") as resp:
        text = await resp.text()
    assert resp.status == 200
    assert 'connector_token_failures_total{reason="malformed"} 1.0' in text
    assert 'connector_http_requests_total{route="notification",status="200"} 1.0' in text
    assert 'connector_notifications_total{new="true",type="resourceCreated:authorisation"} 1.0' in text
