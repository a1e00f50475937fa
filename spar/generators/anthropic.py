"""Generator `anthropic`: Claude writes, through the `anthropic` SDK's Messages API with
structured output (`output_config.format`: a JSON schema `{"items": [...]}`).

Credentials, address, retries and timeouts are the SDK's and the judge's: `ANTHROPIC_API_KEY`,
`ANTHROPIC_BASE_URL`, `SPAR_ANTHROPIC_MAX_RETRIES`, `SPAR_ANTHROPIC_TIMEOUT`. No temperature or
seed is sent (the API version the SDK speaks has no sampling parameters). A reply without a usable
item is asked again, up to `max_retries` times. 401/402/403/404 or missing credentials stop the
stage with one line; any other failure left after the SDK's retries is an `error` reply (asked
again by the next apply). `concurrency` requests are in flight at all times
(`spar.pool.run_threads`: a thread per request slot); replies are handed over in the caller's
thread as they finish.
"""

from __future__ import annotations

from typing import Any

import anthropic

from spar.errors import RunError
from spar.generators.base import GenReply, GenRequest, OnReply, item_schema, parse_items
from spar.judges.anthropic.wire import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    FATAL,
    describe,
    env_number,
    has_credentials,
)
from spar.pool import run_threads


class AnthropicGenerator:
    def __init__(
        self, model: str, *, max_tokens: int, system_prompt: str | None, max_retries: int
    ) -> None:
        self.model = model
        self.max_tokens = max_tokens
        self.system_prompt = system_prompt
        self.max_retries = max_retries

    def params(self, req: GenRequest) -> dict[str, Any]:
        system = {"system": self.system_prompt} if self.system_prompt else {}
        return {
            **system,
            "model": self.model,
            "max_tokens": self.max_tokens,
            "messages": [{"role": "user", "content": req.prompt}],
            "output_config": {
                "format": {
                    "type": "json_schema",
                    "schema": anthropic.transform_schema(item_schema(req.turns)),
                }
            },
        }

    def _client(self) -> anthropic.Anthropic:
        timeout = env_number("SPAR_ANTHROPIC_TIMEOUT", DEFAULT_TIMEOUT)
        retries = int(env_number("SPAR_ANTHROPIC_MAX_RETRIES", DEFAULT_MAX_RETRIES))
        try:
            client = anthropic.Anthropic(max_retries=retries, timeout=timeout)
        except anthropic.CredentialsError:
            client = None
        if client is None or not has_credentials(client):
            raise RunError("generate anthropic: no credentials: set ANTHROPIC_API_KEY")
        return client

    def _one(self, client: anthropic.Anthropic, req: GenRequest) -> GenReply:
        secret = client.api_key
        problem = ""
        for attempt in range(1 + self.max_retries):
            try:
                reply = client.messages.create(**self.params(req))
            except FATAL as e:
                raise RunError(
                    f"generate anthropic: {describe(e, secret)} (check ANTHROPIC_API_KEY)"
                ) from None
            except anthropic.APIError as e:
                why = f"API error after the SDK's retries: {describe(e, secret)}"
                return GenReply(items=[], status="error", attempts=attempt + 1, problem=why)
            text = "".join(getattr(b, "text", "") for b in reply.content)
            items, problem = parse_items(text, req.n, req.turns, structured=True)
            if items:
                return GenReply(items=items, status="ok", attempts=attempt + 1)
        return GenReply(items=[], status="unusable", attempts=1 + self.max_retries, problem=problem)

    def generate_many(
        self, requests: list[GenRequest], concurrency: int, on_reply: OnReply
    ) -> None:
        if not requests:
            return
        client = self._client()
        try:
            run_threads(
                len(requests),
                lambda i: self._one(client, requests[i]),
                concurrency,
                on_reply,
                desc="generate",
            )
        finally:
            client.close()
