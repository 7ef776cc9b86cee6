"""Fixtures for the ConnectPay plugin tests: a running emulator and providers pointed at it (helpers live in
``cp_support.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cp_support import PUBLIC_URL, ProviderFactory

from connector.outbound import CoreServices
from connector.testing.connectpay import ConnectPayEmulator
from plugins.connectpay import ConnectPay


@pytest.fixture
async def emulator() -> AsyncIterator[ConnectPayEmulator]:
    async with ConnectPayEmulator() as cp:
        yield cp


@pytest.fixture
def public_key_file(tmp_path: Path, emulator: ConnectPayEmulator) -> Path:
    path = tmp_path / "connectpay-rsa-public.pem"
    path.write_bytes(emulator.public_key_pem())
    return path


@pytest.fixture
async def make_provider(emulator: ConnectPayEmulator, public_key_file: Path) -> AsyncIterator[ProviderFactory]:
    made: list[ConnectPay] = []

    def factory(**overrides: Any) -> ConnectPay:
        config = emulator.provider_config(public_key_file, **overrides)
        provider = ConnectPay(config, CoreServices(PUBLIC_URL, ConnectPay.name))
        provider.clock = emulator.clock.now
        made.append(provider)
        return provider

    yield factory
    for provider in made:
        await provider.close()


@pytest.fixture
def provider(make_provider: ProviderFactory) -> ConnectPay:
    return make_provider()


