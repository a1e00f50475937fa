"""Spec models of `generate:` — data and eval questions written by an LLM, step by step.

A generation set is a chain of steps. It starts from its roots (one record per key fact of a
universe context, per property, per tier, or given as `roots:`); every step asks the generator,
per record of the step before, for `count` new items (`per_call` of them in one request) with a
Jinja template, and adds each item to a copy of its parent record under the step's name. The last
records are written in the set's `output` shape (synth_docs documents, chat records, or an eval
questions file).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
FIELD_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"  # a template variable

# variables every step's template gets besides vars, root fields and earlier steps' items
CALL_VARIABLES = ("n", "index", "count", "turns")
# what the roots of each origin carry
UNIVERSE_FIELDS = ("universe_context_id", "universe_context", "fact")
PROPERTY_FIELDS = ("property", "description", "num_turns")
TIER_FIELDS = ("tier", "definition")
SYNTH_DOC_STEPS = ("doc_type", "doc_idea", "content")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _cosmetic(default: Any, why: str, **kw: Any) -> Any:
    return Field(default, json_schema_extra={"cosmetic": why}, **kw)


class GeneratorSpec(_Strict):
    """Who writes: Claude (`anthropic`, structured output) or an engine's sampling client
    (`local`, `tinker`: the spec's renderer; the model defaults to model.base_model)."""

    kind: str = Field("anthropic", description="anthropic | an engine name (local, tinker)")
    model: str | None = Field(
        None, description="default: claude-sonnet-4-6 (anthropic) or model.base_model (engines)"
    )
    max_tokens: int = Field(1024, ge=1)
    system_prompt: str | None = Field(None, description="sent before every request")
    temperature: float = Field(1.0, ge=0, description="engines only (anthropic: not sent)")
    seed: int = Field(0, description="engines only: each request's seed derives from it")
    max_retries: int = Field(
        2, ge=0, description="requests again when a reply has no usable item, then drops it"
    )
    concurrency: int = _cosmetic(8, "requests in flight", ge=1)


class StepSpec(_Strict):
    name: str = Field(description="the field its items are stored under (a template variable)")
    template: Path = _cosmetic(..., "its content is hashed, not its path")
    count: int = Field(ge=1, description="items per record of the step before (or per root)")
    per_call: int = Field(1, ge=1, description="items asked for in one request")
    turns: int | None = Field(
        None,
        ge=1,
        description="each item is a list of this many user messages (default: the root's "
        "num_turns, else 1)",
    )
    max_tokens: int | None = Field(None, ge=1, description="default: generator.max_tokens")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(FIELD_PATTERN, v) or v in CALL_VARIABLES:
            raise ValueError(
                f"{v!r}: letters, digits and _ (not starting with a digit), and not one of "
                f"{', '.join(CALL_VARIABLES)}"
            )
        return v


class DedupSpec(_Strict):
    """Near-duplicate removal (MinHash LSH over word shingles) of the last step's items."""

    threshold: float = Field(0.8, gt=0, le=1, description="estimated Jaccard similarity")
    num_perm: int = Field(128, ge=16)
    shingle: int = Field(3, ge=1, description="words per shingle")
    field: str | None = Field(None, description="the field compared (default: the last step's)")


class ChatFields(_Strict):
    user: str | None = Field(None, description="the user turn's field (default: 2nd-to-last step)")
    assistant: str | None = Field(None, description="the reply's field (default: the last step)")


class UniverseContext(_Strict):
    """One universe context (the public synthetic-document pipelines' shape)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    universe_context: str
    key_facts: list[str] = []


class GenerateSpec(_Strict):
    generator: GeneratorSpec = GeneratorSpec()
    vars: dict[str, Any] = Field({}, description="constants every template may use")
    universe: Path | None = _cosmetic(
        None,
        "its content is hashed, not its path",
        description="YAML/JSON(L) of universe contexts {id, universe_context, key_facts}: one "
        "root per key fact",
    )
    properties: dict[str, str] | None = Field(
        None, description="property -> description: one root per property"
    )
    num_turns: dict[str, int] = Field({}, description="property -> user turns per prompt")
    tiers: dict[str, str] | None = Field(
        None, description="tier -> its distance definition: one root per tier"
    )
    roots: list[dict[str, Any]] | None = Field(None, description="the roots, given directly")
    steps: list[StepSpec] = Field(min_length=1)
    output: Literal["records", "synth_docs", "chat", "questions"] = "records"
    chat: ChatFields = ChatFields()
    dedup: DedupSpec | None = None

    @field_validator("properties", mode="before")
    @classmethod
    def _property_list(cls, v: Any) -> Any:
        return {str(p): "" for p in v} if isinstance(v, list) else v

    @model_validator(mode="after")
    def _consistent(self) -> GenerateSpec:
        origins = [
            k for k in ("universe", "properties", "tiers", "roots") if getattr(self, k) is not None
        ]
        if len(origins) > 1:
            raise ValueError(f"give one of universe, properties, tiers, roots (got {origins})")
        for k, v in self.num_turns.items():
            if self.properties is None or k not in self.properties:
                listed = ", ".join(self.properties or {}) or "none"
                raise ValueError(f"num_turns.{k}: not a listed property (properties: {listed})")
            if v < 1:
                raise ValueError(f"num_turns.{k}: at least 1")
        if self.properties is not None and not self.properties:
            raise ValueError("properties: empty")
        if self.tiers is not None and not self.tiers:
            raise ValueError("tiers: empty")
        if self.roots is not None and not self.roots:
            raise ValueError("roots: empty")
        names = [s.name for s in self.steps]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"steps: two steps named {dup[0]!r}")
        clash = set(names) & (set(self.root_fields()) | set(self.vars))
        if clash:
            raise ValueError(f"steps: {sorted(clash)[0]!r} is already a root field or a var")
        for i, s in enumerate(self.steps[:-1]):
            if (s.turns or 1) > 1:
                raise ValueError(f"steps.{i}.turns: only the last step's items may be turns")
        if self.output == "synth_docs":
            missing = [n for n in SYNTH_DOC_STEPS if n not in names]
            if missing:
                raise ValueError(f"output synth_docs: needs steps named {', '.join(missing)}")
        if self.output == "chat":
            user, assistant = self.chat_fields()
            if user is None:
                raise ValueError("output chat: needs two steps or chat.user")
            for f in (user, assistant):
                if f not in names and f not in self.root_fields() and f not in self.vars:
                    raise ValueError(f"chat: no field {f!r}")
        if self.output == "questions" and self.tier_field() is None:
            raise ValueError("output questions: needs tiers: or properties: (the tier of each)")
        if self.dedup is not None and self.dedup.field not in (None, *names):
            raise ValueError(f"dedup.field: no step named {self.dedup.field!r}")
        return self

    def root_fields(self) -> tuple[str, ...]:
        if self.universe is not None:
            return UNIVERSE_FIELDS
        if self.properties is not None:
            return PROPERTY_FIELDS
        if self.tiers is not None:
            return TIER_FIELDS
        if self.roots is not None:
            return tuple(dict.fromkeys(k for r in self.roots for k in r))
        return ()

    def tier_field(self) -> str | None:
        if self.tiers is not None:
            return "tier"
        if self.properties is not None:
            return "property"
        return None

    def tier_order(self) -> list[str]:
        """The tiers of an eval questions set, in order (its properties or tiers)."""
        return list(self.tiers or self.properties or {})

    def chat_fields(self) -> tuple[str | None, str]:
        names = [s.name for s in self.steps]
        user = self.chat.user or (names[-2] if len(names) > 1 else None)
        return user, self.chat.assistant or names[-1]

    def root_count(self) -> int | None:
        """Roots, when the spec alone tells (not for a universe file)."""
        if self.universe is not None:
            return None
        return len(self.tiers or self.properties or self.roots or [None])

    def expected_items(self, roots: int) -> int:
        """Records the last step yields at most (before dedup and drops)."""
        n = roots
        for s in self.steps:
            n *= s.count
        return n

    def expected_turns(self, roots: int) -> int:
        """User turns of the last step's items at most: each item has the step's `turns`, else
        its property's `num_turns`, else 1."""
        last = self.steps[-1].turns
        if last is not None:
            return self.expected_items(roots) * last
        if self.properties is not None:
            per_root = self.expected_items(1)
            return per_root * sum(self.num_turns.get(p, 1) for p in self.properties)
        return self.expected_items(roots)


def resolve_paths(raw: dict[str, Any], abs_path: Any) -> None:
    """Make a raw `generate:` section's template and universe paths absolute."""
    for g in raw.values() if isinstance(raw, dict) else ():
        if not isinstance(g, dict):
            continue
        if isinstance(g.get("universe"), str):
            g["universe"] = abs_path(g["universe"])
        for step in g.get("steps") or []:
            if isinstance(step, dict) and isinstance(step.get("template"), str):
                step["template"] = abs_path(step["template"])
