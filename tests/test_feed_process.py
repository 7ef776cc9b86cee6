"""``connector feed run`` and ``connector feed status`` as an operator runs them: real subprocesses against the Sage
emulator and a SQLite file, killed with SIGKILL in the middle of a statement and restarted."""


from __future__ import annotations

import asyncio
import os
import signal
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from feed_provider import link_accounts

from connector.feed import status
from connector.feed.lease import Lease, current_holder
from connector.feed.testing import settings_to_config
from connector.storage import models
from connector.testing.connector import eventually, write_config
from connector.testing.fixtures import DEMO_BANK_ID, DEMO_BANKS

ROOT = Path(__file__).resolve().parent.parent
HISTORY = 30  # Demo Bank days of history: 3 statements of 10 per account


@pytest.fixture
async def connector(connector_factory):
    return await connector_factory(banks=DEMO_BANKS, providers={"demobank": {"history_days": HISTORY}},
                                   extra={"sage": {"statement_batch_size": 10}})


@pytest.fixture
def config_file(connector, tmp_path) -> Path:
    # Logs at INFO: a subprocess killed mid-run must not block on a full pipe of DEBUG lines first.
    return write_config(tmp_path / "config.toml", settings_to_config(connector.settings, logging={"level": "INFO"}))


async def start_cli(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "connector.cli", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})


