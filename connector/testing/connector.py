"""Running a real connector on loopback for tests, the demo and provider authors.

``RunningConnector`` starts the Sanic app in the current event loop on a free port, so a test talks to it over real
HTTP exactly as Sage and a browser would. ``connector_config`` builds its config, and ``write_config`` writes one for
``connector`` commands run as subprocesses (``wait_until_ready`` waits for ``connector serve``). ``eventually`` waits
for what happens in its own time.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from sanic import Sanic

from connector.config import Settings, parse_settings
from connector.plugins import Plugins


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_encryption_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


async def wait_until_ready(url: str, exit_code: Callable[[], int | None], log: Path, *, timeout: float = 60.0) -> None:
    """Wait for a ``connector serve`` process at ``url`` to answer ``/ready`` with 200.

    ``exit_code`` tells whether the process has ended (``Popen.poll``, or an asyncio process's ``returncode``); if it
    has, or ``timeout`` passes, this raises ``AssertionError`` with the tail of its ``log``.
    """
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            code = exit_code()
            if code is not None:
                raise AssertionError(f"connector exited with {code}:\n{_tail(log)}")
            try:
                async with http.get(f"{url}/ready") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"connector not ready in {timeout:g} s:\n{_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


T = TypeVar("T")


async def eventually(check: Callable[[], T | Awaitable[T]], *, timeout: float = 5.0, interval: float = 0.02,
                     message: str = "the condition") -> T:
    """Call ``check`` (a plain or an ``async`` function) until it returns something true, and return that.

    For what another process or task does in its own time (a feed run, a browser, a subprocess); raises
    ``AssertionError`` naming ``message`` after ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")
        await asyncio.sleep(interval)


@dataclass
class SageEndpoints:
    """Where the Sage stand-in listens, and the credentials it expects from us."""

    base_url: str
    client_id: str
    client_secret: str
    api_key: str
    notification_header_value: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    notification_header_name: str = "X-Connector-Key"

    @classmethod
    def from_settings(cls, settings: Settings) -> SageEndpoints:
        """The endpoints a connector was configured with (what :func:`connector_config` wrote)."""
        sage = settings.sage
        header = sage["notification_header"]
        return cls(sage["provider_api_url"], sage["client_id"], sage["client_secret"], sage["api_key"],
                   notification_header_value=header["value"], notification_header_name=header["name"])


def connector_config(
    sage: SageEndpoints,
    *,
    database_url: str,
    port: int,
    banks: Sequence[Mapping[str, Any]],
    providers: Mapping[str, Mapping[str, Any]],
    encryption_keys: Sequence[str] | None = None,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """A complete config (as parsed TOML) pointing every Sage URL at ``sage``."""
    base = sage.base_url.rstrip("/")
    config: dict[str, Any] = {
        "server": {"public_url": f"http://127.0.0.1:{port}", "host": "127.0.0.1", "port": port},
        "database": {"url": database_url},
        "security": {
            "encryption_keys": list(encryption_keys or [new_encryption_key()]),
            "allow_loopback_redirects": True,
            "frame_ancestors": ["'self'", "http://127.0.0.1:*", "http://localhost:*"],
        },
        "sage": {
            "issuer": f"{base}/",
            "jwks_url": f"{base}/.well-known/jwks.json",
            "token_url": f"{base}/oauth/token",
            "provider_api_url": base,
            "client_id": sage.client_id,
            "client_secret": sage.client_secret,
            "api_key": sage.api_key,
            "notification_header": {"name": sage.notification_header_name, "value": sage.notification_header_value},
        },
        "feed": {"enabled": False},
        "logging": {"level": "DEBUG", "format": "json"},
        "providers": {name: dict(table) for name, table in providers.items()},
        "banks": [dict(b) for b in banks],
    }
    for section, values in (extra or {}).items():
        config.setdefault(section, {}).update(values)
    return config


def _toml_string(value: str) -> str:
    # JSON's escapes are TOML's too; DEL is the one control character JSON leaves raw and TOML refuses.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(config: Mapping[str, Any]) -> str:
    """A config dict (as parsed TOML, e.g. from :func:`connector_config`) as the text of a TOML file."""
    lines: list[str] = []
    for section, table in config.items():
        if section == "banks":
            continue
        if section == "providers":
            for name, provider in table.items():
                lines.append(f"[providers.{name}]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in provider.items()]
                lines.append("")
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    for bank in config.get("banks", []):
        lines.append("[[banks]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in bank.items()]
        lines.append("")
    return "\n".join(lines)


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    """Write ``config`` to ``path`` as TOML, for ``connector`` commands run as subprocesses; return ``path``."""
    path.write_text(to_toml(config), encoding="utf-8")
    return path


class RunningConnector:
    """A connector served on 127.0.0.1 inside the running event loop."""

    def __init__(self, settings: Settings, plugins: Plugins | None = None, *,
                 endpoints: SageEndpoints | None = None) -> None:
        from connector.app import create_app

        Sanic.test_mode = True  # app names may be reused within one process
        self.settings = settings
        #: Where its Sage is, and the credentials it expects from Sage (what ``SageCalls`` signs with).
        self.endpoints = endpoints or SageEndpoints.from_settings(settings)
        self.app = create_app(settings, plugins)
        self.port = int(settings.server["port"])
        self.url = settings.public_url
        self._server: Any = None

    async def start(self) -> RunningConnector:
        self._server = await self.app.create_server(
            host="127.0.0.1", port=self.port, return_asyncio_server=True, access_log=False)
        await self._server.startup()
        await self._server.before_start()
        await self._server.after_start()
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        await self._server.before_stop()
        await self._server.close()
        await self._server.after_stop()
        self._server = None

    async def settle(self) -> None:
        """Wait until the work notifications start after their answer (linking or unlinking a bank account) is done,
        as Sage would by the time it next calls: a test can then look at what it left without racing it."""
        await self.app.ctx.inbox.settled()

    async def __aenter__(self) -> RunningConnector:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def settings_from(config: Mapping[str, Any]) -> Settings:
    settings, problems = parse_settings(config, env={})
    if problems:
        raise ValueError("; ".join(str(p) for p in problems))
    return settings
