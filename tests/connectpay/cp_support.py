"""Helpers that drive the ConnectPay provider through the public contract only, against the real emulator.

* :class:`MemoryConsent` — an in-memory :class:`connector.hookspecs.ConsentSession` that records every save (and
  whether the lock was held), so tests can check "rotated token saved before use" and "one refresh at a time".
* :func:`make_flow` — a :class:`connector.hookspecs.Flow` whose ``issue_state`` returns random states and records them.
* :func:`browser` — a plain aiohttp client playing the person's browser on ConnectPay's pages (never the provider's
  HTTP client, which is never mocked).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import ssl
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import aiohttp

from connector.hookspecs import BankInfo, Flow
from connector.testing.connectpay import ConnectPayEmulator
from connector.types import Account, ChooseAccounts, Done, FlowEvent, JourneyKind, Redirect
from plugins.connectpay import ConnectPay

PUBLIC_URL = "https://connector.example.com"
CLIENT_IP = "203.0.113.7"
PSD2_BANK = BankInfo("8e7f9a2c-0000-4000-8000-000000000001", "ConnectPay", "psd2")
BAAS_BANK = BankInfo("8e7f9a2c-0000-4000-8000-000000000002", "ConnectPay Business", "", {"mode": "baas"})
ANY_BANK = BankInfo("8e7f9a2c-0000-4000-8000-000000000003", "ConnectPay (any)", "any")


class MemoryConsent:
    """A stored consent held in memory. ``saved`` lists every ``save_secrets`` (newest last)."""

    def __init__(self, secrets_: Mapping[str, Any], bank: BankInfo = PSD2_BANK, *,
                 consent_id: str = "consent-1", provider_consent_id: str | None = None) -> None:
        self.consent_id = consent_id
        self.provider_consent_id = provider_consent_id
        self.bank = bank
        self._secrets = dict(secrets_)
        self._lock = asyncio.Lock()
        self.saved: list[dict[str, Any]] = []
        self.saved_under_lock: list[bool] = []
        self.on_save: Callable[[Mapping[str, Any]], None] | None = None

    @property
    def secrets(self) -> Mapping[str, Any]:
        return MappingProxyType(dict(self._secrets))

    async def save_secrets(self, secrets_: Mapping[str, Any]) -> None:
        if self.on_save is not None:
            self.on_save(secrets_)
        self._secrets = dict(secrets_)
        self.saved.append(dict(secrets_))
        self.saved_under_lock.append(self._lock.locked())

    def lock(self) -> AbstractAsyncContextManager[None]:
        return self._lock  # type: ignore[return-value]  # asyncio.Lock is an async context manager


class StateIssuer:
    """The core's ``issue_state`` stand-in: fresh 32-byte states, recorded."""

    def __init__(self) -> None:
        self.issued: list[str] = []

    async def __call__(self) -> str:
        state = secrets.token_urlsafe(32)
        self.issued.append(state)
        return state


def make_flow(bank: BankInfo = PSD2_BANK, *, kind: JourneyKind = JourneyKind.ONBOARDING,
              consent: MemoryConsent | None = None, linked: Sequence[Account] = ()) -> Flow:
    return Flow(journey_id=secrets.token_hex(8), kind=kind, bank=bank, state={}, client_ip=CLIENT_IP,
                issue_state=StateIssuer(), consent=consent, linked_accounts=tuple(linked))


def issued(flow: Flow) -> list[str]:
    return flow.issue_state.issued  # type: ignore[attr-defined]


def callback(values: Mapping[str, list[str]]) -> FlowEvent:
    return FlowEvent(kind="callback", values=values)


def choose(*ids: str) -> FlowEvent:
    return FlowEvent(kind="choose_accounts", values={"account": list(ids)})


def submit(action: str, **values: str) -> FlowEvent:
    return FlowEvent(kind="submit", action=action, values={k: [v] for k, v in values.items()})


async def browser(url: str, *, decision: str = "allow", psu: str = "default",
                  ssl_context: ssl.SSLContext | None = None) -> dict[str, list[str]]:
    """Walk ConnectPay's pages like a browser: authorize (301) → sign-in page → Allow/Deny (302 to our callback).
    Returns the callback's query parameters."""
    async with aiohttp.ClientSession() as session:
        async with session.get(url, allow_redirects=False, ssl=ssl_context or True) as r:
            assert r.status == 301, await r.text()
            page_url = urljoin(url, r.headers["Location"])
        async with session.get(page_url, ssl=ssl_context or True) as r:
            assert r.status == 200
            page = await r.text()
        request_id = re.search(r'name="request" value="([^"]+)"', page)
        assert request_id is not None and "Allow" in page and "Deny" in page
        form = {"request": request_id.group(1), "psu": psu, "decision": decision}
        async with session.post(urljoin(page_url, "/auth/web/decide"), data=form, allow_redirects=False,
                                ssl=ssl_context or True) as r:
            assert r.status == 302
            location = r.headers["Location"]
    assert location.startswith(f"{PUBLIC_URL}/providers/connectpay/callback?")
    return parse_qs(urlsplit(location).query)


async def onboard_psd2(provider: ConnectPay, emulator: ConnectPayEmulator, *, psu: str = "default",
                       pick: Callable[[Sequence[Account]], Sequence[str]] | None = None) -> tuple[Flow, Done]:
    """A whole psd2 onboarding: start → approve → callback → choose (all offered unless ``pick``) → Done."""
    flow = make_flow()
    step = await provider.start(flow)
    assert isinstance(step, Redirect)
    step2 = await provider.resume(flow, callback(emulator.approve(step.url, psu=psu)))
    assert isinstance(step2, ChooseAccounts), step2
    ids = pick(step2.accounts) if pick else [a.provider_account_id for a in step2.accounts]
    done = await provider.resume(flow, choose(*ids))
    assert isinstance(done, Done), done
    return flow, done


async def psd2_consent(provider: ConnectPay, emulator: ConnectPayEmulator) -> tuple[MemoryConsent, Done]:
    """A linked psd2 consent (every offered account chosen), as the core would store it."""
    _, done = await onboard_psd2(provider, emulator)
    return MemoryConsent(done.grant.secrets), done


ProviderFactory = Callable[..., ConnectPay]
