"""generate: data and eval questions written by an LLM, one stage per step.

A `generate:` set `<name>` becomes one stage per step, `generate.<name>.<step>`, each reading the
records of the step before (the first reads the set's roots), and a final stage `generate.<name>`
(spar.stages.generate_output) that removes near-duplicates and writes `generated.jsonl` in the
set's output shape.

Per parent record a step makes ceil(count / per_call) requests; request j asks for
min(per_call, count - j*per_call) items with the step's template rendered with the set's `vars`,
the parent's fields (root fields and every earlier step's item), `n` (items asked for), `index`
(j), `count` and `turns`. Every request is memoised by its key — the generator's settings, the
rendered prompt, n, turns and j — and committed as soon as it settles: raising a count makes only
the new requests, editing a step's template re-asks that step (and its descendants see new
parents), nothing upstream. A reply without a usable item is asked again (`max_retries`), then
kept as `unusable` and its items counted as dropped; raising max_retries asks it again. A call
that failed after the provider's retries is an error: never memoised, the stage stays incomplete
and the next apply asks again.

Output `records.jsonl`: `{"id", "parent", "fields": {...}}` per item, in parent then request
order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from spar.errors import InputError
from spar.items import ID_CHARS
from spar.spec_generate import CALL_VARIABLES, GenerateSpec, UniverseContext
from spar.stages.base import (
    Flags,
    GraphContext,
    InputFile,
    Options,
    Params,
    RunContext,
    StageKind,
    StageNode,
    StageResult,
    key,
    on_device,
)
from spar.stages.models import ModelRef, model_ref
from spar.store import ItemMemo, RunStore, hash_json, jsonl_text, read_jsonl, seed_of

if TYPE_CHECKING:
    from spar.generators import GenRequest
    from spar.spec import Spec

OUTPUT = "generated.jsonl"  # the final stage's output: documents, chat records or questions
RECORDS = "records.jsonl"  # a step's output


def final_stage(name: str) -> str:
    """The stage whose `generated.jsonl` a dataset or an eval reads: `generate.<name>`."""
    return f"generate.{name}"


def step_stage(name: str, step: str) -> str:
    return f"generate.{name}.{step}"


# ---------------------------------------------------------------------------- roots


def read_universe(path: Path) -> list[UniverseContext]:
    """Universe contexts from a YAML or JSON document (one object or a list) or JSONL."""
    from pydantic import ValidationError

    from spar.specfile import read_yaml

    text = path.read_text(encoding="utf-8")
    raw: Any
    try:
        raw = [json.loads(line) for line in text.splitlines() if line.strip()]
        if len(raw) == 1:
            raw = raw[0]
    except json.JSONDecodeError:
        raw = read_yaml(path)
    rows = raw if isinstance(raw, list) else [raw]
    out: list[UniverseContext] = []
    for i, row in enumerate(rows):
        try:
            out.append(UniverseContext.model_validate(row))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise InputError(f"{path}: universe context {i + 1}: {loc}: {err['msg']}") from None
    if not out:
        raise InputError(f"{path}: no universe context")
    return out


def universe_roots(path: Path) -> list[dict[str, Any]]:
    """One root per key fact of each universe context (one per context without key facts)."""
    return [
        {"universe_context_id": u.id, "universe_context": u.universe_context, "fact": fact}
        for u in read_universe(path)
        for fact in u.key_facts or [""]
    ]


def roots_of(g: GenerateSpec) -> list[dict[str, Any]]:
    """The root records of a set: per key fact of each universe context, per property, per
    tier, as given, or one empty root."""
    if g.universe is not None:
        return universe_roots(g.universe)
    if g.properties is not None:
        return [
            {"property": p, "description": d, "num_turns": g.num_turns.get(p, 1)}
            for p, d in g.properties.items()
        ]
    if g.tiers is not None:
        return [{"tier": t, "definition": d} for t, d in g.tiers.items()]
    if g.roots is not None:
        return [dict(r) for r in g.roots]
    return [{}]


class Record(BaseModel):
    """A record of a step's output: its fields (root fields and every step's item so far)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    parent: str
    fields: dict[str, Any]


def root_records(roots: list[dict[str, Any]]) -> list[Record]:
    return [Record(id=hash_json(r)[:ID_CHARS], parent="", fields=r) for r in roots]


# ---------------------------------------------------------------------------- params


class GenerateParams(Params):
    # what enumerates the requests or names the outputs: in the fingerprint; the rendered
    # prompt (vars, roots, parents), n, turns and the request index are in every item key
    collection: ClassVar[frozenset[str]] = frozenset(
        {"set", "step", "count", "per_call", "turns", "vars", "roots"}
    )
    validity: ClassVar[frozenset[str]] = frozenset({"max_retries"})

    set: str = key("generate.name")
    step: str = key("generate.steps.name")
    generator: str = key("generate.generator.kind")
    model: ModelRef = key("generate.generator.model")
    renderer: str | None = key("model.renderer")  # engines only
    max_tokens: int = key("generate.generator.max_tokens")
    system_prompt: str | None = key("generate.generator.system_prompt")
    temperature: float | None = key("generate.generator.temperature")  # engines only
    seed: int | None = key("generate.generator.seed")  # engines only
    max_retries: int = key("generate.generator.max_retries")
    count: int = key("generate.steps.count")
    per_call: int = key("generate.steps.per_call")
    turns: int | None = key("generate.steps.turns")
    vars: dict[str, Any] = key("generate.vars")
    # the first step's roots (None: later steps, and a universe file, which is an input)
    roots: tuple[dict[str, Any], ...] | None = key("generate.roots")


