"""Every error the plugin raises or shows: a stable ``powens_`` code and words a bank customer understands.

Powens's own text (the bank's ``message`` or the technical ``description``) only ever goes into ``detail``.
"""

from __future__ import annotations

from connector.types import ActionRequired, Declined, ProviderError, TemporaryError

from .client import PowensAPIError, PowensBadAnswer, PowensUnreachable

# Plain-language messages, by code. Templates may reword them; the codes are the stable part.
MESSAGES: dict[str, str] = {
    "powens_wrongpass": "Your bank didn't accept these details. Check them and try again.",
    "powens_wrongpass_limit": (
        "Your bank refused these details several times. To avoid your access being blocked, check them with your "
        "bank and start again from your Sage product."
    ),
    "powens_bank_busy": "Your bank is busy right now. Please try again in a few minutes.",
    "powens_bank_unavailable": "Your bank's service is unavailable right now. Please try again later.",
    "powens_provider_bug": "Something went wrong at our data provider. Please try again later.",
    "powens_not_supported": "These accounts can't be connected for this bank.",
    "powens_unknown_state": "We couldn't connect to your bank.",
    "powens_bank_not_available": "This bank can't be connected right now.",
    "powens_session_expired": "This sign-in has timed out. Start again from your Sage product.",
    "powens_webauth_cancelled": "You cancelled at your bank.",
    "powens_webauth_failed": "Your bank couldn't complete the connection.",
    "powens_webauth_mismatch": "Your bank sent back a connection we didn't expect. Start again from your Sage product.",
    "powens_invalid_details": "Your bank didn't accept the format of these details. Check them and try again.",
    "powens_unreachable": "We couldn't reach your bank; please try again.",
    "powens_throttled": "Too many attempts right now. Please try again in a minute.",
    "powens_encryption_unavailable": "Connecting to this bank is temporarily unavailable. Please try again later.",
    "powens_try_later": "Your bank can't be reached right now. Please try again later.",
    "powens_too_many_steps": "We couldn't finish connecting to your bank. Please start again from your Sage product.",
    "powens_accounts_mismatch": "We couldn't switch on the accounts you chose. Please start again.",
    "powens_cancelled": "You stopped connecting your bank. Nothing was shared.",
    "powens_bad_answer": "Something went wrong at our data provider. Please try again later.",
    "powens_request_refused": "Something went wrong at our data provider. Please try again later.",
    "powens_unexpected_step": "This page is out of date. Start again from your Sage product.",
    "powens_connection_deleted": (
        "The link to your bank was removed. Connect your bank again from your Sage product."
    ),
    "powens_token_refused": "Our data provider refused our access for now. Please try again later.",
    "powens_account_unavailable": "Your bank no longer shares this account. Connect it again from your Sage product.",
    # Connection states that need the person (feed side: an authRequired statement).
    "powens_sca_required": "Your bank needs you to confirm your identity again.",
    "powens_webauth_required": "Your bank needs you to sign in again on its own website.",
    "powens_additional_info": "Your bank needs more information from you before it can share your accounts again.",
    "powens_decoupled": "Your bank needs you to approve access in its app.",
    "powens_password_expired": "Your bank asks you to change your password on its website, then sign in again.",
    "powens_action_needed": "Your bank needs you to do something on its website or app.",
}

# Connection states (casefolded) → the code the feed raises (§6.2, "person absent").
ACTION_STATES: dict[str, str] = {
    "scarequired": "powens_sca_required",
    "webauthrequired": "powens_webauth_required",
    "wrongpass": "powens_wrongpass",
    "additionalinformationneeded": "powens_additional_info",
    "decoupled": "powens_decoupled",
    "passwordexpired": "powens_password_expired",
    "actionneeded": "powens_action_needed",
}
TEMPORARY_STATES: dict[str, str] = {
    "ratelimiting": "powens_bank_busy",
    "websiteunavailable": "powens_bank_unavailable",
    "bug": "powens_provider_bug",
}


def provider_error(code: str, *, detail: str | None = None) -> ProviderError:
    return ProviderError(code, MESSAGES[code], detail=detail)


def declined(code: str, *, detail: str | None = None) -> Declined:
    """The person said no or stopped: the journey ends without an alarm or a retry."""
    return Declined(code, MESSAGES[code], detail=detail)


def action_required(code: str, *, detail: str | None = None) -> ActionRequired:
    return ActionRequired(code, MESSAGES[code], detail=detail)


def temporary(code: str, *, detail: str | None = None, retry_after: float | None = None) -> TemporaryError:
    return TemporaryError(code, MESSAGES[code], detail=detail, retry_after=retry_after)


def from_exception(exc: Exception) -> ProviderError:
    """A client failure as the error a person or the feed sees."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, PowensUnreachable):
        return temporary("powens_unreachable")
    if isinstance(exc, PowensBadAnswer):
        return temporary("powens_bad_answer")
    if isinstance(exc, PowensAPIError):
        code = exc.code_cf
        if exc.status == 429 or code == "toomanyrequests":
            return temporary("powens_throttled", detail=exc.detail, retry_after=exc.retry_after)
        if code == "websiteunavailable" or exc.status == 503:
            return temporary("powens_bank_unavailable", detail=exc.detail, retry_after=exc.retry_after)
        if code == "bug" or exc.status >= 500:
            return temporary("powens_provider_bug", detail=exc.detail, retry_after=exc.retry_after)
        if code == "actionneeded":
            return action_required("powens_action_needed", detail=exc.detail)
        if code == "wrongpass":
            return action_required("powens_wrongpass", detail=exc.detail)
        return temporary("powens_request_refused", detail=exc.detail)
    raise exc
