"""generated: a generate set's last records, near-duplicates removed, in the set's output shape.

One node per set, `generate.<name>`, reading its last step's `records.jsonl`; output
`generated.jsonl` (spar.stages.generate.OUTPUT):

- `records`: `{"id", ...fields}` as generated;
- `synth_docs`: `{content, doc_idea, doc_type, fact, universe_context_id}` (+ `id`), what
  `data.docs` takes;
- `chat`: `{"messages": [user, assistant], "metadata": {"source": name, "id"}}`;
- `questions`: `{"tier", "question"}` or `{"tier", "turns": [...]}`, what `eval.questions` takes
  (copy it into the repository and point `eval.questions` at it to freeze a generated eval).

`dedup:` removes near-duplicates (MinHash LSH over word shingles of one field, threshold in the
spec); a questions set always drops exact repeats (an eval file may not repeat a question). The
params file counts both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from spar.spec_generate import DedupSpec
from spar.stages.base import (
    GraphContext,
    Options,
    Params,
    RunContext,
    StageKind,
    StageNode,
    StageResult,
    key,
)
from spar.stages.generate import OUTPUT, RECORDS, Record, final_stage, step_stage
from spar.store import jsonl_text, read_jsonl

if TYPE_CHECKING:
    from spar.spec import Spec


class OutputParams(Params):
    set: str = key("generate.name")  # the chat records' metadata.source
    output: Literal["records", "synth_docs", "chat", "questions"] = key("generate.output")
    user: str | None = key("generate.chat.user")
    assistant: str | None = key("generate.chat.assistant")
    tier: str | None = key("generate.tier")  # questions: the field naming each one's tier
    item: str = key("generate.steps.last")  # the last step's field (a question's text)
    dedup: DedupSpec | None = key("generate.dedup")
    dedup_field: str = key("generate.dedup.field")


class OutputOptions(Options):
    pass


def _text(v: Any) -> str:
    return "\n\n".join(v) if isinstance(v, list) else str(v)


def shape(p: OutputParams, r: Record) -> dict[str, Any]:
    f = r.fields
    if p.output == "synth_docs":
        return {
            "content": f["content"],
            "doc_idea": _text(f["doc_idea"]),
            "doc_type": _text(f["doc_type"]),
            "fact": _text(f.get("fact", "")),
            "universe_context_id": str(f.get("universe_context_id", "")),
            "id": r.id,
        }
    if p.output == "chat":
        assert p.user is not None
        return {
            "messages": [
                {"role": "user", "content": _text(f[p.user])},
                {"role": "assistant", "content": _text(f[p.assistant or ""])},
            ],
            "metadata": {"source": p.set, "id": r.id},
        }
    if p.output == "questions":
        assert p.tier is not None
        q = f[p.item]
        body = {"turns": q} if isinstance(q, list) and len(q) > 1 else {"question": _text(q)}
        return {"tier": str(f[p.tier]), **body}
    return {"id": r.id, **f}


class GenerateOutputStage(StageKind[OutputParams, OutputOptions]):
    kind = "generated"
    version = 1
    outputs: ClassVar[tuple[str, ...]] = (OUTPUT,)
    params_model = OutputParams

    def nodes(self, spec: Spec, g: GraphContext) -> list[StageNode[OutputParams, OutputOptions]]:
        out: list[StageNode[OutputParams, OutputOptions]] = []
        for name, gs in spec.generate.items():
            user, assistant = gs.chat_fields() if gs.output == "chat" else (None, None)
            last = gs.steps[-1].name
            params = OutputParams(
                set=name,
                output=gs.output,
                user=user,
                assistant=assistant,
                tier=gs.tier_field() if gs.output == "questions" else None,
                item=last,
                dedup=gs.dedup,
                dedup_field=(gs.dedup.field if gs.dedup and gs.dedup.field else last),
            )
            upstream = {"records": step_stage(name, last)}
            out.append(
                StageNode(final_stage(name), self, spec.name, params, OutputOptions(), {}, upstream)
            )
        return out

    def run(self, ctx: RunContext[OutputParams, OutputOptions]) -> StageResult:
        from spar.dedup import near_duplicates

        p = ctx.params
        rows_in = read_jsonl(ctx.upstream_file("records", RECORDS))
        records = [Record.model_validate(r) for r in rows_in]
        removed: set[int] = set()
        if p.dedup is not None:
            texts = [_text(r.fields[p.dedup_field]) for r in records]
            d = p.dedup
            removed = set(near_duplicates(texts, d.threshold, d.num_perm, d.shingle))
        repeats = 0
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        for i, r in enumerate(records):
            if i in removed:
                continue
            row = shape(p, r)
            if p.output == "questions":
                ident = _text(row.get("turns", row.get("question")))
                if ident in seen:
                    repeats += 1
                    continue
                seen.add(ident)
            rows.append(row)
        return StageResult(
            {OUTPUT: jsonl_text(rows).encode()},
            details={
                "records": len(rows),
                "near_duplicates_removed": len(removed),
                "repeats_removed": repeats,
            },
        )
