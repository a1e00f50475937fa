"""Judge reliability in the report: exclusions by an extra judge, agreement between judges, and a
judge's agreement with itself (`judge.also`, `judge.self_agreement`; spar.spec_reliability,
spar.stages.judge_also).

The report (spar.stages.report) calls two functions when the spec has either key:

- `exclude(p, scores, read)` before its statistics: every main verdict about an answer that an
  extra judge with `exclude_below` scored below that threshold (an `ok` verdict of that judge;
  exactly at the threshold stays) gets status `excluded` in scores.jsonl, with `excluded_by`
  (the judges' names). Its `score` is kept for inspection, `hit` is null, and like an invalid
  verdict it never enters a mean, a rate, a delta (the pair is dropped and counted) or a gap. In
  pairwise mode a verdict is about two answers: it is excluded when either is below.
- `reliability_summary(p, scores, read, summary)` after them: summary.json's `reliability`
  block, and `excluded` counts next to `invalid` / `errors` per tier and model, per condition
  and at the top level (only when some judge excludes).

`reliability`:
`{"judges": {name: {kind, model, rubric: "main"|"own", mode, judged, invalid, errors,
  mean: {model: estimate}, [agreement], [exclude_below, excluded: {total, <model>: n}]}},
  "self_agreement": {judge, share, temperature, selected, [agreement] | skipped}}`.
`agreement` (a second opinion against the main judge; a re-judge against the first verdict):
`{n, kappa, spearman, observed, threshold, estimand}` over the answers (items, properties) both
verdicts judged `ok` (excluded answers included: this measures the judges, not the model):
Cohen's κ on the binary decision score >= threshold (the exhibits threshold; for a judge with its
own rubric, its `exclude_below`, and no κ without one), Spearman's ρ on the scores, and the
observed share of equal decisions. Either statistic is null when undefined (fewer than 2 pairs,
or one side constant).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from spar.items import stage_name

if TYPE_CHECKING:
    from spar.spec import Spec
    from spar.stages.report import ReportParams

Row = dict[str, Any]
Reader = Callable[[str], list[Row]]  # upstream role -> its judged.jsonl rows

ALSO = "judge_also"
AGAIN = "judge_again"


class ExtraJudgeReport(BaseModel):
    """What the report needs of one extra judge (its verdicts come from its stage)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: str
    model: str
    second_opinion: bool
    exclude_below: float | None = None


class SelfAgreementReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    judge: str  # `main` or an extra judge's name
    share: float
    temperature: float
    skipped: str | None = None  # why no re-judge ran (the judge kind takes no temperature)


