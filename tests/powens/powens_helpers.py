"""Helpers for the Powens provider tests: an in-memory consent, a state issuer, clocks, and journeys driven through
the public contract only (imported by ``conftest.py`` and the test modules)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from connector.hookspecs import BankInfo, Flow
from connector.testing.powens import CREDENTIALS_BANK, PowensEmulator
from connector.types import (
    Account,
    ChooseAccounts,
    Done,
    FlowEvent,
    Form,
    JourneyKind,
    Redirect,
    StepResult,
)
from plugins.powens import Powens

PUBLIC_URL = "https://connector.example.test"


@dataclass
class MemoryConsent:
    """A stored consent as the core hands it to a provider."""

    consent_id: str
    provider_consent_id: str | None
    bank: BankInfo
    stored: dict[str, Any]
    saves: list[dict[str, Any]] = field(default_factory=list)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def secrets(self) -> Mapping[str, Any]:
        return dict(self.stored)

    async def save_secrets(self, secrets: Mapping[str, Any]) -> None:
        self.stored = dict(secrets)
        self.saves.append(dict(secrets))

    def lock(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._lock  # type: ignore[return-value]


class StateIssuer:
    """``flow.issue_state``: records every state it hands out."""

    def __init__(self) -> None:
        self.issued: list[str] = []

    async def __call__(self) -> str:
        value = secrets.token_urlsafe(32)
        self.issued.append(value)
        return value


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Sleeper:
    """Records the delays asked for and yields at once, so back-off never slows the tests."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        await asyncio.sleep(0)


def bank(uuid: str = CREDENTIALS_BANK, name: str = "Example Bank", **options: Any) -> BankInfo:
    return BankInfo(sage_bank_id="10aaeee6-4691-4443-8198-df39aaa8007c", name=name, provider_bank=uuid,
                    options=options)


def make_flow(info: BankInfo, *, kind: JourneyKind = JourneyKind.ONBOARDING, consent: MemoryConsent | None = None,
              linked: Sequence[Account] = ()) -> Flow:
    return Flow(journey_id=secrets.token_hex(8), kind=kind, bank=info, state={}, client_ip="127.0.0.1",
                issue_state=StateIssuer(), consent=consent, linked_accounts=tuple(linked))


def object_form_types(powens: PowensEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Account ``type`` in its documented object form (the emulator, like Powens in practice, sends a string)."""
    plain = powens._account_json
    monkeypatch.setattr(powens, "_account_json", lambda a: {**plain(a), "type": {"id": 1, "name": a.type}})


def deleted_in_all_accounts(powens: PowensEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleted accounts listed in a connection's ``all_accounts``, as the emulator's ``?all`` listing lists them."""
    plain = powens._connection_json

    def connection_json(conn: Any, expand: set[str]) -> dict[str, Any]:
        out = plain(conn, expand)
        if "all_accounts" in expand:
            out["all_accounts"] = [powens._account_json(a) for a in powens.accounts.values()
                                   if a.connection_id == conn.id]
        return out

    monkeypatch.setattr(powens, "_connection_json", connection_json)


def submit(action: str, **values: str) -> FlowEvent:
    return FlowEvent(kind="submit", action=action, values={k: [v] for k, v in values.items()})


def choose(*ids: str, action: str = "") -> FlowEvent:
    return FlowEvent(kind="choose_accounts", action=action, values={"account": list(ids)})


POLL = FlowEvent(kind="poll")


async def bank_decision(url: str, decision: str = "allow") -> dict[str, list[str]]:
    """Walk the emulated bank page like a browser: open it, press Allow or Deny, and return the query of the
    callback it redirects to (the core would check the state, then hand the provider these values)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as page:
            assert page.status == 200
            text = await page.text()
        session = re.search(r'name="session" value="([^"]+)"', text)
        assert session is not None
        action = urlsplit(url)._replace(path="/bank/decide", query="").geturl()
        async with http.post(action, data={"session": session.group(1), "decision": decision},
                             allow_redirects=False) as answer:
            assert answer.status == 302
            location = answer.headers["Location"]
    assert location.startswith(f"{PUBLIC_URL}/providers/powens/callback?")
    return parse_qs(urlsplit(location).query)


async def callback(provider: Powens, flow: Flow, redirect: StepResult, decision: str = "allow") -> StepResult:
    assert isinstance(redirect, Redirect), redirect
    values = await bank_decision(redirect.url, decision)
    # The core consumes the state before calling back: it must be the one the provider asked for.
    assert values["state"] == [flow.issue_state.issued[-1]]  # type: ignore[attr-defined]
    return await provider.resume(flow, FlowEvent(kind="callback", values=values))


async def sign_in(provider: Powens, flow: Flow, *, login: str = "alice", password: str = "s3cret pass",
                  **more: str) -> StepResult:
    first = await provider.start(flow)
    assert isinstance(first, Form), first
    return await provider.resume(flow, submit(first.action, login=login, password=password, **more))


async def link(provider: Powens, flow: Flow, **kwargs: str) -> Done:
    """Credentials bank, happy path: sign in, choose every account, done."""
    step = await sign_in(provider, flow, **kwargs)
    assert isinstance(step, ChooseAccounts), step
    done = await provider.resume(flow, choose(*(a.provider_account_id for a in step.accounts)))
    assert isinstance(done, Done), done
    return done
