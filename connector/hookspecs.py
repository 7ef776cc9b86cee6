"""The plugin contract: how a bank-data provider plugs into the connector.

A provider plugin is a module (or package) that implements :func:`connector_register_providers` with the
:data:`hookimpl` marker and hands the core one or more *provider classes*. The core owns everything Sage-facing
(token checks, authorisation sessions, pages, the PATCH, statements); the provider class does the provider-specific
work, through the methods of :class:`Provider`, and keeps its state only through what the core hands it
(:class:`Flow` for a journey, :class:`ConsentSession` for a stored consent).

Plugins are found in two ways:

* built-ins, listed in ``connector.plugins.DEFAULT_PLUGINS`` (``plugins/demobank`` is the example to copy);
* third-party packages, through the entry-point group :data:`ENTRY_POINT_GROUP`::

      [project.entry-points."connector.providers"]
      mybank = "mybank_connector.plugin"

Rules every provider follows:

* map provider JSON to :mod:`connector.types` in exactly one module;
* raise :class:`~connector.types.ActionRequired` when the person must act (consent lost, wrong password),
  :class:`~connector.types.TemporaryError` when a retry later may succeed, and end a journey with
  :class:`~connector.types.Declined` when the person said no at the bank (not an error: no alarm, no retry);
* make outbound calls only through ``services.http_session(...)``, which refuses origins outside the plugin's
  configured base URLs and follows no redirects;
* never log secrets, typed credentials or one-time codes.

Methods of :class:`Provider` are ``async``; pluggy itself is only used to find and register provider classes, so
no async hook is ever ``firstresult``.

.. versionadded:: 1 the contract as first published (``CONTRACT_VERSION``).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import aiohttp
import pluggy

from connector.types import Account, AccountRead, FlowEvent, JourneyKind, StepResult, WebhookRequest, WebhookResult

__all__ = [
    "CONTRACT_VERSION",
    "ENTRY_POINT_GROUP",
    "BankInfo",
    "ConsentSession",
    "Flow",
    "PolledProvider",
    "Provider",
    "ProviderServices",
    "WebhookProvider",
    "hookimpl",
    "hookspec",
]

PROJECT_NAME = "connector"
ENTRY_POINT_GROUP = "connector.providers"
CONTRACT_VERSION = 1

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --- What the core hands a provider ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BankInfo:
    """One ``[[banks]]`` entry of the config, as a provider sees it.

    :ivar provider_bank: the provider's own id for this bank (a Powens connector uuid, a ConnectPay mode...).
    :ivar options: the bank's ``options`` table, already checked by :meth:`Provider.check_bank`.
    """

    sage_bank_id: str
    name: str
    provider_bank: str
    options: Mapping[str, Any] = field(default_factory=dict)


class ProviderServices(Protocol):
    """Services the core offers every provider instance (given to the provider's constructor)."""

    public_url: str
    """How browsers and Sage reach the connector, without a trailing slash."""

    def callback_url(self) -> str:
        """The provider's fixed callback URL (``{public_url}/providers/{name}/callback``), with no query string."""
        ...

    def http_session(
        self,
        base_urls: Sequence[str],
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
    ) -> aiohttp.ClientSession:
        """An aiohttp session that only reaches ``base_urls``' origins, follows no redirects, verifies TLS and logs
        calls without secrets. The provider closes it in :meth:`Provider.close`."""
        ...


class ConsentSession(Protocol):
    """A stored consent, as a provider sees it during a feed read, a refresh or a re-authorisation."""

    consent_id: str
    provider_consent_id: str | None
    bank: BankInfo

    @property
    def secrets(self) -> Mapping[str, Any]:
        """The decrypted secrets last saved for this consent."""
        ...

    async def save_secrets(self, secrets: Mapping[str, Any]) -> None:
        """Replace the stored secrets at once (encrypted), e.g. a rotated refresh token before it is used."""
        ...

    def lock(self) -> AbstractAsyncContextManager[None]:
        """Hold this while refreshing tokens so two refreshes never race; re-read :attr:`secrets` inside it."""
        ...


@dataclass(slots=True)
class Flow:
    """One person's authorisation journey, as the provider sees it.

    :ivar kind: onboarding (``/auth``) or re-authorisation (``/authrefresh``).
    :ivar state: the provider's own journey state. The core stores it encrypted after every call, so anything the
        next step needs (a temporary token, a connection id) goes here. Never typed passwords or one-time codes.
    :ivar consent: for a re-authorisation, the consent being renewed, and its linked accounts.
    :ivar client_ip: the person's IP address (forwarded headers are honoured only behind a configured proxy).
    :ivar issue_state: returns a fresh random ``state`` bound to this journey and this provider, single use; the
        provider's callback arrives as a ``callback`` event only if it carries such a state.
    """

    journey_id: str
    kind: JourneyKind
    bank: BankInfo
    state: dict[str, Any]
    client_ip: str
    issue_state: Callable[[], Awaitable[str]]
    consent: ConsentSession | None = None
    linked_accounts: Sequence[Account] = ()


# --- The provider --------------------------------------------------------------------------------------------------


@runtime_checkable
class Provider(Protocol):
    """What a provider class implements. The core builds one instance per process.

    Class attributes:

    * ``name``: the key in ``[providers.<name>]`` and ``[[banks]].provider`` (lower case, no spaces);
    * ``title``: the provider's name as shown to people;
    * ``template_dir``: an optional folder of extra Jinja2 templates.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    template_dir: ClassVar[Path | None]

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
        """Check the ``[providers.<name>]`` table (without ``enabled``).

        :return: ``(key, problem)`` pairs, ``key`` relative to the table (``"client_id"``); empty when valid.
        """
        ...

    @classmethod
    def check_bank(cls, bank: BankInfo) -> Iterable[tuple[str, str]]:
        """Check one bank mapped to this provider (its ``provider_bank`` and ``options``).

        :return: ``(key, problem)`` pairs, ``key`` relative to the bank entry (``"options.mode"``).
        """
        ...

    def __init__(self, config: Mapping[str, Any], services: ProviderServices) -> None: ...

    async def start(self, flow: Flow) -> StepResult:
        """Called when a person opens ``/auth`` or ``/authrefresh`` for a bank of this provider.

        :return: the first step: a :class:`~connector.types.Form` in our page, a
            :class:`~connector.types.Redirect` to the bank, or any other step result.
        """
        ...

    async def resume(self, flow: Flow, event: FlowEvent) -> StepResult:
        """Called for each later event of the journey: a form post, the account choice, a waiting page's check,
        the provider's callback (already matched to a single-use ``state``) or a cancel.

        :return: the next step; :class:`~connector.types.Done` ends it with a grant to store, and
            :class:`~connector.types.Failed` ends it with an error page.
        """
        ...

    async def list_accounts(self, consent: ConsentSession) -> Sequence[Account]:
        """Called by ``/availableaccounts``, when Sage asks which accounts of the consent it may link: every
        account the consent can reach, read fresh (Sage gets the last stored list when this raises).

        :raises ActionRequired: the consent is lost. :raises TemporaryError: try again later.
        """
        ...

    async def read_account(
        self, consent: ConsentSession, account: Account, since: date, sync_point: str | None
    ) -> AccountRead:
        """Called by the statement feed: the account's current balance and the booked transactions that changed
        since ``sync_point`` (or, on the first read, booked on or after ``since``).

        Re-reading a small overlap is fine: the core drops transactions it already holds.

        :raises ActionRequired: the consent is lost. :raises TemporaryError: try again later.
        """
        ...

    async def revoke(self, consent: ConsentSession) -> None:
        """Called when the last linked account of a consent is deleted in Sage (the core has already erased the
        stored secrets; ``save_secrets`` does nothing), and when the PATCH to Sage fails at the end of an onboarding:
        revoke provider access where the provider allows it. An exception is logged and ignored."""
        ...

    async def close(self) -> None:
        """Called once when the process stops: close HTTP sessions."""
        ...


class WebhookProvider(Provider, Protocol):
    """A provider that also receives webhooks (optional: the core checks for :meth:`webhook`)."""

    async def webhook(self, request: WebhookRequest) -> WebhookResult:
        """Called for each ``POST /providers/<name>/webhook``: verify the signature (in constant time) and say
        what to refresh.

        :raises PermissionError: the signature is missing or wrong (the core answers 401 and stores nothing).
        :raises ValueError: the body is malformed (400).
        """
        ...


@runtime_checkable
class PolledProvider(Provider, Protocol):
    """A provider whose bank refreshes its data on a schedule (optional: the core checks for the attribute).

    After reading an account the feed waits ``poll_interval_seconds`` before reading it again, unless a webhook
    names its consent (:meth:`WebhookProvider.webhook`): reading sooner would only fetch what the bank has not
    refreshed yet, and spend the provider's request quota.
    """

    poll_interval_seconds: int


# --- Hooks ---------------------------------------------------------------------------------------------------------
# Registration (called once per process, while the plugin manager starts)


@hookspec
def connector_register_providers(register: Callable[[type[Provider]], None]) -> None:
    """Called once at start-up, before the config is checked, to collect provider classes.

    Call ``register(ProviderClass)`` for each provider the plugin offers. Two providers with the same ``name`` are
    a start-up error.

    :param register: the core's registry callback; takes a class that implements :class:`Provider`.
    :return: nothing; results are ignored.

    Example::

        @hookimpl
        def connector_register_providers(register):
            register(DemoBank)
    """
