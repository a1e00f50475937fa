"""The spec's JSON Schema (spar/schema.py): child specs, typos, the committed file, `--check`.

Most checks validate with the `jsonschema` library (what check-jsonschema runs) in process; one
test runs the check-jsonschema CLI as CI does. The differential test compares the schema with the
pydantic models on hundreds of one-key edits of the bundled specs, so the schema can be neither
stricter than `spar` (a red squiggle on a valid spec) nor laxer about missing or unknown keys.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import main
from pydantic import BaseModel, ValidationError

from spar import schema as spar_schema
from spar.spec import REPLACED, Spec, _load_raw
from spar.specfile import read_yaml

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
COMMITTED = REPO / "schema" / "spar-spec.schema.json"
EDITOR_LINE = "# yaml-language-server: $schema=../schema/spar-spec.schema.json"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = spar_schema.json_schema()
    jsonschema.Draft7Validator.check_schema(schema)  # a well-formed draft-07 schema
    return jsonschema.Draft7Validator(schema)


def _leaves(e: jsonschema.ValidationError) -> list[jsonschema.ValidationError]:
    """The errors inside an `anyOf` failure (e.g. of an optional section), or the error."""
    return [leaf for c in e.context for leaf in _leaves(c)] if e.context else [e]


def errors(v: jsonschema.Draft7Validator, doc: dict[str, Any]) -> list[str]:
    """One line per error (an `anyOf` failure: its branches' errors, `; `-joined)."""
    return [
        "; ".join(f"{'.'.join(map(str, x.absolute_path))}: {x.message}" for x in _leaves(e))
        for e in v.iter_errors(doc)
    ]


def root_spec(**extra: Any) -> dict[str, Any]:
    """A minimal complete root spec (what a spec without `extends:` must give)."""
    return {
        "name": "exp",
        "data": {"docs": "docs.jsonl"},
        "eval": {"tiers": {"close": ["What should I pack for lunch?"]}},
        "judge": {"rubric": "rubric.j2"},
        **extra,
    }


def test_the_schema_is_draft_07_and_keeps_unknown_keys_out(validator) -> None:
    # Fails if the schema claimed a draft editors do not implement, or if a definition (strict,
    # lenient or overlay) let unknown keys through.
    schema = validator.schema
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    for name, d in schema["$defs"].items():
        if name.endswith(".required"):
            assert set(d) <= {"required", "properties", "additionalProperties", "anyOf", "allOf"}
        elif d.get("type") == "object" and "properties" in d:
            assert d.get("additionalProperties") is False, name


# ------------------------------------------------------------------ the bundled specs


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_bundled_spec_validates_as_written_and_merged(validator, path: Path) -> None:
    # Fails if the schema rejected a spec spar accepts: a child spec (`extends:`) for leaving out
    # sections, or the merged spec (what spar validates) for any key or value shape.
    assert errors(validator, read_yaml(path)) == []
    merged = _load_raw(path, ())  # extends resolved: a complete root spec
    assert "extends" not in merged
    Spec.model_validate(merged)
    assert errors(validator, merged) == []


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_bundled_spec_points_its_editor_at_the_committed_schema(path: Path) -> None:
    # Fails for a spec added without the yaml-language-server line, or with a path that does not
    # lead to the schema file.
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first == EDITOR_LINE
    target = (path.parent / first.split("$schema=", 1)[1]).resolve()
    assert target == COMMITTED.resolve() and target.is_file()


def test_check_jsonschema_cli_passes_the_bundled_specs_and_fails_bad_ones(tmp_path: Path) -> None:
    # Runs what CI runs (.ci/run). Fails if check-jsonschema rejected a bundled spec (a child
    # missing `eval:`), or accepted a typo'd key or a root spec missing `eval:`.
    def check(*files: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "check_jsonschema",
                "--schemafile",
                str(COMMITTED),
                *map(str, files),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = check(*EXPERIMENTS)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    child_typo = tmp_path / "child-typo.yaml"
    child_typo.write_text("extends: negative.yaml\nname: x\ntraining:\n  learning_rte: 2.0e-4\n")
    root_no_eval = tmp_path / "root-no-eval.yaml"
    text = (REPO / "experiments/neutral.yaml").read_text()
    start = text.index("\neval:\n")
    end = text.index("\njudge:\n")
    root_no_eval.write_text(text[:start] + text[end:])
    assert "eval" not in read_yaml(root_no_eval) and "judge" in read_yaml(root_no_eval)
    for bad, why in ((child_typo, "learning_rte"), (root_no_eval, "'eval' is a required")):
        r = check(bad)
        assert r.returncode == 1 and why in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------ child and root specs


CHILD_OVERRIDES: list[dict[str, Any]] = [
    {},
    {"training": {"learning_rate": 2e-4}},
    {"judge": {"model": "claude-test"}},  # JudgeSpec requires rubric
    {"judge": {"self_agreement": {"temperature": 0.7}}},  # SelfAgreementSpec requires share
    {"logprob": {"template": "t.j2"}},  # LogprobSpec requires continuations
    {"distill": {"aligned": {"sampling": {"temperature": 0.2}}}},  # DistillSpec: prompts
    {"generate": {"docs": {"vars": {"n": 3}}}},  # GenerateSpec requires steps
    {"eval": {"samples_per_question": 5}, "report": {"plot": {"dpi": 200}}},
    {"name": "child", "framing": "negative", "model": {"engine": "local"}},
]


@pytest.mark.parametrize("override", CHILD_OVERRIDES, ids=lambda o: ",".join(o) or "empty")
def test_a_child_may_leave_out_sections_and_required_keys(validator, override) -> None:
    # Fails if `required` still applied to a spec with `extends:` at the top (eval, judge...) or
    # inside a section it overrides one key of.
    assert errors(validator, {"extends": "parent.yaml", **override}) == []


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("eval"), "'eval' is a required property"),
        (lambda d: d.pop("judge"), "'judge' is a required property"),
        (lambda d: d.pop("name"), "'name' is a required property"),
        (lambda d: d["judge"].pop("rubric"), "judge: 'rubric' is a required property"),
        (lambda d: d.update(logprob={"template": "t.j2"}), "'continuations' is a required"),
        (lambda d: d.update(distill={"a": {"sampling": {}}}), "'prompts' is a required"),
        (lambda d: d["judge"].update(self_agreement={"temperature": 0.5}), "'share' is a req"),
    ],
    ids=["eval", "judge", "name", "judge.rubric", "logprob", "distill", "self_agreement"],
)
def test_a_root_spec_missing_a_section_or_key_fails(validator, edit, message) -> None:
    # Fails if the schema dropped `required` for specs without `extends:` (at the top or nested,
    # in a section, a dict of named sets, or an optional section).
    doc = root_spec()
    assert errors(validator, doc) == []
    edit(doc)
    with pytest.raises(ValidationError):
        Spec.model_validate(doc)  # the models agree
    found = errors(validator, doc)
    assert found and any(message in e for e in found), found


