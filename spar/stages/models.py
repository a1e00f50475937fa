"""How a stage names a model in its parameters: by name, or by the content of a local directory.

A local model directory enters fingerprints and item keys by its content (every file's hash,
stat-cached), never by its path: moving it changes nothing, editing its weights re-runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from spar.spec import Spec
    from spar.stages.base import GraphContext


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None  # a model the engine knows by name
    content: str | None = None  # content hash of a local model directory


def is_local(base_model: str) -> bool:
    return base_model.startswith("/")


def model_ref(spec: Spec, g: GraphContext) -> ModelRef:
    from spar.models import model_files

    base = spec.model.base_model
    if not is_local(base):
        return ModelRef(name=base)
    root = Path(base)
    return ModelRef(content=g.store.hashes.hash_dir(root, model_files(root)))
