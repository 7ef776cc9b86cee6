"""Fixtures for the Powens provider tests: the emulator on loopback and the provider built as the core builds it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from powens_helpers import PUBLIC_URL, FakeClock, MemoryConsent, Sleeper, bank, link, make_flow

from connector.outbound import CoreServices
from connector.testing.powens import PowensEmulator
from connector.types import Done
from plugins.powens import Powens


@pytest.fixture
async def powens() -> AsyncIterator[PowensEmulator]:
    async with PowensEmulator() as emulator:
        yield emulator


@pytest.fixture
def services() -> CoreServices:
    return CoreServices(PUBLIC_URL, "powens")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sleeper() -> Sleeper:
    return Sleeper()


@pytest.fixture
def provider_config(powens: PowensEmulator) -> dict[str, Any]:
    return powens.config(requests_per_minute=100_000, sync_timeout_seconds=2, timeout_seconds=2)


@pytest.fixture
async def provider(provider_config: dict[str, Any], services: CoreServices, clock: FakeClock,
                   sleeper: Sleeper) -> AsyncIterator[Powens]:
    instance = Powens(provider_config, services, clock=clock, sleep=sleeper)
    yield instance
    await instance.close()


@pytest.fixture
async def linked(provider: Powens, powens: PowensEmulator) -> tuple[MemoryConsent, Done]:
    """A consent as the core stores it after a finished onboarding on the credentials bank."""
    info = bank()
    done = await link(provider, make_flow(info))
    consent = MemoryConsent("consent-1", done.grant.provider_consent_id, info, dict(done.grant.secrets))
    return consent, done
