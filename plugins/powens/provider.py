"""The ``powens`` provider class: what the core calls. The work is done by :mod:`.journey` (the authorisation
pages), :mod:`.feed` (accounts and transactions) and :mod:`.webhook` (signed notifications).

Uses only the public contract (:mod:`connector.hookspecs`, :mod:`connector.types`) and the helpers of
:mod:`connector.outbound`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any, ClassVar

from connector.hookspecs import BankInfo, ConsentSession, Flow, ProviderServices
from connector.types import Account, AccountRead, FlowEvent, StepResult, WebhookRequest, WebhookResult

from . import config as config_module
from . import webhook as webhook_module
from .client import PowensClient
from .crypto import KeyCache
from .feed import Feed
from .journey import Journey
from .tokens import ConsentCaller


class Powens:
    """Powens (formerly Budget Insight) in its custom-connection mode: our pages, Powens's API."""

    name: ClassVar[str] = "powens"
    title: ClassVar[str] = "Powens"
    template_dir: ClassVar[Path | None] = None

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
        return config_module.check_config(config)

    @classmethod
    def check_bank(cls, bank: BankInfo) -> Iterable[tuple[str, str]]:
        return config_module.check_bank(bank)

    def __init__(
        self,
        config: Mapping[str, Any],
        services: ProviderServices,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """``clock`` and ``sleep`` are for tests (rate limiter, back-off, waiting pages); the core passes neither."""
        self.settings = config_module.settings_from(config)
        self._services = services
        self._client = PowensClient(services, self.settings, clock=clock, sleep=sleep)
        keys = KeyCache(self._client, clock)
        consents = ConsentCaller(self._client, self.settings)
        self._journey = Journey(self.settings, services, self._client, keys, consents, clock)
        self._feed = Feed(self._client, consents)

    @property
    def poll_interval_seconds(self) -> int:
        """How often the feed should poll a consent when webhooks are quiet (§8.3)."""
        return self.settings.poll_interval_minutes * 60

    async def start(self, flow: Flow) -> StepResult:
        return await self._journey.start(flow)

    async def resume(self, flow: Flow, event: FlowEvent) -> StepResult:
        return await self._journey.resume(flow, event)

    async def list_accounts(self, consent: ConsentSession) -> Sequence[Account]:
        return await self._feed.list_accounts(consent)

    async def read_account(
        self, consent: ConsentSession, account: Account, since: date, sync_point: str | None
    ) -> AccountRead:
        return await self._feed.read_account(consent, account, since, sync_point)

    async def revoke(self, consent: ConsentSession) -> None:
        await self._feed.revoke(consent)

    async def webhook(self, request: WebhookRequest) -> WebhookResult:
        return webhook_module.verify(self.settings.webhook_secret, request)

    async def close(self) -> None:
        await self._client.close()
