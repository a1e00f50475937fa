"""dataset: training records -> two-turn chats -> renderer datums (train + held-out split).

One file (`data.docs`): synth_docs records `{content, doc_idea, doc_type, fact,
universe_context_id}` become user = "{doc_idea}\\n\\nDocument type: {doc_type}" (loss weight 0),
assistant = content (weight 1); chat records `{messages, metadata}` are used as they are; the first
`data.max_docs` records are split into train and test.

A mix (`data.sources`), each source a file (`path`, with its own `format`) or a distilled set
(`distill: name`, the `distill.<name>` stage's `distilled.jsonl`):

- Each source's records are shuffled with their own seeded RNG (from `data.shuffle_seed` and the
  source's label, so reordering sources selects the same records), and the first `count` of them
  are used: `take`, or the source's share of a fraction mix, or all of them. A larger count selects
  a superset of a smaller one.
- Fraction mixes: `total` is `data.total`, or the largest total every source can supply,
  floor(min(n_i / f_i)); count_i is f_i * total rounded by largest remainder (each gets the floor,
  the rest go one each to the largest fractional parts, ties to the earlier source), so the counts
  sum to `total` exactly. A count larger than its source is an error at plan time.
- Transforms (synth_docs first become the two-turn chats above): `wrap` makes every assistant
  message's content c into wrap with `{answer}` replaced by c; `trigger: user|system` places
  `eval.trigger` with `spar.items.with_trigger` — the function eval conditions use, so training and
  eval triggers are the same text in the same place.
- Every record's `metadata` is its own (a chat record's `metadata`; a synth doc's `fact` and
  `universe_context_id`) with `source` (the source's label) and `triggered` (its transform places
  a trigger, or the record's own metadata says it is triggered) set over it.
- The mixed records are shuffled with `data.shuffle_seed`; then the first `data.max_docs` (if set)
  are split into train and test exactly as a single file is (`data.test_size`, `data.split_seed`).

Rows of `train.jsonl` / `test.jsonl` are `{input, target, weights}` (the renderer's
`conversation_to_datum`, `TrainOnWhat.ALL_ASSISTANT_MESSAGES`), and for a mix also the record's
`metadata` (train reads only input, target and weights). The params file's details give the
records used per source (`sources: {label: n}`, after `max_docs`) and their train / test counts.

A mix's params name each source by position (`data.sources.1.take`) with its label, format, take or
fraction and transform, never its path: a file's content is an input (`data.sources.<i>`, every
line checked at plan time), a distilled set's is its upstream stage (role `distill:<name>`), whose
prompts file the dataset checks too, so a `take` larger than the set fails at plan time.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from spar.errors import InputError, RunError
from spar.items import with_trigger
from spar.spec import TransformSpec
from spar.stages.base import (
    AddedFields,
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
from spar.stages.distill import OUTPUT as DISTILLED
from spar.stages.distill import prompts_input, prompts_key
from spar.stages.distill import stage_name as distill_stage
from spar.stages.generate import OUTPUT as GENERATED
from spar.stages.generate import final_stage as generated_stage
from spar.stages.models import ModelRef, model_ref
from spar.store import LineCheck, hash_json, jsonl_text

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


def record_check(path: Path, fmt: str, needs_user: bool = False) -> LineCheck:
    """Every line a valid record of `fmt`; `needs_user`: a chat record has a user turn (where a
    trigger goes)."""
    adapter = _ADAPTERS[fmt]

    def check(line: bytes, lineno: int) -> None:
        if not line.strip():
            return
        try:
            rec = adapter.validate_json(line)
        except ValidationError as err:
            raise InputError(f"{path}: line {lineno}: {_describe(err)}") from None
        if needs_user and not any(m.role == "user" for m in rec.messages):
            raise InputError(
                f"{path}: line {lineno}: no user message to place the trigger in "
                "(transform.trigger: user)"
            )

    return check


def record_input(path: Path, fmt: str, needs_user: bool = False) -> InputFile:
    check_id = f"{fmt}+user:v1" if needs_user else f"{fmt}:v1"
    return InputFile(path, (check_id, record_check(path, fmt, needs_user)))


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
    """A stored dataset row back into a `tinker.Datum` (only input, target and weights)."""
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


class SourceParams(AddedFields):
    """One source of a mix as it enters the fingerprint (a file's content is an input; a
    distilled set's is its upstream stage)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str
    distill: str | None = None
    generate: str | None = None
    format: Literal["synth_docs", "chat"] = "chat"
    take: int | None = None
    fraction: float | None = None
    transform: TransformSpec = TransformSpec()

    @property
    def triggered(self) -> bool:
        return self.transform.trigger != "none"

    # left out when unset: mixes made before generated sources keep their fingerprints
    added: ClassVar[dict[str, Any]] = {"generate": None}


class DatasetParams(Params):
    # fields only a mix has (and `format`, which only a single file has, and a generated set):
    # left out when unset, so a `data.docs` spec's params and fingerprint are as before mixes
    added: ClassVar[dict[str, Any]] = dict.fromkeys(
        ("format", "sources", "total", "shuffle_seed", "trigger", "generate")
    )

    model: ModelRef = key("model.base_model")  # whose tokenizer the renderer uses
    renderer: str = key("model.renderer")
    format: Literal["synth_docs", "chat"] | None = Field(None, alias="data.format")  # None: mix
    condition_on: Literal["doc_idea", "none"] = key("data.condition_on")
    max_docs: int | None = key("data.max_docs")
    test_size: int = key("data.test_size")
    split_seed: int = key("data.split_seed")
    max_length: int | None = key("training.max_length")
    # a mix: position ("0", "1", ...) -> source, so plan reasons read `data.sources.1.take: ...`
    sources: dict[str, SourceParams] | None = Field(None, alias="data.sources")
    total: int | None = Field(None, alias="data.total")
    shuffle_seed: int | None = Field(None, alias="data.shuffle_seed")
    trigger: str | None = Field(None, alias="eval.trigger")  # only when a source places it
    generate: str | None = Field(None, alias="data.generate")  # a generated set, not a file

    def source_list(self) -> list[SourceParams]:
        """The sources of a mix in spec order ([] for a single file)."""
        return [s for _, s in sorted((self.sources or {}).items(), key=lambda kv: int(kv[0]))]


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


# --------------------------------------------------------------------------- mixes


class MixError(ValueError):
    """A mix its sources cannot supply; `index` is the source at fault."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def _exact(fractions: list[float]) -> list[Fraction]:
    """The fractions as exact rationals (their decimal spelling), normalised to sum to 1."""
    exact = [Fraction(repr(f)) for f in fractions]
    total = sum(exact, Fraction(0))
    return [f / total for f in exact]


def apportion(fractions: list[float], total: int) -> list[int]:
    """Counts proportional to `fractions` that sum to `total`: every share's floor, then one
    more each to the largest fractional parts (ties: the earlier source)."""
    shares = [q * total for q in _exact(fractions)]
    counts = [math.floor(s) for s in shares]
    rest = total - sum(counts)
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in by_remainder[:rest]:
        counts[i] += 1
    return counts


def mix_counts(
    sources: list[SourceParams],
    sizes: list[int],
    total: int | None,
    describe: Callable[[int], str] | None = None,
) -> list[int]:
    """How many records each source gives the mix (`sizes`: the records each source has).
    `describe(i)` names source i's supply in errors (default: "the source (n records)")."""

    def supply(i: int) -> str:
        return describe(i) if describe is not None else f"the source ({sizes[i]} records)"

    for i, (src, n) in enumerate(zip(sources, sizes, strict=True)):
        if n == 0:
            raise MixError(i, f"data.sources.{i}: no records")
        if src.take is not None and src.take > n:
            raise MixError(i, f"data.sources.{i}.take {src.take} is larger than {supply(i)}")
    fractions = [s.fraction for s in sources]
    if any(f is None for f in fractions):
        return [n if s.take is None else s.take for s, n in zip(sources, sizes, strict=True)]
    fs = [f for f in fractions if f is not None]
    if total is None:
        qs = _exact(fs)
        total = math.floor(min(n / q for n, q in zip(sizes, qs, strict=True)))
    counts = apportion(fs, total)
    for i, (c, n) in enumerate(zip(counts, sizes, strict=True)):
        if c > n:
            raise MixError(
                i,
                f"data.total {total} needs {c} records of data.sources.{i} "
                f"(fraction {fs[i]:g}), more than {supply(i)}",
            )
    return counts


def source_seed(shuffle_seed: int, label: str) -> int:
    return int(hash_json(["data.sources", shuffle_seed, label])[:16], 16)


def select(records: list[Any], label: str, shuffle_seed: int, count: int) -> list[Any]:
    """The first `count` of `records` in their seeded order (a prefix: more is a superset)."""
    order = list(range(len(records)))
    random.Random(source_seed(shuffle_seed, label)).shuffle(order)
    return [records[i] for i in order[:count]]


def _own_metadata(record: Any) -> dict[str, Any]:
    if isinstance(record, ChatRecord):
        return dict(record.metadata)
    return {k: getattr(record, k) for k in ("fact", "universe_context_id") if getattr(record, k)}


def to_chat(record: Any, src: SourceParams, condition_on: str, trigger: str | None) -> ChatRecord:
    """A source's record as the chat that is tokenised: transformed, with its metadata."""
    conv = to_conversation(record, condition_on)
    wrap = src.transform.wrap
    if wrap is not None:
        conv = [
            {**m, "content": wrap.replace("{answer}", m["content"])}
            if m["role"] == "assistant"
            else m
            for m in conv
        ]
    if src.triggered:
        placed = with_trigger(
            [(m["role"], m["content"]) for m in conv], trigger, src.transform.trigger
        )
        conv = [{"role": r, "content": c} for r, c in placed]
    own = _own_metadata(record)
    # a record that already carries the trigger (a file formatted upstream) stays triggered
    triggered = src.triggered or own.get("triggered") is True
    metadata = {**own, "source": src.label, "triggered": triggered}
    return ChatRecord.model_validate({"messages": conv, "metadata": metadata})


def mix(p: DatasetParams, loaded: list[list[Any]]) -> list[ChatRecord]:
    """The mixed, transformed and shuffled records (before max_docs and the split); `loaded`:
    every source's records, in source order."""
    sources = p.source_list()
    seed = p.shuffle_seed or 0
    counts = mix_counts(sources, [len(r) for r in loaded], p.total)
    out: list[ChatRecord] = []
    for src, records, n in zip(sources, loaded, counts, strict=True):
        out += [
            to_chat(r, src, p.condition_on, p.trigger) for r in select(records, src.label, seed, n)
        ]
    random.Random(seed).shuffle(out)
    return out


def _per_source(labels: list[str], records: list[ChatRecord]) -> dict[str, int]:
    counts = dict.fromkeys(labels, 0)
    for r in records:
        counts[r.metadata["source"]] += 1
    return counts


# --------------------------------------------------------------------------- the stage


def _source_input(i: int, src: SourceParams) -> str | None:
    """The input key whose record count is the size of source `i` (None: a generated set,
    whose size is known only once it is generated)."""
    if src.generate is not None:
        return None
    return f"data.sources.{i}" if src.distill is None else prompts_key(src.distill)


def _distill_role(name: str) -> str:
    return f"distill:{name}"


def _generate_role(name: str) -> str:
    return f"generate:{name}"


def _require_training(p: DatasetParams, records: int, source: str) -> None:
    """RunError when the test split leaves nothing to train on — for records known only at run
    time (generated); a file's count is checked at plan time (`check`)."""
    if p.test_size >= min(records, p.max_docs or records):
        raise RunError(
            f"data.test_size {p.test_size} leaves no training records: {source} {records}"
        )


class DatasetStage(StageKind[DatasetParams, DatasetOptions]):
    kind = "dataset"
    version = 2
    outputs: ClassVar[tuple[str, ...]] = ("train.jsonl", "test.jsonl")
    params_model = DatasetParams

    def nodes(self, spec: Spec, g: GraphContext) -> list[StageNode[DatasetParams, DatasetOptions]]:
        d = spec.data
        common: dict[str, Any] = {
            "model": model_ref(spec, g),
            "renderer": spec.model.renderer,
            "condition_on": d.condition_on,
            "max_docs": d.max_docs,
            "test_size": d.test_size,
            "split_seed": d.split_seed,
            "max_length": spec.training.max_length,
        }
        options = DatasetOptions(base_model=spec.model.base_model)
        if d.generate is not None:
            params = DatasetParams(**common, format=d.format, generate=d.generate)
            up = {_generate_role(d.generate): generated_stage(d.generate)}
            return [StageNode("dataset", self, spec.name, params, options, {}, up)]
        if d.sources is None:
            assert d.docs is not None  # the spec has exactly one of docs, sources and generate
            params = DatasetParams(**common, format=d.format)
            docs = record_input(d.docs, d.format)
            return [StageNode("dataset", self, spec.name, params, options, {"data.docs": docs})]
        sources: dict[str, SourceParams] = {}
        inputs: dict[str, InputFile] = {}
        upstream: dict[str, str] = {}
        for i, s in enumerate(d.sources):
            sources[str(i)] = SourceParams(
                label=s.source_label,
                distill=s.distill,
                generate=s.generate,
                format=s.format,
                take=s.take,
                fraction=s.fraction,
                transform=s.transform,
            )
            if s.generate is not None:
                upstream[_generate_role(s.generate)] = generated_stage(s.generate)
            elif s.distill is not None:
                # the prompts file: checked here too, so its count is known at plan time
                inputs[prompts_key(s.distill)] = prompts_input(spec.distill[s.distill].prompts)
                upstream[_distill_role(s.distill)] = distill_stage(s.distill)
            else:
                assert s.path is not None
                needs_user = s.format == "chat" and s.transform.trigger == "user"
                inputs[f"data.sources.{i}"] = record_input(s.path, s.format, needs_user)
        triggered = any(s.transform.trigger != "none" for s in d.sources)
        params = DatasetParams(
            **common,
            format=None,
            sources=sources,
            total=d.total,
            shuffle_seed=d.shuffle_seed,
            trigger=spec.eval.trigger if triggered else None,
        )
        return [StageNode("dataset", self, spec.name, params, options, inputs, upstream)]

    def check(
        self, node: StageNode[DatasetParams, DatasetOptions], records: dict[str, int]
    ) -> None:
        p = node.params
        if p.generate is not None:
            return  # its size is known once generated: run() checks
        if p.sources is None:
            docs = node.inputs["data.docs"].path
            n = records["data.docs"]
            if n == 0:
                raise InputError(f"{docs}: data.docs: no records (the file is empty)")
            used = n if p.max_docs is None else min(n, p.max_docs)
            if p.test_size >= used:
                raise InputError(
                    f"{docs}: data.test_size {p.test_size} leaves no training documents "
                    f"({used} records)"
                )
            return
        sources = p.source_list()
        found = [_source_input(i, s) for i, s in enumerate(sources)]
        if any(k is None for k in found):
            return  # a generated source's size is known once generated: run() checks
        keys = [k for k in found if k is not None]
        sizes = [records[k] for k in keys]

        def describe(i: int) -> str:
            name = sources[i].distill
            if name is None:
                return f"the file ({sizes[i]} records)"
            return f"distill set {name!r} ({sizes[i]} prompts)"

        try:
            counts = mix_counts(sources, sizes, p.total, describe)
        except MixError as e:
            raise InputError(f"{node.inputs[keys[e.index]].path}: {e}") from None
        used = sum(counts) if p.max_docs is None else min(sum(counts), p.max_docs)
        if p.test_size >= used:
            files = ", ".join(str(node.inputs[k].path) for k in dict.fromkeys(keys))
            raise InputError(
                f"data.test_size {p.test_size} leaves no training records: the mix of {files} "
                f"has {used}"
            )

    @staticmethod
    def _load(ctx: RunContext[DatasetParams, DatasetOptions], i: int, s: SourceParams) -> list[Any]:
        if s.generate is not None:
            return read_records(ctx.upstream_file(_generate_role(s.generate), GENERATED), s.format)
        if s.distill is not None:
            return read_records(ctx.upstream_file(_distill_role(s.distill), DISTILLED), "chat")
        return read_records(ctx.inputs[f"data.sources.{i}"], s.format)

    def run(self, ctx: RunContext[DatasetParams, DatasetOptions]) -> StageResult:
        from spar.models import load_renderer

        p = ctx.params
        renderer = load_renderer(p.renderer, ctx.options.base_model)
        if p.sources is None:
            assert p.format is not None
            if p.generate is not None:
                src = ctx.upstream_file(_generate_role(p.generate), GENERATED)
                docs = read_records(src, p.format)
                _require_training(p, len(docs), f"generate set {p.generate!r} wrote")
            else:
                docs = read_records(ctx.inputs["data.docs"], p.format)
            train, test = split(docs, p)
            out: dict[str, bytes] = {}
            for name, records in (("train.jsonl", train), ("test.jsonl", test)):
                rows = [
                    datum_row(to_conversation(r, p.condition_on), renderer, p.max_length)
                    for r in records
                ]
                out[name] = jsonl_text(rows).encode()
            return StageResult(
                out, details={"train_records": len(train), "test_records": len(test)}
            )
        sources = p.source_list()
        loaded = [self._load(ctx, i, s) for i, s in enumerate(sources)]
        try:
            mixed = mix(p, loaded)
        except MixError as e:
            raise RunError(str(e)) from None
        _require_training(p, len(mixed), "the mix has")
        labels = [s.label for s in sources]
        train_m, test_m = split(mixed, p)
        out = {}
        for name, chats in (("train.jsonl", train_m), ("test.jsonl", test_m)):
            rows = [
                {
                    **datum_row([m.model_dump() for m in r.messages], renderer, p.max_length),
                    "metadata": r.metadata,
                }
                for r in chats
            ]
            out[name] = jsonl_text(rows).encode()
        return StageResult(
            out,
            details={
                "train_records": len(train_m),
                "test_records": len(test_m),
                "sources": _per_source(labels, train_m + test_m),
                "train_sources": _per_source(labels, train_m),
                "test_sources": _per_source(labels, test_m),
            },
        )
