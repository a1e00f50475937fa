"""What Claude is asked for and how its reply is read: the score schema, lenient JSON parsing,
the verdict check and the re-ask message."""

from __future__ import annotations

import contextlib
import functools
import json
from typing import Any

import anthropic
from anthropic.types import Message

from spar.judges.base import JudgeRequest, Verdict

REASK = (
    "Your reply could not be used: {problem}. Reply again with only a JSON object "
    '{{"reasoning": "<one or two sentences>", "score": <integer from {lo} to {hi}>}}.'
)


@functools.cache
def score_schema(lo: int, hi: int) -> dict[str, Any]:
    """JSON schema of the answer, in the form the API's structured outputs accept."""
    return anthropic.transform_schema(
        {
            "type": "object",
            "properties": {
                "reasoning": {"type": "string", "description": "one or two sentences"},
                "score": {
                    "type": "integer",
                    "enum": list(range(lo, hi + 1)),
                    "description": f"an integer from {lo} to {hi}",
                },
            },
            "required": ["reasoning", "score"],
            "additionalProperties": False,
        }
    )


def find_json_object(text: str) -> dict[str, Any] | None:
    """The whole text as a JSON object, else the first object in it that has a `score`."""
    text = text.strip()
    with contextlib.suppress(ValueError):
        obj = json.loads(text)
        if isinstance(obj, dict):
            return obj
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        with contextlib.suppress(ValueError):
            obj, _ = decoder.raw_decode(text, start)
            if isinstance(obj, dict) and "score" in obj:
                return obj
        start = text.find("{", start + 1)
    return None


def reply_text(msg: Message) -> str:
    return "".join(b.text for b in msg.content if b.type == "text")


def read_verdict(msg: Message, req: JudgeRequest) -> Verdict | str:
    """The verdict in a reply (an `ok` one, its score an int, asks 1), or what is wrong with it."""
    obj: dict[str, Any] | None = None
    for block in msg.content:
        if block.type == "tool_use" and isinstance(block.input, dict) and "score" in block.input:
            obj = block.input
    text = reply_text(msg)
    if obj is None:
        obj = find_json_object(text)
    if obj is None:
        if msg.stop_reason == "refusal":
            return "the model refused to answer"
        if msg.stop_reason == "max_tokens":
            return "the reply was cut off at max_tokens before a complete JSON object"
        shown = " ".join(text.split())[:80]
        return f"no JSON object with a score in the reply ({shown!r})"
    score = obj.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float):
        return f"score {score!r} is not a number"
    if isinstance(score, float) and not float(score).is_integer():
        return f"score {score} is not an integer"
    if not req.scale_min <= score <= req.scale_max:
        return f"score {score:g} is outside [{req.scale_min}, {req.scale_max}]"
    reasoning = obj.get("reasoning", "")
    if not isinstance(reasoning, str):
        reasoning = json.dumps(reasoning)
    return Verdict(score=int(score), reasoning=reasoning, status="ok")


def reask_messages(
    first: list[dict[str, Any]], reply: str, problem: str, req: JudgeRequest
) -> list[dict[str, Any]]:
    """The first question, the unusable reply, and what was wrong with it."""
    follow = REASK.format(problem=problem, lo=req.scale_min, hi=req.scale_max)
    if not reply.strip():
        return [*first[:1], {"role": "user", "content": follow}]
    return [
        *first[:1],
        {"role": "assistant", "content": reply.strip()},
        {"role": "user", "content": follow},
    ]
