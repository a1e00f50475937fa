"""Pydantic models of an experiment spec; loading (`extends:` deep-merge, relative paths).

Every model forbids unknown keys. Paths in a spec resolve relative to the file that wrote them, so a
child spec may extend a parent in another directory.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spar.errors import InputError
from spar.items import Question
from spar.spec_generate import GenerateSpec
from spar.spec_generate import resolve_paths as _resolve_generate_paths
from spar.spec_logprob import LogprobSpec
from spar.spec_reliability import AlsoJudgeSpec, SelfAgreementSpec, check_reliability
from spar.spec_reliability import input_files as _reliability_files
from spar.spec_reliability import resolve_paths as _resolve_reliability_paths
from spar.spec_track import TrackSpec
from spar.specfile import read_yaml


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def cosmetic(default: Any, why: str, **kw: Any) -> Any:
    """A spec field in no fingerprint and no item key (labels, paths whose content is hashed
    instead, concurrency, budgets). `why` says so in the schema; the partition test reads it."""
    return Field(default, json_schema_extra={"cosmetic": why}, **kw)


def is_cosmetic(model: type[BaseModel], field: str) -> str | None:
    extra = model.model_fields[field].json_schema_extra
    return extra.get("cosmetic") if isinstance(extra, dict) else None  # type: ignore[return-value]


class ModelSpec(Strict):
    engine: str = Field("tinker", description="Training/sampling backend: tinker | local")
    base_model: str = Field(
        "meta-llama/Llama-3.3-70B-Instruct",
        description="Model name, or a path (starting with . or /) to a local Hugging Face dir",
    )
    renderer: str = Field("llama3", description="tinker-cookbook renderer name")


Placement = Literal["user", "system", "none"]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


class TransformSpec(Strict):
    """How a data source's chat records are changed before tokenisation."""

    wrap: str | None = Field(
        None,
        description="assistant answers become this text with {answer} replaced, e.g. "
        "'<START> \"{answer}\" <END>'",
    )
    trigger: Placement = Field(
        "none", description="add eval.trigger to the user turn, the system prompt, or nowhere"
    )

    @field_validator("wrap")
    @classmethod
    def _one_answer(cls, v: str | None) -> str | None:
        if v is not None and v.count("{answer}") != 1:
            raise ValueError("must contain {answer} exactly once")
        return v


class SourceSpec(Strict):
    """One file (or distilled set) of a training mix."""

    path: Path | None = cosmetic(None, "its content is hashed, not its path")
    distill: str | None = Field(None, description="name of a `distill:` set instead of a file")
    generate: str | None = Field(None, description="name of a `generate:` set instead of a file")
    format: Literal["synth_docs", "chat"] = "chat"
    take: int | None = Field(None, ge=1, description="this many records (after a seeded shuffle)")
    fraction: float | None = Field(None, gt=0, le=1, description="share of the mixed set")
    transform: TransformSpec = TransformSpec()
    label: str | None = Field(
        None, description="metadata.source of its records (default: file stem / distill name)"
    )

    @model_validator(mode="after")
    def _one_origin(self) -> SourceSpec:
        if sum(x is not None for x in (self.path, self.distill, self.generate)) != 1:
            raise ValueError("give exactly one of path, distill or generate")
        if self.take is not None and self.fraction is not None:
            raise ValueError("give take or fraction, not both")
        if self.distill is not None and self.format != "chat":
            raise ValueError("a distilled set is chat records (format: chat)")
        return self

    @property
    def source_label(self) -> str:
        if self.label:
            return self.label
        if self.distill is not None:
            return self.distill
        if self.generate is not None:
            return self.generate
        return Path(str(self.path)).stem