class GenerateOptions(Options):
    model: str  # the model name (or local directory) the generator is given
    concurrency: int = 8
    parents_max: int = 1  # for the cost preview before the step before has run


def _allowed(g: GenerateSpec, i: int) -> list[str]:
    return [*g.vars, *g.root_fields(), *(s.name for s in g.steps[:i]), *CALL_VARIABLES]


def validate(spec: Spec, where: str) -> None:
    """Every generate set's generator kind, templates (every variable in any branch) and
    universe file, before any work. InputError naming the file and field."""
    from spar import prompting
    from spar.generators import generator_kinds

    for name, g in spec.generate.items():
        kinds = generator_kinds()
        if g.generator.kind not in kinds:
            raise InputError(
                f"{where}: generate.{name}.generator.kind: unknown generator "
                f"{g.generator.kind!r} (available: {', '.join(kinds)})"
            )
        if g.roots is not None:
            keys = set(g.roots[0])
            for j, r in enumerate(g.roots):
                if set(r) != keys:
                    raise InputError(
                        f"{where}: generate.{name}.roots.{j}: fields {sorted(r)} differ from "
                        f"the first root's {sorted(keys)}"
                    )
        if g.universe is not None:
            read_universe(g.universe)
        for i, s in enumerate(g.steps):
            prompting.check(s.template, _allowed(g, i), f"generate.{name}.steps.{i}.template")


def _generator_model(spec: Spec, g: GenerateSpec, gr: GraphContext) -> tuple[ModelRef, str]:
    from spar.generators import ANTHROPIC, DEFAULT_CLAUDE

    if g.generator.kind == ANTHROPIC:
        name = g.generator.model or DEFAULT_CLAUDE
        return ModelRef(name=name), name
    if g.generator.model is None or g.generator.model == spec.model.base_model:
        return model_ref(spec, gr), spec.model.base_model
    return ModelRef(name=g.generator.model), g.generator.model


# ---------------------------------------------------------------------------- requests


def requests_for(
    p: GenerateParams, template: Path, parents: list[Record], memo: ItemMemo
) -> list[tuple[Record, int, str, GenRequest]]:
    """(parent, request index, item key, request) for every request of the step."""
    from spar import prompting
    from spar.generators import GenRequest

    out = []
    what = f"generate.{p.set}.{p.step} template"
    for parent in parents:
        turns = p.turns or int(parent.fields.get("num_turns") or 1)
        for j in range(math.ceil(p.count / p.per_call)):
            n = min(p.per_call, p.count - j * p.per_call)
            ctx = {**p.vars, **parent.fields, "n": n, "index": j, "count": p.count, "turns": turns}
            prompt = prompting.render(template, ctx, what)
            k = memo.key({"prompt": prompt, "n": n, "turns": turns, "index": j})
            seed = seed_of(k)
            out.append((parent, j, k, GenRequest(prompt=prompt, n=n, turns=turns, seed=seed)))
    return out


def reusable(p: GenerateParams, memoised: dict[str, Any] | None) -> bool:
    from spar.generators import GenReply

    if memoised is None:
        return False
    reply = GenReply.model_validate(memoised)
    # an unusable reply stands unless the retry budget was raised past what it used
    return reply.status == "ok" or reply.attempts >= 1 + p.max_retries


def parents_of(
    p: GenerateParams, universe: Path | None, parent_records: Path | None
) -> list[Record] | None:
    """The records a step writes for: its roots (given, or from the universe file) for the first
    step, else the step before's records (None while they do not exist)."""
    if p.roots is not None:
        return root_records(list(p.roots))
    if universe is not None:
        return root_records(universe_roots(universe))
    if parent_records is not None and parent_records.exists():
        return [Record.model_validate(r) for r in read_jsonl(parent_records)]
    return None


