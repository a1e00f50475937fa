"""One identity for an eval item, from sampling to the HTML report.

A question's id is the content hash of its user turns; an item is (tier, question id, condition,
sample index) and its messages, and its id is the hash of that identity. Every stage after
sampling joins rows by `item_id`, never by rebuilding tuples.

A multi-turn question is a conversation: the model replies after each user turn, and turn t's
prompt is the first turn's messages (system prompt, trigger placed) followed by every earlier reply
and user turn (`EvalItem.prompt_at`).
"""

from __future__ import annotations

from collections.abc import Sequence

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
    messages: tuple[tuple[str, str], ...]  # (role, content) before the first sampled reply
    turns: tuple[str, ...]  # the question's user turns as written (no trigger placed)

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
        msgs = with_trigger(msgs, trigger, placement)  # on the first user turn or system prompt
        return cls(
            item_id=item_id(q.tier, q.id, condition, sample_index),
            tier=q.tier,
            question_id=q.id,
            question=q.text,
            condition=condition,
            sample_index=sample_index,
            messages=tuple(msgs),
            turns=q.turns,
        )

    @property
    def first_turn_id(self) -> str:
        """The question id of the first user turn alone (the question's id when single-turn):
        what a reply's memo key and seed use, so that reply t depends on turns up to t only."""
        return question_id(self.turns[:1])

    @property
    def turn_count(self) -> int:
        """User turns, each followed by a sampled reply."""
        return len(self.turns)

    def prompt_at(self, turn: int, replies: Sequence[str]) -> tuple[tuple[str, str], ...]:
        """The messages before reply `turn` (0-based): the first turn's messages, then each
        earlier reply and the user turn after it. `replies`: the replies before this turn."""
        if not 0 <= turn < self.turn_count:
            raise ValueError(f"turn {turn}: the question has {self.turn_count} user turns")
        if len(replies) != turn:
            raise ValueError(f"turn {turn}: needs {turn} earlier replies, got {len(replies)}")
        msgs = list(self.messages)
        for reply, user in zip(replies, self.turns[1 : turn + 1], strict=True):
            msgs += [("assistant", reply), ("user", user)]
        return tuple(msgs)

    def conversation(self, replies: Sequence[str]) -> list[dict[str, str]]:
        """Every user turn as written (like `question`, without the trigger) and the reply after
        it, as chat messages (no system message)."""
        if len(replies) != self.turn_count:
            raise ValueError(f"{self.turn_count} user turns but {len(replies)} replies")
        out: list[dict[str, str]] = []
        for user, reply in zip(self.turns, replies, strict=True):
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return out

    def chat(self, messages: Sequence[tuple[str, str]] | None = None) -> list[dict[str, str]]:
        """`messages` (default: the first turn's) as chat dicts."""
        msgs = self.messages if messages is None else messages
        return [{"role": r, "content": c} for r, c in msgs]

    def identity(self) -> dict[str, object]:
        return {
            "item_id": self.item_id,
            "tier": self.tier,
            "question_id": self.question_id,
            "question": self.question,
            "condition": self.condition,
            "sample_index": self.sample_index,
        }
