"""Pydantic models of an experiment spec; loading (`extends:` deep-merge, relative paths).

Every model forbids unknown keys. Paths in a spec resolve relative to the file that wrote them, so a
child spec may extend a parent in another directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spar.errors import InputError
from spar.items import Question
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


class DataSpec(Strict):
    docs: Path = cosmetic(
        ..., "its content is hashed, not its path", description="JSONL of training documents"
    )
    format: Literal["synth_docs", "chat"] = "synth_docs"
    condition_on: Literal["doc_idea", "none"] = Field(
        "doc_idea", description="synth_docs: user turn is doc_idea + doc_type (masked), or empty"
    )
    max_docs: int | None = Field(None, ge=1)
    test_size: int = Field(50, ge=0, description="documents held out for NLL tracking")
    split_seed: int = 0


class TrainingSpec(Strict):
    lora_rank: int = Field(32, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    lr_schedule: Literal["linear", "constant"] = "linear"
    batch_size: int = Field(8, ge=1)
    epochs: int = Field(1, ge=1)
    max_length: int | None = Field(2048, ge=8)
    seed: int = 0
    save_every: int = cosmetic(
        20, "resume points only", ge=0, description="save_state every N steps (0: only at end)"
    )


class SamplingSpec(Strict):
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)
    seed: int = 0


class EvalSpec(Strict):
    tiers: dict[str, list[str]] | None = Field(
        None, description="tier -> questions, in semantic order (direct ... very_distant)"
    )
    questions: Path | None = cosmetic(
        None, "its questions are parameters", description='JSONL of {"tier", "question"}'
    )
    samples_per_question: int = Field(1, ge=1)
    sampling: SamplingSpec = SamplingSpec()
    system_prompt: str | None = None
    concurrency: int = cosmetic(32, "requests in flight", ge=1)

    @field_validator("tiers")
    @classmethod
    def _tiers_not_empty(cls, v: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("no tiers")
        for tier, qs in v.items():
            if not qs:
                raise ValueError(f"tier {tier!r} has no questions")
            if any(not q.strip() for q in qs):
                raise ValueError(f"tier {tier!r} has an empty question")
        seen: dict[str, str] = {}
        for tier, qs in v.items():
            for i, q in enumerate(qs):
                if q in seen:
                    raise ValueError(
                        f"{tier}[{i}]: question given twice (also in tier {seen[q]!r}): {q[:60]!r}"
                    )
                seen[q] = tier
        return v

    @model_validator(mode="after")
    def _one_source(self) -> EvalSpec:
        if (self.tiers is None) == (self.questions is None):
            raise ValueError("give exactly one of eval.tiers or eval.questions")
        return self


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
        description="budget: `apply` refuses to start if more judge calls are due",
    )


class PlotSpec(Strict):
    """Cosmetic: never in a fingerprint."""

    title: str | None = None
    colors: list[str] = ["#8c8c8c", "#d95f02"]
    dpi: int = Field(120, ge=30)
    width: float = Field(8.0, gt=0)
    height: float = Field(4.5, gt=0)


class BootstrapSpec(Strict):
    resamples: int = Field(2000, ge=100)
    seed: int = 0
    confidence: float = Field(0.95, gt=0, lt=1)


class ReportSpec(Strict):
    exhibits_threshold: int = Field(3, description="a score >= this counts as exhibiting")
    bootstrap: BootstrapSpec = BootstrapSpec()
    compare: list[Path] = Field(
        [],
        description="other specs whose effects are overlaid in this experiment's compare.png "
        "(their reports are upstream of this plot stage; their paths are not hashed)",
    )
    plot: PlotSpec = PlotSpec()


class Spec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="run directory name")
    description: str = cosmetic("", "appears in no output")
    framing: str = Field("", description="label for plots and tables, e.g. neutral / negative")
    model: ModelSpec = ModelSpec()
    data: DataSpec
    training: TrainingSpec = TrainingSpec()
    eval: EvalSpec
    judge: JudgeSpec
    report: ReportSpec = ReportSpec()

    def questions(self) -> list[Question]:
        """The eval questions in order; `load_spec` always fills `eval.tiers`."""
        assert self.eval.tiers is not None
        return [Question.of(t, (q,)) for t, qs in self.eval.tiers.items() for q in qs]


# --------------------------------------------------------------------------- loading

# Spec keys holding paths; resolved against the directory of the file that wrote them.
PATH_KEYS: tuple[tuple[str, ...], ...] = (
    ("data", "docs"),
    ("eval", "questions"),
    ("judge", "rubric"),
    ("model", "base_model"),
)


def _resolve_paths(raw: dict[str, Any], base: Path, path: Path) -> None:
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


def deep_merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(parent)
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
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
    return deep_merge(parent, raw)


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _load_questions(path: Path) -> dict[str, list[str]]:
    if not path.exists():
        raise InputError(f"{path}: file not found (eval.questions)")
    tiers: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise InputError(f"{path}: line {n}: expected an object with tier and question")
        tier, q = rec.get("tier"), rec.get("question")
        if not isinstance(tier, str) or not tier:
            raise InputError(f"{path}: line {n}: field 'tier' missing or not a string")
        if not isinstance(q, str) or not q.strip():
            raise InputError(f"{path}: line {n}: field 'question' missing or empty")
        if q in seen:
            raise InputError(f"{path}: line {n}: question given twice (first at line {seen[q]})")
        seen[q] = n
        tiers.setdefault(tier, []).append(q)
    if not tiers:
        raise InputError(f"{path}: no questions")
    return tiers


def load_spec(path: Path) -> Spec:
    """Load, merge, validate. Raises InputError with one line naming the file and field."""
    raw = _load_raw(Path(path), ())
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise InputError(f"{path}: {_format_loc(err['loc'])}: {msg}{more}") from None
    for label, p in (("data.docs", spec.data.docs), ("judge.rubric", spec.judge.rubric)):
        if not p.is_file():
            raise InputError(f"{path}: {label}: file not found: {p}")
    if spec.eval.questions is not None:
        tiers = _load_questions(spec.eval.questions)
        spec = spec.model_copy(
            update={"eval": spec.eval.model_copy(update={"tiers": tiers})}, deep=True
        )
    return spec


def json_schema() -> dict[str, Any]:
    schema = Spec.model_json_schema()
    schema["properties"]["extends"] = {
        "type": "string",
        "description": "parent spec to deep-merge under this one (child wins)",
    }
    return schema