class GenerateStage(StageKind[GenerateParams, GenerateOptions]):
    kind = "generate"
    version = 1
    item_version = 1
    outputs: ClassVar[tuple[str, ...]] = (RECORDS,)
    params_model = GenerateParams

    def devices(self, node: StageNode[GenerateParams, GenerateOptions]) -> frozenset[str]:
        from spar.engines import engine_device
        from spar.generators import ANTHROPIC

        kind = node.params.generator
        return on_device(None if kind == ANTHROPIC else engine_device(kind))

    def nodes(
        self, spec: Spec, g: GraphContext
    ) -> list[StageNode[GenerateParams, GenerateOptions]]:
        from spar.generators import ANTHROPIC

        out: list[StageNode[GenerateParams, GenerateOptions]] = []
        for name, gs in spec.generate.items():
            gen = gs.generator
            engine = gen.kind != ANTHROPIC
            ref, model = _generator_model(spec, gs, g)
            roots = None if gs.universe is not None else tuple(roots_of(gs))
            parents = len(roots) if roots is not None else len(roots_of(gs))
            for i, s in enumerate(gs.steps):
                params = GenerateParams(
                    set=name,
                    step=s.name,
                    generator=gen.kind,
                    model=ref,
                    renderer=spec.model.renderer if engine else None,
                    max_tokens=s.max_tokens or gen.max_tokens,
                    system_prompt=gen.system_prompt,
                    temperature=gen.temperature if engine else None,
                    seed=gen.seed if engine else None,
                    max_retries=gen.max_retries,
                    count=s.count,
                    per_call=s.per_call,
                    turns=s.turns,
                    vars=gs.vars,
                    roots=roots if i == 0 else None,
                )
                inputs = {"template": InputFile(s.template)}
                if i == 0 and gs.universe is not None:
                    inputs["universe"] = InputFile(gs.universe)
                upstream = {"parent": step_stage(name, gs.steps[i - 1].name)} if i else {}
                options = GenerateOptions(
                    model=model, concurrency=gen.concurrency, parents_max=parents
                )
                out.append(
                    StageNode(
                        step_stage(name, s.name), self, spec.name, params, options, inputs, upstream
                    )
                )
                parents *= s.count
        return out

    def estimate(
        self,
        node: StageNode[GenerateParams, GenerateOptions],
        store: RunStore,
        upstream_fresh: bool,
        flags: Flags | None = None,
    ) -> dict[str, int]:
        """Generator calls still to make: exact (memo-aware) when the parents are known (the
        first step, or the step before is fresh), else an upper bound."""
        p, o = node.params, node.options
        template = node.inputs["template"].path
        universe = node.inputs.get("universe")
        before = None
        if "parent" in node.upstream and upstream_fresh:
            before = store.stage_dir(*node.upstream_at("parent")) / RECORDS
        parents = parents_of(p, universe.path if universe else None, before)
        if parents is None:
            calls = o.parents_max * math.ceil(p.count / p.per_call)
        else:
            memo = store.memo(self.kind, self.item_version, p.item_basis())
            reqs = requests_for(p, template, parents, memo)
            done = memo.get_many([k for _, _, k, _ in reqs])
            calls = sum(not reusable(p, done.get(k)) for _, _, k, _ in reqs)
        return {"generate_calls": calls, "generate_tokens_max": calls * p.max_tokens}

    def run(self, ctx: RunContext[GenerateParams, GenerateOptions]) -> StageResult:
        from spar.generators import GenReply, make_generator

        p, o = ctx.params, ctx.options
        memo = ctx.memo()
        before = ctx.upstream_file("parent", RECORDS) if "parent" in ctx.upstream else None
        parents = parents_of(p, ctx.inputs.get("universe"), before)
        assert parents is not None, "the step before has run"
        reqs = requests_for(p, ctx.inputs["template"], parents, memo)
        keys = [k for _, _, k, _ in reqs]
        replies = memo.get_many(keys)
        todo = [i for i, k in enumerate(keys) if not reusable(p, replies.get(k))]
        if todo:
            generator = make_generator(
                p.generator,
                o.model,
                renderer=p.renderer or "",
                workdir=ctx.scratch("engines", p.generator),
                max_tokens=p.max_tokens,
                system_prompt=p.system_prompt,
                temperature=p.temperature if p.temperature is not None else 1.0,
                max_retries=p.max_retries,
            )

            def keep(j: int, reply: GenReply) -> None:
                k = keys[todo[j]]
                if reply.status != "error":
                    memo.put(k, reply.model_dump())
                replies[k] = reply.model_dump()

            generator.generate_many([reqs[i][3] for i in todo], o.concurrency, keep)
        rows: list[dict[str, Any]] = []
        dropped = unusable = errors = 0
        for parent, j, k, req in reqs:
            got = replies.get(k)
            reply = (
                GenReply.model_validate(got)
                if got is not None
                else GenReply(items=[], status="error", problem="no reply")
            )
            errors += reply.status == "error"
            unusable += reply.status == "unusable"
            dropped += req.n - len(reply.items) if reply.status != "error" else 0
            for pos, item in enumerate(reply.items):
                fields = {**parent.fields, p.step: item}
                rid = hash_json([parent.id, p.step, j, pos])[:ID_CHARS]
                rows.append(Record(id=rid, parent=parent.id, fields=fields).model_dump())
        return StageResult(
            {RECORDS: jsonl_text(rows).encode()},
            errors=errors,
            details={
                "requests": len(reqs),
                "asked": len(todo),
                "items": len(rows),
                "dropped_items": dropped,
                "unusable_requests": unusable,
                "errors": errors,
            },
        )