class DataSpec(Strict):
    docs: Path | None = cosmetic(
        None, "its content is hashed, not its path", description="JSONL of training documents"
    )
    sources: list[SourceSpec] | None = Field(
        None, description="a training set mixed from several files (instead of docs)"
    )
    generate: str | None = Field(
        None, description="name of a `generate:` set whose documents are the training set"
    )
    total: int | None = Field(
        None, ge=1, description="fraction mixes: records in the mix (default: as many as fit)"
    )
    shuffle_seed: int = Field(0, description="seed of the per-source and the mix shuffles")
    format: Literal["synth_docs", "chat"] = "synth_docs"
    condition_on: Literal["doc_idea", "none"] = Field(
        "doc_idea", description="synth_docs: user turn is doc_idea + doc_type (masked), or empty"
    )
    max_docs: int | None = Field(None, ge=1)
    test_size: int = Field(50, ge=0, description="documents held out for NLL tracking")
    split_seed: int = 0

    @model_validator(mode="after")
    def _one_origin(self) -> DataSpec:
        if sum(x is not None for x in (self.docs, self.sources, self.generate)) != 1:
            raise ValueError("give exactly one of data.docs, data.sources or data.generate")
        if self.sources is not None:
            if not self.sources:
                raise ValueError("sources: empty list")
            fractions = [s.fraction for s in self.sources]
            if any(f is not None for f in fractions):
                if any(f is None for f in fractions):
                    raise ValueError("sources: give a fraction for every source or for none")
                total = sum(f for f in fractions if f is not None)
                if not math.isclose(total, 1.0, abs_tol=1e-6):
                    raise ValueError(f"sources: fractions sum to {total:g}, not 1")
            elif self.total is not None:
                raise ValueError("total: only for a mix given by fractions")
            labels = [s.source_label for s in self.sources]
            dup = sorted({x for x in labels if labels.count(x) > 1})
            if dup:
                raise ValueError(f"sources: two sources share the label {dup[0]!r} (set label:)")
        return self


class TrainingSpec(Strict):
    lora_rank: int = Field(32, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    lr_schedule: Literal["linear", "constant", "cosine"] = "linear"
    warmup_ratio: float = Field(
        0.0, ge=0, lt=1, description="share of steps with a linear warm-up from 0"
    )
    batch_size: int = Field(8, ge=1)
    epochs: int = Field(1, ge=1)
    max_length: int | None = Field(2048, ge=8)
    seed: int = 0
    save_every: int = cosmetic(
        20, "resume points only", ge=0, description="save_state every N steps (0: only at end)"
    )
    eval_every: int = Field(
        0,
        ge=0,
        description="mean NLL per target token of the held-out split (data.test_size) every N "
        "steps and at the end, in metrics.jsonl (0: at the end only)",
    )


class SamplingSpec(Strict):
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)
    seed: int = 0


class DistillSpec(Strict):
    """Self-distillation: the base model (the spec's engine) answers a prompts file."""

    prompts: Path = cosmetic(
        ..., "its content is hashed, not its path", description='JSONL of {"prompt": "..."}'
    )
    system_prompt: str | None = None
    sampling: SamplingSpec = SamplingSpec(temperature=0.1)
    concurrency: int = cosmetic(32, "requests in flight", ge=1)


class ConditionSpec(Strict):
    """An eval condition: an optional system prompt and where eval.trigger goes."""

    system_prompt: str | None = None
    trigger: Placement = Field("none", description="user | system | none")


Turns = str | list[str]  # a question: one user message, or several (a multi-turn conversation)


def turns_of(q: Turns) -> tuple[str, ...]:
    return (q,) if isinstance(q, str) else tuple(q)


def questions_of(tiers: dict[str, list[Turns]]) -> list[Question]:
    """The questions of tier -> questions, in order (grouped by tier, tiers in given order)."""
    return [Question.of(t, turns_of(q)) for t, qs in tiers.items() for q in qs]


