"""The machine API's OpenAPI document (``/docs/openapi.json``), and schemathesis run against a real connector.

The connector runs in the test's event loop (the kit's fixtures); schemathesis's calls are synchronous, so they run
in a worker thread. Sage's credentials are real: tokens signed by the Sage emulator's key and the configured
notification header, per operation, so generated requests reach the code behind the checks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import pytest

from connector.errors import API_ERRORS
from connector.hookspecs import hookimpl
from connector.testing.fixtures import DEMO_BANKS
from connector.types import WebhookRequest, WebhookResult
from plugins.demobank.provider import DemoBank

MACHINE_OPERATIONS = {
    ("/notification", "post"),
    ("/availableaccounts", "get"),
    ("/health", "get"),
    ("/ready", "get"),
    ("/metrics", "get"),
    ("/providers/{provider}/webhook", "post"),
}

#: Every status each operation can answer, and (for errors) its codes.
EXPECTED_ERRORS = {
    ("/notification", "post"): {
        "invalid_request", "invalid_notification_header", "invalid_token", "insufficient_scope", "payload_too_large",
        "unsupported_media_type", "internal_error", "temporarily_unavailable"},
    ("/availableaccounts", "get"): {
        "invalid_request", "invalid_token", "insufficient_scope", "unknown_external_id", "internal_error",
        "temporarily_unavailable"},
    ("/providers/{provider}/webhook", "post"): {
        "invalid_request", "invalid_token", "not_found", "payload_too_large", "internal_error",
        "temporarily_unavailable"},
    ("/health", "get"): {"internal_error"},
    ("/ready", "get"): {"internal_error"},
    ("/metrics", "get"): {"internal_error"},
}

HOOK_SECRET = "hook-signature-for-tests"


class HookBank(DemoBank):
    """Demo Bank with a webhook: signed by a fixed header, a JSON object with a string ``id`` (deduplicated)."""

    name: ClassVar[str] = "hookbank"
    title: ClassVar[str] = "Hook Bank"

    async def webhook(self, request: WebhookRequest) -> WebhookResult:
        given = request.headers.get("x-hook-signature", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, HOOK_SECRET.encode()):
            raise PermissionError("bad signature")
        try:
            body = json.loads(request.body)
        except (ValueError, UnicodeDecodeError):
            raise ValueError("the body is not JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("id"), str) or not body["id"]:
            raise ValueError("id is required")
        return WebhookResult(dedupe_key=f"hook:{body['id'][:100]}", provider_consent_ids=(body["id"][:100],))


@hookimpl
def connector_register_providers(register):
    register(HookBank)


pytestmark = pytest.mark.connector_plugins(sys.modules[__name__])

HOOK_BANK = {"sage_bank_id": "6b3f0a52-5d47-4a8e-9a51-1a1f5c7f2b11", "name": "Hook Bank", "provider": "hookbank"}


@pytest.fixture
async def connector(connector_factory):
    return await connector_factory(banks=(*DEMO_BANKS, HOOK_BANK), providers={"demobank": {}, "hookbank": {}})


async def document(http, connector) -> dict[str, Any]:
    async with http.get(f"{connector.url}/docs/openapi.json") as resp:
        assert resp.status == 200
        return await resp.json()


def error_codes(doc: Mapping[str, Any], response: Mapping[str, Any]) -> set[str]:
    schema = response["content"]["application/json"]["schema"]
    assert schema["allOf"][0] == {"$ref": "#/components/schemas/Error"}
    return set(schema["allOf"][1]["properties"]["error"]["enum"])


async def test_the_document_describes_every_machine_endpoint_and_no_page(http, connector):
    doc = await document(http, connector)
    operations = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert operations == MACHINE_OPERATIONS  # /auth, /authrefresh, /journey/..., callbacks are pages, not API
    for (path, method), expected in EXPECTED_ERRORS.items():
        operation = doc["paths"][path][method]
        assert operation["summary"], path
        responses = operation["responses"]
        assert "200" in responses and responses["200"]["content"], path
        found = set()
        for status, response in responses.items():
            if status == "200" or (path, status) == ("/ready", "503"):
                continue
            codes = error_codes(doc, response)
            assert all(API_ERRORS[code][0] == int(status) for code in codes), (path, status, codes)
            found |= codes
        assert found == expected, path
    assert doc["paths"]["/ready"]["get"]["responses"]["503"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Ready"}
    assert doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"] == {
        "text/plain": {"schema": {"type": "string"}}}


async def test_the_error_body_and_the_security_schemes(http, connector):
    doc = await document(http, connector)
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error", "message"]
    assert error["properties"]["error"]["enum"] == sorted(API_ERRORS)  # the code table, nothing else
    schemes = doc["components"]["securitySchemes"]
    assert schemes["sageBearer"] == {**schemes["sageBearer"], "type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    header = connector.settings.sage["notification_header"]["name"]
    assert schemes["sageNotificationHeader"] == {**schemes["sageNotificationHeader"], "type": "apiKey",
                                                 "in": "header", "name": header}
    paths = doc["paths"]
    assert paths["/notification"]["post"]["security"] == [{"sageNotificationHeader": [], "sageBearer": []}]
    assert paths["/availableaccounts"]["get"]["security"] == [{"sageBearer": []}]
    for path in ("/health", "/ready", "/metrics", "/providers/{provider}/webhook"):
        assert "security" not in next(iter(paths[path].values())), path


# --- schemathesis -------------------------------------------------------------------------------------------------

MAX_EXAMPLES = 100
TIME_BUDGET = 45.0  # seconds for the whole run; each operation stops generating when the budget is spent


def credentials(sage, connector) -> Callable[[Any], dict[str, str]]:
    """Valid credentials for each operation, as Sage (or the provider) would send them."""
    name, value = connector.endpoints.notification_header_name, connector.endpoints.notification_header_value
    notification = {"Authorization": f"Bearer {sage.identity.notification_token()}", name: value}
    provider_api = {"Authorization": f"Bearer {sage.identity.provider_api_token()}"}

    def headers(case: Any) -> dict[str, str]:
        path = case.operation.path
        if path == "/notification":
            return dict(notification)
        if path == "/availableaccounts":
            return dict(provider_api)
        if path == "/providers/{provider}/webhook":
            return {"X-Hook-Signature": HOOK_SECRET}
        return {}

    return headers


def fuzz(base_url: str, headers: Callable[[Any], dict[str, str]],
         explicit: Callable[[Any], list[tuple[Any, dict[str, str]]]],
         ) -> tuple[list[str], Counter[tuple[str, str, int]]]:
    """Run schemathesis over every operation, positive and negative data, then the ``explicit`` cases; return the
    failures and how often each (operation, mode, status) was answered."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        ignored_auth,
        negative_data_rejection,
        not_a_server_error,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
              response_schema_conformance, negative_data_rejection, ignored_auth]
    schema = schemathesis.openapi.from_url(f"{base_url}/docs/openapi.json")
    failures: list[str] = []
    answers: Counter[tuple[str, str, int]] = Counter()
    deadline = time.monotonic() + TIME_BUDGET

    def generated(operation: Any, mode: GenerationMode) -> Callable[[], None]:
        """A hypothesis test sending ``mode`` data to ``operation`` and checking each answer against the document."""

        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                  report_multiple_bugs=False)
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            if time.monotonic() > deadline:
                return
            if operation.path == "/providers/{provider}/webhook" and mode is GenerationMode.POSITIVE:
                case.path_parameters = {**(case.path_parameters or {}), "provider": "hookbank"}
            response = case.call_and_validate(base_url=base_url, headers=headers(case), checks=checks, timeout=10)
            answers[(operation.label, mode.value, response.status_code)] += 1

        return run

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                generated(operation, mode)()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, operation.label  # nothing in it can be made invalid
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - a failed check: go on, report them all
                failures.append(f"{operation.label} [{mode.value}]: {type(exc).__name__}: {exc}"[:4000])
        for case, sent in explicit(operation):
            try:
                response = case.call_and_validate(base_url=base_url, headers=sent, checks=checks, timeout=10)
                answers[(operation.label, "explicit", response.status_code)] += 1
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - as above
                failures.append(f"{operation.label} [explicit]: {type(exc).__name__}: {exc}"[:4000])
    return failures, answers


