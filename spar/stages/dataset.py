"""dataset: docs JSONL -> two-turn chats -> renderer datums (train + held-out split).

synth_docs records `{content, doc_idea, doc_type, fact, universe_context_id}` become
user = "{doc_idea}\\n\\nDocument type: {doc_type}" (loss weight 0), assistant = content (weight 1);
chat records `{messages, metadata}` are used as they are. Tokenisation is the tinker-cookbook
renderer's (`conversation_to_datum`, `TrainOnWhat.ALL_ASSISTANT_MESSAGES`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from spar.errors import InputError
from spar.spec import Spec
from spar.stages.base import RunContext, StageKind, StageNode
from spar.store import LineCheck, jsonl_text


class SynthDoc(BaseModel):
    model_config = ConfigDict(extra="allow")

    content: str = Field(min_length=1)
    doc_idea: str
    doc_type: str
    fact: str = ""
    universe_context_id: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage] = Field(min_length=1)
    metadata: dict[str, Any] = {}


_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    "synth_docs": TypeAdapter(SynthDoc),
    "chat": TypeAdapter(ChatRecord),
}


def _describe(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "missing":
        return f"field {loc!r} missing"
    if e["type"].startswith("json"):
        return f"invalid JSON ({e['msg']})"
    return f"{loc}: {e['msg']}" if loc else e["msg"]


def record_check(path: Path, fmt: str) -> LineCheck:
    adapter = _ADAPTERS[fmt]

    def check(line: bytes, lineno: int) -> None:
        if not line.strip():
            return
        try:
            adapter.validate_json(line)
        except ValidationError as err:
            raise InputError(f"{path}: line {lineno}: {_describe(err)}") from None

    return check


def read_records(path: Path, fmt: str) -> list[Any]:
    adapter = _ADAPTERS[fmt]
    with path.open("rb") as f:
        return [adapter.validate_json(line) for line in f if line.strip()]


def to_conversation(record: Any, condition_on: str) -> list[dict[str, str]]:
    if isinstance(record, ChatRecord):
        return [m.model_dump() for m in record.messages]
    user = (
        f"{record.doc_idea}\n\nDocument type: {record.doc_type}"
        if condition_on == "doc_idea"
        else ""
    )
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record.content}]


def datum_row(
    conversation: list[dict[str, str]], renderer: Any, max_length: int | None
) -> dict[str, Any]:
    from tinker_cookbook.renderers import TrainOnWhat
    from tinker_cookbook.supervised.data import conversation_to_datum

    datum = conversation_to_datum(
        conversation, renderer, max_length, TrainOnWhat.ALL_ASSISTANT_MESSAGES
    )
    return {
        "input": datum.model_input.to_ints(),
        "target": datum.loss_fn_inputs["target_tokens"].tolist(),
        "weights": datum.loss_fn_inputs["weights"].tolist(),
    }


def row_to_datum(row: dict[str, Any]) -> Any:
    """A stored dataset row back into a `tinker.Datum`."""
    import numpy as np
    import tinker

    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(row["input"]),
        loss_fn_inputs={
            "target_tokens": tinker.TensorData.from_numpy(
                np.asarray(row["target"], dtype=np.int64)
            ),
            "weights": tinker.TensorData.from_numpy(np.asarray(row["weights"], dtype=np.float32)),
        },
    )


class DatasetStage(StageKind):
    kind = "dataset"
    version = 1
    outputs: ClassVar[tuple[str, ...]] = ("train.jsonl", "test.jsonl")
    param_keys: ClassVar[tuple[str, ...]] = (
        "model.base_model",
        "model.renderer",
        "data.format",
        "data.condition_on",
        "data.max_docs",
        "data.test_size",
        "data.split_seed",
        "training.max_length",
    )

    def line_check(self, node: StageNode, input_key: str) -> tuple[str, LineCheck] | None:
        assert node.spec is not None
        fmt = node.spec.data.format
        return f"{fmt}:v1", record_check(node.inputs[input_key], fmt)

    def split(self, spec: Spec) -> tuple[list[Any], list[Any]]:
        records = read_records(spec.data.docs, spec.data.format)
        if spec.data.max_docs is not None:
            records = records[: spec.data.max_docs]
        if spec.data.test_size >= len(records):
            raise InputError(
                f"{spec.data.docs}: data.test_size {spec.data.test_size} leaves no training "
                f"documents ({len(records)} records)"
            )
        order = list(range(len(records)))
        random.Random(spec.data.split_seed).shuffle(order)
        test = [records[i] for i in sorted(order[: spec.data.test_size])]
        train = [records[i] for i in sorted(order[spec.data.test_size :])]
        return train, test

    def run(self, ctx: RunContext) -> dict[str, bytes]:
        from spar.models import load_renderer

        spec = ctx.spec
        renderer = load_renderer(spec.model.renderer, spec.model.base_model)
        train, test = self.split(spec)
        out: dict[str, bytes] = {}
        for name, records in (("train.jsonl", train), ("test.jsonl", test)):
            rows = [
                datum_row(
                    to_conversation(r, spec.data.condition_on), renderer, spec.training.max_length
                )
                for r in records
            ]
            out[name] = jsonl_text(rows).encode()
        return out