async def start_background(*args: str) -> asyncio.subprocess.Process:
    """A process the test will kill: its output goes nowhere, so it can never block on a pipe."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "connector.cli", *args, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})


async def cli(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await start_cli(*args)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


async def kill(proc: asyncio.subprocess.Process) -> None:
    proc.kill()  # SIGKILL: no clean-up of any kind
    await proc.wait()


def assert_all_once(sage, ids: list[str], per_account: int = HISTORY) -> None:
    for bank_account_id in ids:
        got = sage.transactions_by_account.get(bank_account_id, [])
        assert len(got) == len(set(got)) == per_account, (bank_account_id, len(got), len(set(got)))


async def test_killed_while_polling_then_restarted(sage, sage_calls, browser, config_file):
    ids = await link_accounts(browser, sage_calls, sage, "alice", bank_id=DEMO_BANK_ID, start="2020-01-01T00:00:00Z")
    sage.processing_polls = 10_000  # the first statement of each account stays in flight
    proc = await start_background("feed", "run", "--once", "--config", str(config_file))
    async def both_in_flight() -> bool:
        # Sage holds both statements and our side has stored both ids (the emulator answering is not enough).
        return ({s["data"]["principalId"] for s in sage.statements} == set(ids)
                and await models.FeedStatement.filter(status="accepted").count() == 2)

    await eventually(both_in_flight, timeout=20)
    await kill(proc)
    accepted = await models.FeedStatement.filter(status="accepted").count()
    assert accepted == 2  # the id Sage gave was stored before the process died

    sage.processing_polls = 0
    code, out, err = await cli("feed", "run", "--once", "--config", str(config_file))
    assert code == 0, out + err
    assert len(out.strip().splitlines()) == 2 and all("live" in line for line in out.splitlines())
    assert_all_once(sage, ids)
    assert len(sage.requests_to("/v1/statements", "POST")) == 6  # the accepted ones were polled, not resent


async def test_killed_while_a_post_hangs_then_restarted(sage, sage_calls, browser, config_file):
    [bank_account_id] = await link_accounts(browser, sage_calls, sage, "bob", bank_id=DEMO_BANK_ID, only=[0],
                                            start="2020-01-01T00:00:00Z")
    sage.processing_polls = 0
    sage.delay_next(3.0, count=1, path_prefix="/v1/statements")
    proc = await start_background("feed", "run", "--once", "--config", str(config_file))
    await eventually(lambda: len(sage.requests_to("/v1/statements", "POST")) == 1, timeout=20)
    await kill(proc)  # the POST is at Sage; whether it was accepted is unknown to us

    code, out, err = await cli("feed", "run", "--once", "--config", str(config_file))
    assert code == 0, out + err
    await eventually(lambda: sage.replayed_statements == 1, timeout=5)  # the original landed after the resend
    posts = [r.body for r in sage.requests_to("/v1/statements", "POST")]
    assert posts[0] == posts[1]  # the same bytes, resent
    assert_all_once(sage, [bank_account_id])


async def test_killed_again_and_again(sage, sage_calls, browser, config_file):
    ids = await link_accounts(browser, sage_calls, sage, "carol", bank_id=DEMO_BANK_ID, start="2020-01-01T00:00:00Z")
    sage.processing_polls = 0
    for delay in (1.3, 1.9, 2.6):
        proc = await start_background("feed", "run", "--once", "--config", str(config_file))
        await asyncio.sleep(delay)
        if proc.returncode is None:
            await kill(proc)
    code, out, err = await cli("feed", "run", "--once", "--config", str(config_file))
    assert code == 0, out + err
    assert_all_once(sage, ids)


async def test_feed_run_until_stopped(sage, sage_calls, browser, config_file):
    [bank_account_id] = await link_accounts(browser, sage_calls, sage, "gina", bank_id=DEMO_BANK_ID, only=[0],
                                            start="2020-01-01T00:00:00Z")
    sage.processing_polls = 0
    proc = await start_background("feed", "run", "--config", str(config_file))
    await eventually(lambda: len(sage.transactions_by_account.get(bank_account_id, [])) == HISTORY, timeout=20)
    assert await current_holder() is not None
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    assert await current_holder() is None  # the lease is released on the way out
    assert_all_once(sage, [bank_account_id])


async def test_status_and_exit_codes(sage, sage_calls, browser, config_file):
    [ok_id] = await link_accounts(browser, sage_calls, sage, "dave", bank_id=DEMO_BANK_ID, only=[0])
    sage.processing_polls = 0
    code, out, _ = await cli("feed", "run", "--once", "--config", str(config_file))
    assert code == 0 and f"{ok_id}  Business Current ••" in out and "live  sent 30 transactions in 3 statements" in out

    code, out, _ = await cli("feed", "status", "--config", str(config_file))
    assert code == 0
    assert out.splitlines()[0] == "feed: not running"
    assert f"{ok_id}  Business Current ••" in out and "Demo Bank [demobank]  live" in out
    assert "last statement: complete 10 tx" in out and "waiting: 0 transactions" in out
    assert "consent expires: unknown" in out

    # A consent lost at the first read: authRequired goes out, and the run says it could not deliver.
    [lost_id] = await link_accounts(browser, sage_calls, sage, "expire", bank_id=DEMO_BANK_ID, only=[0])
    code, out, _ = await cli("feed", "run", "--once", "--config", str(config_file))
    assert code == 1
    [line] = [x for x in out.splitlines() if x.startswith(lost_id)]
    assert "auth_required (demobank_consent_expired)  authRequired sent; demobank_consent_expired: " in line
    assert sage.account_status[lost_id] == "authRequired"

    # Sage refuses a statement: recorded with Sage's reason, the account held, exit 1.
    [held_id] = await link_accounts(browser, sage_calls, sage, "erin", bank_id=DEMO_BANK_ID, only=[0])
    sage.reject_statements("duplicate_unique_id", "uniqueId already sent")
    code, out, _ = await cli("feed", "run", "--once", "--config", str(config_file))
    assert code == 1
    [line] = [x for x in out.splitlines() if x.startswith(held_id)]
    assert "held (statement_rejected)" in line and "duplicate_unique_id: uniqueId already sent" in line
    code, out, _ = await cli("feed", "status", "--config", str(config_file))
    assert code == 1
    assert "held (statement_rejected)" in out and "waiting: 30 transactions" in out
    assert "last error: Sage HTTP 400: duplicate_unique_id: uniqueId already sent" in out
    assert "auth_required (demobank_consent_expired)" in out

    # Another process holds the feed lease: nothing runs.
    lease = Lease(60)
    assert await lease.acquire()
    try:
        code, _, err = await cli("feed", "run", "--once", "--config", str(config_file))
        assert code == 3 and "running in another process" in err
    finally:
        await lease.release()


async def test_status_shows_consent_expiry_and_lag(sage, sage_calls, browser, connector):
    [bank_account_id] = await link_accounts(browser, sage_calls, sage, "frank", bank_id=DEMO_BANK_ID, only=[0])
    link = await models.LinkedAccount.get(bank_account_id=bank_account_id).prefetch_related("account")
    now = datetime.now(UTC)
    await models.Consent.filter(id=link.account.consent_id).update(expires_at=now + timedelta(days=12, hours=1))
    await models.FeedCursor.create(linked_account_id=link.id, caught_up_at=now - timedelta(minutes=7),
                                   last_error="demobank_unavailable: Demo Bank isn't available")
    [row] = await status.collect(connector.settings, now=now)
    assert row.consent_expires.endswith("(12 days left)") and row.lag == "7m" and row.waiting == 0
    text = status.render([row])
    assert "consent expires:" in text and "12 days left" in text
    assert "last error: demobank_unavailable: Demo Bank isn't available" in text
    await models.Consent.filter(id=link.account.consent_id).update(expires_at=now - timedelta(days=1))
    [row] = await status.collect(connector.settings, now=now)
    assert row.consent_expires.endswith("(expired)")
