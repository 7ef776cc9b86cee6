"""The Sanic application factory. Nothing is built at import time; shared objects live on ``app.ctx`` and are
created in ``before_server_start`` and closed in ``after_server_stop``."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from jinja2 import Environment, FileSystemLoader
from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.handlers import ErrorHandler
from sanic.response import HTTPResponse
from sanic.response import json as json_response
from sanic_ext import Extend, openapi
from tortoise.exceptions import DBConnectionError, IntegrityError, OperationalError

from connector import logs
from connector.config import Settings
from connector.errors import ApiError, PageError
from connector.feed import Feed
from connector.hookspecs import Provider
from connector.inbox import Inbox
from connector.journey.service import Journeys
from connector.metrics import Metrics
from connector.outbound import guarded_session
from connector.plugins import Plugins, load_plugins
from connector.sage.client import SageClient
from connector.sage.ratelimit import RateLimiter
from connector.security.crypto import SecretBox, UnknownKey
from connector.security.headers import SecurityHeaders
from connector.security.tokens import JWKSCache, SageTokenVerifier
from connector.storage import close_database, open_database
from connector.tasks import spawn
from connector.web import journey, machine, ops, render

log = logging.getLogger("connector.app")

#: Paths answered as JSON; everything else is a page a person may see.
MACHINE_PREFIXES = ("/notification", "/availableaccounts", "/health", "/ready", "/metrics", "/docs")


def template_dirs(providers: dict[str, type[Provider]]) -> list[Path]:
    here = Path(__file__).resolve().parent
    dirs = [p for p in (here / "templates", here.parent / "templates") if p.is_dir()][:1]
    dirs += [Path(cls.template_dir) for cls in providers.values() if getattr(cls, "template_dir", None)]
    return dirs


def is_journey(path: str) -> bool:
    """Pages of a person's journey (and their error pages): the only ones Sage may frame."""
    return path in ("/auth", "/authrefresh") or path.startswith("/journey/") or (
        path.startswith("/providers/") and path.endswith("/callback"))


def is_machine(path: str) -> bool:
    return path.startswith(MACHINE_PREFIXES) or path.endswith("/webhook")


