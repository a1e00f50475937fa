"""dataset: docs JSONL -> two-turn chats -> renderer datums (train + held-out split).

synth_docs records `{content, doc_idea, doc_type, fact, universe_context_id}` become
user = "{doc_idea}\\n\\nDocument type: {doc_type}" (loss weight 0), assistant = content (weight 1);
chat records `{messages, metadata}` are used as they are. Tokenisation is the tinker-cookbook
renderer's (`conversation_to_datum`, `TrainOnWhat.ALL_ASSISTANT_MESSAGES`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from spar.errors import InputError
from spar.stages.base import (
    GraphContext,
    InputFile,
    Options,
    Params,
    RunContext,
    StageKind,
    StageNode,
    StageResult,
    key,
)
from spar.stages.models import ModelRef, model_ref
from spar.store import LineCheck, jsonl_text

if TYPE_CHECKING:
    from spar.spec import Spec


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

    messages: list[Any] = list(conversation)  # renderer Message dicts
    datum = conversation_to_datum(
        messages, renderer, max_length, TrainOnWhat.ALL_ASSISTANT_MESSAGES
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


class DatasetParams(Params):
    model: ModelRef = key("model.base_model")  # whose tokenizer the renderer uses
    renderer: str = key("model.renderer")
    format: Literal["synth_docs", "chat"] = key("data.format")
    condition_on: Literal["doc_idea", "none"] = key("data.condition_on")
    max_docs: int | None = key("data.max_docs")
    test_size: int = key("data.test_size")
    split_seed: int = key("data.split_seed")
    max_length: int | None = key("training.max_length")


class DatasetOptions(Options):
    base_model: str  # where the tokenizer is loaded from (a name or a local directory)


def split(records: list[Any], p: DatasetParams) -> tuple[list[Any], list[Any]]:
    if p.max_docs is not None:
        records = records[: p.max_docs]
    order = list(range(len(records)))
    random.Random(p.split_seed).shuffle(order)
    test = [records[i] for i in sorted(order[: p.test_size])]
    train = [records[i] for i in sorted(order[p.test_size :])]
    return train, test


class DatasetStage(StageKind[DatasetParams, DatasetOptions]):
    kind = "dataset"
    version = 2
    outputs: ClassVar[tuple[str, ...]] = ("train.jsonl", "test.jsonl")
    params_model = DatasetParams

    def nodes(self, spec: Spec, g: GraphContext) -> list[StageNode[DatasetParams, DatasetOptions]]:
        d = spec.data
        params = DatasetParams(
            model=model_ref(spec, g),
            renderer=spec.model.renderer,
            format=d.format,
            condition_on=d.condition_on,
            max_docs=d.max_docs,
            test_size=d.test_size,
            split_seed=d.split_seed,
            max_length=spec.training.max_length,
        )
        docs = InputFile(d.docs, (f"{d.format}:v1", record_check(d.docs, d.format)))
        return [
            StageNode(
                "dataset",
                self,
                spec.name,
                params,
                DatasetOptions(base_model=spec.model.base_model),
                {"data.docs": docs},
            )
        ]

    def check(
        self, node: StageNode[DatasetParams, DatasetOptions], records: dict[str, int]
    ) -> None:
        p, docs = node.params, node.inputs["data.docs"].path
        n = records["data.docs"]
        if n == 0:
            raise InputError(f"{docs}: data.docs: no records (the file is empty)")
        used = n if p.max_docs is None else min(n, p.max_docs)
        if p.test_size >= used:
            raise InputError(
                f"{docs}: data.test_size {p.test_size} leaves no training documents "
                f"({used} records)"
            )

    def run(self, ctx: RunContext[DatasetParams, DatasetOptions]) -> StageResult:
        from spar.models import load_renderer

        p = ctx.params
        renderer = load_renderer(p.renderer, ctx.options.base_model)
        train, test = split(read_records(ctx.inputs["data.docs"], p.format), p)
        out: dict[str, bytes] = {}
        for name, records in (("train.jsonl", train), ("test.jsonl", test)):
            rows = [
                datum_row(to_conversation(r, p.condition_on), renderer, p.max_length)
                for r in records
            ]
            out[name] = jsonl_text(rows).encode()
        return StageResult(out, details={"train_records": len(train), "test_records": len(test)})
