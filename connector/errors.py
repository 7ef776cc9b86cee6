"""Stable error codes, and the one place where an error becomes an HTTP answer.

Machine endpoints answer ``{"error": code, "message": text}``; people get an accessible page that says what happened
and what to do. Every code is listed here, so the documentation and the tests read from one table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PageText:
    status: int
    title: str
    message: str
    todo: str


#: Errors a person can see. Provider errors use their own ``code`` with the ``provider_error`` texts as a frame.
PAGES: dict[str, PageText] = {
    "redirect_refused": PageText(400, "We can't return you to Sage from here",
                                 "The link that brought you here doesn't point back to a Sage service we know.",
                                 "Close this window and start again from your Sage product."),
    "bad_request": PageText(400, "This link is incomplete",
                            "Part of the link that brought you here is missing or damaged.",
                            "Go back to Sage and start connecting your bank again."),
    "not_announced": PageText(403, "We couldn't check this request",
                              "Sage didn't tell us about this connection request, so we can't continue it.",
                              "Go back to Sage and start again."),
    "bank_mismatch": PageText(403, "This request doesn't match your bank",
                              "The bank in this link isn't the one Sage told us about.",
                              "Go back to Sage and choose your bank again."),
    "unknown_bank": PageText(403, "This bank isn't available here",
                             "We can't connect this bank at the moment.",
                             "Go back to Sage and choose another bank, or contact Sage support."),
    "account_mismatch": PageText(403, "This request doesn't match your account",
                                 "The account in this link isn't one we connected for you.",
                                 "Go back to Sage and try again from the account's settings."),
    "link_used": PageText(410, "This link has already been used",
                          "For your security, each link to connect your bank works only once.",
                          "Go back to Sage and start again."),
    "link_expired": PageText(410, "This link has expired",
                             "For your security, you have 20 minutes to connect your bank.",
                             "Go back to Sage and start again."),
    "journey_expired": PageText(410, "Your session has expired",
                                "For your security, the connection stops after a while without activity.",
                                "Go back to Sage and start again."),
    "journey_not_found": PageText(404, "We can't find this page",
                                  "This page belongs to a connection that has ended or never existed.",
                                  "Go back to Sage and start again."),
    "too_many_attempts": PageText(429, "Too many attempts",
                                  "We've had too many requests that we couldn't match.",
                                  "Wait a minute, then start again from Sage."),
    "storage_unavailable": PageText(503, "Please try again in a moment",
                                    "Our service is briefly unavailable. Nothing has been changed.",
                                    "Wait a moment, then start again from Sage."),
    "sage_unavailable": PageText(502, "We couldn't tell Sage about your accounts",
                                 "Your bank connected, but Sage didn't confirm it. Nothing has been linked.",
                                 "Go back to Sage and start again. If it happens again, contact Sage support."),
    "different_user": PageText(403, "These aren't the same accounts",
                               "You signed in to your bank as someone whose accounts don't include the one "
                               "you're reconnecting.",
                               "Go back to Sage and try again, signing in as the account holder."),
    "cancelled": PageText(200, "You cancelled connecting your bank",
                          "Nothing has been shared with Sage.",
                          "Go back to Sage. You can connect your bank at any time."),
    "declined": PageText(200, "You didn't allow access",
                         "Nothing has been shared with Sage.",
                         "Go back to Sage. You can connect your bank at any time."),
    "provider_error": PageText(502, "We couldn't connect to your bank",
                               "Something went wrong while connecting to your bank.",
                               "Go back to Sage and try again later."),
    "not_found": PageText(404, "We can't find this page", "This address doesn't exist.",
                          "Check the address, or go back to Sage."),
    "method_not_allowed": PageText(405, "This page can't be used like that",
                                   "Your browser asked for this page in a way we don't support.",
                                   "Go back to Sage and start again."),
    "internal_error": PageText(500, "Something went wrong on our side",
                               "We've logged the problem. Nothing has been shared with Sage.",
                               "Go back to Sage and try again later."),
}

#: Errors machine endpoints answer with.
API_ERRORS: dict[str, tuple[int, str]] = {
    "invalid_request": (400, "The request is malformed."),
    "invalid_token": (401, "The bearer token is missing or invalid."),
    "invalid_notification_header": (401, "The notification header is missing or wrong."),
    "insufficient_scope": (403, "The token does not carry the scope this endpoint needs."),
    "unknown_external_id": (404, "No account has this externalId."),
    "not_found": (404, "No such endpoint."),
    "method_not_allowed": (405, "Method not allowed on this endpoint."),
    "payload_too_large": (413, "The request body is too large."),
    "unsupported_media_type": (415, "The body must be application/json."),
    "too_many_requests": (429, "Too many requests; slow down."),
    "internal_error": (500, "Internal error."),
    "temporarily_unavailable": (503, "Temporarily unavailable; nothing was stored. Retry later."),
}


class ApiError(Exception):
    def __init__(self, code: str, message: str | None = None, *, headers: dict[str, str] | None = None) -> None:
        status, default = API_ERRORS[code]
        super().__init__(code)
        self.code, self.status = code, status
        self.message = message or default
        self.headers = headers or {}


class PageError(Exception):
    """An error page. ``back_url`` is the composed redirect to Sage, or ``None`` when it can't be trusted."""

    def __init__(self, code: str, *, back_url: str | None = None, detail: str | None = None,
                 message: str | None = None, status: int | None = None) -> None:
        super().__init__(code)
        text = PAGES.get(code, PAGES["provider_error"])
        self.code = code
        self.status = status or text.status
        self.text = text if message is None else PageText(self.status, text.title, message, text.todo)
        self.back_url = back_url
        self.detail = detail
