"""The feed under faults: Sage's rate limit and 429 storms, 5xx, timeouts, expiring tokens, refused, failed and slow
statements, and a provider that is down. Every test ends by checking each transaction reached Sage exactly once."""
# ruff: noqa: F811  (pytest fixtures imported from feed_provider are parameters of the tests)

from __future__ import annotations

import asyncio
from datetime import timedelta

from feed_provider import (  # noqa: F401 - fixtures
    World,
    connector,
    connector_extra,
    link_accounts,
    make_feed,
    plugins,
    today,
    world,
)

from connector.feed import admin
from connector.feed.lease import Lease
from connector.metrics import Metrics
from connector.sage.ratelimit import Backoff, RateLimiter
from connector.storage import models
from connector.testing.connector import eventually


async def setup(world: World, browser, sage_calls, sage, user: str, *, accounts: int = 1, days: int = 15,
                per_day: int = 1) -> list[str]:
    made = world.open_user(user, accounts=accounts)
    start = today() - timedelta(days=days + 5)
    for account in made:
        world.daily(account.provider_account_id, start, days, per_day)
    return await link_accounts(browser, sage_calls, sage, user, start=start)


def exactly_once(sage, world: World, ids: list[str], user: str) -> None:
    for bank_account_id, account in zip(ids, world.users[user]):
        got = sage.transactions_by_account.get(bank_account_id, [])
        assert len(got) == len(set(got)) == len(world.books[account.provider_account_id].present())


async def metric(feed, name: str, **labels: str) -> float:
    """One sample of the feed's Prometheus metrics as ``/metrics`` shows it after a round; 0 when absent."""
    await feed.export_states()
    return feed.metrics.registry.get_sample_value(name, labels) or 0.0


def max_in_flight(sage) -> int:
    """Most accounts with a statement posted and not yet seen complete, at any moment (from Sage's log)."""
    open_ids: set[str] = set()
    most = 0
    for request in sage.requests:
        if request.method == "POST" and request.path == "/v1/statements" and isinstance(request.json, dict):
            open_ids.add(request.json["data"]["principalId"])
        elif request.method == "GET" and request.path.startswith("/v1/statements/"):
            record = sage.statement(request.path.rsplit("/", 1)[-1])
            if record.status == "complete":
                open_ids.discard(record.bank_account_id)
        most = max(most, len(open_ids))
    return most


async def test_many_accounts_in_parallel_within_the_rate_limit(sage, sage_calls, browser, make_feed, world):
    ids = await setup(world, browser, sage_calls, sage, "par", accounts=6, days=12)
    sage.rate = 10  # Sage's agreed rate, enforced by the emulator with 429
    feed = make_feed(rate=10, batch_size=8, parallel_accounts=6)
    report = await feed.run_once()
    assert report.ok, report.lines()
    exactly_once(sage, world, ids, "par")
    assert sage.count_429 == 0
    assert max_in_flight(sage) >= 3  # accounts ran in parallel, one statement each at a time (else Sage 409s)
    assert all(len([s for s in sage.statements if s["data"]["principalId"] == i]) == 2 for i in ids)


async def test_a_429_storm_is_sat_out(sage, sage_calls, browser, make_feed, world):
    ids = await setup(world, browser, sage_calls, sage, "storm", accounts=2, days=12)
    sage.throttle(12, retry_after="0.1")
    feed = make_feed(limiter=RateLimiter(50, backoff=Backoff(0.05, 0.2)), batch_size=6, metrics=Metrics())
    report = await feed.run_once()
    assert report.ok, report.lines()
    assert sage.count_429 == 12 and feed.sage.stats.throttled == 12
    sent = sum(1 for s in sage.statements if s["data"]["principalId"] in ids)
    assert await metric(feed, "connector_sage_429_total") == 12
    assert await metric(feed, "connector_statements_total", outcome="sent") == sent
    exactly_once(sage, world, ids, "storm")


async def test_5xx_resends_identical_bytes(sage, sage_calls, browser, make_feed, world):
    [bank_account_id] = await setup(world, browser, sage_calls, sage, "fivexx")
    sage.fail_next(503, count=3, path_prefix="/v1/statements")
    assert (await make_feed().run_once()).ok
    posts = [r.body for r in sage.requests_to("/v1/statements", "POST")]
    assert len(posts) == 4 and len(set(posts)) == 1  # three 503s, then the same bytes accepted
    exactly_once(sage, world, [bank_account_id], "fivexx")


