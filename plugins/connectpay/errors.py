"""Every error the plugin raises: a stable ``connectpay_*`` code and words a bank customer understands.

Provider text goes only into ``detail``. Keeping the wording here keeps it consistent across psd2, baas and the feed.
"""

from __future__ import annotations

from connector.types import ActionRequired, Declined, ProviderError, TemporaryError

TRY_LATER = "ConnectPay is not answering right now. Please try again in a few minutes."


def unavailable(detail: str | None = None, retry_after: float | None = None) -> TemporaryError:
    return TemporaryError("connectpay_unavailable", TRY_LATER, detail=detail, retry_after=retry_after)


def rate_limited(retry_after: float | None) -> TemporaryError:
    return TemporaryError("connectpay_rate_limited", "ConnectPay is busy right now. Please try again in a few minutes.",
                          retry_after=retry_after)


def timeout() -> TemporaryError:
    return TemporaryError("connectpay_timeout", TRY_LATER)


def tls_failed() -> TemporaryError:
    # An expired/unregistered client certificate is an operator problem, never the person's (§7.2).
    return TemporaryError("connectpay_tls_failed",
                          "We cannot reach ConnectPay securely right now. The service team has been told.")


def unreadable(detail: str | None = None) -> TemporaryError:
    return TemporaryError("connectpay_unexpected_answer",
                          "ConnectPay sent an answer we could not read. Please try again later.", detail=detail)


def client_refused(detail: str | None = None) -> TemporaryError:
    # invalid_client / partner key refused: our credentials are wrong; retry later, never "authRequired".
    return TemporaryError("connectpay_client_refused",
                          "The link to ConnectPay is not set up correctly. The service team has been told.",
                          detail=detail)


def request_refused(detail: str | None = None) -> TemporaryError:
    return TemporaryError("connectpay_request_refused",
                          "ConnectPay did not accept our request. Please try again later.", detail=detail)


def consent_lost(detail: str | None = None) -> ActionRequired:
    return ActionRequired("connectpay_consent_lost",
                          "Your permission to share ConnectPay data has ended. Please connect your ConnectPay "
                          "account again.", detail=detail)


def consent_expired() -> ActionRequired:
    return ActionRequired("connectpay_consent_expired",
                          "Your permission to share ConnectPay data has expired. Please connect your ConnectPay "
                          "account again.")


def account_unavailable(detail: str | None = None) -> ActionRequired:
    return ActionRequired("connectpay_account_unavailable",
                          "This account can no longer be reached at ConnectPay. It may be closed, or no longer "
                          "shared. Please connect it again.", detail=detail)


def user_blocked(detail: str | None = None) -> ActionRequired:
    return ActionRequired("connectpay_user_blocked",
                          "Your ConnectPay user can no longer be used. Please contact ConnectPay, then connect again.",
                          detail=detail)


def denied() -> ProviderError:
    return Declined("connectpay_denied",
                         "You cancelled at ConnectPay, so no accounts were shared. You can try again at any time.")


def callback_error(detail: str | None = None) -> ProviderError:
    return ProviderError("connectpay_callback_error",
                         "ConnectPay could not complete the sign-in. Please try again.", detail=detail)


def code_refused(detail: str | None = None) -> ProviderError:
    return ProviderError("connectpay_code_refused",
                         "ConnectPay did not accept this sign-in (it may have been used already or be too old). "
                         "Please start again.", detail=detail)


def scope_missing() -> ProviderError:
    return ProviderError("connectpay_scope_missing",
                         "ConnectPay did not give permission to read your accounts. Please start again and allow "
                         "access to your account information.")


def no_accounts() -> ProviderError:
    return ProviderError("connectpay_no_accounts",
                         "We found no ConnectPay account that can be shared. Check the account in ConnectPay, then "
                         "try again.")


def accounts_missing(names: str) -> ProviderError:
    return ProviderError("connectpay_accounts_missing",
                         f"This sign-in does not reach every account you linked before ({names}). Sign in as the "
                         "person and company that own them and try again. Nothing was changed.")


def cancelled() -> ProviderError:
    return Declined("connectpay_cancelled", "You stopped connecting ConnectPay. No accounts were shared.")


def mode_unavailable() -> ProviderError:
    return ProviderError("connectpay_mode_unavailable",
                         "This way of connecting ConnectPay is not available here. Please contact the service team.")


def sca_missing() -> ProviderError:
    return ProviderError("connectpay_sca_missing",
                         "ConnectPay signed you in without a text-message code, so we cannot confirm the accounts "
                         "are yours. Please contact ConnectPay.")


def too_many_attempts() -> ProviderError:
    return ProviderError("connectpay_too_many_attempts",
                         "Too many sign-in attempts. To protect your ConnectPay user, please wait and try again later.")


def different_user() -> ProviderError:
    return ProviderError("connectpay_different_user",
                         "You signed in as a different ConnectPay user than the one linked before. Nothing was "
                         "changed. Please sign in with the user you used the first time.")


def session_out_of_step() -> ProviderError:
    return ProviderError("connectpay_session_error", "Something went wrong with this sign-in. Please start again.")
