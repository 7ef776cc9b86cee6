"""Rendering pages a person sees: one layout, a step indicator, and the way back to Sage."""

from __future__ import annotations

from typing import Any

from sanic import Request
from sanic.response import HTTPResponse
from sanic_ext import render

from connector.errors import PAGES, PageError
from connector.types import Step

STEPS: tuple[tuple[str, str], ...] = (
    (Step.SIGN_IN.value, "Sign in to your bank"),
    (Step.VERIFY.value, "Confirm it's you"),
    (Step.CHOOSE_ACCOUNTS.value, "Choose accounts"),
    (Step.FINISH.value, "Back to Sage"),
)


def step_context(current: str | None) -> dict[str, Any]:
    names = [name for name, _ in STEPS]
    index = names.index(current) if current in names else None
    return {"steps": STEPS, "step_index": index}


async def page(request: Request, template: str, *, status: int = 200, step: str | None = None,
               **context: Any) -> HTTPResponse:
    return await render(template, status=status, context={**step_context(step), **context},
                        app=request.app)


async def error(request: Request, err: PageError, **context: Any) -> HTTPResponse:
    return await page(request, "error.html", status=err.status, code=err.code, text=err.text,
                      detail=err.detail, back_url=err.back_url, **context)


def page_error_for(code: str, *, message: str | None = None, detail: str | None = None,
                   back_url: str | None = None) -> PageError:
    """A stored error page (provider codes fall back to the generic provider texts with their own message)."""
    status = PAGES[code].status if code in PAGES else PAGES["provider_error"].status
    return PageError(code, back_url=back_url, message=message, detail=detail, status=status)