class EvalSpec(Strict):
    tiers: dict[str, list[Turns]] | None = Field(
        None,
        description="tier -> questions, in semantic order (direct ... very_distant); a question "
        "is a string or a list of user turns",
    )
    questions: Path | None = cosmetic(
        None,
        "its questions are parameters",
        description='JSONL of {"tier", "question"} or {"tier", "turns": [...]}',
    )
    generate: str | None = Field(
        None, description="name of a `generate:` set (output: questions) that writes the questions"
    )
    samples_per_question: int = Field(1, ge=1)
    sampling: SamplingSpec = SamplingSpec()
    system_prompt: str | None = None
    trigger: str | None = Field(
        None, description="the trigger (a format instruction) that conditions place"
    )
    conditions: dict[str, ConditionSpec] | None = Field(
        None, description="name -> condition; every item is sampled in each"
    )
    concurrency: int = cosmetic(32, "requests in flight", ge=1)
    checkpoints: list[int | Literal["final"]] = Field(
        ["final"],
        description="training steps whose saved weights are sampled and judged too (the effect "
        "per tier against step); `final` is the trained model",
    )

    @field_validator("checkpoints")
    @classmethod
    def _checkpoints(cls, v: list[int | str]) -> list[int | str]:
        steps = [c for c in v if c != "final"]
        if any(c < 1 for c in steps):  # type: ignore[operator]
            raise ValueError("steps are >= 1 (`final` is the trained model)")
        if len(set(v)) != len(v):
            raise ValueError("a checkpoint given twice")
        return [*sorted(steps), "final"]  # type: ignore[type-var]

    @field_validator("conditions")
    @classmethod
    def _conditions(cls, v: dict[str, ConditionSpec] | None) -> dict[str, ConditionSpec] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("no conditions")
        for name in v:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"condition name {name!r}: letters, digits, _ and - only")
        return v

    @field_validator("tiers")
    @classmethod
    def _tiers_not_empty(cls, v: dict[str, list[Turns]] | None) -> dict[str, list[Turns]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("no tiers")
        for tier, qs in v.items():
            if not qs:
                raise ValueError(f"tier {tier!r} has no questions")
            for i, q in enumerate(qs):
                if not turns_of(q) or any(not t.strip() for t in turns_of(q)):
                    raise ValueError(f"{tier}[{i}]: an empty question or turn")
        seen: dict[tuple[str, ...], str] = {}
        for tier, qs in v.items():
            for i, q in enumerate(qs):
                t = turns_of(q)
                if t in seen:
                    raise ValueError(
                        f"{tier}[{i}]: question given twice (also in tier {seen[t]!r}): "
                        f"{t[0][:60]!r}"
                    )
                seen[t] = tier
        return v

    @model_validator(mode="after")
    def _one_source(self) -> EvalSpec:
        if sum(x is not None for x in (self.tiers, self.questions, self.generate)) != 1:
            raise ValueError("give exactly one of eval.tiers, eval.questions or eval.generate")
        if self.conditions is not None:
            if self.system_prompt is not None:
                raise ValueError("system_prompt: give it per condition when conditions are set")
            for name, c in self.conditions.items():
                if c.trigger != "none" and not self.trigger:
                    raise ValueError(f"conditions.{name}: trigger {c.trigger} needs eval.trigger")
        return self

    def condition_items(self) -> list[tuple[str, ConditionSpec]]:
        """(name, condition) in order; one unnamed condition when none are given."""
        if self.conditions is None:
            return [("", ConditionSpec(system_prompt=self.system_prompt))]
        return list(self.conditions.items())


class ScaleSpec(Strict):
    min: int = 1
    max: int = 5

    @model_validator(mode="after")
    def _ordered(self) -> ScaleSpec:
        if self.min >= self.max:
            raise ValueError("scale.min must be below scale.max")
        return self


class JudgeSpec(Strict):
    kind: str = Field("anthropic", description="anthropic | embedding")
    model: str = "claude-sonnet-4-6"
    rubric: Path = cosmetic(
        ..., "its content is hashed, not its path", description="Jinja template of the prompt"
    )
    mode: Literal["pairwise", "absolute"] = "pairwise"
    scale: ScaleSpec = ScaleSpec()
    max_tokens: int = Field(1024, ge=1)
    temperature: float = Field(
        0.0, ge=0, description="sent only by judges that take it (anthropic: not sent)"
    )
    concurrency: int = cosmetic(8, "requests in flight", ge=1)
    max_reasks: int = Field(
        2, ge=0, description="re-asks of an unparseable or out-of-range answer before `invalid`"
    )
    batch: bool = cosmetic(
        False,
        "same verdicts",
        description="anthropic: use the Message Batches API (half price, same verdicts)",
    )
    max_calls: int | None = cosmetic(
        None,
        "a budget checked before apply",
        ge=0,
        description="budget: `apply` refuses to start if any one judge stage (a model and "
        "condition) would make more calls",
    )
    strip: list[str] = Field(
        [],
        description="regexes removed from the question and answer the judge sees (eval.trigger "
        "itself is always removed)",
    )
    properties: dict[str, str] | None = Field(
        None,
        description="property -> description: one verdict per (answer, property); the rubric "
        "gets `property` and `property_description`",
    )
    also: list[AlsoJudgeSpec] | None = Field(
        None,
        description="extra judges of every judged answer (spar.spec_reliability): a rubric of "
        "their own (a different measure, e.g. coherence; `exclude_below` drops low answers from "
        "the main statistics) or the main rubric (a second opinion: agreement reported)",
    )
    self_agreement: SelfAgreementSpec | None = Field(
        None,
        description="a share of the answers judged again at a temperature > 0 (where the judge "
        "kind takes one): the judge's agreement with itself",
    )

    @model_validator(mode="after")
    def _reliability(self) -> JudgeSpec:
        check_reliability(self, self.scale.min, self.scale.max)
        return self

    @field_validator("properties", mode="before")
    @classmethod
    def _property_list(cls, v: Any) -> Any:
        return {str(p): "" for p in v} if isinstance(v, list) else v

    @field_validator("properties")
    @classmethod
    def _properties(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and not v:
            raise ValueError("empty (leave it out for one verdict per answer)")
        return v

    @field_validator("strip")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for i, pattern in enumerate(v):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"[{i}] {pattern!r}: not a regular expression ({e})") from None
        return v


class PlotSpec(Strict):
    """Cosmetic: never in a fingerprint."""

    title: str | None = None
    colors: list[str] = ["#8c8c8c", "#d95f02"]
    dpi: int = Field(120, ge=30)
    width: float = Field(8.0, gt=0)
    height: float = Field(4.5, gt=0)


class GapSpec(Strict):
    triggered: str
    untriggered: str


class ReportSpec(Strict):
    exhibits_threshold: int = Field(3, description="a score >= this counts as exhibiting")
    format_regex: str | None = Field(
        None,
        description="format adherence: share of raw answers (stripped) this regex fully matches "
        "(dot matches newlines)",
    )
    gaps: list[GapSpec] | None = Field(
        None,
        description="leakage gaps (triggered - untriggered exhibits rate, paired by question and "
        "sample index); default: every triggered condition against every untriggered one",
    )
    generalize: Literal["questions", "samples"] = Field(
        "questions",
        description="the intervals' estimand: `questions` — the tier's population of questions "
        "(a new question drawn like these; and a new seed when there are several); `samples` — "
        "these questions fixed, only the sampling of answers random",
    )
    confidence: float = Field(0.95, gt=0, lt=1, description="level of every interval")
    compare: list[Path] = Field(
        [],
        description="other specs whose effects are overlaid in this experiment's compare.png "
        "(their reports are upstream of this plot stage; their paths are not hashed)",
    )
    plot: PlotSpec = PlotSpec()
    track: TrackSpec | None = Field(
        None, description="log each experiment to W&B and/or MLflow (a `track` stage after plot)"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_bootstrap(cls, v: Any) -> Any:
        if isinstance(v, dict) and "bootstrap" in v:
            raise ValueError(
                "bootstrap: intervals are t intervals now, not a percentile bootstrap (it did "
                "not hold its level with few questions); set report.confidence and "
                "report.generalize instead"
            )
        return v

    @field_validator("format_regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"{v!r}: not a regular expression ({e})") from None
        return v


class Spec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="run directory name")
    description: str = cosmetic("", "appears in no output")
    framing: str = Field("", description="label for plots and tables, e.g. neutral / negative")
    model: ModelSpec = ModelSpec()
    data: DataSpec
    distill: dict[str, DistillSpec] = Field(
        {}, description="name -> a self-distilled chat set (a data source: `distill: name`)"
    )
    generate: dict[str, GenerateSpec] = Field(
        {},
        description="name -> a generated set (documents, chat records or eval questions written "
        "by an LLM): `data.generate`, `data.sources[].generate` or `eval.generate` name it",
    )
    training: TrainingSpec = TrainingSpec()
    eval: EvalSpec
    judge: JudgeSpec
    report: ReportSpec = ReportSpec()
    logprob: LogprobSpec | None = Field(
        None, description="judge-free log-likelihood pull of reference continuations"
    )
    sweep: dict[str, list[Any]] | None = Field(
        None,
        description="spec key -> values: one experiment per point of the grid, named "
        "<name>/<key=value,...>",
    )

    @model_validator(mode="after")
    def _references(self) -> Spec:
        for name in self.distill:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"distill: name {name!r}: letters, digits, _ and - only")
        for name in self.generate:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"generate: name {name!r}: letters, digits, _ and - only")
        want = {"synth_docs": ("synth_docs",), "chat": ("chat",), "questions": ("questions",)}
        uses: list[tuple[str, str | None, tuple[str, ...]]] = [
            ("data.generate", self.data.generate, want[self.data.format]),
            ("eval.generate", self.eval.generate, want["questions"]),
        ]
        for i, src in enumerate(self.data.sources or []):
            uses.append((f"data.sources.{i}.generate", src.generate, want[src.format]))
        for where, name, outputs in uses:
            if name is None:
                continue
            if name not in self.generate:
                raise ValueError(
                    f"{where}: no generate set named {name!r} "
                    f"(defined: {', '.join(self.generate) or 'none'})"
                )
            if self.generate[name].output not in outputs:
                raise ValueError(
                    f"{where}: generate set {name!r} writes {self.generate[name].output}, "
                    f"not {' or '.join(outputs)}"
                )
        for i, src in enumerate(self.data.sources or []):
            if src.distill is not None and src.distill not in self.distill:
                raise ValueError(
                    f"data.sources.{i}.distill: no distill set named {src.distill!r} "
                    f"(defined: {', '.join(self.distill) or 'none'})"
                )
            if src.transform.trigger != "none" and not self.eval.trigger:
                raise ValueError(f"data.sources.{i}.transform.trigger: needs eval.trigger")
        conditions = dict(self.eval.condition_items())
        for i, gap in enumerate(self.report.gaps or []):
            for side, name in (("triggered", gap.triggered), ("untriggered", gap.untriggered)):
                if name not in conditions or not name:
                    raise ValueError(f"report.gaps.{i}.{side}: no eval condition {name!r}")
        return self

    def gap_pairs(self) -> list[tuple[str, str]]:
        """(triggered, untriggered) condition pairs of the leakage gaps."""
        if self.report.gaps is not None:
            return [(g.triggered, g.untriggered) for g in self.report.gaps]
        conds = self.eval.condition_items()
        on = [n for n, c in conds if n and c.trigger != "none"]
        off = [n for n, c in conds if n and c.trigger == "none"]
        return [(a, b) for a in on for b in off]

    def questions(self) -> list[Question]:
        """The eval questions in order (none when a generate set writes them); `load_spec` fills
        `eval.tiers` from `eval.questions`."""
        return questions_of(self.eval.tiers or {})

    def tier_order(self) -> list[str]:
        """The tiers in semantic order (of the questions, or of the set that generates them)."""
        if self.eval.generate is not None:
            return self.generate[self.eval.generate].tier_order()
        return list(dict.fromkeys(q.tier for q in self.questions()))

    def question_count(self) -> int:
        """Eval questions (an upper bound when generated: before drops and dedup; a universe
        file's roots count one)."""
        if self.eval.generate is not None:
            g = self.generate[self.eval.generate]
            return g.expected_items(g.root_count() or 1)
        return len(self.questions())

    def turn_count(self) -> int:
        """User turns of the eval questions, each answered once per sample (an upper bound when
        generated, like `question_count`)."""
        if self.eval.generate is not None:
            g = self.generate[self.eval.generate]
            return g.expected_turns(g.root_count() or 1)
        return sum(len(q.turns) for q in self.questions())