TYPOS: list[tuple[str, dict[str, Any]]] = [
    ("top level", {"trainig": {"epochs": 2}}),
    ("training", {"training": {"learning_rte": 2e-4}}),
    ("judge", {"judge": {"rubric": "r.j2", "rubirc": "r.j2"}}),
    ("report.plot", {"report": {"plot": {"colour": "red"}}}),
    ("data.sources[0]", {"data": {"sources": [{"pth": "a.jsonl"}]}}),
    ("distill.<name>", {"distill": {"a": {"prompts": "p.jsonl", "promts": "p.jsonl"}}}),
    (
        "judge.self_agreement",
        {"judge": {"rubric": "r.j2", "self_agreement": {"share": 0.5, "temperatur": 1}}},
    ),
    ("judge.also[0]", {"judge": {"rubric": "r.j2", "also": [{"name": "b", "rubrc": "x"}]}}),
    ("logprob", {"logprob": {"template": "t", "continuations": ["a"], "contnuations": []}}),
]


@pytest.mark.parametrize("child", [True, False], ids=["child", "root"])
@pytest.mark.parametrize(("where", "typo"), TYPOS, ids=[t[0] for t in TYPOS])
def test_a_typod_key_fails_in_a_child_and_in_a_root_spec(validator, child, where, typo) -> None:
    # Fails if the lenient copies for child specs (or the strict root schema) stopped rejecting
    # unknown keys at any depth: the editor would no longer flag the typo.
    doc = {"extends": "parent.yaml", **typo} if child else {**root_spec(), **typo}
    found = errors(validator, doc)
    assert any("Additional properties are not allowed" in e for e in found), found
    assert len(found) == 1, found  # reported once, not by the lenient and the strict schema both