async def test_5xx_beyond_the_client_retries_leaves_the_statement_for_the_next_run(
        sage, sage_calls, browser, make_feed, world):
    [bank_account_id] = await setup(world, browser, sage_calls, sage, "down5")
    sage.fail_next(500, count=5, path_prefix="/v1/statements")
    feed = make_feed()
    report = await feed.run_once()
    assert not report.ok and report.outcomes[bank_account_id].reason == "sage_unavailable"
    report = await feed.run_once()
    assert report.ok
    posts = {r.body for r in sage.requests_to("/v1/statements", "POST")}
    assert len(posts) == 1  # the same statement, resent
    exactly_once(sage, world, [bank_account_id], "down5")


async def test_a_timeout_resends_the_same_statement(sage, sage_calls, browser, make_feed, world):
    ids = await setup(world, browser, sage_calls, sage, "slow", days=20)
    sage.delay_next(1.0, count=1, path_prefix="/v1/statements")
    feed = make_feed(read_timeout=0.3, batch_size=10)
    report = await feed.run_once()
    assert report.ok, report.lines()
    assert feed.sage.stats.timeouts >= 1
    await eventually(lambda: sage.replayed_statements >= 1)  # the slow original arrived after the resend
    exactly_once(sage, world, ids, "slow")


async def test_the_token_expiring_mid_run(sage, sage_calls, browser, make_feed, world):
    ids = await setup(world, browser, sage_calls, sage, "token", days=20)
    sage.processing_polls = 2
    feed = make_feed(batch_size=10)
    run = asyncio.create_task(feed.run_once())
    await eventually(lambda: len(sage.statements) >= 1)
    tokens = sage.token_requests
    sage.expire_tokens()
    report = await asyncio.wait_for(run, 10)
    assert report.ok, report.lines()
    assert sage.token_requests == tokens + 1 and feed.sage.stats.unauthorized >= 1
    exactly_once(sage, world, ids, "token")


async def test_the_provider_down(sage, sage_calls, browser, make_feed, world):
    [bank_account_id] = await setup(world, browser, sage_calls, sage, "prov")
    feed = make_feed(read_attempts=3, metrics=Metrics())
    world.down = 2  # two failures, then the third attempt in the same run succeeds
    assert (await feed.run_once()).ok
    world.add(world.users["prov"][0].provider_account_id, today(), "-1.00")

    world.down = 1000
    report = await feed.run_once()
    outcome = report.outcomes[bank_account_id]
    assert not report.ok and (outcome.state, outcome.reason) == ("failing", "provider_unavailable")
    assert "feedtest_down" in outcome.error
    link = await models.LinkedAccount.get(bank_account_id=bank_account_id)
    assert (link.feed_state, link.feed_reason) == ("failing", "provider_unavailable")
    sent = len(sage.statements)
    reads = len(world.reads)
    report = await feed.run_once()  # still within the backoff: no read, nothing sent, still failing
    assert not report.ok and len(world.reads) == reads and len(sage.statements) == sent
    # Two failures in the first run, three (read_attempts) in the second: each failed read is counted.
    assert await metric(feed, "connector_provider_errors_total", kind="temporary", provider="feedtest") == 5

    world.down = 0
    await asyncio.sleep(0.35)
    report = await feed.run_once()
    assert report.ok and report.outcomes[bank_account_id].transactions == 1
    exactly_once(sage, world, [bank_account_id], "prov")


async def test_a_refused_statement_holds_its_account_only(sage, sage_calls, browser, make_feed, world):
    first, second = await setup(world, browser, sage_calls, sage, "refused", accounts=2)
    sage.reject_statements("balance_mismatch", "ledgerBalance does not match", count=1)
    feed = make_feed(parallel_accounts=1, metrics=Metrics())
    report = await feed.run_once()
    assert not report.ok
    assert await metric(feed, "connector_statements_total", outcome="refused") == 1
    assert await metric(feed, "connector_feed_accounts", reason="statement_rejected", state="held") == 1
    held = report.outcomes[first]
    assert (held.state, held.reason) == ("held", "statement_rejected")
    assert "balance_mismatch" in held.error and "HTTP 400" in held.error
    assert report.outcomes[second].state == "live"
    statement = await models.FeedStatement.get(linked_account__bank_account_id=first)
    assert statement.status == "rejected" and "ledgerBalance does not match" in statement.error
    posts = len(sage.requests_to("/v1/statements", "POST"))
    report = await feed.run_once()  # held: never skipped past, nothing resent
    assert report.outcomes[first].state == "held" and len(sage.requests_to("/v1/statements", "POST")) == posts
    assert first not in sage.transactions_by_account

    # The operator releases it (`connector feed retry`): the same bytes go out again and the feed goes on.
    assert (await admin.retry(second)).released is False  # nothing holds that one
    result = await admin.retry(first)
    assert result.released, result.message
    assert (await feed.run_once()).ok
    bodies = [r.body for r in sage.requests_to("/v1/statements", "POST")
              if r.json and r.json["data"]["principalId"] == first]
    assert len(bodies) == 2 and bodies[0] == bodies[1]
    exactly_once(sage, world, [first, second], "refused")


