"""The ConnectPay provider class: config checks, the two hosts, and dispatch to the psd2 or baas half.

Which half serves a journey: a re-authorisation keeps the mode of the stored consent; otherwise the bank's mode
(``options.mode``, else ``provider_bank``, else ``any``) intersected with ``[providers.connectpay].modes``. With
both modes available the person picks one first, in plain words.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable, Mapping
from datetime import date
from pathlib import Path
from typing import Any, ClassVar

import aiohttp

from connector.hookspecs import BankInfo, ConsentSession, Flow, ProviderServices
from connector.types import (
    Account,
    AccountRead,
    Choice,
    Failed,
    Field,
    FlowEvent,
    Form,
    JourneyKind,
    ProviderError,
    Step,
    StepResult,
)
from plugins.connectpay import errors, settings
from plugins.connectpay.baas import Baas
from plugins.connectpay.client import Endpoint, Pacer
from plugins.connectpay.psd2 import Psd2
from plugins.connectpay.runtime import Clock, Runtime

log = logging.getLogger("plugins.connectpay")

MODE_LABELS = {
    "psd2": "On ConnectPay's own page (works for every ConnectPay account)",
    "baas": "Here, with the email and password of your ConnectPay user",
}


def mode_form(modes: Iterable[str], error: str | None = None) -> Form:
    return Form(
        title="How do you want to connect ConnectPay?",
        fields=(Field("mode", "Where to sign in", kind="list",
                      choices=tuple(Choice(m, MODE_LABELS[m]) for m in modes)),),
        action="choose_mode",
        error=error,
        field_errors={"mode": error} if error else {},
        step=Step.SIGN_IN,
    )


class ConnectPay:
    """ConnectPay accounts through PSD2 account information (``psd2``) or our BaaS partnership (``baas``)."""

    name: ClassVar[str] = "connectpay"
    title: ClassVar[str] = "ConnectPay"
    template_dir: ClassVar[Path | None] = None  # the core's generic Form/Redirect/ChooseAccounts steps suffice

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
        return settings.parse(config)[1]

    @classmethod
    def check_bank(cls, bank: BankInfo) -> Iterable[tuple[str, str]]:
        return settings.check_bank(bank.provider_bank, bank.options)

    def __init__(self, config: Mapping[str, Any], services: ProviderServices) -> None:
        cfg, problems = settings.parse(config)
        if problems:
            raise ValueError("invalid [providers.connectpay]: " + ", ".join(key for key, _ in problems))
        self.settings = cfg
        mtls_ssl = self._mtls_context(cfg)
        tls_ssl = self._trust_context(cfg) if cfg.tls_base_url.startswith("https:") else None

        def mtls_session() -> aiohttp.ClientSession:
            return services.http_session([cfg.mtls_base_url], ssl_context=mtls_ssl, timeout=cfg.timeout_seconds)

        def tls_session() -> aiohttp.ClientSession:
            return services.http_session([cfg.tls_base_url], ssl_context=tls_ssl, timeout=cfg.timeout_seconds)

        self._rt = Runtime(
            settings=cfg,
            mtls=Endpoint(cfg.mtls_base_url, mtls_session, Pacer(cfg.requests_per_second, cfg.max_concurrency)),
            tls=Endpoint(cfg.tls_base_url, tls_session, Pacer(cfg.requests_per_second, cfg.max_concurrency)),
            callback_url=services.callback_url(),
        )
        self.psd2 = Psd2(self._rt)
        self.baas: Baas | None = None
        if "baas" in cfg.modes:
            key = settings.load_public_key(cfg.baas.password_public_key_file)
            if key is None:
                raise ValueError("invalid [providers.connectpay]: baas.password_public_key_file")
            self.baas = Baas(self._rt, key)

    @staticmethod
    def _trust_context(cfg: settings.Settings) -> ssl.SSLContext:
        # ca_file replaces the system store (a private CA: the emulator, a sandbox); otherwise the system store.
        return ssl.create_default_context(cafile=cfg.ca_file or None)

    @classmethod
    def _mtls_context(cls, cfg: settings.Settings) -> ssl.SSLContext | None:
        if not cfg.mtls_base_url.startswith("https:"):
            return None  # loopback emulator over plain http
        context = cls._trust_context(cfg)
        if cfg.mtls_cert_file:
            context.load_cert_chain(cfg.mtls_cert_file, cfg.mtls_key_file or None,
                                    password=cfg.mtls_key_password or None)
        return context

    @property
    def clock(self) -> Clock:
        """The time source for token expiry; tests replace it with the emulator's clock."""
        return self._rt.clock

    @clock.setter
    def clock(self, value: Clock) -> None:
        self._rt.clock = value

    # --- dispatch -----------------------------------------------------------------------------------------------

    def _modes_for(self, bank: BankInfo) -> list[str]:
        wanted = settings.bank_mode(bank.provider_bank, bank.options)
        candidates = list(settings.MODES) if wanted == "any" else [wanted]
        return [m for m in candidates if m in self.settings.modes and (m != "baas" or self.baas is not None)]

    def _half(self, mode: str) -> Psd2 | Baas:
        if mode == "baas" and self.baas is not None:
            return self.baas
        if mode == "psd2" and "psd2" in self.settings.modes:
            return self.psd2
        raise errors.mode_unavailable()

    def _consent_half(self, consent: ConsentSession) -> Psd2 | Baas:
        mode = consent.secrets.get("mode")
        if mode not in settings.MODES:
            modes = self._modes_for(consent.bank)
            mode = modes[0] if modes else "psd2"
        return self._half(str(mode))

    async def start(self, flow: Flow) -> StepResult:
        if flow.kind is JourneyKind.REAUTHORISATION and flow.consent is not None:
            mode = flow.consent.secrets.get("mode")
            if mode in settings.MODES:
                try:
                    return await self._half(str(mode)).start(flow)
                except ProviderError as exc:
                    return Failed(exc)
        modes = self._modes_for(flow.bank)
        if not modes:
            return Failed(errors.mode_unavailable())
        if len(modes) == 1:
            return await self._half(modes[0]).start(flow)
        flow.state.update({"step": "mode", "modes": modes})
        return mode_form(modes)

    async def resume(self, flow: Flow, event: FlowEvent) -> StepResult:
        mode = flow.state.get("mode")
        if mode is None:
            modes = list(flow.state.get("modes") or [])
            if event.kind == "cancel":
                return Failed(errors.cancelled())
            if event.kind == "submit" and event.action == "choose_mode" and flow.state.get("step") == "mode":
                picked = event.first("mode")
                if picked in modes:
                    return await self._half(picked).start(flow)
                return mode_form(modes, error="Choose where you want to sign in.")
            return Failed(errors.session_out_of_step())
        try:
            half = self._half(str(mode))
        except ProviderError as exc:
            return Failed(exc)
        return await half.resume(flow, event)

    async def list_accounts(self, consent: ConsentSession) -> list[Account]:
        return await self._consent_half(consent).list_accounts(consent)

    async def read_account(
        self, consent: ConsentSession, account: Account, since: date, sync_point: str | None
    ) -> AccountRead:
        return await self._consent_half(consent).read_account(consent, account, since, sync_point)

    async def revoke(self, consent: ConsentSession) -> None:
        try:
            half = self._consent_half(consent)
        except ProviderError:
            return
        await half.revoke(consent)

    async def close(self) -> None:
        await self._rt.mtls.close()
        await self._rt.tls.close()
