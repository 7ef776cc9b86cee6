"""The authorisation journey: onboarding (§11) and re-authorisation (§12), as one small state machine (§6).

Everything the next request needs lives in ``flow.state`` (the core stores it encrypted): the temporary user token,
ids, the connector's sources and field *rules*, counters. Typed values and one-time codes never go there; they live
for one request, are checked, encrypted (§4) and sent.

``flow.state`` keys:

``token``, ``id_user``
    the temporary Powens user (onboarding only; dropped once the user is permanent).
``connector``, ``bank_name``, ``sources``, ``mechanisms``, ``fields``
    the connector as read at the start: enabled sources by priority, every source's mechanism, the field rules.
``added``, ``current``, ``connection_id``
    sources added so far, the source being added, the connection.
``phase``
    what the person is looking at: ``source_form``, ``connection_form``, ``webauth``, ``validating``,
    ``decoupled``, ``action_needed``, ``check_again``, ``choose``.
``form``
    the field rules of the form on screen, to check the answer against.
``wrongpass``, ``rounds``, ``wait_until``, ``resume_sent``, ``nudged``, ``chosen``, ``offered``, ``expires_at``
    counters and marks.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from connector.hookspecs import Flow, ProviderServices
from connector.types import (
    Choice,
    Failed,
    FlowEvent,
    Form,
    JourneyKind,
    ProviderError,
    Redirect,
    Step,
    StepResult,
    Wait,
)

from . import errors, mapping
from .accounts import ACTION_ADD_SOURCE, AccountSteps
from .client import PowensAPIError, PowensBadAnswer, PowensClient, PowensUnreachable, Retry
from .config import Settings, bank_options
from .crypto import KeyCache, KeyProblem
from .fields import fields_to_show, parse_fields, to_form_fields, validate
from .sources import expiry, failing_source, usable_sources
from .tokens import ConsentCaller

log = logging.getLogger("plugins.powens")

ACTION_SOURCE = "source"
ACTION_CONNECTION = "connection_fields"
ACTION_CHECK = "check_again"
ACTION_SKIP_SOURCE = "skip_source"

MAX_WRONGPASS = 3  # §3.2: more attempts risk the person being locked out by their bank
MAX_ROUNDS = 10  # §6.1
VALIDATING_SECONDS = 60.0  # §6.2: poll a validating connection for up to a minute, then "Check again"

CANCELLED_ERRORS = ("access_denied", "tos_declined")
REDIRECT_EXPLANATION = (
    "Your bank's own page opens next, in this window, so you can sign in there and give your consent."
)


class Journey:
    def __init__(
        self,
        settings: Settings,
        services: ProviderServices,
        client: PowensClient,
        keys: KeyCache,
        consents: ConsentCaller,
        clock: Callable[[], float],
    ) -> None:
        self._settings = settings
        self._services = services
        self._client = client
        self._keys = keys
        self._consents = consents
        self._clock = clock
        self._accounts = AccountSteps(settings, client, self._call)

    # --- entry points -------------------------------------------------------------------------------------------

    async def start(self, flow: Flow) -> StepResult:
        return await self._guard(self._start(flow))

    async def resume(self, flow: Flow, event: FlowEvent) -> StepResult:
        return await self._guard(self._resume(flow, event))

    async def _guard(self, step: Awaitable[StepResult]) -> StepResult:
        """Turn every failure into an error page with a plain message (no PATCH follows a :class:`Failed`)."""
        try:
            return await step
        except ProviderError as exc:
            return Failed(exc)
        except (PowensAPIError, PowensUnreachable, PowensBadAnswer) as exc:
            return Failed(errors.from_exception(exc))
        except KeyProblem:
            return Failed(errors.temporary("powens_encryption_unavailable"))
        except mapping.MappingError:
            return Failed(errors.temporary("powens_bad_answer"))

    async def _start(self, flow: Flow) -> StepResult:
        st = flow.state
        st.clear()
        st.update(added=[], wrongpass=0, rounds=0, bank_name=flow.bank.name)
        if flow.kind is JourneyKind.REAUTHORISATION:
            return await self._start_reauth(flow)
        # The connector first (it needs no token), so a bank that cannot be connected leaves no user behind.
        if not await self._read_connector(flow):
            return Failed(errors.provider_error("powens_bank_not_available"))
        # A temporary user: abandoned onboardings vanish by themselves after 30 minutes (§1.4).
        answer = await self._client.request("POST", "/auth/init", body={}, retry=Retry.THROTTLE)
        if not isinstance(answer, dict) or not isinstance(answer.get("auth_token"), str):
            raise PowensBadAnswer("no auth_token")
        st["token"], st["id_user"] = answer["auth_token"], answer.get("id_user")
        return await self._begin_source(flow, st["sources"][0])

    async def _start_reauth(self, flow: Flow) -> StepResult:
        consent = flow.consent
        if consent is None:
            return Failed(errors.provider_error("powens_unexpected_step"))
        connection_id = consent.secrets.get("connection_id") or consent.provider_consent_id
        if connection_id is None:
            return Failed(errors.action_required("powens_connection_deleted"))
        flow.state["connection_id"] = int(connection_id)
        flow.state["id_user"] = consent.secrets.get("id_user")
        await self._read_connector(flow, for_reauth=True)
        connection = await self._get_connection(flow)
        return await self._route(flow, connection)

    async def _resume(self, flow: Flow, event: FlowEvent) -> StepResult:
        st = flow.state
        phase = st.get("phase")
        if event.kind == "cancel":
            return await self._cancel(flow)
        if event.kind == "callback":
            return await self._callback(flow, event)
        if event.kind == "choose_accounts":
            if phase != "choose":
                return Failed(errors.provider_error("powens_unexpected_step"))
            if event.action == ACTION_ADD_SOURCE:
                return await self._add_next_source(flow, event)
            return await self._accounts.activate(flow, event, lambda error: self._choose(flow, error=error))
        if event.kind == "poll":
            return await self._poll(flow)
        if event.kind == "submit":
            if event.action == ACTION_SKIP_SOURCE and st.get("added"):
                st["current"] = None
                return await self._choose(flow)
            if event.action == ACTION_SOURCE and phase == "source_form":
                return await self._submit_source(flow, event.values)
            if event.action == ACTION_CONNECTION and phase == "connection_form":
                return await self._submit_connection_fields(flow, event.values)
            if event.action == ACTION_CHECK and phase in ("action_needed", "check_again"):
                return await self._check_again(flow)
        return Failed(errors.provider_error("powens_unexpected_step"))

    # --- Powens calls with the journey's token ------------------------------------------------------------------

    async def _call(self, flow: Flow, method: str, path: str, **kwargs: Any) -> Any:
        if flow.kind is JourneyKind.REAUTHORISATION:
            if flow.consent is None:
                raise errors.provider_error("powens_unexpected_step")
            return await self._consents.call(flow.consent, method, path, **kwargs)
        token = flow.state.get("token")
        if not token:
            raise errors.provider_error("powens_session_expired")
        try:
            return await self._client.request(method, path, token=token, **kwargs)
        except PowensAPIError as exc:
            if exc.status == 401:
                # The temporary user lives 30 minutes (§1.2): after that nothing can be resumed.
                raise errors.provider_error("powens_session_expired") from None
            raise

    async def _post_fields(
        self, flow: Flow, path: str, params: Mapping[str, str], values: Mapping[str, str], extra: Mapping[str, Any]
    ) -> Any:
        """POST field values, each a JWE. Never repeated, except once after a key problem that Powens reports
        before any contact with the bank (``keymanager``, or ``invalidValue`` when the key has since changed)."""

        async def send() -> Any:
            body = {**extra, **await self._keys.encrypt(values)}
            return await self._call(flow, "POST", path, params=params, body=body, sync=True, retry=Retry.NEVER)

        try:
            return await send()
        except PowensAPIError as exc:
            if exc.code_cf not in ("keymanager", "invalidvalue"):
                raise
            old = self._keys.kid
            new = await self._keys.refresh()
            if exc.code_cf == "invalidvalue" and new == old:
                raise
            log.info("powens key refreshed after %s", exc.code, extra={"request_id": exc.request_id})
        try:
            return await send()
        except PowensAPIError as exc:
            if exc.code_cf in ("keymanager", "invalidvalue"):
                log.error("powens still refuses our encryption", extra={"request_id": exc.request_id})
                raise errors.temporary("powens_encryption_unavailable", detail=exc.detail) from None
            raise

    async def _get_connection(self, flow: Flow) -> dict[str, Any]:
        try:
            answer = await self._call(
                flow, "GET", f"/users/me/connections/{flow.state['connection_id']}", params={"expand": "sources"}
            )
        except PowensAPIError as exc:
            if exc.status == 404:
                raise errors.action_required("powens_connection_deleted", detail=exc.detail) from None
            raise
        if not isinstance(answer, dict):
            raise PowensBadAnswer("connection is not an object")
        return answer

    # --- connector, sources and forms ---------------------------------------------------------------------------

    async def _read_connector(self, flow: Flow, *, for_reauth: bool = False) -> bool:
        """``GET /connectors/{uuid}?expand=sources,fields`` (no cache, §2.1); keeps the usable sources (§2.5)."""
        st = flow.state
        uuid = flow.bank.provider_bank
        connector = await self._client.request("GET", f"/connectors/{uuid}", params={"expand": "sources,fields"})
        if not isinstance(connector, dict):
            raise PowensBadAnswer("connector is not an object")
        st["connector"] = str(connector.get("uuid") or uuid)
        st["bank_name"] = flow.bank.name or str(connector.get("name") or "your bank")
        default = connector.get("auth_mechanism") or "credentials"
        raw_sources = [s for s in connector.get("sources") or [] if isinstance(s, dict) and s.get("name")]
        st["mechanisms"] = {s["name"]: s.get("auth_mechanism") or default for s in raw_sources}
        st["fields"] = parse_fields(connector.get("fields"))
        st["sources"] = usable_sources(raw_sources, default, bank_options(flow.bank))
        if for_reauth:
            return True
        if connector.get("restricted") or connector.get("hidden"):
            log.warning("powens connector cannot take new connections", extra={"connector": uuid})
            return False
        if not st["sources"]:
            log.warning("powens connector has no usable source", extra={"connector": uuid})
            return False
        return True

    def _source(self, flow: Flow, name: str) -> dict[str, Any]:
        return next(s for s in flow.state["sources"] if s["name"] == name)

    def _next_source(self, flow: Flow) -> dict[str, Any] | None:
        added = set(flow.state.get("added") or ())
        return next((s for s in flow.state.get("sources") or () if s["name"] not in added), None)

    async def _begin_source(self, flow: Flow, source: Mapping[str, Any]) -> StepResult:
        st = flow.state
        st["current"], st["phase"] = source["name"], "source_form"
        st["form"] = fields_to_show(st["fields"], source["name"], source["mechanism"], st["added"])
        if not any(f["type"] != "hidden" for f in st["form"]):
            # Nothing to ask (e.g. a webauth source after a credentials one): go straight on (§2.6 worked example).
            return await self._submit_source(flow, {})
        return self._form_again(flow, error=None)

    def _form_again(self, flow: Flow, *, error: str | None, field_errors: Mapping[str, str] | None = None) -> Form:
        """The form on screen (again, values cleared, after a refused or invalid answer)."""
        st = flow.state
        if st.get("phase") == "source_form":
            optional = bool(st["added"])  # a later source: the person may go on without it
            webauth = self._source(flow, st["current"])["mechanism"] == "webauth"
            return Form(
                title=f"Add more accounts from {st['bank_name']}" if optional else f"Sign in to {st['bank_name']}",
                fields=to_form_fields(st["form"]),
                action=ACTION_SOURCE,
                intro=(
                    "Your bank's own page opens after this one."
                    if webauth
                    else "Enter the details you use for your bank's online banking. They are sent to your bank "
                    "encrypted and we never store them."
                ),
                error=error,
                field_errors=dict(field_errors or {}),
                step=Step.SIGN_IN,
                secondary_actions=(Choice(ACTION_SKIP_SOURCE, "Continue without these accounts"),) if optional else (),
            )
        return Form(
            title=st.get("form_title") or "Your bank needs more information",
            fields=to_form_fields(st["form"]),
            action=ACTION_CONNECTION,
            intro=st.get("form_intro"),
            error=error,
            field_errors=dict(field_errors or {}),
            step=Step.VERIFY,
        )

    # --- adding a source ----------------------------------------------------------------------------------------

    async def _submit_source(self, flow: Flow, submitted: Mapping[str, Sequence[str]]) -> StepResult:
        st = flow.state
        values, problems = validate(st["form"], submitted)
        if problems:
            return self._form_again(flow, error="Check the details below.", field_errors=problems)
        source = self._source(flow, st["current"])
        connection_id = st.get("connection_id")
        if source["mechanism"] == "webauth":
            return await self._webauth(flow, source=source["name"], values=values, connection_id=connection_id)
        if connection_id is None:
            path, extra = "/users/me/connections", {"connector_uuid": st["connector"]}
        else:
            path, extra = f"/users/me/connections/{connection_id}", {}
        params = {"source": source["name"], "expand": "sources"}
        try:
            answer = await self._post_fields(flow, path, params, values, extra)
        except PowensAPIError as exc:
            return await self._source_refused(flow, exc)
        except (PowensUnreachable, PowensBadAnswer) as exc:
            return await self._source_outcome_unknown(flow, exc)
        if not isinstance(answer, dict) or answer.get("id") is None:
            return await self._source_outcome_unknown(flow, PowensBadAnswer("no connection in the answer"))
        st["connection_id"] = int(answer["id"])  # 200, 201 and 202 alike (§16 OP-1)
        return await self._route(flow, answer)

    async def _source_refused(self, flow: Flow, exc: PowensAPIError) -> StepResult:
        code = exc.code_cf
        if code == "wrongpass":
            # On creation the refused connection is already deleted at Powens, and on a second source only that
            # source is (§3.2, §16 OP-10): the next submit creates it again, so nothing to forget here.
            return self._wrongpass(flow, exc.message)
        if exc.status >= 500 and exc.status != 503:
            # Powens failed mid-way: it may or may not have created the connection.
            return await self._source_outcome_unknown(flow, exc)
        if exc.status == 429 or code == "toomanyrequests":
            return self._form_again(flow, error=errors.MESSAGES["powens_throttled"])
        if code == "bankmessage":
            return self._form_again(flow, error=exc.message or errors.MESSAGES["powens_unknown_state"])
        if code in ("invalidvalue", "missingparameter"):
            # Powens's own rules refused a value our checks let through (a regex we could not compile...).
            log.info("powens refused a field value", extra={"request_id": exc.request_id})
            return self._form_again(flow, error=errors.MESSAGES["powens_invalid_details"])
        raise exc

    def _wrongpass(self, flow: Flow, bank_message: str | None, *, count: bool = True) -> StepResult:
        """The form again after refused details; ``count`` is false when the refusal came from a background sync
        (re-authorisation), not from something the person typed."""
        st = flow.state
        st["wrongpass"] = int(st.get("wrongpass") or 0) + (1 if count else 0)
        if st["wrongpass"] >= MAX_WRONGPASS:
            return Failed(errors.provider_error("powens_wrongpass_limit", detail=bank_message))
        error = errors.MESSAGES["powens_wrongpass"]
        if bank_message:
            error = f"{error} Your bank said: {bank_message}"
        return self._form_again(flow, error=error)

    async def _source_outcome_unknown(self, flow: Flow, exc: Exception) -> StepResult:
        """No usable answer to a request that carried credentials: never repeat it (the person could be locked
        out); look whether Powens created the connection or source anyway and go on from there (§3.1)."""
        st = flow.state
        log.warning("powens connection request had no usable answer", extra={"error": type(exc).__name__})
        try:
            if st.get("connection_id") is not None:
                connection = await self._get_connection(flow)
                names = {s.get("name") for s in connection.get("sources") or [] if isinstance(s, dict)}
                if st["current"] in names:
                    return await self._route(flow, connection)
            else:
                listed = await self._call(flow, "GET", "/users/me/connections", params={"expand": "sources"})
                found = [
                    c
                    for c in (listed or {}).get("connections") or []
                    if isinstance(c, dict) and c.get("connector_uuid") == st["connector"] and c.get("id") is not None
                ]
                if found:
                    connection = max(found, key=lambda c: int(c["id"]))
                    st["connection_id"] = int(connection["id"])
                    return await self._route(flow, connection)
        except (PowensAPIError, PowensUnreachable, PowensBadAnswer):
            pass
        return self._form_again(flow, error=errors.MESSAGES["powens_unreachable"])

    async def _add_next_source(self, flow: Flow, event: FlowEvent) -> StepResult:
        st = flow.state
        st["chosen"] = [str(v) for v in event.values.get("account", [])]
        source = self._next_source(flow)
        if source is None:
            return await self._choose(flow)
        st["wrongpass"] = 0  # the cap is per form: a new source starts afresh
        return await self._begin_source(flow, source)

    # --- webauth ------------------------------------------------------------------------------------------------

    async def _webauth(
        self, flow: Flow, *, source: str | None, values: Mapping[str, str], connection_id: int | None
    ) -> StepResult:
        """Ask ``/webauth-url`` from the server (no token or code reaches the browser, §5.1) and redirect."""
        st = flow.state
        params: dict[str, str] = {
            "client_id": self._settings.client_id,
            "redirect_uri": self._services.callback_url(),
            "state": await flow.issue_state(),
        }
        if connection_id is not None:
            params["id_connection"] = str(connection_id)
        else:
            params["connector_uuid"] = st["connector"]
        if source:
            params["source"] = source
        if values:
            # Webauth field values travel as extra query parameters, each a compact JWE (§16 OP-8).
            params.update(await self._keys.encrypt(values))
        try:
            answer = await self._call(flow, "GET", "/webauth-url", params=params)
        except PowensAPIError as exc:
            if exc.status == 409 and connection_id is not None:
                # "Already up to date": nothing to do at the bank, so read the state again (§6.2).
                return await self._route(flow, await self._get_connection(flow))
            raise
        url = answer.get("url") if isinstance(answer, dict) else None
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise PowensBadAnswer("no webauth url")
        st["phase"], st["webauth_source"] = "webauth", source
        return Redirect(url=url, explanation=REDIRECT_EXPLANATION, step=Step.SIGN_IN)

    async def _callback(self, flow: Flow, event: FlowEvent) -> StepResult:
        st = flow.state
        if st.get("phase") != "webauth":
            return Failed(errors.provider_error("powens_unexpected_step"))
        error = event.first("error")
        if error:
            detail = event.first("error_description") or error
            log.info("powens webauth came back with an error", extra={"error_code": error[:64]})
            if error.casefold() in CANCELLED_ERRORS:
                failure = errors.declined("powens_webauth_cancelled", detail=detail)
            else:
                failure = errors.provider_error("powens_webauth_failed", detail=detail)
            if flow.kind is JourneyKind.ONBOARDING and st.get("added"):
                # An optional later source: keep what the first source gave.
                st["current"] = None
                return await self._choose(flow, error=failure.message)
            return Failed(failure)
        raw_id = event.first("id_connection")
        if not raw_id.isdigit():
            return Failed(errors.provider_error("powens_webauth_failed", detail="no id_connection in the callback"))
        expected = st.get("connection_id")
        if expected is not None and int(raw_id) != int(expected):
            log.warning("powens webauth returned another connection", extra={"expected": expected})
            return Failed(errors.provider_error("powens_webauth_mismatch"))
        st["connection_id"] = int(raw_id)
        try:
            connection = await self._get_connection(flow)
        except ProviderError as exc:
            if expected is None and exc.code == "powens_connection_deleted":
                # Not a connection of this journey's user (a return address carrying someone else's id).
                log.warning("powens webauth returned a connection this user cannot read")
                return Failed(errors.provider_error("powens_webauth_mismatch"))
            raise
        return await self._route(flow, connection)

    # --- the resume loop (§6) -----------------------------------------------------------------------------------

    async def _route(self, flow: Flow, connection: Mapping[str, Any]) -> StepResult:
        st = flow.state
        state = connection.get("state")
        key = state.casefold() if isinstance(state, str) else None
        expires = expiry(connection)
        if expires is not None:
            # flow.state is stored as JSON: text here, read back with mapping.parse_datetime.
            st["expires_at"] = mapping.format_datetime(expires)
        if key is None:
            if flow.kind is JourneyKind.REAUTHORISATION:
                return await self._accounts.finish_reauth(flow)
            if st.get("current") and st["current"] not in st["added"]:
                st["added"].append(st["current"])
            st["current"] = None
            return await self._choose(flow)
        if key in ("validating",) or (key == "decoupled" and st.get("resume_sent")):
            if st.get("phase") != "validating" or "wait_until" not in st:
                st["wait_until"] = self._clock() + VALIDATING_SECONDS
            st["phase"] = "validating"
            return Wait(
                title="Waiting for your bank",
                message="Your bank is confirming your approval. This usually takes a few seconds.",
                poll_seconds=2,
            )
        if key != "decoupled":
            st["resume_sent"] = False
        st["rounds"] = int(st.get("rounds") or 0) + 1
        if st["rounds"] > MAX_ROUNDS:
            log.warning("powens resume loop gave up", extra={"state": state})
            return Failed(errors.provider_error("powens_too_many_steps"))
        bank_text = connection.get("error_message") if isinstance(connection.get("error_message"), str) else None
        conn_fields = parse_fields(connection.get("fields"))
        log.info("powens connection state", extra={"state": state, "connection_id": st.get("connection_id")})
        if key == "additionalinformationneeded":
            return self._connection_form(
                flow, conn_fields, title="Your bank needs more information",
                intro=bank_text or "Enter the code your bank sent you.",
            )
        if key == "decoupled":
            st["phase"], st["resume_sent"] = "decoupled", False
            return Wait(
                title="Approve in your bank's app",
                message="Open your bank's app and approve the request.",
                poll_seconds=3,
            )
        if key == "scarequired":
            failing = failing_source(connection)
            if failing and st["mechanisms"].get(failing) == "webauth":
                return await self._webauth(flow, source=failing, values={}, connection_id=st["connection_id"])
            return await self._force_sync(flow)
        if key == "webauthrequired":
            return await self._webauth(
                flow, source=failing_source(connection), values={}, connection_id=st["connection_id"]
            )
        if key == "wrongpass":
            st["form"], st["phase"] = conn_fields, "connection_form"
            st["form_title"], st["form_intro"] = f"Sign in to {st['bank_name']} again", None
            return self._wrongpass(flow, bank_text, count=False)
        if key == "passwordexpired":
            return self._connection_form(
                flow, conn_fields, title="Change your password",
                intro="Your bank asks you to change your password on its website. Once done, enter the new "
                "password here.",
            )
        if key == "actionneeded":
            st["phase"] = "action_needed"
            intro = "Your bank needs you to do something on its website or app."
            if bank_text:
                intro = f"{intro} Your bank said: {bank_text}"
            return Form(
                title="Your bank needs you to act", fields=(), action=ACTION_CHECK, submit_label="Check again",
                intro=intro, step=Step.VERIFY,
            )
        if key in errors.TEMPORARY_STATES:
            if key == "bug":
                log.error("powens reports an internal error on the connection", extra={"state": state})
            return await self._stop(flow, errors.temporary(errors.TEMPORARY_STATES[key], detail=bank_text))
        if key == "notsupported":
            return await self._stop(flow, errors.provider_error("powens_not_supported", detail=bank_text))
        log.warning("powens connection in an unknown state", extra={"state": str(state)[:64]})
        return await self._stop(flow, errors.provider_error("powens_unknown_state", detail=bank_text))

    def _connection_form(self, flow: Flow, specs: list[dict[str, Any]], *, title: str, intro: str) -> StepResult:
        st = flow.state
        st["form"], st["phase"], st["form_title"], st["form_intro"] = specs, "connection_form", title, intro
        return Form(title=title, fields=to_form_fields(specs), action=ACTION_CONNECTION, intro=intro, step=Step.VERIFY)

    async def _stop(self, flow: Flow, error: ProviderError) -> StepResult:
        """A non-recoverable state: on an optional later source, back to the accounts already found; else stop."""
        st = flow.state
        if flow.kind is JourneyKind.ONBOARDING and st.get("added") and st.get("current"):
            st["current"] = None
            return await self._choose(flow, error=error.message)
        return Failed(error)

    async def _force_sync(self, flow: Flow, *, reread_on_conflict: bool = False) -> StepResult:
        """``POST /users/me/connections/{id}`` with ``{}`` while the person is present (SCARequired on a
        credentials source, §6.2); a 409 means "not now": try later, or just read the state again."""
        try:
            answer = await self._call(
                flow, "POST", f"/users/me/connections/{flow.state['connection_id']}", params={"expand": "sources"},
                body={}, sync=True, retry=Retry.THROTTLE,
            )
        except PowensAPIError as exc:
            if exc.status == 409 and reread_on_conflict:
                return await self._route(flow, await self._get_connection(flow))
            if exc.status == 409:
                return Failed(errors.temporary("powens_try_later", detail=exc.detail))
            raise
        return await self._route(flow, answer if isinstance(answer, dict) else await self._get_connection(flow))

    async def _submit_connection_fields(self, flow: Flow, submitted: Mapping[str, Sequence[str]]) -> StepResult:
        st = flow.state
        values, problems = validate(st["form"], submitted)
        if problems:
            return self._form_again(flow, error="Check the details below.", field_errors=problems)
        try:
            answer = await self._post_fields(
                flow, f"/users/me/connections/{st['connection_id']}", {"expand": "sources"}, values, {}
            )
        except PowensAPIError as exc:
            if exc.code_cf == "wrongpass":
                return self._wrongpass(flow, exc.message)
            if exc.status == 429:
                return self._form_again(flow, error=errors.MESSAGES["powens_throttled"])
            raise
        except (PowensUnreachable, PowensBadAnswer):
            # Not repeated (it carried values): read where the connection stands instead.
            return await self._route(flow, await self._get_connection(flow))
        return await self._route(flow, answer if isinstance(answer, dict) else await self._get_connection(flow))

    async def _poll(self, flow: Flow) -> StepResult:
        st = flow.state
        phase = st.get("phase")
        if phase == "decoupled" and not st.get("resume_sent"):
            # The person approves in their app; "Continue" (or the page's own check) resumes in the background,
            # then we poll (§6.2). Without background=true the call would block until the bank answers.
            st["resume_sent"] = True
            answer = await self._call(
                flow, "POST", f"/users/me/connections/{st['connection_id']}",
                params={"background": "true", "expand": "sources"}, body={"resume": True}, retry=Retry.THROTTLE,
            )
            return await self._route(flow, answer if isinstance(answer, dict) else await self._get_connection(flow))
        if phase == "validating":
            if self._clock() >= float(st.get("wait_until") or 0):
                st["phase"] = "check_again"
                return Form(
                    title="Still waiting for your bank", fields=(), action=ACTION_CHECK, submit_label="Check again",
                    intro="Your bank hasn't confirmed yet. Once you have approved the request, select Check again.",
                    step=Step.VERIFY,
                )
            return await self._route(flow, await self._get_connection(flow))
        if st.get("connection_id") is not None and phase in ("decoupled",):
            return await self._route(flow, await self._get_connection(flow))
        return Failed(errors.provider_error("powens_unexpected_step"))

    async def _check_again(self, flow: Flow) -> StepResult:
        st = flow.state
        if st.get("phase") == "action_needed" and not st.get("nudged"):
            # actionNeeded is fixed at the bank, not through the API; one person-present sync tells us if it is.
            st["nudged"] = True
            return await self._force_sync(flow, reread_on_conflict=True)
        st.pop("wait_until", None)
        st["phase"] = "validating" if st.get("phase") == "check_again" else st.get("phase")
        return await self._route(flow, await self._get_connection(flow))

    async def _choose(self, flow: Flow, *, error: str | None = None) -> StepResult:
        return await self._accounts.choose(flow, more=self._next_source(flow) is not None, error=error)

    async def _cancel(self, flow: Flow) -> StepResult:
        st = flow.state
        if flow.kind is JourneyKind.ONBOARDING and st.get("token"):
            # The person stopped: delete the temporary user and anything it holds now, not in 30 minutes (§1.4).
            try:
                await self._client.request("DELETE", "/users/me", token=st["token"], retry=Retry.THROTTLE)
            except (PowensAPIError, PowensUnreachable, PowensBadAnswer):
                log.info("powens temporary user not deleted on cancel; it expires by itself")
            st.pop("token", None)
        st["phase"] = "cancelled"
        return Failed(errors.declined("powens_cancelled"))
