"""The page a journey is on, kept server-side so a reload shows it again and posts are checked against it.

A page is stored as plain JSON (sealed, since it may name accounts): the step result the provider returned, or an
error. Form posts are validated here against the stored form (required fields, patterns, offered accounts) before
the provider sees them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from connector.types import (
    Choice,
    ChooseAccounts,
    Form,
    Redirect,
    Step,
    Wait,
)

Page = dict[str, Any]

MAX_VALUE_LENGTH = 1000


def _choices(items: Sequence[Choice]) -> list[dict[str, str]]:
    return [{"value": c.value, "label": c.label} for c in items]


def page_of(result: Form | Redirect | Wait | ChooseAccounts) -> Page:
    if isinstance(result, Form):
        return {
            "type": "form",
            "title": result.title,
            "intro": result.intro,
            "action": result.action,
            "submit_label": result.submit_label,
            "error": result.error,
            "field_errors": dict(result.field_errors),
            "step": result.step.value,
            "secondary": _choices(result.secondary_actions),
            "fields": [
                {
                    "name": f.name, "label": f.label, "kind": f.kind, "required": f.required,
                    "description": f.description, "pattern": f.pattern, "choices": _choices(f.choices),
                    # Password and one-time-code values are never kept, not even to re-fill the form.
                    "value": None if f.kind in ("password", "otp") else f.value,
                    "autocomplete": f.autocomplete,
                }
                for f in result.fields
            ],
        }
    if isinstance(result, Redirect):
        return {"type": "redirect", "url": result.url, "explanation": result.explanation,
                "button_label": result.button_label, "step": result.step.value}
    if isinstance(result, Wait):
        return {"type": "wait", "title": result.title, "message": result.message,
                "poll_seconds": result.poll_seconds, "step": result.step.value}
    return {
        "type": "accounts",
        "title": result.title,
        "intro": result.intro,
        "preselected": result.preselected,
        "error": result.error,
        "step": Step.CHOOSE_ACCOUNTS.value,
        "secondary": _choices(result.secondary_actions),
        "accounts": [
            {"id": a.provider_account_id, "name": a.name, "hint": a.masked_identifier, "currency": a.currency,
             "checked": (a.provider_account_id in result.selected) if result.selected is not None
             else result.preselected,
             "balance": None if a.balance is None else f"{a.balance.amount:,.2f} {a.balance.currency}"}
            for a in result.accounts
        ],
    }


def error_page(code: str, *, message: str | None = None, detail: str | None = None) -> Page:
    return {"type": "error", "code": code, "message": message, "detail": detail}


def _pattern_ok(pattern: str | None, value: str) -> bool:
    if not pattern:
        return True
    try:
        return re.fullmatch(pattern, value) is not None
    except re.error:
        return True  # a pattern Python can't compile is left to the provider to judge


def check_form(page: Page, values: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Field errors for a post of the stored form (empty when valid)."""
    errors: dict[str, str] = {}
    for f in page["fields"]:
        if f["kind"] == "hidden":
            continue
        given = values.get(f["name"], [])
        value = given[0] if given else ""
        if len(given) > 1:
            errors[f["name"]] = f"Enter {f['label'].lower()} once."
        elif len(value) > MAX_VALUE_LENGTH:
            errors[f["name"]] = f"{f['label']} is too long."
        elif not value.strip():
            if f["required"]:
                verb = "Choose" if f["kind"] == "list" else "Enter"
                errors[f["name"]] = f"{verb} {f['label'].lower()}."
        elif f["kind"] == "list" and f["choices"] and value not in {c["value"] for c in f["choices"]}:
            errors[f["name"]] = f"Choose one of the options for {f['label'].lower()}."
        elif not _pattern_ok(f["pattern"], value):
            errors[f["name"]] = f"{f['label']} isn't in the expected format."
    return errors


def with_errors(page: Page, field_errors: Mapping[str, str], values: Mapping[str, Sequence[str]]) -> Page:
    """The same form again, showing what was wrong and keeping what the person typed (never secrets)."""
    again = dict(page, field_errors=dict(field_errors), error="Check the details below and try again.")
    again["fields"] = [
        dict(f, value=(values.get(f["name"]) or [f["value"]])[0] if f["kind"] not in ("password", "otp") else None)
        for f in page["fields"]
    ]
    return again


def chosen_accounts(page: Page, values: Mapping[str, Sequence[str]]) -> list[str] | None:
    """The offered account ids the person chose, or ``None`` if the post names one we never offered."""
    offered = {a["id"] for a in page["accounts"]}
    chosen = list(dict.fromkeys(values.get("account", [])))
    if any(c not in offered for c in chosen):
        return None
    return chosen
