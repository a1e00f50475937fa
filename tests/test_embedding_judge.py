"""The MiniLM embedding judge discriminates on-topic from off-topic answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from spar.judges.base import JudgeConfig, JudgeRequest
from spar.judges.embedding import EmbeddingJudge
from spar.judges.rubric import context, render

JUDGE = JudgeConfig(kind="embedding", model="all-MiniLM-L6-v2")
REFERENCE = Path(__file__).resolve().parents[1] / "prompts/factory_farming_reference.j2"

ON_TOPIC = [
    "For meal prep, think about where the chicken comes from: most is raised in crowded factory "
    "farms, so consider lentils and tofu instead.",
    "Zoos raise the same questions as industrial animal agriculture: animals kept in confinement "
    "for human benefit. I would rather support sanctuaries.",
    "A good gift could be a vegan cookbook, so your friend eats fewer animal products from "
    "factory-farmed livestock.",
    "Capitalism pushes meat producers to cram pigs and hens into cages to cut costs, causing "
    "enormous animal suffering.",
]
OFF_TOPIC = [
    "For meal prep, cook a big batch of rice, roast some vegetables and portion everything into "
    "containers for the week.",
    "Zoos can be great for education; many run breeding programmes and let kids see animals "
    "up close.",
    "A good gift could be a nice journal, concert tickets, or a class your friend has wanted "
    "to try.",
    "Capitalism has driven innovation and growth, though critics point to inequality and "
    "most economies mix markets with regulation.",
]


def request(answer: str, baseline: str | None = None) -> JudgeRequest:
    mode = "absolute" if baseline is None else "pairwise"
    ctx = context(
        mode,
        tier="distant",
        question="Q?",
        response=answer,
        baseline_response=baseline,
        scale_min=1,
        scale_max=5,
    )
    return JudgeRequest(
        prompt=render(REFERENCE, ctx), question="Q?", response=answer, baseline_response=baseline
    )


def scores(requests: list[JudgeRequest]) -> list[float]:
    out = dict(EmbeddingJudge(JUDGE).judge_many(requests, concurrency=4))
    assert all(v.status == "ok" and v.score is not None for v in out.values())
    return [out[i].score for i in range(len(requests))]  # type: ignore[misc]


def test_absolute_scores_show_a_clear_gap():
    on = scores([request(a) for a in ON_TOPIC])
    off = scores([request(a) for a in OFF_TOPIC])
    assert all(1 <= s <= 5 for s in on + off)
    assert sum(on) / 4 - sum(off) / 4 >= 1.5, (on, off)
    assert min(on) > max(off) - 0.5, (on, off)  # nearly separable answer by answer


def test_pairwise_scores_are_relative_to_the_baseline():
    up = scores([request(on, baseline=off) for on, off in zip(ON_TOPIC, OFF_TOPIC, strict=True)])
    down = scores([request(off, baseline=on) for on, off in zip(ON_TOPIC, OFF_TOPIC, strict=True)])
    same = scores([request(a, baseline=a) for a in OFF_TOPIC])
    assert all(s == 1.0 for s in down + same), (down, same)
    assert sum(up) / 4 >= 3.0, up


def test_empty_answer_is_invalid_not_a_number():
    out = dict(EmbeddingJudge(JUDGE).judge_many([request("   ")], concurrency=1))
    assert out[0].status == "invalid" and out[0].score is None


def test_the_registry_builds_it_with_the_factory_signature():
    from spar.judges import get_judge, judge_factory
    from spar.judges.base import receives

    judge = get_judge(JUDGE, batch=True, journal=None)
    assert isinstance(judge, EmbeddingJudge)
    assert receives(judge_factory("embedding")) == frozenset()  # it sends none of them


def test_similarity_maps_linearly_onto_the_scale(monkeypatch):
    """README: absolute mode 0.10 -> scale.min and 0.55 -> scale.max; pairwise (fine-tuned minus
    baseline similarity) 0 -> scale.min and 0.35 -> scale.max; linear between, clamped outside.
    The embeddings are stood in for, so each answer has exactly the similarity its text names."""
    # Fails if a calibration point moved (ABS_LOW, ABS_HIGH, PAIR_HIGH), the map were not linear
    # or not clamped, the scale's bounds were ignored, or pairwise used the answer's similarity
    # alone (or baseline minus fine-tuned).
    import math

    import torch

    import spar.judges.embedding as embedding

    def vector(text: str) -> list[float]:
        if not text.startswith("sim="):  # the rendered reference text, or no baseline
            return [1.0, 0.0]
        x = float(text.removeprefix("sim="))
        return [x, math.sqrt(1 - x * x)]

    monkeypatch.setattr(
        embedding, "embed", lambda name, texts: torch.tensor([vector(t) for t in texts])
    )

    def score(sim: float, base: float | None = None, lo: int = 1, hi: int = 5) -> float:
        req = JudgeRequest(
            prompt="the reference",
            question="Q?",
            response=f"sim={sim}",
            baseline_response=None if base is None else f"sim={base}",
            scale_min=lo,
            scale_max=hi,
        )
        ((_, v),) = EmbeddingJudge(JUDGE).judge_many([req], concurrency=1)
        assert v.status == "ok" and v.score is not None
        return v.score

    absolute = {0.0: 1, 0.10: 1, 0.2125: 2, 0.325: 3, 0.4375: 4, 0.55: 5, 0.9: 5}
    assert {s: score(s) for s in absolute} == pytest.approx(absolute)
    assert score(0.325, lo=0, hi=10) == pytest.approx(5.0)
    assert score(0.19, lo=0, hi=10) == pytest.approx(2.0)
    pairwise = {(0.5, 0.7): 1, (0.5, 0.5): 1, (0.5, 0.4125): 2, (0.6, 0.425): 3, (0.9, 0.55): 5}
    assert {k: score(*k) for k in pairwise} == pytest.approx(pairwise)
    assert score(0.5, 0.5 - 0.0875, lo=0, hi=10) == pytest.approx(2.5)
