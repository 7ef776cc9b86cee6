"""Powens provider plugin: registers :class:`~plugins.powens.provider.Powens` with the core."""

from __future__ import annotations

from collections.abc import Callable

from connector.hookspecs import Provider, hookimpl

from .provider import Powens

__all__ = ["Powens", "connector_register_providers"]


@hookimpl
def connector_register_providers(register: Callable[[type[Provider]], None]) -> None:
    register(Powens)