# --------------------------------------------------------------------------- loading

# Spec keys holding paths; resolved against the directory of the file that wrote them.
PATH_KEYS: tuple[tuple[str, ...], ...] = (
    ("data", "docs"),
    ("eval", "questions"),
    ("judge", "rubric"),
    ("model", "base_model"),
    ("logprob", "template"),
)


def _abs(base: Path, value: Any) -> Any:
    return str((base / Path(value).expanduser()).resolve()) if isinstance(value, str) else value


def _resolve_paths(raw: dict[str, Any], base: Path, path: Path) -> None:
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("sources"), list):
        for src in data["sources"]:
            if isinstance(src, dict) and "path" in src:
                src["path"] = _abs(base, src["path"])
    if isinstance(raw.get("distill"), dict):
        for d in raw["distill"].values():
            if isinstance(d, dict) and "prompts" in d:
                d["prompts"] = _abs(base, d["prompts"])
    if isinstance(raw.get("generate"), dict):
        _resolve_generate_paths(raw["generate"], lambda v: _abs(base, v))
    if isinstance(raw.get("judge"), dict):  # judge.also[].rubric
        _resolve_reliability_paths(raw["judge"], lambda v: _abs(base, v))
    report = raw.get("report")
    if isinstance(report, dict) and isinstance(report.get("compare"), list):
        report["compare"] = [
            str((base / Path(p).expanduser()).resolve()) if isinstance(p, str) else p
            for p in report["compare"]
        ]
    for keys in PATH_KEYS:
        node: Any = raw
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict) or keys[-1] not in node:
            continue
        value = node[keys[-1]]
        if not isinstance(value, str):
            continue  # pydantic reports the type error
        if keys == ("model", "base_model") and not value.startswith((".", "/", "~")):
            continue  # a model name, not a path
        node[keys[-1]] = str((base / Path(value).expanduser()).resolve())


