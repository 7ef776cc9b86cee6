"""Mutual TLS on the server-to-server host, with a CA and certificates generated at run time (security.md O6).

The emulator started with ``tls=True`` serves both hosts over HTTPS; the "mTLS" one refuses any handshake without a
client certificate issued by its test CA. The provider trusts that CA through ``ca_file``.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
from cp_support import PUBLIC_URL, MemoryConsent, browser, callback, choose, make_flow

from connector.outbound import CoreServices
from connector.testing.connectpay import ConnectPayEmulator, EmulatorPki
from connector.types import ChooseAccounts, Done, Failed, Redirect, TemporaryError
from plugins.connectpay import ConnectPay


@pytest.fixture
async def tls_emulator() -> AsyncIterator[ConnectPayEmulator]:
    async with ConnectPayEmulator(tls=True) as cp:
        yield cp


def _provider(emulator: ConnectPayEmulator, **overrides: object) -> ConnectPay:
    provider = ConnectPay(emulator.provider_config(**overrides), CoreServices(PUBLIC_URL, "connectpay"))
    provider.clock = emulator.clock.now
    return provider


async def test_onboarding_and_read_over_mutual_tls(tls_emulator: ConnectPayEmulator) -> None:
    assert tls_emulator.mtls_base_url.startswith("https://") and tls_emulator.pki is not None
    assert ConnectPay.check_config(tls_emulator.provider_config()) == []
    provider = _provider(tls_emulator)
    try:
        flow = make_flow()
        step = await provider.start(flow)
        assert isinstance(step, Redirect) and step.url.startswith(tls_emulator.tls_base_url)
        trust = ssl.create_default_context(cafile=str(tls_emulator.pki.ca_file))
        offered = await provider.resume(flow, callback(await browser(step.url, ssl_context=trust)))
        assert isinstance(offered, ChooseAccounts)
        done = await provider.resume(flow, choose("LT-ACC-0001"))
        assert isinstance(done, Done)

        consent = MemoryConsent(done.grant.secrets)
        tls_emulator.advance(3600)  # also exercises a refresh over mTLS
        since = tls_emulator.clock.now().date() - timedelta(days=30)
        read = await provider.read_account(consent, done.grant.accounts[0], since, None)
        assert len(read.booked) == 5 and len(consent.saved) == 1
    finally:
        await provider.close()


async def test_mtls_host_refuses_a_foreign_certificate(tls_emulator: ConnectPayEmulator) -> None:
    pki = tls_emulator.pki
    assert pki is not None
    provider = _provider(tls_emulator, mtls_cert_file=str(pki.rogue_cert_file), mtls_key_file=str(pki.rogue_key_file))
    try:
        flow = make_flow()
        step = await provider.start(flow)
        assert isinstance(step, Redirect)
        result = await provider.resume(flow, callback(tls_emulator.approve(step.url)))
        assert isinstance(result, Failed)
        assert isinstance(result.error, TemporaryError)  # an operator problem, never the person's
        assert result.error.code in ("connectpay_tls_failed", "connectpay_unavailable")
        assert tls_emulator.calls("/auth/v1/oauth2/token") == []  # the handshake failed before any request
    finally:
        await provider.close()


async def test_mtls_host_refuses_a_call_without_certificate(tls_emulator: ConnectPayEmulator) -> None:
    # The provider itself refuses to start without a certificate (check_config), so call the host directly.
    assert tls_emulator.pki is not None
    trust = ssl.create_default_context(cafile=str(tls_emulator.pki.ca_file))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.post(f"{tls_emulator.mtls_base_url}/auth/v1/oauth2/token", ssl=trust,
                                    data={"grant_type": "refresh_token"}) as response:
                await response.read()
        # The 1-way host needs no client certificate.
        async with session.get(f"{tls_emulator.tls_base_url}/auth/v1/oauth2/authorize", ssl=trust,
                               allow_redirects=False) as response:
            assert response.status == 400
    assert tls_emulator.calls("/auth/v1/oauth2/token") == []


def test_pki_files_are_private(tmp_path: Path) -> None:
    pki = EmulatorPki.create(tmp_path)
    assert oct(pki.client_key_file.stat().st_mode & 0o777) == "0o600"
