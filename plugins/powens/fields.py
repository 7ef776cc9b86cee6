"""Powens form fields (``ConnectorField``, §2.4): which to show (§2.6), how to render them (§2.7) and how to check
what the person typed before anything is encrypted and sent.

Field *specs* are plain dicts so they can sit in ``flow.state`` between two requests (labels, rules: no values).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import date
from typing import Any

from connector.types import Choice, Field

FIELD_TYPES = ("text", "password", "date", "list", "number", "hidden")


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _str_list(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def parse_fields(raw: Any) -> list[dict[str, Any]]:
    """Normalise Powens fields into JSON-safe specs; anything without a ``name`` is dropped."""
    specs: list[dict[str, Any]] = []
    for item in raw if isinstance(raw, list) else []:
        if not isinstance(item, dict) or not _str(item.get("name")):
            continue
        kind = (_str(item.get("type")) or "text").casefold()
        values = []
        for choice in item.get("values") or []:
            if isinstance(choice, dict) and choice.get("value") is not None:
                values.append({"label": str(choice.get("label") or choice["value"]), "value": str(choice["value"])})
        specs.append(
            {
                "name": item["name"],
                "label": _str(item.get("label")) or item["name"],
                "description": _str(item.get("description")),
                # Unknown types fall back to text, as Powens asks (§2.7).
                "type": kind if kind in FIELD_TYPES else "text",
                "required": bool(item.get("required", True)),
                "regex": _str(item.get("regex")),
                "values": values,
                "auth_mechanisms": _str_list(item.get("auth_mechanisms")),
                "connector_sources": _str_list(item.get("connector_sources")),
                "ephemeral": bool(item.get("ephemeral", False)),
                "default": _str(item.get("value")),
            }
        )
    return specs


def fields_to_show(
    specs: Iterable[Mapping[str, Any]], source_name: str, mechanism: str, added: Sequence[str]
) -> list[dict[str, Any]]:
    """The connector fields to ask for when adding ``source_name`` after the sources in ``added`` (§2.6)."""
    shown = []
    for spec in specs:
        mechanisms = spec.get("auth_mechanisms") or []
        sources = spec.get("connector_sources") or []
        if mechanisms and mechanism not in mechanisms:
            continue
        if sources and source_name not in sources:
            continue
        # Second-source rule: a value already given for an earlier source is not needed again. A field for every
        # source ("all") meets any non-empty set of added sources.
        if added and (not sources or set(sources) & set(added)):
            continue
        shown.append(dict(spec))
    return shown


def _kind(spec: Mapping[str, Any]) -> str:
    kind = str(spec["type"])
    if kind == "text" and spec.get("ephemeral"):
        return "otp"  # a one-time code: numeric keyboard and autocomplete="one-time-code"
    return kind


def to_form_fields(specs: Iterable[Mapping[str, Any]]) -> tuple[Field, ...]:
    fields = []
    for spec in specs:
        kind = _kind(spec)
        fields.append(
            Field(
                name=spec["name"],
                label=spec["label"],
                kind=kind,  # type: ignore[arg-type]
                required=bool(spec["required"]) and kind != "hidden",
                description=spec.get("description"),
                pattern=spec.get("regex") if _compiles(spec.get("regex")) else None,
                choices=tuple(Choice(c["value"], c["label"]) for c in spec.get("values") or ()),
                value=spec.get("default") if kind == "hidden" else None,
                autocomplete={"password": "off", "otp": "one-time-code"}.get(kind),
            )
        )
    return tuple(fields)


def _compiles(pattern: str | None) -> bool:
    if not pattern:
        return False
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def validate(
    specs: Iterable[Mapping[str, Any]], submitted: Mapping[str, Sequence[str]]
) -> tuple[dict[str, str], dict[str, str]]:
    """Check ``required``, ``regex``, list choices and dates again on our side (cheap, and the core's check may
    differ from Powens's rules). Returns ``(values to send, errors by field name)``; errors never echo the value."""
    values: dict[str, str] = {}
    errors: dict[str, str] = {}
    for spec in specs:
        name = spec["name"]
        if spec["type"] == "hidden":
            # Never trust the page for a hidden value: send Powens's own default.
            if spec.get("default"):
                values[name] = spec["default"]
            continue
        given = submitted.get(name) or []
        value = given[0] if given else ""
        if spec["type"] != "password":
            value = value.strip()
        if not value:
            if spec.get("required"):
                errors[name] = f"Enter your {spec['label'].lower()}."
            continue
        if spec["type"] == "list" and spec.get("values") and value not in {c["value"] for c in spec["values"]}:
            errors[name] = f"Choose one of the options for {spec['label'].lower()}."
            continue
        if spec["type"] == "date":
            try:
                date.fromisoformat(value)
            except ValueError:
                errors[name] = "Enter a date such as 2024-01-31."
                continue
        if spec["type"] == "number" and not value.isdigit():
            errors[name] = f"Enter digits only for {spec['label'].lower()}."
            continue
        regex = spec.get("regex")
        if regex and _compiles(regex) and re.fullmatch(regex, value) is None:
            # A regex Python cannot compile is skipped and Powens decides (§2.7).
            errors[name] = f"Check your {spec['label'].lower()}: it is not in the format your bank expects."
            continue
        values[name] = value
    return values, errors
