"""Faults during a journey: slow bank checks, 409/429/500, bad keys, malformed answers (§3.1, §10, §16 OP-3)."""

from __future__ import annotations

import pytest
from powens_helpers import Sleeper, bank, link, make_flow, sign_in, submit

from connector.outbound import CoreServices
from connector.testing.powens import PowensEmulator
from connector.types import ChooseAccounts, Failed, Form, TemporaryError
from plugins.powens import Powens

CREATE = r"^/users/me/connections$"


async def test_sync_timeout_then_the_connection_is_found(powens: PowensEmulator, services: CoreServices) -> None:
    provider = Powens(powens.config(sync_timeout_seconds=0.3, requests_per_minute=100_000), services,
                      sleep=Sleeper())
    powens.delay_next(0.8, method="POST", path=CREATE)  # the bank check answers after our timeout
    try:
        step = await sign_in(provider, make_flow(bank()))
    finally:
        await provider.close()
    assert isinstance(step, ChooseAccounts)
    assert powens.connection_posts == 1  # never sent twice
    assert any(c.method == "GET" and c.path == "/users/me/connections" for c in powens.calls)


async def test_500_on_creation_is_not_retried(provider: Powens, powens: PowensEmulator) -> None:
    powens.fail_next(500, method="POST", path=CREATE)
    flow = make_flow(bank())
    step = await sign_in(provider, flow)
    assert isinstance(step, Form)
    assert step.error == "We couldn't reach your bank; please try again."
    assert len([c for c in powens.calls if c.method == "POST" and c.path == "/users/me/connections"]) == 1
    again = await provider.resume(flow, submit(step.action, login="alice", password="pw"))
    assert isinstance(again, ChooseAccounts)


async def test_429_on_creation_asks_to_wait(provider: Powens, powens: PowensEmulator, sleeper: Sleeper) -> None:
    powens.fail_next(429, method="POST", path=CREATE, retry_after="30")
    step = await sign_in(provider, make_flow(bank()))
    assert isinstance(step, Form)
    assert step.error == "Too many attempts right now. Please try again in a minute."
    assert sleeper.calls == []  # values are never re-sent by themselves


async def test_connection_locked_is_repeated(provider: Powens, powens: PowensEmulator, sleeper: Sleeper) -> None:
    powens.fail_next(409, code="connectionLocked", method="POST", path=CREATE)
    step = await sign_in(provider, make_flow(bank()))
    assert isinstance(step, ChooseAccounts)
    assert sleeper.calls == [2.0]


async def test_429_on_reads_honours_retry_after(provider: Powens, powens: PowensEmulator, sleeper: Sleeper) -> None:
    powens.fail_next(429, path="^/connectors/", retry_after="7", times=2)
    step = await provider.start(make_flow(bank()))
    assert isinstance(step, Form)
    assert sleeper.calls == [7.0, 7.0]


async def test_500_on_reads_is_retried_then_reported(provider: Powens, powens: PowensEmulator,
                                                     sleeper: Sleeper) -> None:
    powens.fail_next(500, path="^/connectors/", times=5)
    step = await provider.start(make_flow(bank()))
    assert isinstance(step, Failed) and isinstance(step.error, TemporaryError)
    assert step.error.code == "powens_provider_bug"
    assert len(sleeper.calls) == 4


async def test_mismatched_key_is_refetched_once_then_reported(provider: Powens, powens: PowensEmulator) -> None:
    powens.publish_mismatched_key()
    step = await sign_in(provider, make_flow(bank()))
    assert isinstance(step, Failed)
    assert isinstance(step.error, TemporaryError)
    assert step.error.code == "powens_encryption_unavailable"
    assert len([c for c in powens.calls if c.path == "/publickey"]) == 2
    assert powens.connection_posts == 2 and powens.connections == {}


async def test_rotated_key_is_picked_up(provider: Powens, powens: PowensEmulator) -> None:
    await link(provider, make_flow(bank()))  # caches the first key
    powens.rotate_key()
    step = await sign_in(provider, make_flow(bank()), login="bob")
    assert isinstance(step, ChooseAccounts)
    assert len([c for c in powens.calls if c.path == "/publickey"]) == 2


async def test_jwk_set_is_accepted(provider: Powens, powens: PowensEmulator) -> None:
    powens.publickey_shape = "jwks"
    step = await sign_in(provider, make_flow(bank()))
    assert isinstance(step, ChooseAccounts)


async def test_key_without_kid_is_refused(provider: Powens, powens: PowensEmulator) -> None:
    powens.publickey_without_kid = True
    step = await sign_in(provider, make_flow(bank()))
    assert isinstance(step, Failed) and step.error.code == "powens_encryption_unavailable"
    assert powens.connection_posts == 0


async def test_malformed_connector_answer(provider: Powens, powens: PowensEmulator) -> None:
    powens.malformed_next(path="^/connectors/")
    step = await provider.start(make_flow(bank()))
    assert isinstance(step, Failed) and step.error.code == "powens_bad_answer"


async def test_malformed_creation_answer_looks_for_the_connection(provider: Powens, powens: PowensEmulator) -> None:
    powens.malformed_next(method="POST", path=CREATE)
    flow = make_flow(bank())
    step = await sign_in(provider, flow)
    # The emulator dropped the request unprocessed: nothing to continue from, the form comes back.
    assert isinstance(step, Form) and step.error == "We couldn't reach your bank; please try again."
    assert powens.connection_posts == 0


@pytest.mark.parametrize("rpm", [3])
async def test_client_side_limiter_spaces_calls(powens: PowensEmulator, services: CoreServices, rpm: int) -> None:
    sleeper = Sleeper()
    now = [0.0]

    async def sleep(seconds: float) -> None:
        sleeper.calls.append(seconds)
        now[0] += seconds

    provider = Powens(powens.config(requests_per_minute=rpm), services, clock=lambda: now[0], sleep=sleep)
    try:
        flow = make_flow(bank())
        await provider.start(flow)  # /auth/init, /connectors/{uuid}: 2 calls
        await provider.resume(flow, submit("source", login="alice", password="pw"))  # /publickey, POST, ...
    finally:
        await provider.close()
    assert sleeper.calls and sleeper.calls[0] == pytest.approx(60.0)