def explicit_cases(headers: Callable[[Any], dict[str, str]], external_id: str
                   ) -> Callable[[Any], list[tuple[Any, dict[str, str]]]]:
    """Cases random data rarely reaches: an account list that exists, and the webhook's every answer."""

    def cases(operation: Any) -> list[tuple[Any, dict[str, str]]]:
        if operation.path == "/availableaccounts":
            case = operation.Case(query={"externalId": external_id})
            return [(case, headers(case))]
        if operation.path != "/providers/{provider}/webhook":
            return []
        out = []
        for provider, signature, body in (("hookbank", HOOK_SECRET, b'{"id": "evt-1"}'),
                                          ("hookbank", HOOK_SECRET, b'{"id": "evt-1"}'),  # a repeat
                                          ("hookbank", "wrong", b'{"id": "evt-2"}'),
                                          ("hookbank", HOOK_SECRET, b"[1, 2]"),
                                          ("demobank", HOOK_SECRET, b"{}"),  # no webhook: 404
                                          ("nobody", HOOK_SECRET, b"{}")):
            out.append((operation.Case(path_parameters={"provider": provider}, body=body,
                                       media_type="application/octet-stream"), {"X-Hook-Signature": signature}))
        return out

    return cases


@pytest.fixture
def hypothesis_home(tmp_path):
    """Hypothesis's files (its constants cache) go to a temporary folder, not into the repository."""
    from hypothesis import configuration

    configuration.set_hypothesis_home_dir(tmp_path / "hypothesis")
    yield
    configuration.set_hypothesis_home_dir(None)


async def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_document(sage, connector, sage_calls,
                                                                                    browser, hypothesis_home):
    [external_id, _] = (await sage_calls.onboard(browser)).external_ids
    headers = credentials(sage, connector)
    started = time.monotonic()
    failures, answers = await asyncio.to_thread(fuzz, connector.url, headers, explicit_cases(headers, external_id))
    assert not failures, "\n\n".join(failures)
    assert time.monotonic() - started < 60
    statuses: dict[tuple[str, str], set[int]] = {}
    for label, mode, status in answers:
        statuses.setdefault((label, mode), set()).add(status)
    # The credentials work (2xx), and invalid data is refused, so the run reached the code behind each check.
    assert 200 in statuses[("POST /notification", "positive")]
    assert 400 in statuses[("POST /notification", "negative")]
    assert 400 in statuses[("GET /availableaccounts", "negative")]
    assert statuses[("GET /availableaccounts", "explicit")] == {200}
    assert statuses[("POST /providers/{provider}/webhook", "explicit")] == {200, 400, 401, 404}
    for label in ("GET /health", "GET /ready", "GET /metrics"):
        assert statuses[(label, "positive")] == {200}, label
    assert sum(answers.values()) >= 300

