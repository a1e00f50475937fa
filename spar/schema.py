"""The spec's JSON Schema, for editors (yaml-language-server) and CI (check-jsonschema).

The schema is generated from the pydantic models in `spar.spec` and kept in the repository at
`schema/spar-spec.schema.json` (`spar schema --write`; `spar schema --check` fails when the file is
stale). A spec file points its editor at it with a first line
`# yaml-language-server: $schema=../schema/spar-spec.schema.json`.

One schema serves root specs and child specs (`extends:`). A child is deep-merged onto its parent
(`spar.spec.deep_merge`), so it may leave out any section and, inside a mapping, any key the
parent gives: for it no `required` applies along mappings. Lists and the keys in
`spar.spec.REPLACED` are replaced whole by a child, so what a child writes there is complete and
is checked as strictly as in a root spec. Unknown keys are rejected in both (a typo stays red).

Shape (JSON Schema draft-07, the draft yaml-language-server implements):

- the root's `properties` are the *lenient* ones: each definition that has a `required` somewhere
  along mappings gets a copy `<Name>.partial` without it (lists inside still point at the strict
  definitions); `additionalProperties: false` everywhere;
- `if: {required: [extends]}` / `else:` an overlay that adds back exactly the requirements of a
  root spec (`<Name>.required` definitions hold only `required` and the nested overlays), so a
  root spec is validated as strictly as `Spec.model_json_schema()` would, and each mistake is
  reported once.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spar.spec import REPLACED, Spec

DRAFT = "http://json-schema.org/draft-07/schema#"
SCHEMA_FILE = Path("schema/spar-spec.schema.json")  # relative to the repository root
DEFS = "$defs"  # resolved as a JSON pointer by every draft-07 validator and editor
PARTIAL, REQUIRED = ".partial", ".required"

# Keys a `mode="before"` validator also accepts in another shape than the field's type:
# (model, field) -> the extra shape, added to the field's schema as one more `anyOf` branch.
# tests/test_schema.py fails if a model gains such a validator without an entry here.
ALSO_ACCEPTED: dict[tuple[str, str], dict[str, Any]] = {
    ("JudgeSpec", "properties"): {
        "type": "array",
        "items": {"type": "string"},
        "description": "property names (each with an empty description)",
    },
    ("GenerateSpec", "properties"): {
        "type": "array",
        "items": {"type": "string"},
        "description": "property names (each with an empty description)",
    },
}
# `mode="before"` validators that only reject (no other shape to add).
BEFORE_ONLY_REJECTS: frozenset[tuple[str, str]] = frozenset({("ReportSpec", "_no_bootstrap")})

EXTENDS = {
    "type": "string",
    "description": "parent spec to deep-merge under this one (child wins): this spec may then "
    "leave out any section and any key its parent gives",
}
Json = dict[str, Any]


def _ref_name(node: Json) -> str | None:
    ref = node.get("$ref")
    prefix = f"#/{DEFS}/"
    return ref[len(prefix) :] if isinstance(ref, str) and ref.startswith(prefix) else None


def _maybe_object(node: Any) -> bool:
    """Whether a mapping could be valid under this branch."""
    if not isinstance(node, dict):
        return node is not False
    kind = node.get("type")
    if kind is None:
        return True
    return kind == "object" or (isinstance(kind, list) and "object" in kind)


def _ref(name: str) -> str:
    return f"#/{DEFS}/{name}"


def _widen(defs: dict[str, Json]) -> None:
    for (model, field), extra in ALSO_ACCEPTED.items():
        prop = defs[model]["properties"][field]
        branches = prop.get("anyOf")
        if branches is None:
            keep = {k: v for k, v in prop.items() if k in ("title", "description", "default")}
            branches = [{k: v for k, v in prop.items() if k not in keep}]
            prop.clear()
            prop.update(keep)
        prop["anyOf"] = [*branches, extra]


class _Builder:
    """Derives the lenient (`.partial`) and requirement-only (`.required`) definitions."""

    def __init__(self, defs: dict[str, Json]) -> None:
        self.defs = defs
        self.out: dict[str, Json] = {}
        self._has_req: dict[str, bool] = {}

    # ------------------------------------------------------------ which definitions differ

    def has_req(self, node: Any) -> bool:
        """A `required` reachable along mappings (properties, dict values, anyOf branches)."""
        if not isinstance(node, dict):
            return False
        if node.get("required"):
            return True
        name = _ref_name(node)
        if name is not None:
            if name not in self._has_req:
                self._has_req[name] = False  # a cycle adds nothing new
                self._has_req[name] = self.has_req(self.defs[name])
            return self._has_req[name]
        return any(self.has_req(c) for c in self._children(node))

    @staticmethod
    def _children(node: Json) -> list[Any]:
        kids: list[Any] = list((node.get("properties") or {}).values())
        if isinstance(node.get("additionalProperties"), dict):
            kids.append(node["additionalProperties"])
        for key in ("anyOf", "oneOf", "allOf"):
            kids += node.get(key) or []
        return kids

    def _def(self, name: str, suffix: str, build: Callable[[Json], Json | None]) -> str:
        target = name + suffix
        if target not in self.out:
            self.out[target] = {}  # placeholder: a cycle refers to it
            built = build(self.defs[name])
            self.out[target] = built if built is not None else {}
        return _ref(target)

    # ------------------------------------------------------------ lenient copy (children)

    def partial(self, node: Any) -> Any:
        if not isinstance(node, dict) or not self.has_req(node):
            return node
        name = _ref_name(node)
        if name is not None:
            return {**node, "$ref": self._def(name, PARTIAL, self.partial)}
        out = {k: v for k, v in node.items() if k != "required"}
        if "properties" in node:
            out["properties"] = {k: self.partial(v) for k, v in node["properties"].items()}
        if isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = self.partial(node["additionalProperties"])
        for key in ("anyOf", "oneOf", "allOf"):
            if key in node:
                out[key] = [self.partial(b) for b in node[key]]
        return out  # items / prefixItems stay strict: a child replaces a list whole

    # ------------------------------------------------------------ requirements only (roots)

    def required(self, node: Any) -> Json | None:
        """A schema that checks only the requirements of `node` (None: it has none). Everything
        else (types, unknown keys) is left to the lenient schema, so it is reported once."""
        if not isinstance(node, dict) or not self.has_req(node):
            return None
        name = _ref_name(node)
        if name is not None:
            return {"$ref": self._def(name, REQUIRED, self.required)}
        out: Json = {}
        if node.get("required"):
            out["required"] = list(node["required"])
        props = {k: self.required(v) for k, v in (node.get("properties") or {}).items()}
        if any(v is not None for v in props.values()):
            out["properties"] = {k: v for k, v in props.items() if v is not None}
        extra = self.required(node.get("additionalProperties"))
        if extra is not None:
            out["additionalProperties"] = extra
        for key in ("anyOf", "oneOf"):
            branches = node.get(key) or []
            if not any(self.has_req(b) for b in branches):
                continue
            if sum(_maybe_object(b) for b in branches) == 1:
                # e.g. `X | None`: the requirements apply to the one branch an object can take
                # (they hold vacuously for other values), so the error names the missing key
                only = next(b for b in branches if _maybe_object(b))
                out["allOf"] = [*out.get("allOf", []), self.required(only)]
            else:  # a branch without requirements keeps its own test
                out["anyOf"] = [self.required(b) or b for b in branches]
        if "allOf" in node:
            parts = [r for b in node["allOf"] if (r := self.required(b)) is not None]
            if parts:
                out["allOf"] = [*out.get("allOf", []), *parts]
        return out


def json_schema() -> dict[str, Any]:
    """The spec's JSON Schema: a root spec must be complete, a child (`extends:`) need not be;
    unknown keys are rejected in both."""
    strict = Spec.model_json_schema(ref_template=f"#/{DEFS}/{{model}}")
    defs: dict[str, Json] = strict.pop(DEFS)
    clash = [n for n in defs if n.endswith((PARTIAL, REQUIRED))]
    if clash:  # pragma: no cover - a model named like a derived definition
        raise RuntimeError(f"spec model names clash with derived definitions: {clash}")
    _widen(defs)
    b = _Builder(defs)
    props: Json = {
        k: (copy.deepcopy(v) if k in REPLACED else b.partial(v))
        for k, v in strict["properties"].items()
    }
    props["extends"] = dict(EXTENDS)
    root_reqs = b.required(
        {
            "required": strict.get("required", []),
            "properties": {k: v for k, v in strict["properties"].items() if k not in REPLACED},
        }
    )
    schema: Json = {
        "$schema": DRAFT,
        "$comment": "generated from spar.spec by `spar schema --write`; do not edit",
        "title": "spar experiment spec",
        "description": "One experiment (spar.spec.Spec). A spec with `extends:` is deep-merged "
        "onto its parent and may leave out what the parent gives.",
        "type": "object",
        "properties": props,
        "additionalProperties": False,
        "if": {"required": ["extends"]},
        "else": root_reqs or {},
        DEFS: {**defs, **dict(sorted(b.out.items()))},
    }
    return schema


def schema_text() -> str:
    """The schema file's exact text (what `spar schema --write` writes)."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def write_schema(path: Path = SCHEMA_FILE) -> bool:
    """Write the schema file; False when it was already up to date (left untouched)."""
    data = schema_text().encode()
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return True


def check_schema(path: Path = SCHEMA_FILE) -> str | None:
    """None when the file holds exactly what `write_schema` would write; else why not (one
    line)."""
    if not path.is_file():
        return f"{path}: missing; run `spar schema --write`"
    if path.read_bytes() != schema_text().encode():
        return f"{path}: out of date with the spec models; run `spar schema --write`"
    return None
