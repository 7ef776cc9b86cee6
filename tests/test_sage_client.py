"""SageClient against the Sage emulator, and the shared rate limiter on its own."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest

from connector.outbound import guarded_session
from connector.sage import Backoff, RateLimiter, SageClient, SageError, parse_retry_after
from connector.testing.sage import SageEmulator

STATEMENT = json.dumps({"data": {
    "principalId": "acc-1",
    "bankId": "bank-1",
    "expected": {"transactionDetailsCount": 1, "accountDetailsCount": 1, "transactionCreditSum": 250.00,
                 "transactionDebitSum": 0},
    "accountDetails": [{"bankAccountId": "acc-1", "status": "active", "balances": {
        "ledgerBalance": 1250.00, "ledgerBalanceDate": "2025-01-01T12:00:00.000Z",
        "availableBalance": 1250.00, "availableBalanceDate": "2025-01-01T12:00:00.000Z"}}],
    "transactionDetails": [{"uniqueId": "u-1", "bankAccountId": "acc-1", "transactionAmount": 250.00,
                            "transactionType": "CREDIT", "transactionStatus": "posted",
                            "datePosted": "2025-01-01T12:00:00.000Z", "description": "Salary"}],
}}, indent=1).encode()  # unusual spacing on purpose: the bytes must arrive exactly as given

ACCOUNTS = [{"bankAccountExternalId": "ext-1", "accountName": "Current ••1234", "bankIdentifier": "200000",
             "branchIdentifier": "", "accountIdentifier": "12345678"}]


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        target = self.now + max(seconds, 0)
        await asyncio.sleep(0)
        self.now = max(self.now, target)


@pytest.fixture
async def emulator() -> AsyncIterator[SageEmulator]:
    async with SageEmulator(rate=None) as emu:
        yield emu


@pytest.fixture
async def session(emulator: SageEmulator) -> AsyncIterator[aiohttp.ClientSession]:
    async with guarded_session([emulator.base_url], timeout=5) as s:
        yield s


@pytest.fixture
def make_client(emulator: SageEmulator, session: aiohttp.ClientSession) -> Callable[..., SageClient]:
    def make(**overrides: Any) -> SageClient:
        settings: dict[str, Any] = {
            **emulator.client_settings(),
            "limiter": RateLimiter(100, backoff=Backoff(0.05, 0.2)),
            "backoff_base": 0.01,
            "backoff_cap": 0.05,
            "interactive_delays": (0.05, 0.1),
            **overrides,
        }
        return SageClient(session, **settings)

    return make


@pytest.fixture
def client(make_client: Callable[..., SageClient]) -> SageClient:
    return make_client()


# -- token -----------------------------------------------------------------------------------------------------------


async def test_token_fetched_once_and_reused(client: SageClient, emulator: SageEmulator) -> None:
    await asyncio.gather(*(client.get_statement(f"s-{i}") for i in range(10)))  # single flight
    await client.post_statement(STATEMENT)
    assert emulator.token_requests == 1 and client.stats.token_fetches == 1
    form = emulator.requests_to("/oauth/token")[0].json
    assert form == {"grant_type": "client_credentials", "client_id": emulator.client_id,
                    "client_secret": "<redacted>", "audience": emulator.audience}
    api = emulator.requests_to("/v1/statements", "POST")[0]
    assert api.headers["Authorization"] == "Bearer <redacted>" and api.headers["x-api-key"] == "<redacted>"
    assert api.headers["Accept"] == "application/json" and api.headers["Content-Type"] == "application/json"
    assert "Content-Type" not in emulator.requests_to("/v1/statements/s-0")[0].headers
    assert client.stats.requests == 11


async def test_token_refreshed_five_minutes_before_expiry(make_client: Callable[..., SageClient],
                                                          emulator: SageEmulator) -> None:
    clock = FakeClock()
    emulator.expires_in = 3600
    client = make_client(clock=clock)
    await client.get_statement("s")
    clock.now += 3600 - 301
    await client.get_statement("s")
    assert emulator.token_requests == 1
    clock.now += 2
    await client.get_statement("s")
    assert emulator.token_requests == 2


async def test_token_without_expires_in_lives_475_minutes(make_client: Callable[..., SageClient],
                                                          emulator: SageEmulator) -> None:
    clock = FakeClock()
    emulator.expires_in = None
    client = make_client(clock=clock)
    await client.get_statement("s")
    clock.now += 474 * 60
    await client.get_statement("s")
    assert emulator.token_requests == 1
    clock.now += 2 * 60
    await client.get_statement("s")
    assert emulator.token_requests == 2


async def test_401_refetches_the_token_and_replays_once(client: SageClient, emulator: SageEmulator) -> None:
    await client.get_statement("s")
    emulator.expire_tokens()
    assert await client.post_statement(STATEMENT)
    assert emulator.token_requests == 2 and client.stats.unauthorized == 1
    posts = emulator.requests_to("/v1/statements", "POST")
    assert [p.body for p in posts] == [STATEMENT, STATEMENT]
    assert len(emulator.statements) == 1


async def test_second_401_is_unauthorized(make_client: Callable[..., SageClient], emulator: SageEmulator) -> None:
    client = make_client(api_key="not-the-key")
    with pytest.raises(SageError) as caught:
        await client.get_statement("s")
    assert (caught.value.reason, caught.value.status) == ("unauthorized", 401)
    assert emulator.token_requests == 2 and len(emulator.requests_to("/v1")) == 2


async def test_refused_credentials_fail_fast_until_the_backoff_passes(make_client: Callable[..., SageClient],
                                                                      emulator: SageEmulator) -> None:
    clock = FakeClock()
    client = make_client(client_secret="wrong", clock=clock)
    for _ in range(3):
        with pytest.raises(SageError) as caught:
            await client.get_statement("s")
        assert caught.value.reason == "token_rejected"
    assert emulator.token_requests == 1  # not hammered
    assert emulator.requests_to("/v1") == []
    clock.now += 1.0  # past the first backoff ceiling
    with pytest.raises(SageError):
        await client.get_statement("s")
    assert emulator.token_requests == 2


async def test_token_endpoint_outage_is_retried(client: SageClient, emulator: SageEmulator) -> None:
    emulator.fail_next(503, count=2, path_prefix="/oauth/token")
    assert await client.get_statement("s") == {"status": "unknown"}
    assert emulator.token_requests == 3


# -- 429 -------------------------------------------------------------------------------------------------------------


async def test_429_pauses_the_whole_client_for_retry_after(client: SageClient, emulator: SageEmulator) -> None:
    emulator.throttle(1, retry_after=1)
    posting = asyncio.create_task(client.post_statement(STATEMENT))
    while emulator.count_429 == 0:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    other = asyncio.create_task(client.get_statement("s"))  # started during the pause: it waits too
    statement_id, _ = await asyncio.gather(posting, other)
    assert emulator.statement(statement_id).status == "processing"
    throttled_at = next(r.at for r in emulator.requests_to("/v1") if r.method == "POST")
    later = [r for r in emulator.requests_to("/v1") if r.at > throttled_at]
    assert len(later) == 2 and all(r.at - throttled_at >= 0.99 for r in later)
    posts = emulator.requests_to("/v1/statements", "POST")
    assert [p.body for p in posts] == [STATEMENT, STATEMENT]
    assert client.stats.throttled == 1 and client.stats.retries == 1


async def test_429_without_retry_after_uses_jittered_backoff(client: SageClient, emulator: SageEmulator) -> None:
    emulator.throttle(2, retry_after=None)
    assert await client.get_statement("s") == {"status": "unknown"}
    assert client.stats.throttled == 2
    assert client._limiter.backoff.failures == 0  # reset by the success


async def test_429_http_date_retry_after(client: SageClient, emulator: SageEmulator) -> None:
    when = (datetime.now(UTC) + timedelta(seconds=1)).replace(microsecond=0)  # HTTP dates have whole seconds
    emulator.throttle(1, retry_after=format_datetime(when, usegmt=True))
    started = time.monotonic()
    expected_wait = (when - datetime.now(UTC)).total_seconds()
    assert await client.get_statement("s") == {"status": "unknown"}
    assert time.monotonic() - started >= expected_wait - 0.05


async def test_429_exhausts_the_attempts(make_client: Callable[..., SageClient], emulator: SageEmulator) -> None:
    client = make_client(max_attempts=3)
    emulator.throttle(5, retry_after="0.01")
    with pytest.raises(SageError) as caught:
        await client.get_statement("s")
    assert (caught.value.reason, caught.value.status) == ("throttled", 429)
    assert len(emulator.requests_to("/v1")) == 3


def test_parse_retry_after() -> None:
    now = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:07 GMT", now=lambda: now) == 7.0
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", now=lambda: now) == 0.0
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after("99999999") == 600.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    assert parse_retry_after(None) is None


# -- 5xx, timeouts, refusals ------------------------------------------------------------------------------------------


async def test_5xx_resends_identical_bytes(client: SageClient, emulator: SageEmulator) -> None:
    emulator.fail_next(503, count=2, path_prefix="/v1/statements")
    statement_id = await client.post_statement(STATEMENT)
    posts = emulator.requests_to("/v1/statements", "POST")
    assert [p.body for p in posts] == [STATEMENT] * 3
    assert client.stats.retries == 2
    assert emulator.statement(statement_id).body == emulator.statements[0]


async def test_5xx_gives_up_after_max_attempts(make_client: Callable[..., SageClient],
                                               emulator: SageEmulator) -> None:
    client = make_client(max_attempts=3)
    emulator.fail_next(502, count=10)
    with pytest.raises(SageError) as caught:
        await client.post_statement(STATEMENT)
    assert (caught.value.reason, caught.value.status) == ("unavailable", 502)
    assert len(emulator.requests_to("/v1")) == 3


async def test_timeout_is_retried_with_the_same_bytes(make_client: Callable[..., SageClient],
                                                      emulator: SageEmulator) -> None:
    client = make_client(read_timeout=0.2)
    emulator.delay_next(0.5, path_prefix="/v1/statements")
    statement_id = await client.post_statement(STATEMENT)
    assert client.stats.timeouts == 1 and client.stats.retries == 1
    await asyncio.sleep(0.5)  # the first attempt is processed late, as after a lost answer
    assert len(emulator.statements) == 1 and emulator.replayed_statements == 1
    assert emulator.statement(statement_id).status == "processing"


async def test_rejected_statement_is_not_retried(client: SageClient, emulator: SageEmulator) -> None:
    emulator.reject_statements("duplicate_unique_id", "uniqueId u-1 was already sent\n\tby you")
    with pytest.raises(SageError) as caught:
        await client.post_statement(STATEMENT)
    assert (caught.value.reason, caught.value.status) == ("rejected", 400)
    assert caught.value.detail == "duplicate_unique_id: uniqueId u-1 was already sent by you"
    assert len(emulator.requests_to("/v1")) == 1


async def test_2xx_without_id_is_unexpected(client: SageClient, emulator: SageEmulator) -> None:
    emulator.fail_next(201, body={"data": {"id": "x"}})
    with pytest.raises(SageError) as caught:
        await client.post_statement(STATEMENT)
    assert caught.value.reason == "unexpected_response"
    assert len(emulator.requests_to("/v1")) == 1  # never resent: it could trip the duplicate rule


async def test_redirect_and_foreign_origin_are_refused(make_client: Callable[..., SageClient],
                                                       emulator: SageEmulator) -> None:
    client = make_client()
    emulator.fail_next(302, headers={"Location": "http://127.0.0.1:9/elsewhere"})
    with pytest.raises(SageError) as caught:
        await client.get_statement("s")
    assert caught.value.reason == "refused_origin"
    elsewhere = make_client(api_url="http://127.0.0.1:9")
    with pytest.raises(SageError) as caught:
        await elsewhere.get_statement("s")
    assert caught.value.reason == "refused_origin"


# -- statements and banks -----------------------------------------------------------------------------------------


async def test_statement_roundtrip(client: SageClient, emulator: SageEmulator) -> None:
    statement_id = await client.post_statement(STATEMENT)
    assert emulator.requests_to("/v1/statements", "POST")[0].body == STATEMENT
    assert await client.get_statement(statement_id) == {"_id": statement_id, "status": "processing", "errors": []}
    assert (await client.get_statement(statement_id))["status"] == "complete"
    assert await client.get_statement("no-such-statement") == {"status": "unknown"}
    assert await client.get_statement("../banks") == {"status": "unknown"}  # the id stays one path segment
    assert emulator.requests[-1].path == "/v1/statements/../banks"


async def test_post_banks(client: SageClient, emulator: SageEmulator) -> None:
    urls = {k: f"https://connector.example/{k}" for k in ("notification", "availableAccounts", "auth", "reAuth")}
    bank = {"name": "Example Bank", "countryCode": "GB", "url": "https://bank.example", "externalRef": "agg-1",
            "supportiframe": True, "callbackURLs": urls}
    answer = await client.post_banks({"data": {"toCreate": [bank]}})
    created = answer["data"]["created"][0]
    assert created["externalRef"] == "agg-1" and created["principalId"] in emulator.banks
    with pytest.raises(SageError) as caught:
        await client.post_banks({"data": {"toCreate": [{**bank, "callbackURLs": {}}]}})
    assert (caught.value.reason, caught.value.status) == ("rejected", 400)
    assert caught.value.detail.startswith("invalid_callback_urls")


# -- PATCH /v1/authorisations ----------------------------------------------------------------------------------------


async def test_patch_bodies(client: SageClient, emulator: SageEmulator) -> None:
    await client.patch_authorisation("0b7f3c3e-1111-4222-8333-444455556666", ACCOUNTS)
    await client.patch_authorisation("1b7f3c3e-1111-4222-8333-444455556666", None)
    onboarding, reauth = emulator.requests_to("/v1/authorisations")
    assert onboarding.method == "PATCH" and onboarding.path.endswith("/0b7f3c3e-1111-4222-8333-444455556666")
    assert json.loads(onboarding.body) == {"data": {"status": "success", "bankAccounts": ACCOUNTS}}
    assert json.loads(reauth.body) == {"data": {"status": "success"}}
    assert b"bankAccounts" not in reauth.body


@pytest.mark.parametrize("status", [200, 201, 204])
async def test_patch_success_statuses(client: SageClient, emulator: SageEmulator, status: int) -> None:
    emulator.patch_status = status
    await client.patch_authorisation("a-1", None)


async def test_patch_other_status_fails_at_once(client: SageClient, emulator: SageEmulator) -> None:
    emulator.expect_authorisation("a-known")
    with pytest.raises(SageError) as caught:
        await client.patch_authorisation("a-unknown", None)
    assert (caught.value.reason, caught.value.status) == ("rejected", 404)
    assert len(emulator.requests_to("/v1")) == 1
    emulator.fail_next(202)
    with pytest.raises(SageError) as caught:
        await client.patch_authorisation("a-known", None)
    assert caught.value.reason == "unexpected_response"


async def test_patch_retries_at_most_three_times(client: SageClient, emulator: SageEmulator) -> None:
    emulator.fail_next(503, count=3)
    with pytest.raises(SageError) as caught:
        await client.patch_authorisation("a-1", ACCOUNTS)
    assert (caught.value.reason, caught.value.status) == ("unavailable", 503)
    assert len(emulator.requests_to("/v1")) == 3
    emulator.fail_next(500, count=2)
    await client.patch_authorisation("a-1", ACCOUNTS)  # third attempt succeeds


async def test_patch_honours_short_retry_after_only(client: SageClient, emulator: SageEmulator) -> None:
    emulator.throttle(1, retry_after="0.2")
    await client.patch_authorisation("a-1", None)
    assert len(emulator.patches) == 1
    emulator.throttle(1, retry_after=6)
    started = time.monotonic()
    with pytest.raises(SageError) as caught:
        await client.patch_authorisation("a-2", None)
    assert caught.value.reason == "throttled" and time.monotonic() - started < 0.5
    assert client._limiter.pause_remaining() > 5  # everyone else waits as Sage asked
    with pytest.raises(SageError) as caught:  # a PATCH cannot wait that long: it fails without a request
        await client.patch_authorisation("a-3", None)
    assert caught.value.reason == "throttled" and len(emulator.requests_to("/v1")) == 3


async def test_patch_gives_up_within_its_budget(make_client: Callable[..., SageClient],
                                                emulator: SageEmulator) -> None:
    client = make_client(interactive_read_timeout=0.3, interactive_budget=0.5)
    emulator.delay_next(5, count=5)
    started = time.monotonic()
    with pytest.raises(SageError) as caught:
        await client.patch_authorisation("a-1", None)
    assert caught.value.reason == "unavailable"
    assert time.monotonic() - started < 0.8
    assert len(emulator.requests_to("/v1")) == 2  # 0.3 s timeout, ~0.05 s pause, then the budget ends


# -- secrets ---------------------------------------------------------------------------------------------------------


async def test_no_secret_in_logs_or_errors(make_client: Callable[..., SageClient], emulator: SageEmulator,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = make_client(max_attempts=2)
    await client.get_statement("s")
    emulator.fail_next(500, count=2, body={"error": f"bad key {emulator.api_key} for {emulator.issued_tokens[0]}"})
    errors: list[SageError] = []
    try:
        await client.post_statement(STATEMENT)
    except SageError as exc:
        errors.append(exc)
    emulator.fail_next(400, body={"message": f"secret was {emulator.client_secret}"})
    try:
        await client.post_banks({"data": {}})
    except SageError as exc:
        errors.append(exc)
    assert [e.reason for e in errors] == ["unavailable", "rejected"]
    assert "[redacted]" in errors[0].detail and "[redacted]" in errors[1].detail
    secrets = [emulator.api_key, emulator.client_secret, *emulator.issued_tokens]
    texts = [str(e) for e in errors] + [r.getMessage() + repr(r.__dict__) for r in caplog.records]
    assert not [t for t in texts for s in secrets if s in t]


# -- the rate limiter ------------------------------------------------------------------------------------------------


async def test_client_never_exceeds_the_rate() -> None:
    async with SageEmulator(rate=10) as emulator:
        async with guarded_session([emulator.base_url]) as own_session:
            client = SageClient(own_session, **emulator.client_settings(), limiter=RateLimiter(10))
            started = time.monotonic()
            await asyncio.gather(*(client.get_statement(f"s-{i}") for i in range(30)))
            elapsed = time.monotonic() - started
    assert emulator.count_429 == 0
    assert 2.5 < elapsed < 4.0  # 29 gaps of 1/(10 * 0.97) s


async def test_limiter_keeps_95_percent_of_the_rate_and_never_exceeds_it() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, clock=clock, sleep=clock.sleep)
    grants = []
    for _ in range(1000):
        await limiter.acquire()
        grants.append(clock.now)
    # No one-second window holds more than 10 grants, so the 11th is always more than 1 s after the 1st.
    assert min(b - a for a, b in zip(grants, grants[10:])) > 1.0
    achieved = (len(grants) - 1) / (grants[-1] - grants[0])
    assert 9.5 <= achieved <= 10


async def test_limiter_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, burst=5, clock=clock, sleep=clock.sleep)
    for _ in range(5):
        await limiter.acquire()
    assert clock.now == 1000.0
    await limiter.acquire()
    assert clock.now > 1000.0


async def test_priority_waiters_are_served_first() -> None:
    limiter = RateLimiter(40)
    await limiter.acquire()  # empties the bucket
    order: list[str] = []

    async def take(name: str, priority: bool) -> None:
        await limiter.acquire(priority=priority)
        order.append(name)

    normal = [asyncio.create_task(take(f"n{i}", False)) for i in range(3)]
    await asyncio.sleep(0)
    urgent = asyncio.create_task(take("p", True))
    await asyncio.gather(*normal, urgent)
    assert order == ["p", "n0", "n1", "n2"]


async def test_pause_holds_everyone_and_cancelled_waiters_leave() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, clock=clock, sleep=clock.sleep)
    await limiter.acquire()
    limiter.pause_for(30)
    limiter.pause_for(5)  # never shortens a pause
    gone = asyncio.create_task(limiter.acquire())
    waiting = asyncio.create_task(limiter.acquire(priority=True))
    await asyncio.sleep(0)  # both are queued now, neither granted
    gone.cancel()
    await waiting
    assert clock.now >= 1030.0
    assert limiter.granted == 2


def test_throttled_uses_retry_after_else_backoff() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, clock=clock, backoff=Backoff(rng=lambda: 0.999))
    assert limiter.throttled(3.0) == 3.0
    assert limiter.pause_remaining() == 3.0
    assert limiter.throttled(None) == 3.0  # already paused: a 429 sent before the pause does not escalate
    pauses = []
    for _ in range(3):
        clock.now += 10
        pauses.append(round(limiter.throttled(None), 2))
    assert pauses == [1.0, 2.0, 4.0]
    limiter.recovered()
    clock.now += 10
    assert round(limiter.throttled(None), 2) == 1.0


def test_backoff_ceilings() -> None:
    backoff = Backoff(rng=lambda: 1.0)
    assert [backoff.next() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    backoff.reset()
    assert backoff.next() == 1
    jittered = Backoff(rng=lambda: 0.25)
    assert jittered.next() == 0.25
    for _ in range(2000):  # no overflow after many failures
        jittered.next()
    assert jittered.next() == 15.0


async def test_lowercase_retry_after_is_read(client: SageClient, emulator: SageEmulator) -> None:
    emulator.fail_next(429, headers={"retry-after": "0.3"})
    started = time.monotonic()
    assert await client.get_statement("s") == {"status": "unknown"}
    assert time.monotonic() - started >= 0.29
