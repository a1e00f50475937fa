"""Jinja prompt templates (judge rubrics, generation steps): one sandbox with StrictUndefined,
every name checked in every branch before any work, one-line errors naming the file and line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import SandboxedEnvironment

from spar.errors import InputError

_ENV = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found ({what})") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory ({what})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None


@cache
def _compile(path: Path, text: str) -> tuple[jinja2.Template, nodes.Template]:
    try:
        return _ENV.from_string(text), _ENV.parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise InputError(f"{path}: line {e.lineno}: template syntax error: {e.message}") from None


def _first_line(ast: nodes.Template, name: str) -> int:
    lines = [n.lineno for n in ast.find_all(nodes.Name) if n.name == name and n.ctx == "load"]
    return min(lines, default=1)


def load(path: Path, what: str) -> jinja2.Template:
    return _compile(path, read(path, what))[0]


def check(
    path: Path,
    allowed: Sequence[str],
    what: str,
    who: str | None = None,
    hints: Mapping[str, str] | None = None,
) -> set[str]:
    """Every variable, filter and test the template uses, in any branch, must exist (rendering
    once with sample values would only check the branches that sample enters). Returns the
    variables it uses. `what` names the file's role in errors ("judge.rubric"), `who` the
    template in the list of allowed names, `hints` a note per name in that list's error."""
    _, ast = _compile(path, read(path, what))
    used = meta.find_undeclared_variables(ast)
    unknown = used - set(allowed) - set(_ENV.globals)
    if unknown:
        name = min(unknown, key=lambda n: (_first_line(ast, n), n))
        hint = (hints or {}).get(name, "")
        raise InputError(
            f"{path}: line {_first_line(ast, name)}: unknown variable '{name}' "
            f"({hint}{who or what} may use: {', '.join(allowed)})"
        )
    for node in ast.find_all((nodes.Filter, nodes.Test)):
        kind, known = (
            ("filter", _ENV.filters) if isinstance(node, nodes.Filter) else ("test", _ENV.tests)
        )
        if node.name not in known:
            raise InputError(f"{path}: line {node.lineno}: unknown {kind} '{node.name}'")
    return used


def render(path: Path, ctx: dict[str, Any], what: str) -> str:
    template, _ = _compile(path, read(path, what))
    try:
        return template.render(**ctx)
    except jinja2.UndefinedError as e:
        raise InputError(f"{path}: undefined variable in template: {e.message}") from None
    except jinja2.TemplateError as e:
        raise InputError(f"{path}: template error: {e}") from None
