"""One identity for an eval item, from sampling to the HTML report.

A question's id is the content hash of its user turns; an item is (tier, question id, condition,
sample index) and its messages, and its id is the hash of that identity. Every stage after
sampling joins rows by `item_id`, never by rebuilding tuples.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from spar.store.hashing import hash_json

ID_CHARS = 16


def question_id(turns: tuple[str, ...]) -> str:
    return hash_json({"turns": list(turns)})[:ID_CHARS]


class Question(BaseModel):
    """A question of the eval set: one or more user turns, in a tier."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    tier: str
    turns: tuple[str, ...]

    @property
    def text(self) -> str:
        """The question as shown in reports (turns joined for a multi-turn question)."""
        return "\n\n".join(self.turns)

    @classmethod
    def of(cls, tier: str, turns: tuple[str, ...]) -> Question:
        return cls(id=question_id(turns), tier=tier, turns=turns)


def with_trigger(
    messages: list[tuple[str, str]], trigger: str | None, where: str
) -> list[tuple[str, str]]:
    """`messages` with the trigger placed: appended to the (first) user turn after a blank line,
    or to the system prompt (which it becomes when there is none). `where`: user|system|none."""
    if where == "none" or not trigger:
        return list(messages)
    out = list(messages)
    if where == "system":
        if out and out[0][0] == "system":
            out[0] = ("system", f"{out[0][1]}\n\n{trigger}")
        else:
            out.insert(0, ("system", trigger))
        return out
    for i, (role, content) in enumerate(out):
        if role == "user":
            out[i] = ("user", f"{content}\n\n{trigger}")
            return out
    raise ValueError("no user turn to place the trigger in")


def stage_name(base: str, condition: str) -> str:
    """A per-condition stage's name: `sample_base` (no conditions) or `sample_base.<condition>`."""
    return f"{base}.{condition}" if condition else base


def item_id(tier: str, qid: str, condition: str, sample_index: int) -> str:
    return hash_json([tier, qid, condition, sample_index])[:ID_CHARS]


class EvalItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    item_id: str
    tier: str
    question_id: str
    question: str
    condition: str = ""
    sample_index: int
    messages: tuple[tuple[str, str], ...]  # (role, content) before the sampled reply

    @classmethod
    def build(
        cls,
        q: Question,
        sample_index: int,
        system_prompt: str | None,
        condition: str = "",
        trigger: str | None = None,
        placement: str = "none",
    ) -> EvalItem:
        msgs: list[tuple[str, str]] = [("system", system_prompt)] if system_prompt else []
        msgs += [("user", t) for t in q.turns[:1]]
        msgs = with_trigger(msgs, trigger, placement)
        return cls(
            item_id=item_id(q.tier, q.id, condition, sample_index),
            tier=q.tier,
            question_id=q.id,
            question=q.text,
            condition=condition,
            sample_index=sample_index,
            messages=tuple(msgs),
        )

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def identity(self) -> dict[str, object]:
        return {
            "item_id": self.item_id,
            "tier": self.tier,
            "question_id": self.question_id,
            "question": self.question,
            "condition": self.condition,
            "sample_index": self.sample_index,
        }
