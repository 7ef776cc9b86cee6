"""Several instances on one PostgreSQL database: two ``connector serve`` processes on two ports, one Sage emulator
in this process. Whatever the two are asked at the same moment, the database decides, so single-use values are used
once, a notification is stored and acted on once, and the statement feed runs in one of them at a time: killing its
holder in the middle of a statement loses nothing and sends nothing twice.

These need PostgreSQL (SQLite is one process's database): they run when ``CONNECTOR_TEST_POSTGRES`` is set, as in
the PostgreSQL pass of ``scripts/test``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest

from connector.feed.lease import current_holder
from connector.storage import close_database, models, open_database
from connector.testing.connector import (
    SageEndpoints,
    connector_config,
    eventually,
    free_port,
    wait_until_ready,
    write_config,
)
from connector.testing.fixtures import DEMO_BANK_ID, DEMO_BANKS, POSTGRES_ENV, SageCalls

pytestmark = pytest.mark.skipif(not os.environ.get(POSTGRES_ENV),
                                reason=f"several instances need PostgreSQL: set {POSTGRES_ENV}")

ROOT = Path(__file__).resolve().parent.parent
HISTORY = 30  # Demo Bank days of history: 3 statements of 10 transactions per account
LEASE_SECONDS = 3
START_TIMEOUT = 40.0


@dataclass
class Instance:
    name: str
    url: str
    process: asyncio.subprocess.Process
    log: Path
    calls: SageCalls

    @property
    def pid(self) -> int:
        return self.process.pid

    def at(self, url: str) -> str:
        """The same URL on this instance (pages link to ``public_url``, which is the first instance)."""
        parts, here = urlsplit(url), urlsplit(self.url)
        return urlunsplit((here.scheme, here.netloc, parts.path, parts.query, parts.fragment))

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


async def _start(name: str, config: Path, port: int, tmp_path: Path, calls: SageCalls) -> Instance:
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as out:  # a file, not a pipe: a process killed mid-run never blocks on its output
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "connector.cli", "serve", "--config", str(config), "--port", str(port),
            cwd=tmp_path, stdout=out, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                                              if p)})
    return Instance(name, f"http://127.0.0.1:{port}", process, log, calls)


async def _stop(instance: Instance) -> None:
    if instance.process.returncode is not None:
        return
    instance.process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(instance.process.wait(), 10)
    except TimeoutError:
        instance.process.kill()
        await instance.process.wait()


@pytest.fixture
async def instances(sage, database_url, http, tmp_path) -> AsyncIterator[tuple[Instance, Instance]]:
    """Two instances of one config (``public_url`` is the first: the load balancer's address, as far as pages
    go), started together on a fresh database, so their migrations meet under the advisory lock too."""
    endpoints = SageEndpoints(sage.base_url, sage.client_id, sage.client_secret, sage.api_key)
    ports = free_port(), free_port()
    config = connector_config(
        endpoints, database_url=database_url, port=ports[0], banks=DEMO_BANKS,
        providers={"demobank": {"history_days": HISTORY}},
        extra={"sage": {"statement_batch_size": 10},
               "feed": {"enabled": True, "interval_seconds": 1, "lease_seconds": LEASE_SECONDS},
               "logging": {"level": "INFO"}})
    path = write_config(tmp_path / "config.toml", config)
    started: list[Instance] = []
    try:
        for name, port in zip("ab", ports):
            calls = SageCalls(sage, endpoints, f"http://127.0.0.1:{port}", http)
            started.append(await _start(name, path, port, tmp_path, calls))
        await asyncio.gather(*(wait_until_ready(i.url, lambda i=i: i.process.returncode, i.log,
                                                timeout=START_TIMEOUT) for i in started))
        await open_database(database_url, migrate=False)  # this process reads the shared database
        try:
            yield started[0], started[1]
        finally:
            await close_database()
    finally:
        await asyncio.gather(*(_stop(i) for i in started))


async def _status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url, allow_redirects=False) as resp:
        await resp.read()
        return resp.status


async def test_one_authorisation_id_on_both_instances_at_once(instances, http):
    a, b = instances
    for n in range(6):
        told = a if n % 2 == 0 else b  # the notification reached one of them
        authorisation_id = await told.calls.announce()
        statuses = await asyncio.gather(_status(http, a.calls.auth_url(authorisation_id)),
                                        _status(http, b.calls.auth_url(authorisation_id)))
        assert sorted(statuses) == [200, 410], (n, statuses)
        assert await models.Journey.filter(authorisation_id=authorisation_id).count() == 1


async def test_the_same_notification_on_both_instances_at_once(instances, sage, http, browser):
    a, b = instances
    # An authorisation: one row each, whichever instance stored it.
    ids = [str(uuid.uuid4()) for _ in range(10)]
    bodies = [{"type": "resourceCreated", "resource": {"id": i, "type": "authorisation", "url": "NA"},
               "additionalData": {"bankId": DEMO_BANK_ID}} for i in ids]
    answers = await asyncio.gather(*(i.calls.notify(body) for body in bodies for i in (a, b)))
    assert [status for status, _ in answers] == [200] * 20
    for authorisation_id in ids:
        assert await models.Notification.filter(dedupe_key=f"resourceCreated:authorisation:{authorisation_id}") \
            .count() == 1
        assert await models.Authorisation.filter(id=authorisation_id).count() == 1

    # A bank account linked: one row, acted on once (one link, outcome "linked", never "already_linked").
    external_id = (await a.calls.onboard(browser, "alice")).external_ids[0]
    bank_account_id = str(uuid.uuid4())
    body = {"type": "resourceCreated", "resource": {"id": bank_account_id, "type": "bankAccount", "url": ""},
            "additionalData": {"externalId": external_id, "bankId": DEMO_BANK_ID,
                               "requestedStartDate": "2020-01-01T00:00:00Z"}}
    answers = await asyncio.gather(a.calls.notify(body), b.calls.notify(body))
    assert [status for status, _ in answers] == [200, 200]
    key = f"resourceCreated:bankAccount:{bank_account_id}"

    async def processed() -> bool:
        return await models.Notification.filter(dedupe_key=key, processed_at__isnull=False).exists()

    await eventually(processed, timeout=10)
    [row] = await models.Notification.filter(dedupe_key=key)
    assert row.outcome == "linked"
    assert await models.LinkedAccount.filter(bank_account_id=bank_account_id).count() == 1


async def test_one_callback_state_on_both_instances_at_once(instances, sage, http, browser):
    a, b = instances
    for _ in range(3):
        authorisation_id = await a.calls.announce()
        page = await browser.get(a.calls.auth_url(authorisation_id))
        page = await browser.submit(page, {"User name": "redirect", "Password": "secret"}, button="Sign in")
        assert page.h1 == "Continue to Demo Bank", page.text
        callback, _ = page.link("Continue to your bank")
        assert "state=" in callback
        statuses = await asyncio.gather(_status(http, a.at(callback)), _status(http, b.at(callback)))
        assert sorted(statuses) == [303, 410], statuses
        page = await browser.get(page.url)  # the journey went on once, to the accounts
        assert page.h1 == "Choose the accounts to share with Sage"


async def test_the_feed_leader_killed_mid_statement_the_other_takes_over(instances, sage, browser):
    a, b = instances
    by_pid = {a.pid: a, b.pid: b}
    sage.processing_polls = 10_000  # the first statement of each account stays in flight
    external_ids = (await a.calls.onboard(browser, "alice")).external_ids
    ids = [await a.calls.account_created(e, requested_start_date="2020-01-01T00:00:00Z") for e in external_ids]

    async def in_flight() -> bool:
        return ({s["data"]["principalId"] for s in sage.statements} == set(ids)
                and len(sage.requests_to("/v1/statements/", "GET")) >= 2)

    await eventually(in_flight, timeout=30)
    leader = by_pid[await _holder_pid()]
    survivor = b if leader is a else a
    assert await models.FeedStatement.filter(status="accepted").count() == 2
    leader.process.kill()  # SIGKILL: no clean-up of any kind, the lease is left behind
    await leader.process.wait()
    killed_at = time.monotonic()
    sage.processing_polls = 0

    async def taken_over() -> bool:
        return await _holder_pid() == survivor.pid

    await eventually(taken_over, timeout=LEASE_SECONDS + 2, interval=0.05)
    assert time.monotonic() - killed_at <= LEASE_SECONDS + 2

    async def delivered() -> bool:  # at Sage, and known to be complete here
        return all(len(sage.transactions_by_account.get(i, [])) >= HISTORY for i in ids) \
            and await models.FeedStatement.filter(status="complete").count() >= 3 * len(ids)

    await eventually(delivered, timeout=40)
    for bank_account_id in ids:
        got = sage.transactions_by_account[bank_account_id]
        assert len(got) == len(set(got)) == HISTORY, (bank_account_id, len(got), len(set(got)))
    # The accepted statements were polled by the survivor, not resent: 3 statements per account, each POSTed once.
    assert len(sage.requests_to("/v1/statements", "POST")) == 3 * len(ids)
    assert await models.FeedStatement.filter(status="complete").count() == 3 * len(ids)
    assert survivor.process.returncode is None, survivor.tail()


async def _holder_pid() -> int | None:
    holder = await current_holder()
    if holder is None:
        return None
    return int(holder[0].split(":")[-2])
