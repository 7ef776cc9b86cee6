"""Finding provider plugins: built-ins from ``DEFAULT_PLUGINS``, third parties through entry points.

The core talks to plugins only through :class:`Plugins`, a typed facade with one method per hook, so nothing else
touches ``pm.hook``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import TYPE_CHECKING

import pluggy

from connector import hookspecs
from connector.hookspecs import ENTRY_POINT_GROUP, PROJECT_NAME, Provider
from connector.outbound import CoreServices

if TYPE_CHECKING:
    from connector.config import Settings

DEFAULT_PLUGINS: tuple[str, ...] = (
    "plugins.demobank",
    "plugins.connectpay",
    "plugins.powens",
)

#: Comma-separated plugin names (module or entry-point names) that are not loaded, e.g. for tests.
DISABLE_ENV = "CONNECTOR_DISABLE_PLUGINS"


class PluginError(Exception):
    """A plugin could not be loaded or registered (a start-up error)."""


@dataclass(frozen=True, slots=True)
class ProviderEntry:
    """A registered provider class and where it came from (``built-in: plugins.demobank`` or a distribution)."""

    cls: type[Provider]
    origin: str


class Plugins:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self._origins: dict[object, str] = {}
        self._providers: dict[str, ProviderEntry] | None = None

    def register(self, plugin: ModuleType | object, origin: str) -> None:
        self.pm.register(plugin)
        self._origins[plugin] = origin

    def load(self, *, extra: tuple[ModuleType | object, ...] = ()) -> Plugins:
        """Load built-ins, then installed entry points, then ``extra`` (tests), and check every hook is known."""
        disabled = {name.strip() for name in os.environ.get(DISABLE_ENV, "").split(",") if name.strip()}
        for dotted in DEFAULT_PLUGINS:
            if dotted in disabled or dotted.rsplit(".", 1)[-1] in disabled:
                continue
            try:
                module = importlib.import_module(dotted)
            except ModuleNotFoundError as exc:
                if exc.name and dotted.startswith(exc.name):
                    continue  # a built-in not shipped in this install
                raise
            self.register(module, f"built-in: {dotted}")
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in disabled:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party package must name itself
                raise PluginError(f"entry point {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
            if self.pm.is_registered(plugin):
                continue
            dist = ep.dist.name if ep.dist else "unknown distribution"
            self.register(plugin, f"entry point: {ep.name} = {ep.value} ({dist})")
        for plugin in extra:
            self.register(plugin, f"test: {getattr(plugin, '__name__', type(plugin).__name__)}")
        self.pm.check_pending()
        return self

    def providers(self) -> dict[str, ProviderEntry]:
        """Every registered provider class by name; a duplicate name is a :class:`PluginError`."""
        if self._providers is not None:
            return self._providers
        found: dict[str, ProviderEntry] = {}
        for impl in self.pm.hook.connector_register_providers.get_hookimpls():
            origin = self._origins.get(impl.plugin, impl.plugin_name)

            def register(cls: type[Provider], _origin: str = origin) -> None:
                name = getattr(cls, "name", None)
                if not isinstance(name, str) or not name:
                    raise PluginError(f"{_origin}: provider class {cls!r} has no name")
                if name in found:
                    raise PluginError(
                        f"provider {name!r} is registered twice: by {found[name].origin} and by {_origin}"
                    )
                found[name] = ProviderEntry(cls, _origin)

            impl.function(register=register)
        self._providers = found
        return found

    def enabled(self, settings: Settings) -> dict[str, type[Provider]]:
        """The provider classes the config enables, by name (a name no plugin registers is a config problem)."""
        available = self.providers()
        return {name: available[name].cls for name in settings.enabled_providers() if name in available}

    def instances(self, settings: Settings) -> dict[str, Provider]:
        """One instance per enabled provider, given its config table and the core's services."""
        return {
            name: cls({k: v for k, v in settings.providers[name].items() if k != "enabled"},
                      CoreServices(settings.public_url, name))
            for name, cls in self.enabled(settings).items()
        }


def load_failure(exc: Exception) -> str:
    """What to tell an operator when plugins could not be loaded: a PluginError names the plugin; anything else (a
    built-in's import error, a hook implementation pluggy refuses) is named by its type."""
    return str(exc) if isinstance(exc, PluginError) else \
        f"provider plugins could not be loaded: {type(exc).__name__}: {exc}"


def load_plugins(*, extra: tuple[ModuleType | object, ...] = ()) -> Plugins:
    return Plugins().load(extra=extra)