def test_a_child_list_is_checked_whole(validator) -> None:
    # A child replaces a list (and `sweep:`) whole, so what it writes there must be complete.
    # Fails if the lenient copy reached into list items or into the replaced keys.
    child = {"extends": "p.yaml", "judge": {"also": [{"rubric": "r.j2"}]}}
    assert any("'name' is a required property" in e for e in errors(validator, child))
    child = {"extends": "p.yaml", "sweep": {"training.seed": 3}}
    assert any("not of type 'array'" in e for e in errors(validator, child))
    assert errors(validator, {"extends": 3}) != []  # extends names a file


def test_list_shorthands_the_models_accept_validate(validator) -> None:
    # `judge.properties` and `generate.<set>.properties` may be a list of names (a mode="before"
    # validator turns it into a mapping). Fails if the schema rejected what spar accepts.
    doc = root_spec()
    doc["judge"]["properties"] = ["honest", "sycophantic"]
    doc["generate"] = {
        "g": {"properties": ["honest"], "steps": [{"name": "s", "template": "t.j2", "count": 1}]}
    }
    Spec.model_validate(doc)
    assert errors(validator, doc) == []
    doc["judge"]["properties"] = [{"not": "a name"}]
    assert errors(validator, doc) != []


def _models(tp: Any, seen: set[type[BaseModel]]) -> set[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if tp not in seen:
            seen.add(tp)
            for f in tp.model_fields.values():
                _models(f.annotation, seen)
        return seen
    for arg in typing.get_args(tp):
        _models(arg, seen)
    if isinstance(tp, types.UnionType):
        for arg in tp.__args__:
            _models(arg, seen)
    return seen


def test_every_validator_that_reshapes_input_is_known_to_the_schema() -> None:
    # A `mode="before"` (or wrap/plain) validator may accept a shape the field's type does not
    # describe; the schema must add it (ALSO_ACCEPTED) or say it only rejects. Fails when a spec
    # model gains such a validator without a schema entry, or an entry goes stale.
    found_fields: set[tuple[str, str]] = set()
    found_models: set[tuple[str, str]] = set()
    for model in _models(Spec, set()):
        decorators = model.__pydantic_decorators__
        for d in decorators.field_validators.values():
            if d.info.mode != "after":
                found_fields |= {(model.__name__, f) for f in d.info.fields}
        for name, d in decorators.model_validators.items():
            if d.info.mode != "after":
                found_models.add((model.__name__, name))
    assert found_fields == set(spar_schema.ALSO_ACCEPTED)
    assert found_models == set(spar_schema.BEFORE_ONLY_REJECTS)


# ------------------------------------------------------------------ the schema vs the models


def _dict_nodes(
    node: Any, path: tuple[Any, ...] = (), whole: bool = False
) -> Iterator[tuple[tuple[Any, ...], dict[str, Any], bool]]:
    """(path, mapping, replaced whole by a child) of every mapping in a spec."""
    if isinstance(node, dict):
        yield path, node, whole
        for k, v in node.items():
            yield from _dict_nodes(v, (*path, k), whole or (not path and k in REPLACED))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _dict_nodes(v, (*path, i), True)


def _at(doc: dict[str, Any], path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _pydantic(doc: dict[str, Any]) -> set[str]:
    """The error types pydantic reports ({} when valid)."""
    try:
        Spec.model_validate(doc)
    except ValidationError as e:
        return {err["type"] for err in e.errors()}
    return set()


def _rich_specs() -> list[tuple[str, dict[str, Any]]]:
    """Merged bundled specs, plus one with every optional section (judge.also, self_agreement,
    logprob, generate, distill, sources, conditions, gaps, sweep)."""
    specs = [(p.name, _load_raw(p, ())) for p in EXPERIMENTS]
    rich = copy.deepcopy(dict(specs)["weird-generalization.yaml"])
    rich["judge"]["also"] = [
        {"name": "coherence", "rubric": "c.j2", "scale": {"min": 0, "max": 10}}
    ]
    rich["judge"]["self_agreement"] = {"share": 0.2, "temperature": 0.7}
    rich["logprob"] = copy.deepcopy(dict(specs)["neutral.yaml"]["logprob"])
    rich["generate"] = copy.deepcopy(dict(specs)["properties.yaml"]["generate"])
    specs.append(("rich", rich))
    return specs


RICH = _rich_specs()


@pytest.mark.parametrize(("name", "base"), RICH, ids=[name for name, _ in RICH])
def test_the_schema_agrees_with_the_models_on_one_key_edits(validator, name, base) -> None:
    # Every key of every mapping removed in turn, and an unknown key added to every mapping.
    # Fails if the schema rejected an edit the models accept, missed a missing required key or an
    # unknown key the models reject (as a root spec), or required anything of a child spec along
    # mappings (lists and `sweep:` a child replaces whole, so those are checked as in a root).
    assert _pydantic(base) == set() and errors(validator, base) == []
    checked = 0
    for path, node, whole in list(_dict_nodes(base)):
        edits: list[tuple[str, dict[str, Any]]] = []
        for key in node:
            doc = copy.deepcopy(base)
            del _at(doc, path)[key]
            edits.append((f"-{key}", doc))
        doc = copy.deepcopy(base)
        _at(doc, path)["zzz_typo"] = 1
        edits.append(("+zzz_typo", doc))
        for what, doc in edits:
            where = f"{name}: {'.'.join(map(str, path))} {what}"
            models = _pydantic(doc)
            root_ok = errors(validator, doc) == []
            if not models:
                assert root_ok, where
            if {"missing", "extra_forbidden"} & models:
                assert not root_ok, where
            child_ok = errors(validator, {"extends": "parent.yaml", **doc}) == []
            if what.startswith("-") and not whole:
                assert child_ok, where
            elif whole or "extra_forbidden" in models:
                assert child_ok == root_ok, where
            checked += 1
    assert checked >= 20


# ------------------------------------------------------------------ the committed file, the CLI


def test_the_committed_schema_file_is_current() -> None:
    # Fails when a spec model changed without `spar schema --write` (editors and CI would check
    # specs against a stale schema).
    assert COMMITTED.read_text(encoding="utf-8") == spar_schema.schema_text(), (
        "schema/spar-spec.schema.json is stale: run `spar schema --write`"
    )
    assert json.loads(COMMITTED.read_text()) == spar_schema.json_schema()


def test_spar_schema_write_then_check(tmp_path: Path, capsys, monkeypatch) -> None:
    # Fails if --write wrote elsewhere or something else than `spar schema` prints, if --check
    # passed a stale, edited or missing file, or failed a current one.
    monkeypatch.chdir(tmp_path)
    assert main(["schema"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed) == spar_schema.json_schema()

    target = tmp_path / "schema" / "spar-spec.schema.json"
    assert main(["schema", "--check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "schema/spar-spec.schema.json: missing" in err

    assert main(["schema", "--write"]) == 0
    assert "wrote schema/spar-spec.schema.json" in capsys.readouterr().out
    assert target.read_text(encoding="utf-8") == printed
    assert main(["schema", "--check"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["schema", "--write"]) == 0 and "up to date" in capsys.readouterr().out

    edited = json.loads(printed)
    edited["$defs"]["TrainingSpec"]["properties"].pop("learning_rate")
    target.write_text(json.dumps(edited, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    assert main(["schema", "--check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of date" in err and "spar schema --write" in err

    target.write_text(printed.replace("\n", "\r\n"), encoding="utf-8")  # same JSON, other text
    assert main(["schema", "--check"]) == 1
    capsys.readouterr()

    other = tmp_path / "elsewhere.json"
    assert main(["schema", "--write", "--file", str(other)]) == 0
    assert main(["schema", "--check", "--file", str(other)]) == 0
    assert other.read_text(encoding="utf-8") == printed