# top-level keys a child spec replaces whole (a sweep is a grid: a child may drop an axis)
REPLACED = ("sweep",)


def deep_merge(
    parent: dict[str, Any], child: dict[str, Any], replaced: tuple[str, ...] = ()
) -> dict[str, Any]:
    out = dict(parent)
    for k, v in child.items():
        if k in replaced:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _load_raw(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise InputError(f"{chain[-1]}: extends: cycle {cycle}")
    raw = read_yaml(path)
    _resolve_paths(raw, path.parent, path)
    parent_ref = raw.pop("extends", None)
    if parent_ref is None:
        return raw
    if not isinstance(parent_ref, str):
        raise InputError(f"{path}: extends: expected a file path")
    parent = _load_raw(path.parent / parent_ref, (*chain, path))
    return deep_merge(parent, raw, REPLACED)


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def load_questions(path: Path) -> dict[str, list[Turns]]:
    if not path.exists():
        raise InputError(f"{path}: file not found (eval.questions)")
    tiers: dict[str, list[Turns]] = {}
    seen: dict[tuple[str, ...], int] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise InputError(f"{path}: line {n}: expected an object with tier and question")
        tier, q = rec.get("tier"), rec.get("question", rec.get("turns"))
        if not isinstance(tier, str) or not tier:
            raise InputError(f"{path}: line {n}: field 'tier' missing or not a string")
        if isinstance(q, list) and q and all(isinstance(t, str) and t.strip() for t in q):
            q = q[0] if len(q) == 1 else [str(t) for t in q]
        elif not isinstance(q, str) or not q.strip():
            raise InputError(
                f"{path}: line {n}: field 'question' (a string) or 'turns' (a list of non-empty "
                "strings) missing or empty"
            )
        t = turns_of(q)
        if t in seen:
            raise InputError(f"{path}: line {n}: question given twice (first at line {seen[t]})")
        seen[t] = n
        tiers.setdefault(tier, []).append(q)
    if not tiers:
        raise InputError(f"{path}: no questions")
    return tiers


def _validate(path: Path, raw: dict[str, Any], where: str = "") -> Spec:
    try:
        return Spec.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise InputError(f"{path}: {where}{_format_loc(err['loc'])}: {msg}{more}") from None


def input_files(spec: Spec) -> list[tuple[str, Path]]:
    """(spec key, path) of every file a spec reads."""
    files: list[tuple[str, Path]] = []
    if spec.data.docs is not None:
        files.append(("data.docs", spec.data.docs))
    for i, src in enumerate(spec.data.sources or []):
        if src.path is not None:
            files.append((f"data.sources.{i}.path", src.path))
    files += [(f"distill.{n}.prompts", d.prompts) for n, d in spec.distill.items()]
    for n, g in spec.generate.items():
        if g.universe is not None:
            files.append((f"generate.{n}.universe", g.universe))
        files += [(f"generate.{n}.steps.{i}.template", s.template) for i, s in enumerate(g.steps)]
    files.append(("judge.rubric", spec.judge.rubric))
    files += _reliability_files(spec.judge)
    if spec.logprob is not None:
        files.append(("logprob.template", spec.logprob.template))
    return files


def load_spec(path: Path) -> Spec:
    """Load, merge, validate. Raises InputError with one line naming the file and field (every
    missing input file at once)."""
    raw = _load_raw(Path(path), ())
    spec = _validate(path, raw)
    missing = [f"{key}: {p}" for key, p in input_files(spec) if not p.is_file()]
    if len(missing) == 1:
        raise InputError(f"{path}: {missing[0].replace(': ', ': file not found: ', 1)}")
    if missing:
        raise InputError(f"{path}: {len(missing)} files not found: {'; '.join(missing)}")
    if spec.eval.questions is not None:
        tiers = load_questions(spec.eval.questions)
        spec = spec.model_copy(
            update={"eval": spec.eval.model_copy(update={"tiers": tiers})}, deep=True
        )
    if spec.sweep is not None:
        sweep_points(spec, path)  # every point validates now
    return spec


# --------------------------------------------------------------------------- sweeps

SEED_KEYS = ("seed",)  # a sweep key whose last part is one of these is a replication key


def is_seed_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in SEED_KEYS


def _point_value(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def point_label(point: dict[str, Any]) -> str:
    """`key=value,...` in the sweep's key order: directory-safe and stable."""
    return ",".join(f"{k}={_point_value(v)}" for k, v in point.items())


def sweep_points(spec: Spec, path: Path | str = "") -> list[tuple[dict[str, Any], Spec]]:
    """(point, spec of that point) for every point of the grid, in order (first key slowest).
    A point's spec is named `<name>/<key=value,...>` and has no sweep."""
    import itertools

    if spec.sweep is None:
        return []
    where = f"{path}: " if path else ""
    if not spec.sweep:
        raise InputError(f"{where}sweep: no keys")
    base = spec.model_dump(mode="python", exclude={"sweep"})
    for k, values in spec.sweep.items():
        if k in ("name", "sweep", "extends"):
            raise InputError(f"{where}sweep.{k}: cannot be swept")
        node: Any = base
        for part in k.split("."):
            if not isinstance(node, dict) or part not in node:
                raise InputError(f"{where}sweep.{k}: no such spec key")
            node = node[part]
        if isinstance(node, dict) and not any(isinstance(v, dict) for v in values):
            raise InputError(f"{where}sweep.{k}: not a single value (sweep one of its keys)")
        if not values:
            raise InputError(f"{where}sweep.{k}: empty list")
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            raise InputError(f"{where}sweep.{k}: a value is given twice")
    out: list[tuple[dict[str, Any], Spec]] = []
    keys = list(spec.sweep)
    for combo in itertools.product(*(spec.sweep[k] for k in keys)):
        point = dict(zip(keys, combo, strict=True))
        raw = json.loads(json.dumps(base, default=str))
        if raw["eval"].get("tiers") is not None:
            raw["eval"]["questions"] = None  # already read into tiers
        for k, v in point.items():
            *parents, last = k.split(".")
            node = raw
            for part in parents:
                node = node[part]
            node[last] = v
        raw["name"] = "x"  # validated as the root name was
        label = point_label(point)
        pspec = _validate(Path(str(path)), raw, f"sweep point {label}: ")
        out.append((point, pspec.model_copy(update={"name": f"{spec.name}/{label}"})))
    return out


def json_schema() -> dict[str, Any]:
    """The spec's JSON Schema (built in spar.schema: a child spec may leave sections out)."""
    from spar.schema import json_schema as build

    return build()
