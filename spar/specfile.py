"""Reading a spec file: strict YAML (a key given twice is an error), one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, ScalarNode

from spar.errors import InputError

_MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that rejects a mapping key written twice in the same mapping.

    PyYAML keeps the last value silently, so `training: {lora_rank: 8, lora_rank: 32}` would
    train with rank 32 and nobody would notice the typo. Keys brought in by a `<<:` merge may
    still be overridden by keys written in the mapping itself (that is what merging is for).
    """

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: the base class reports it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    shown = key_node.value if isinstance(key_node, ScalarNode) else key
                    raise ConstructorError(
                        problem=f"key '{shown}' given twice (first at line {first})",
                        problem_mark=key_node.start_mark,
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """The top-level mapping of a spec file, or InputError naming the file and the line."""
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory (expected a YAML spec file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        raw = yaml.load(text, Loader=StrictLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "YAML"
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise InputError(f"{path}: {where}: {problem}") from None
    if raw is None:
        raise InputError(f"{path}: empty file (expected a mapping of spec fields)")
    if not isinstance(raw, dict):
        raise InputError(f"{path}: top level must be a mapping, got a {type(raw).__name__}")
    return raw