class Errors(ErrorHandler):
    """The one place where an exception becomes an answer: JSON for machines, an accessible page for people.

    Error pages render with a synchronous Jinja environment because Sanic calls this handler synchronously.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pages: Environment | None = None

    def default(self, request: Request, exception: Exception) -> HTTPResponse:  # type: ignore[override]
        if isinstance(exception, ApiError):
            return json_response({"error": exception.code, "message": exception.message},
                                 status=exception.status, headers=exception.headers)
        if isinstance(exception, PageError):
            return self.page(request, exception)
        unreadable = isinstance(exception, UnknownKey)
        if unreadable or (isinstance(exception, (OperationalError, DBConnectionError))
                          and not isinstance(exception, IntegrityError)):
            # The database is unreachable or refused the write (nothing was stored, so the caller may retry), or
            # a stored secret was sealed with a key no longer configured (the message names its key id).
            log.error("stored secret unreadable: %s" % exception if unreadable else "storage unavailable",
                      extra={"path": request.path, "error": type(exception).__name__})
            if is_machine(request.path):
                err = ApiError("temporarily_unavailable")
                return json_response({"error": err.code, "message": err.message}, status=err.status,
                                     headers={"Retry-After": "5"})
            return self.page(request, PageError("storage_unavailable"))
        status = getattr(exception, "status_code", 500)
        if status >= 500 or not isinstance(exception, SanicException):
            log.error("unhandled error", extra={"path": request.path, "error": type(exception).__name__})
            status = 500
        if is_machine(request.path):
            code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                    500: "internal_error"}.get(status, "invalid_request")
            err = ApiError(code)
            return json_response({"error": err.code, "message": err.message}, status=err.status)
        code = {404: "not_found", 405: "method_not_allowed", 500: "internal_error"}.get(status, "bad_request")
        return self.page(request, PageError(code, status=status if status != 500 else None))

    def page(self, request: Request, err: PageError) -> HTTPResponse:
        assert self.pages is not None
        body = self.pages.get_template("error.html").render(
            request=request, code=err.code, text=err.text, back_url=err.back_url, detail=err.detail,
            **render.step_context(None))
        return HTTPResponse(body, status=err.status, content_type="text/html; charset=utf-8")


def create_app(settings: Settings, plugins: Plugins | None = None, *, name: str | None = None) -> Sanic:
    logs.quiet_libraries()
    plugins = plugins or load_plugins()
    enabled = plugins.enabled(settings)

    errors = Errors()
    dirs = template_dirs(enabled)
    errors.pages = Environment(loader=FileSystemLoader([str(d) for d in dirs]), autoescape=True)
    app = Sanic(name or f"connector-{uuid.uuid4().hex[:8]}", error_handler=errors)
    app.config.update(
        REQUEST_MAX_SIZE=32 * 1024 * 1024,  # the largest per-route cap (a provider webhook); routes check theirs
        REQUEST_MAX_HEADER_SIZE=8192,
        PROXIES_COUNT=settings.server["proxies_count"] or None,
        REAL_IP_HEADER=settings.server["real_ip_header"] or None,
        KEEP_ALIVE_TIMEOUT=15,
        FALLBACK_ERROR_FORMAT="json",
    )
    Extend(app, config={
        "cors": False,
        "templating_path_to_templates": [str(p) for p in dirs],
        "templating_enable_async": True,
        "http_auto_trace": False,
        "http_auto_options": False,
        # A HEAD would run the GET handler: on /auth, /authrefresh and callbacks it would burn a single-use value.
        "http_auto_head": False,
    })
    app.ctx.settings = settings
    app.ctx.plugins = plugins
    app.ctx.provider_titles = {n: getattr(cls, "title", n) for n, cls in enabled.items()}
    security = settings.security
    headers = SecurityHeaders(settings.public_url, security["frame_ancestors"], security["redirect_hosts"],
                              security["allow_loopback_redirects"])
    static = Path(template_dirs({})[0]) / "static"
    if static.is_dir():
        app.static("/static", static, name="static")

    @app.on_request
    async def request_id(request: Request) -> None:
        given = request.headers.get("x-request-id", "")
        # A caller's id is kept only if it is short and plain, so it can't smuggle anything into the logs.
        request.ctx.request_id = given if given.isascii() and given.replace("-", "").isalnum() and len(given) <= 64 \
            else uuid.uuid4().hex
        logs.request_id.set(request.ctx.request_id)

    @app.on_response
    async def secure(request: Request, response: HTTPResponse) -> None:
        headers.apply(response.headers, page=is_journey(request.path))
        if getattr(request.ctx, "request_id", None):
            response.headers["X-Request-ID"] = request.ctx.request_id
        route = request.route.name.rsplit(".", 1)[-1] if request.route else "unmatched"
        app.ctx.metrics.requests.labels(route, str(response.status)).inc()

    app.blueprint(journey.bp)
    openapi.exclude(bp=journey.bp)  # HTML for people, not part of the machine API document
    app.blueprint(machine.bp)
    app.blueprint(ops.bp)
    app.ctx.metrics = Metrics()

    @app.before_server_start
    async def start(app: Sanic, _: Any = None) -> None:
        await open_database(settings.database["url"])
        sage = settings.sage
        app.ctx.box = SecretBox(settings.encryption_keys)
        name, value = sage["notification_header"]["name"], sage["notification_header"]["value"]
        app.ctx.notification_header = (name, value)
        app.ctx.http = guarded_session([sage["jwks_url"], sage["token_url"], sage["provider_api_url"]])
        jwks = JWKSCache(app.ctx.http, sage["jwks_url"])
        app.ctx.jwks = jwks
        app.ctx.verifier = SageTokenVerifier(jwks, issuer=sage["issuer"], audience=sage["audience"],
                                             leeway=sage["clock_leeway_seconds"],
                                             allowed_clients=sage["allowed_token_clients"])
        app.ctx.limiter = RateLimiter(sage["requests_per_second"])
        app.ctx.sage = SageClient.from_settings(app.ctx.http, sage, app.ctx.limiter)
        app.ctx.metrics.sage_throttled.source = lambda: app.ctx.sage.stats.throttled
        app.ctx.providers = plugins.instances(settings)
        # The statement feed: woken early when Sage links or deletes a bank account, or a consent is repaired.
        app.ctx.feed = Feed(settings, app.ctx.providers, app.ctx.box, app.ctx.sage, metrics=app.ctx.metrics)
        app.ctx.journeys = Journeys(settings, app.ctx.providers, app.ctx.box, app.ctx.sage,
                                    on_consent_restored=app.ctx.feed.wake, metrics=app.ctx.metrics)
        app.ctx.inbox = Inbox(settings, app.ctx.providers, app.ctx.box, on_account_change=app.ctx.feed.wake)

    @app.after_server_start
    async def warm(app: Sanic, _: Any = None) -> None:
        spawn(app, app.ctx.jwks.warm())
        # Notifications a crash left unprocessed: their work is idempotent, so it need not hold up serving (it may
        # call a provider that is down).
        spawn(app, app.ctx.inbox.process_pending())
        if settings.feed["enabled"]:
            spawn(app, app.ctx.feed.run_forever())

    @app.before_server_stop
    async def finish_tasks(app: Sanic, _: Any = None) -> None:
        feed: Feed | None = getattr(app.ctx, "feed", None)
        if feed is not None:
            feed.stop()
        tasks = list(getattr(app.ctx, "tasks", ()))
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        for task in tasks:
            task.cancel()

    @app.after_server_stop
    async def stop(app: Sanic, _: Any = None) -> None:
        await app.ctx.jwks.close()
        for provider in getattr(app.ctx, "providers", {}).values():
            try:
                await provider.close()
            except Exception:
                log.warning("provider close failed", exc_info=True)
        http: aiohttp.ClientSession | None = getattr(app.ctx, "http", None)
        if http is not None:
            await http.close()
        await close_database()

    return app
