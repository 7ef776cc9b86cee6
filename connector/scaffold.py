"""``connector new-provider NAME``: scaffold a provider plugin package that passes its own tests right away.

The files come from ``connector/scaffold_template/`` (package data). Each ``*.tmpl`` file is copied without its
suffix, with ``{{key}}`` placeholders filled in; ``_package_`` and ``_name_`` in a path become the package and the
provider name, and ``gitignore`` becomes ``.gitignore``.
"""

from __future__ import annotations

import keyword
import re
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from connector.plugins import DEFAULT_PLUGINS

TEMPLATE_DIR = Path(__file__).resolve().parent / "scaffold_template"
NAME = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
BUILT_IN_NAMES = tuple(dotted.rsplit(".", 1)[-1] for dotted in DEFAULT_PLUGINS)


class ScaffoldError(Exception):
    """The name or the target folder can't be used; the message says why."""


@dataclass(frozen=True, slots=True)
class Names:
    """Every name the generated package uses, derived from the provider name."""

    name: str  # the provider name: [providers.<name>], [[banks]].provider, the entry point's name
    title: str  # shown to people
    package: str  # the import package
    dist: str  # the distribution (pip) name
    cls: str  # the provider class

    @classmethod
    def of(cls, name: str, title: str | None = None) -> Names:
        check_name(name)
        words = name.split("_")
        return cls(
            name=name,
            title=title or " ".join(w.capitalize() for w in words),
            package=f"{name}_connector",
            dist=f"{name.replace('_', '-')}-connector",
            cls="".join(w.capitalize() for w in words),
        )


def check_name(name: str) -> None:
    if not NAME.match(name) or not 2 <= len(name) <= 40:
        raise ScaffoldError(f"{name!r} can't be a provider name: use 2 to 40 lower-case letters and digits, "
                            "starting with a letter (words may be joined with _), e.g. acmebank")
    if keyword.iskeyword(name):
        raise ScaffoldError(f"{name!r} is a Python keyword; choose another name")
    if name in BUILT_IN_NAMES:
        raise ScaffoldError(f"a built-in provider is already called {name!r}; choose another name")


def connector_version() -> str:
    try:
        return metadata.version("sage-banking-connector")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0.1.0"


def render(text: str, values: dict[str, str]) -> str:
    def fill(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise ScaffoldError(f"template placeholder {{{{{key}}}}} has no value")
        return values[key]

    return PLACEHOLDER.sub(fill, text)


def target_path(relative: Path, names: Names) -> Path:
    parts = [part.replace("_package_", names.package).replace("_name_", names.name) for part in relative.parts]
    parts[-1] = parts[-1].removesuffix(".tmpl")
    if parts[-1] == "gitignore":
        parts[-1] = ".gitignore"
    return Path(*parts)


def scaffold(name: str, directory: Path | None = None, *, title: str | None = None) -> tuple[Path, list[Path]]:
    """Write a new provider package for ``name`` into ``directory`` (default ``./<name>-connector``), which must
    not exist or be empty. Return the folder and the files written, relative to it."""
    names = Names.of(name, title)
    root = Path(directory) if directory is not None else Path.cwd() / names.dist
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ScaffoldError(f"{root} already exists and is not an empty folder")
    values = {
        "name": names.name, "title": names.title, "package": names.package, "dist": names.dist, "cls": names.cls,
        "bank_id": str(uuid.uuid4()), "connector_version": connector_version(),
    }
    templates = sorted(p for p in TEMPLATE_DIR.rglob("*.tmpl") if "__pycache__" not in p.parts)
    if not templates:
        raise ScaffoldError(f"no templates found in {TEMPLATE_DIR} (is the package installed completely?)")
    rendered = [(target_path(t.relative_to(TEMPLATE_DIR), names), render(t.read_text(encoding="utf-8"), values))
                for t in templates]
    written = []
    for relative, text in rendered:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(relative)
    return root, written
