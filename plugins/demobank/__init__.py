"""Demo Bank: a fake bank that needs no network, scripted by what the person types.

This plugin is the example to copy when you add a provider: it implements every method of
:class:`connector.hookspecs.Provider` with the smallest code that is still honest.
"""

from connector.hookspecs import hookimpl

from plugins.demobank.provider import DemoBank


@hookimpl
def connector_register_providers(register):
    register(DemoBank)
