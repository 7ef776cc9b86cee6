"""Pages a person walks: ``/auth``, ``/authrefresh``, the journey's own pages and provider callbacks.

State changes only on POST, except ``/auth``, ``/authrefresh`` and provider callbacks, which are guarded by
single-use values (security.md P8). Every POST answers 303 (never 307/308, which would re-post credentials).
"""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, redirect
from sanic.response import json as json_response

from connector.errors import PageError
from connector.journey.service import Journeys, Next
from connector.types import JourneyKind
from connector.web import render

bp = Blueprint("journey")

MAX_FORM_BYTES = 16 * 1024


def journeys(request: Request) -> Journeys:
    return request.app.ctx.journeys


def client_ip(request: Request) -> str:
    # remote_addr is filled from forwarded headers only when server.proxies_count / real_ip_header are set.
    return request.remote_addr or request.ip


def args(request: Request) -> dict[str, list[str]]:
    """Query parameters as plain lists (Sanic's ``.get`` would hide a repeated parameter)."""
    return {k: list(v) for k, v in dict.items(request.get_args(keep_blank_values=True))}


def _see_other(next_: Next) -> HTTPResponse:
    return redirect(next_.url, status=303)


async def _begin(request: Request, kind: JourneyKind) -> HTTPResponse:
    service = journeys(request)
    handle, next_ = await service.begin(kind, args(request), client_ip(request))
    if next_.url != service.page_url(handle):
        # The provider finished without asking anything (e.g. a re-authorisation cleared by a person-present sync):
        # Sage was told, so the browser goes straight back.
        return _see_other(next_)
    return await _show(request, handle)


@bp.get("/auth")
async def auth(request: Request) -> HTTPResponse:
    return await _begin(request, JourneyKind.ONBOARDING)


@bp.get("/authrefresh")
async def authrefresh(request: Request) -> HTTPResponse:
    return await _begin(request, JourneyKind.REAUTHORISATION)


async def _show(request: Request, handle: str) -> HTTPResponse:
    service = journeys(request)
    journey, current = await service.load(handle, client_ip(request))
    back_url = service.back_url(journey)
    common = {
        "page": current,
        "handle": handle,
        "post_url": service.page_url(handle),
        "back_url": back_url,
        "bank_name": request.app.ctx.settings.bank(journey.sage_bank_id).name,
        "provider_title": request.app.ctx.provider_titles.get(journey.provider, journey.provider),
        "reauth": journey.kind == JourneyKind.REAUTHORISATION.value,
    }
    kind = current["type"]
    if kind == "error":
        err = render.page_error_for(current["code"], message=current.get("message"),
                                    detail=current.get("detail"), back_url=back_url)
        return await render.error(request, err, bank_name=common["bank_name"])
    template = {"form": "form.html", "redirect": "redirect.html", "wait": "wait.html",
                "accounts": "accounts.html"}[kind]
    return await render.page(request, template, step=current.get("step"), **common)


@bp.get("/journey/<handle:str>")
async def show(request: Request, handle: str) -> HTTPResponse:
    return await _show(request, handle)


@bp.post("/journey/<handle:str>")
async def post(request: Request, handle: str) -> HTTPResponse:
    if len(request.body) > MAX_FORM_BYTES:
        raise PageError("bad_request")
    form = {k: list(v) for k, v in dict.items(request.get_form(keep_blank_values=True))}
    return _see_other(await journeys(request).post(handle, form, client_ip(request)))


@bp.get("/journey/<handle:str>/poll")
async def poll(request: Request, handle: str) -> HTTPResponse:
    service = journeys(request)
    next_ = await service.poll(handle, client_ip(request))
    if request.args.get("format") != "json":
        return _see_other(next_)
    # The waiting page's script checks in the background, so the page (and the person's focus) stays put until
    # something changed: {"waiting": true} means check again later; otherwise the script goes to "url".
    waiting = False
    if next_.url == service.page_url(handle):
        try:
            _, current = await service.load(handle)
            waiting = current["type"] == "wait"
        except PageError:
            waiting = False
    return json_response({"waiting": waiting, "url": next_.url})


@bp.get("/providers/<provider:str>/callback")
async def callback(request: Request, provider: str) -> HTTPResponse:
    return _see_other(await journeys(request).callback(provider, args(request), client_ip(request)))