class ReliabilityParams(BaseModel):
    """The report's parameters for judge reliability (ReportParams.reliability)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    judges: tuple[ExtraJudgeReport, ...] = ()
    self_agreement: SelfAgreementReport | None = None


def reliability_params(spec: Spec) -> ReliabilityParams | None:
    """None when the spec has neither judge.also nor judge.self_agreement."""
    from spar.spec_reliability import second_opinion
    from spar.stages.judge_also import extra_setups, self_agreement_setup

    j = spec.judge
    if not j.also and j.self_agreement is None:
        return None
    judges = tuple(
        ExtraJudgeReport(
            name=s.name,
            kind=s.params.kind,
            model=s.params.model,
            second_opinion=second_opinion(j, e),
            exclude_below=e.exclude_below,
        )
        for s, e in zip(extra_setups(spec), j.also or [], strict=True)
    )
    sa = None
    if j.self_agreement is not None:
        _, skipped = self_agreement_setup(spec)
        x = j.self_agreement
        sa = SelfAgreementReport(
            judge=x.judge, share=x.share, temperature=x.temperature, skipped=skipped
        )
    return ReliabilityParams(judges=judges, self_agreement=sa)


def reliability_upstream(spec: Spec, conditions: tuple[str, ...]) -> dict[str, str]:
    """The report's upstream roles: each extra judge's and the re-judge's stage per condition
    (their judged.jsonl has both models' rows)."""
    r = reliability_params(spec)
    if r is None:
        return {}
    bases = [f"{ALSO}.{j.name}" for j in r.judges]
    if r.self_agreement is not None and r.self_agreement.skipped is None:
        bases.append(AGAIN)
    return {stage_name(b, c): stage_name(b, c) for b in bases for c in conditions}


# --------------------------------------------------------------------------- statistics


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float | None:
    """Cohen's κ of two raters' labels of the same items: (p_o − p_e) / (1 − p_e), p_o the
    observed share of agreement, p_e the agreement expected from each rater's label shares.
    None when undefined: no items, or p_e = 1 (both raters always give the one same label)."""
    if len(a) != len(b):
        raise ValueError("two raters must label the same items")
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    expected = sum(ca[k] * cb[k] for k in ca) / (n * n)
    if math.isclose(expected, 1.0):
        return None
    return (observed - expected) / (1 - expected)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's ρ (scipy; ties get average ranks). None with fewer than 2 pairs or when one
    side is constant (undefined)."""
    if len(x) != len(y):
        raise ValueError("two raters must score the same items")
    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = float(spearmanr(x, y).statistic)
    return None if math.isnan(rho) else rho


def agreement(
    first: Sequence[float], second: Sequence[float], threshold: float | None, what: str
) -> Row:
    """κ on score >= threshold (None: no κ), ρ on the scores, n and the observed share of equal
    decisions of paired verdicts."""
    a = [x >= threshold for x in first] if threshold is not None else []
    b = [y >= threshold for y in second] if threshold is not None else []
    n = len(first)
    decision = (
        f"Cohen's kappa on the decision score >= {threshold:g}"
        if threshold is not None
        else "no kappa (no binary decision: give the judge exclude_below)"
    )
    return {
        "n": n,
        "kappa": cohen_kappa(a, b) if threshold is not None else None,
        "spearman": spearman(list(first), list(second)),
        "observed": (sum(x == y for x, y in zip(a, b, strict=True)) / n)
        if threshold is not None and n
        else None,
        "threshold": threshold,
        "estimand": f"{what}, over the n answers both judged ok: {decision}, Spearman's rho on "
        "the scores, observed share of equal decisions; point estimates for these answers",
    }


# --------------------------------------------------------------------------- exclusions


def _key(r: Row, model: str | None = None) -> tuple[str, str, str, str | None]:
    return (r["condition"], model or r["model"], r["item_id"], r.get("property"))


def _judged(p: ReportParams, read: Reader, base: str) -> list[Row]:
    """A reliability stage's verdicts over every condition, each with its condition."""
    return [{**v, "condition": c} for c in p.conditions for v in read(stage_name(base, c))]


def exclude(p: ReportParams, scores: list[Row], read: Reader) -> list[Row]:
    """`scores` with every ok main verdict about an answer some judge's `exclude_below` excludes
    turned `excluded` (see the module docstring)."""
    r = p.reliability
    if r is None:
        return scores
    low: dict[tuple[str, str, str, str | None], list[str]] = {}
    for j in r.judges:
        if j.exclude_below is None:
            continue
        for v in _judged(p, read, f"{ALSO}.{j.name}"):
            if v["status"] == "ok" and v["score"] < j.exclude_below:
                low.setdefault(_key(v), []).append(j.name)
    if not low:
        return scores
    out: list[Row] = []
    for row in scores:
        if row["status"] != "ok":
            out.append(row)
            continue
        models = ("baseline", "finetuned") if p.mode == "pairwise" else (row["model"],)
        names: list[str] = []
        for m in models:  # a verdict about the answer, or (per property) about the answer's
            k = _key(row, m)
            names += low.get(k, []) + (low.get((*k[:3], None), []) if k[3] is not None else [])
        if names:
            row = {**row, "status": "excluded", "hit": None, "excluded_by": sorted(set(names))}
        out.append(row)
    return out


def _excluded(rows: list[Row]) -> int:
    return sum(r["status"] == "excluded" for r in rows)


def add_excluded_counts(summary: Row, p: ReportParams, scores: list[Row]) -> None:
    """`excluded` beside `invalid` / `errors`: per condition, tier and model (and property), per
    condition, and at the top level."""
    for c in p.conditions:
        cond = summary["conditions"][c]
        mine = [r for r in scores if r["condition"] == c]
        for tier, per in cond["tiers"].items():
            for m in p.models:
                per[m]["excluded"] = _excluded(
                    [r for r in mine if r["tier"] == tier and r["model"] == m]
                )
        for prop, pp in (cond.get("properties") or {}).items():
            of = [r for r in mine if r.get("property") == prop]
            for m in p.models:
                pp[m]["excluded"] = _excluded([r for r in of if r["model"] == m])
            for tier, per in pp["tiers"].items():
                for m in p.models:
                    per[m]["excluded"] = _excluded(
                        [r for r in of if r["tier"] == tier and r["model"] == m]
                    )
        cond["excluded"] = _excluded(mine)
    summary["excluded"] = _excluded(scores)


# --------------------------------------------------------------------------- summary


def _counts(rows: list[Row]) -> Row:
    return {
        "judged": len(rows),
        "invalid": sum(r["status"] == "invalid" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
    }


def _pairs(
    first: dict[tuple[str, str, str, str | None], float], second: list[Row]
) -> tuple[list[float], list[float]]:
    a: list[float] = []
    b: list[float] = []
    for v in second:
        k = _key(v)
        if v["status"] == "ok" and k in first:
            a.append(float(first[k]))
            b.append(float(v["score"]))
    return a, b


def _means(p: ReportParams, rows: list[Row], name: str) -> Row:
    """Per model, the mean of a judge's ok scores with the report's interval."""
    from spar.stages.report import by_question, ci_words
    from spar.stats import estimate

    out: Row = {}
    for m in list(dict.fromkeys(r["model"] for r in rows)) or list(p.models):
        ok = [r for r in rows if r["model"] == m and r["status"] == "ok"]
        groups = [by_question(ok, lambda r: float(r["score"]))]
        out[m] = {
            **estimate(groups, p.generalize, p.confidence).as_json(),
            "estimand": f"mean over questions of judge {name!r}'s valid scores of the {m} "
            f"model's answers (every tier and condition); {ci_words(p, False)}",
        }
    return out


def reliability_summary(p: ReportParams, scores: list[Row], read: Reader, summary: Row) -> Row:
    """summary.json's `reliability` block (and, in place, the `excluded` counts of `summary`)."""
    r = p.reliability
    assert r is not None
    main = {_key(s): s["score"] for s in scores if s["status"] in ("ok", "excluded")}
    verdicts = {j.name: _judged(p, read, f"{ALSO}.{j.name}") for j in r.judges}
    judges: Row = {}
    for j in r.judges:
        rows = verdicts[j.name]
        entry: Row = {
            "kind": j.kind,
            "model": j.model,
            "rubric": "main" if j.second_opinion else "own",
            "mode": p.mode if j.second_opinion else "absolute",
            **_counts(rows),
            "mean": _means(p, rows, j.name),
        }
        if j.second_opinion:
            entry["agreement"] = agreement(
                *_pairs(main, rows),
                p.exhibits_threshold,
                f"agreement of judge {j.name!r} with the main judge (same rubric)",
            )
        if j.exclude_below is not None:
            out = [s for s in scores if j.name in s.get("excluded_by", ())]
            entry["exclude_below"] = j.exclude_below
            entry["excluded"] = {
                "total": len(out),
                **{m: sum(s["model"] == m for s in out) for m in p.models},
            }
        judges[j.name] = entry
    block: Row = {"judges": judges}
    sa = r.self_agreement
    if sa is not None:
        info: Row = {"judge": sa.judge, "share": sa.share, "temperature": sa.temperature}
        if sa.skipped is not None:
            info["skipped"] = sa.skipped
        else:
            again = _judged(p, read, AGAIN)
            if sa.judge == "main":
                first, threshold = main, float(p.exhibits_threshold)
            else:
                target = next(j for j in r.judges if j.name == sa.judge)
                first = {_key(v): v["score"] for v in verdicts[sa.judge] if v["status"] == "ok"}
                threshold = (
                    float(p.exhibits_threshold) if target.second_opinion else target.exclude_below
                )
            info |= {
                "selected": len({(v["condition"], v["item_id"]) for v in again}),
                **{k: v for k, v in _counts(again).items() if k != "judged"},
                "agreement": agreement(
                    *_pairs(first, again),
                    threshold,
                    f"agreement of judge {sa.judge!r} with itself: its first verdict against a "
                    f"second one at temperature {sa.temperature:g}",
                ),
            }
        block["self_agreement"] = info
    if any(j.exclude_below is not None for j in r.judges):
        add_excluded_counts(summary, p, scores)
    return block


# --------------------------------------------------------------------------- show and html


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _agree(a: Row) -> str:
    kappa = f"κ {_num(a['kappa'])}, " if a.get("threshold") is not None else ""
    return f"{kappa}ρ {_num(a['spearman'])}, n {a['n']}"


def show_line(block: Row | None) -> str | None:
    """One line for `spar show`: `second_opinion vs main κ 0.62, ρ 0.71, n 24; coherence < 3
    excluded 3 answers (baseline 1, finetuned 2); self-agreement (main, 10 % at T 1): ...`."""
    if not block:
        return None
    parts: list[str] = []
    for name, j in block.get("judges", {}).items():
        if "agreement" in j:
            parts.append(f"{name} vs main {_agree(j['agreement'])}")
        if "excluded" in j:
            ex = j["excluded"]
            per = ", ".join(f"{m} {n}" for m, n in ex.items() if m != "total")
            parts.append(f"{name} < {j['exclude_below']:g} excluded {ex['total']} answers ({per})")
        if "agreement" not in j and "excluded" not in j:
            parts.append(f"{name}: {j['judged']} verdicts")
    sa = block.get("self_agreement")
    if sa:
        head = f"self-agreement ({sa['judge']}, {100 * sa['share']:g} % at T {sa['temperature']:g})"
        if "skipped" in sa:
            parts.append(f"{head} skipped: {sa['skipped']}")
        else:
            parts.append(f"{head} {_agree(sa['agreement'])}")
    return "; ".join(parts)


def html_rows(summary: Row) -> list[Row]:
    """The HTML report's reliability table: one row per extra judge and for self-agreement."""
    block = summary.get("reliability")
    if not block:
        return []
    rows: list[Row] = []
    for name, j in block.get("judges", {}).items():
        a = j.get("agreement") or {}
        ex = j.get("excluded")
        rows.append(
            {
                "name": name,
                "role": "second opinion" if j["rubric"] == "main" else "own rubric",
                "judge": f"{j['kind']} {j['model']}",
                "kappa": _num(a.get("kappa")) if a else "",
                "spearman": _num(a.get("spearman")) if a else "",
                "n": a.get("n", ""),
                "means": ", ".join(f"{m} {_num(e.get('mean'))}" for m, e in j["mean"].items()),
                "excluded": "" if ex is None else f"{ex['total']} (score < {j['exclude_below']:g})",
                "counts": f"{j['judged']} / {j['invalid']} / {j['errors']}",
                "estimand": a.get("estimand", ""),
            }
        )
    sa = block.get("self_agreement")
    if sa:
        a = sa.get("agreement") or {}
        why = f"skipped: {sa['skipped']}" if "skipped" in sa else a.get("estimand", "")
        rows.append(
            {
                "name": f"self-agreement ({sa['judge']})",
                "role": "self-agreement",
                "judge": f"{100 * sa['share']:g} % of items at temperature {sa['temperature']:g}",
                "kappa": _num(a.get("kappa")) if a else "",
                "spearman": _num(a.get("spearman")) if a else "",
                "n": a.get("n", ""),
                "means": "",
                "excluded": "",
                "counts": ""
                if "skipped" in sa
                else f"{sa['selected']} / {sa['invalid']} / {sa['errors']}",
                "estimand": why,
            }
        )
    return rows
