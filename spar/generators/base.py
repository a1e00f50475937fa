"""What a generator is: a rendered prompt in, `n` items out (each a text, or a list of `turns`
user messages), and how a reply's text becomes items."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict

Item = str | list[str]


class GenRequest(BaseModel):
    """One request: exactly what a generator may use."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str
    n: int  # items asked for
    turns: int = 1  # > 1: each item is a list of this many user messages
    seed: int = 0  # engines: the first attempt's seed (retries derive theirs from it)


class GenReply(BaseModel):
    """`ok`: at least one usable item (at most n; fewer count as dropped). `unusable`: no usable
    item after every retry (kept, so a re-run does not pay again unless retries are raised).
    `error`: the call failed after the provider's retries — never memoised, asked again."""

    model_config = ConfigDict(extra="forbid")

    items: list[Item]
    status: Literal["ok", "unusable", "error"]
    attempts: int = 1
    problem: str = ""


OnReply = Callable[[int, GenReply], None]


class Generator(Protocol):
    def generate_many(
        self, requests: list[GenRequest], concurrency: int, on_reply: OnReply
    ) -> None:
        """Call `on_reply(index, reply)` for every request as it finishes (any order)."""
        ...


# ---------------------------------------------------------------------------- reading replies

_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\(?\d{1,3}[.):]|#+)\s+")


def item_schema(turns: int) -> dict[str, Any]:
    """JSON schema of a reply: {"items": [...]}, each a string or a list of `turns` strings."""
    one: dict[str, Any] = {"type": "string"}
    if turns > 1:
        one = {"type": "array", "items": {"type": "string"}, "description": f"{turns} messages"}
    return {
        "type": "object",
        "properties": {"items": {"type": "array", "items": one}},
        "required": ["items"],
        "additionalProperties": False,
    }


def _json_items(text: str) -> list[Any] | None:
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    if isinstance(value, dict) and isinstance(value.get("items"), list):
        return list(value["items"])
    return list(value) if isinstance(value, list) else None


def _lines(text: str) -> list[str]:
    return [_BULLET.sub("", line).strip() for line in text.splitlines() if line.strip()]


def parse_items(text: str, n: int, turns: int, structured: bool = False) -> tuple[list[Item], str]:
    """The usable items of a reply (at most n, no empty text, no repeats) and, when there are
    none, what was wrong. JSON `{"items": [...]}` (or a list) first; else (unless the reply was
    asked for as `structured` output) plain text: the whole reply for one single-message item,
    one item per line for several, `turns` lines per item for multi-turn ones."""
    candidates = _json_items(text)
    if candidates is None and structured:
        candidates = []
    if candidates is None:
        if turns > 1:
            lines = _lines(text)
            candidates = [lines[i : i + turns] for i in range(0, len(lines), turns)]
        elif n == 1:
            candidates = [text.strip().strip('"').strip()]
        else:
            candidates = _lines(text)
    items: list[Item] = []
    for c in candidates:
        item: Item | None = None
        if turns == 1 and isinstance(c, str) and c.strip():
            item = c.strip()
        elif (
            turns > 1
            and isinstance(c, list)
            and len(c) == turns
            and all(isinstance(t, str) and t.strip() for t in c)
        ):
            item = [t.strip() for t in c]
        if item is not None and item not in items:
            items.append(item)
    items = items[:n]
    if items:
        return items, ""
    shape = "a text" if turns == 1 else f"a list of {turns} messages"
    return [], f"no usable item (wanted {n}, each {shape}) in: {text.strip()[:80]!r}"