async def test_a_rebuilt_statement_keeps_its_unique_ids(sage, sage_calls, browser, make_feed, world):
    [bank_account_id] = await setup(world, browser, sage_calls, sage, "rebuilt", days=20)
    sage.reject_statements("too_many_transactions", "at most 5", count=1)
    feed = make_feed(batch_size=10)
    assert not (await feed.run_once()).ok
    assert await models.FeedStatement.filter(linked_account__bank_account_id=bank_account_id).count() == 2
    result = await admin.retry(bank_account_id, rebuild=True)
    assert result.released and "20 transaction(s)" in result.message
    feed.options.batch_size = 5  # "the fix": smaller statements
    assert (await feed.run_once()).ok
    sent = [s["data"] for s in sage.statements if s["data"]["principalId"] == bank_account_id]
    assert [len(s["transactionDetails"]) for s in sent] == [5, 5, 5, 5]
    exactly_once(sage, world, [bank_account_id], "rebuilt")


async def test_a_failed_statement_is_resent_after_backoff(sage, sage_calls, browser, make_feed, world):
    [bank_account_id] = await setup(world, browser, sage_calls, sage, "failed", days=20)
    sage.fail_statements([{"code": "processing_error", "message": "try again"}], count=1)
    feed = make_feed(batch_size=10, metrics=Metrics())
    report = await feed.run_once()
    assert await metric(feed, "connector_statements_total", outcome="retried") == 1
    outcome = report.outcomes[bank_account_id]
    assert (outcome.state, outcome.reason) == ("failing", "statement_failed")
    assert "processing_error: try again" in outcome.error
    assert not sage.transactions_by_account.get(bank_account_id)  # a failed statement's ids are released
    report = await feed.run_once()  # within the backoff: nothing later goes first
    assert report.outcomes[bank_account_id].reason == "statement_failed"
    assert len(sage.requests_to("/v1/statements", "POST")) == 1
    await asyncio.sleep(0.25)
    assert (await feed.run_once()).ok
    posts = [r.body for r in sage.requests_to("/v1/statements", "POST")]
    assert posts[0] == posts[1]  # the identical batch
    exactly_once(sage, world, [bank_account_id], "failed")


async def test_a_slow_statement_is_polled_not_resubmitted(sage, sage_calls, browser, make_feed, world):
    [bank_account_id] = await setup(world, browser, sage_calls, sage, "stuck")
    sage.processing_polls = 10_000
    feed = make_feed(statement_timeout=0.3)
    report = await feed.run_once()
    assert (report.outcomes[bank_account_id].state, report.outcomes[bank_account_id].reason) == \
        ("failing", "statement_timeout")
    sage.processing_polls = 0
    report = await feed.run_once()  # the late poll is not due yet
    assert report.outcomes[bank_account_id].reason == "statement_timeout"
    await asyncio.sleep(0.25)
    assert (await feed.run_once()).ok
    assert len(sage.requests_to("/v1/statements", "POST")) == 1
    exactly_once(sage, world, [bank_account_id], "stuck")


async def test_an_answer_without_an_id_is_not_resent(sage, sage_calls, browser, make_feed, world):
    [bank_account_id] = await setup(world, browser, sage_calls, sage, "noid")
    sage.fail_next(201, count=1, path_prefix="/v1/statements", body={"data": {"status": "ok"}})
    feed = make_feed()
    report = await feed.run_once()
    assert (report.outcomes[bank_account_id].state, report.outcomes[bank_account_id].reason) == \
        ("failing", "unexpected_response")
    await feed.run_once()
    assert len(sage.requests_to("/v1/statements", "POST")) == 1


async def test_a_process_without_the_lease_does_not_spin_when_woken(make_feed):
    """Every worker of ``serve --workers N`` runs the feed loop and is woken by what it receives; only the lease
    holder works, and the others must go on waiting calmly, not retry the lease in a loop."""
    holder = Lease(60)
    assert await holder.acquire()
    attempts = 0

    class Counting(Lease):
        async def acquire(self) -> bool:
            nonlocal attempts
            attempts += 1
            return await super().acquire()

    feed = make_feed(lease_ttl=3)
    feed.lease = Counting(3)
    loop = asyncio.create_task(feed.run_forever())
    await asyncio.sleep(0.1)
    for _ in range(3):
        await feed.wake()
        await asyncio.sleep(0.1)
    feed.stop()
    await asyncio.wait_for(loop, 5)
    assert 1 <= attempts <= 5  # one at start, at most one per wake-up: not thousands
    await holder.release()
