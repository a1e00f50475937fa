"""Checks that run before any work: strict spec YAML, rubric names, renderers, model dirs.

Each test that names a bug also shows the old check passing wrongly on the same input, so it
fails if the new check regresses to the old behaviour.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spar.errors import InputError
from spar.judges import rubric
from spar.models import (
    SMOLLM2,
    check_local_model,
    check_renderer,
    model_files,
    renderer_names,
)
from spar.specfile import read_yaml

# ----------------------------------------------------------------------------- read_yaml


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def rejected(fn, *args) -> str:
    with pytest.raises(InputError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_duplicate_top_level_key(tmp_path):
    text = "name: a\ndescription: x\nname: b\n"
    assert yaml.safe_load(text) == {"name": "b", "description": "x"}  # old: last one wins
    p = write(tmp_path, "spec.yaml", text)
    assert rejected(read_yaml, p) == f"{p}: line 3: key 'name' given twice (first at line 1)"


def test_duplicate_nested_key(tmp_path):
    text = "training:\n  lora_rank: 8\n  seed: 0\n  lora_rank: 32\n"
    assert yaml.safe_load(text)["training"]["lora_rank"] == 32
    p = write(tmp_path, "spec.yaml", text)
    assert rejected(read_yaml, p) == f"{p}: line 4: key 'lora_rank' given twice (first at line 2)"


def test_duplicate_key_deep_and_in_a_list(tmp_path):
    deep = "report:\n  plot:\n    colors: [a]\n    dpi: 1\n    dpi: 2\n"
    p = write(tmp_path, "deep.yaml", deep)
    assert rejected(read_yaml, p).endswith("line 5: key 'dpi' given twice (first at line 4)")
    in_list = "items:\n  - a: 1\n  - a: 1\n    b: 2\n    a: 3\n"
    assert yaml.safe_load(in_list)["items"][1]["a"] == 3
    p = write(tmp_path, "list.yaml", in_list)
    assert rejected(read_yaml, p).endswith("line 5: key 'a' given twice (first at line 3)")


def test_duplicate_key_in_flow_mapping(tmp_path):
    p = write(tmp_path, "spec.yaml", "x: 1\ntraining: {lora_rank: 8, lora_rank: 32}\n")
    assert rejected(read_yaml, p) == f"{p}: line 2: key 'lora_rank' given twice (first at line 2)"


def test_same_key_in_different_mappings_is_fine(tmp_path):
    p = write(tmp_path, "spec.yaml", "a: {seed: 1}\nb: {seed: 2}\nl: [{x: 1}, {x: 2}]\n")
    assert read_yaml(p) == {"a": {"seed": 1}, "b": {"seed": 2}, "l": [{"x": 1}, {"x": 2}]}


def test_merge_key_may_be_overridden(tmp_path):
    text = "base: &b {seed: 0, dpi: 1}\nplot:\n  <<: *b\n  dpi: 2\n"
    p = write(tmp_path, "spec.yaml", text)
    assert read_yaml(p)["plot"] == {"seed": 0, "dpi": 2}


def test_read_yaml_keeps_old_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert rejected(read_yaml, missing) == f"{missing}: file not found"
    bad = write(tmp_path, "bad.yaml", "name: a\ntraining: [1, 2\nx: 3\n")
    msg = rejected(read_yaml, bad)
    assert msg.startswith(f"{bad}: line 3: "), msg
    for text in ("", "# only a comment\n"):
        empty = write(tmp_path, "empty.yaml", text)
        assert rejected(read_yaml, empty) == (
            f"{empty}: empty file (expected a mapping of spec fields)"
        )
    lst = write(tmp_path, "list.yaml", "- a\n- b\n")
    assert rejected(read_yaml, lst) == f"{lst}: top level must be a mapping, got a list"


def test_read_yaml_returns_mapping(tmp_path):
    p = write(tmp_path, "spec.yaml", "name: a\nmodel: {engine: local}\nn: null\n")
    assert read_yaml(p) == {"name": "a", "model": {"engine": "local"}, "n": None}


# ----------------------------------------------------------------------------- rubric


def sample_render(path: Path, mode: str) -> str:
    """What validate() used to do: one render with sample values."""
    return rubric.render(
        path,
        rubric.context(
            mode,
            tier="direct",
            question="Q?",
            response="A.",
            baseline_response="B.",
            scale_min=1,
            scale_max=5,
        ),
    )


def test_variables():
    assert rubric.variables("absolute") == (
        "mode",
        "tier",
        "question",
        "response",
        "scale_min",
        "scale_max",
        "conversation",
    )
    assert set(rubric.variables("absolute", properties=True)) == {
        *rubric.variables("absolute"),
        "property",
        "property_description",
    }
    assert set(rubric.variables("pairwise")) == {
        *rubric.variables("absolute"),
        "baseline_response",
        "finetuned_response",
        "baseline_conversation",
    }


def test_unknown_variable_in_branch_not_sampled(tmp_path):
    p = write(
        tmp_path,
        "r.j2",
        "Q: {{ question }}\n{% if tier == 'distant' %}\nA: {{ respnse }}\n{% endif %}\n",
    )
    sample_render(p, "absolute")  # old check: passes, the branch is never entered
    msg = rejected(rubric.validate, p, "absolute", 1, 5)
    assert msg == (
        f"{p}: line 3: unknown variable 'respnse' "
        "(the rubric may use: mode, tier, question, response, scale_min, scale_max, conversation)"
    )


def test_unknown_variable_in_for_body_not_entered(tmp_path):
    p = write(
        tmp_path, "r.j2", "{{ response }}\n{% for x in [] %}\n{{ x }} {{ quesiton }}\n{% endfor %}"
    )
    sample_render(p, "absolute")
    assert rejected(rubric.validate, p, "absolute", 1, 5).startswith(
        f"{p}: line 3: unknown variable 'quesiton' "
    )


def test_pairwise_variable_in_absolute_mode_branch(tmp_path):
    p = write(
        tmp_path,
        "r.j2",
        "{{ response }}\n{% if mode == 'pairwise' %}\nvs {{ baseline_response }}\n{% endif %}\n",
    )
    sample_render(p, "absolute")
    msg = rejected(rubric.validate, p, "absolute", 1, 5)
    assert msg.startswith(f"{p}: line 3: unknown variable 'baseline_response' "), msg
    assert "finetuned_response" not in msg
    rubric.validate(p, "pairwise", 1, 5)


def test_first_unknown_variable_by_line(tmp_path):
    p = write(tmp_path, "r.j2", "{{ question }}\n{{ zzz }}\n{{ aaa }}\n{{ zzz }}\n")
    assert rejected(rubric.validate, p, "absolute", 1, 5).startswith(
        f"{p}: line 2: unknown variable 'zzz' "
    )


def test_local_names_and_globals_are_fine(tmp_path):
    p = write(
        tmp_path,
        "r.j2",
        "{% set ns = namespace(n=0) %}{% set label = tier | upper %}"
        "{% for i in range(scale_min, scale_max + 1) %}{{ loop.index }}:{{ i }} {% endfor %}"
        "{% macro q(text) %}[{{ text }}]{% endmacro %}{{ q(question) }} {{ label }} "
        "{{ dict(a=1).a }} {{ ns.n }} {{ response }} {{ finetuned_response }}\n",
    )
    rubric.validate(p, "pairwise", 1, 3)


def test_loop_outside_a_for_is_unknown(tmp_path):
    p = write(tmp_path, "r.j2", "{{ question }}\n{% if tier == 'x' %}{{ loop.index }}{% endif %}")
    sample_render(p, "absolute")
    assert "line 2: unknown variable 'loop'" in rejected(rubric.validate, p, "absolute", 1, 5)


def test_unknown_filter_in_branch_not_sampled(tmp_path):
    p = write(
        tmp_path,
        "r.j2",
        "{{ question }}\n{% if tier == 'x' %}{{ response | truncat(9) }}{% endif %}",
    )
    sample_render(p, "absolute")  # Jinja reports an unknown filter only when it runs
    assert (
        rejected(rubric.validate, p, "absolute", 1, 5) == f"{p}: line 2: unknown filter 'truncat'"
    )


def test_rubric_syntax_error_keeps_message(tmp_path):
    p = write(tmp_path, "r.j2", "Score this:\n{{ question }\n")
    msg = rejected(rubric.validate, p, "absolute", 1, 5)
    assert msg.startswith(f"{p}: line 2: template syntax error: "), msg


def test_context_render_load_unchanged(tmp_path):
    p = write(tmp_path, "r.j2", "{{ mode }} {{ tier }} {{ question }} {{ baseline_response }}")
    ctx = rubric.context(
        "pairwise",
        tier="t",
        question="q",
        response="r",
        baseline_response="b",
        scale_min=1,
        scale_max=5,
    )
    assert ctx["finetuned_response"] == "r"
    assert rubric.render(p, ctx) == "pairwise t q b"
    assert rubric.load(p).render(**ctx) == "pairwise t q b"


def test_static_prefix(tmp_path):
    p = write(
        tmp_path,
        "r.j2",
        "Rate from {{ scale_min }} to {{ scale_max }} ({{ mode }}).\nQ: {{ question }}\n",
    )
    assert rubric.static_prefix(p, "absolute", 1, 5) == "Rate from 1 to 5 (absolute).\nQ: "


@pytest.mark.parametrize("var", ["tier", "question", "response", "baseline_response"])
def test_static_prefix_stops_at_every_item_variable(tmp_path, var):
    p = write(tmp_path, "r.j2", f"Header.\n[{{{{ {var} }}}}] {{{{ question }}}}\n")
    assert rubric.static_prefix(p, "pairwise", 1, 5) == "Header.\n["


def test_static_prefix_empty_when_item_first_or_render_fails(tmp_path):
    first = write(tmp_path, "a.j2", "{{ tier }} static tail")
    assert rubric.static_prefix(first, "absolute", 1, 5) == ""
    broken = write(tmp_path, "b.j2", "Header {{ 1 / 0 }}")
    assert rubric.static_prefix(broken, "absolute", 1, 5) == ""
    undefined = write(tmp_path, "c.j2", "Header {{ baseline_response }}")
    assert rubric.static_prefix(undefined, "absolute", 1, 5) == ""
    assert rubric.static_prefix(tmp_path / "missing.j2", "absolute", 1, 5) == ""


def test_shipped_rubrics_validate():
    prompts = Path(__file__).parent.parent / "prompts"
    for name, mode in [
        ("factory_farming_absolute.j2", "absolute"),
        ("factory_farming_reference.j2", "absolute"),
        ("factory_farming_pairwise.j2", "pairwise"),
    ]:
        rubric.validate(prompts / name, mode, 1, 5)
        assert rubric.static_prefix(prompts / name, mode, 1, 5).strip()


# ----------------------------------------------------------------------------- renderers


def dispatched_names() -> set[str]:
    """Every name tinker-cookbook's get_renderer compares its argument with, found by running it.

    A str whose == records the other side walks the whole if/elif chain and lands on the
    "Unknown renderer" error, having been compared with every built-in name.
    """
    from tinker_cookbook.exceptions import RendererError
    from tinker_cookbook.renderers import get_renderer

    seen: set[str] = set()

    class Spy(str):
        __hash__ = str.__hash__

        def __eq__(self, other: object) -> bool:
            if isinstance(other, str):
                seen.add(other)
            return False

    with pytest.raises(RendererError, match="Unknown renderer"):
        get_renderer(Spy("no-such-renderer"), tokenizer=None)
    return seen


def test_renderer_names_match_what_get_renderer_accepts():
    from tinker_cookbook.exceptions import RendererError
    from tinker_cookbook.renderers import get_renderer

    names = renderer_names()
    assert names == sorted(names)
    assert set(names) == dispatched_names()
    assert {"qwen3_instruct", "llama3", "role_colon", "tml_v0"} <= set(names)
    for name in names:  # each is really accepted (a dummy tokenizer may break the renderer itself)
        try:
            get_renderer(name, tokenizer=None)
        except RendererError as e:
            assert "Unknown renderer" not in str(e), name
        except Exception:
            pass


def test_registered_renderer_is_listed():
    from tinker_cookbook.renderers import register_renderer, unregister_renderer

    register_renderer("Org/custom", lambda tok, ip=None: None)
    try:
        assert "Org/custom" in renderer_names()
        check_renderer("Org/custom", "spec.yaml")
    finally:
        unregister_renderer("Org/custom")
    assert "Org/custom" not in renderer_names()


def test_renderer_names_import_neither_torch_nor_transformers():
    code = (
        "import sys; from spar.models import renderer_names; n = renderer_names(); "
        "print(len(n), sorted(m for m in ('torch', 'transformers', 'tinker', 'tinker_cookbook')"
        " if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.split(maxsplit=1)
    assert int(out[0]) >= 40
    assert out[1].strip() == "[]"


def test_check_renderer(tmp_path):
    check_renderer("qwen3_instruct", "spec.yaml")
    msg = rejected(check_renderer, "qwen3-instruct", "exp/spec.yaml")
    assert msg.startswith(
        "exp/spec.yaml: model.renderer: unknown renderer 'qwen3-instruct' (available: "
    )
    assert "qwen3_instruct" in msg and "llama3" in msg


# ----------------------------------------------------------------------------- local models


def test_check_local_model_names_are_not_paths():
    assert check_local_model("meta-llama/Llama-3.3-70B-Instruct", "s.yaml") is None
    assert check_local_model(SMOLLM2, "s.yaml") is None


def test_check_local_model_errors(tmp_path):
    missing = tmp_path / "nope"
    assert rejected(check_local_model, str(missing), "s.yaml") == (
        f"s.yaml: model.base_model: {missing}: directory not found"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert rejected(check_local_model, str(empty), "s.yaml") == (
        f"s.yaml: model.base_model: {empty}: not a Hugging Face model directory (no config.json)"
    )
    a_file = write(tmp_path, "weights.bin", "x")
    assert "not a directory" in rejected(check_local_model, str(a_file), "s.yaml")
    (empty / "config.json").write_text("{\n  'model_type': 1\n}")
    assert rejected(check_local_model, str(empty), "s.yaml").startswith(
        f"s.yaml: model.base_model: {empty}: config.json is not valid JSON (line 2"
    )


def test_check_local_model_ok(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert check_local_model(str(tmp_path), "s.yaml") == tmp_path


def test_model_files(tmp_path):
    d = tmp_path / "model"
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "abc").write_text("weights")
    files = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "sub/extra.txt",
    ]
    for f in files:
        (d / f).parent.mkdir(parents=True, exist_ok=True)
        (d / f).write_text(f)
    for junk in [
        ".cache/huggingface/download/x.lock",
        ".git/HEAD",
        ".DS_Store",
        "__pycache__/a.pyc",
    ]:
        (d / junk).parent.mkdir(parents=True, exist_ok=True)
        (d / junk).write_text("junk")
    (d / "model-00002-of-00002.safetensors").symlink_to(blobs / "abc")  # HF cache snapshot style
    (d / "sub" / "loop").symlink_to(d / "sub")  # must not recurse forever
    (d / "dangling.bin").symlink_to(tmp_path / "gone")

    got = [f.relative_to(d).as_posix() for f in model_files(d)]
    assert got == sorted([*files, "model-00002-of-00002.safetensors"])
    assert all(f.is_absolute() for f in model_files(d))
    assert rejected(model_files, tmp_path / "nope").endswith("model directory not found")
