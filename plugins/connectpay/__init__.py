"""ConnectPay provider plugin (psd2 account information and BaaS with integrated SCA).

Registered as a built-in through ``connector.plugins.DEFAULT_PLUGINS``; it uses only the public contract
(:mod:`connector.hookspecs`, :mod:`connector.types`) and the helpers of :mod:`connector.outbound`.
Spec: ``connectpay.md``.
"""

from __future__ import annotations

from collections.abc import Callable

from connector.hookspecs import Provider, hookimpl
from plugins.connectpay.provider import ConnectPay

__all__ = ["ConnectPay", "connector_register_providers"]


@hookimpl
def connector_register_providers(register: Callable[[type[Provider]], None]) -> None:
    register(ConnectPay)
