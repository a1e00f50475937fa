"""Drawing one completion per prompt through a sampling client: the loop every sampling stage
shares (sample, distill).

`concurrency` requests are in flight at all times (`spar.pool.run_pool`): each completed one,
collected in completion order, makes room for the next at once. Every result is handed to
`on_result` as soon as it is collected, so a caller that commits it there (the item memo) loses
only the requests still in flight when the process dies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from spar.pool import run_pool

if TYPE_CHECKING:
    import tinker

    from spar.engines.base import Future, SamplingClient
    from spar.spec import SamplingSpec
    from spar.store import ItemMemo


class Drawn(BaseModel):
    """One completion: the assistant message's text as the renderer parses it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    response: str
    stop_reason: str


def draw(
    client: SamplingClient,
    renderer: Any,
    prompts: Sequence[tinker.ModelInput],
    seeds: Sequence[int],
    sampling: SamplingSpec,
    concurrency: int,
    on_result: Callable[[int, Drawn], None],
    desc: str = "sample",
    stop: Callable[[], bool] | None = None,
) -> None:
    """Draw one completion of each rendered prompt with its seed (`prompts[i]` with `seeds[i]`)
    at `sampling`'s temperature, top_p and max_tokens, stopping at the renderer's stop sequences;
    call `on_result(i, drawn)` for each, in completion order. A failed request raises (what was
    handed to `on_result` before stays handed).

    `prompts` and `seeds` may grow while drawing: what `on_result` appends to both (a retry with
    another seed) is drawn too, in the same pool."""
    import tinker

    if len(prompts) != len(seeds):
        raise ValueError(f"draw: {len(prompts)} prompts but {len(seeds)} seeds")
    if concurrency < 1:
        raise ValueError(f"draw: concurrency {concurrency} (at least 1)")
    stops = renderer.get_stop_sequences()

    def submit(i: int) -> Future:
        params = tinker.SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=seeds[i],
            stop=stops,
        )
        return client.sample(prompts[i], 1, params)

    def drawn(i: int, response: Any) -> None:
        seq = response.sequences[0]
        message, _ = renderer.parse_response(list(seq.tokens))
        content = message["content"]
        text = content if isinstance(content, str) else str(content)
        on_result(i, Drawn(response=text, stop_reason=str(seq.stop_reason)))

    run_pool(lambda: len(prompts), submit, concurrency, drawn, desc, stop)


def draw_missing(
    memo: ItemMemo,
    keys: Sequence[str],
    client: Callable[[], SamplingClient],
    renderer: Any,
    prompts: Sequence[tinker.ModelInput],
    seeds: Sequence[int],
    sampling: SamplingSpec,
    concurrency: int,
    desc: str = "sample",
    stop: Callable[[], bool] | None = None,
) -> tuple[dict[str, Any], int]:
    """The memoised value (a `Drawn` dump) of every item key, and how many were drawn now: items
    not in the memo are drawn (`prompts[i]` with `seeds[i]`, through `client()`, made only when
    something is missing) and each is committed as soon as it is collected. `stop`: see
    `spar.pool.run_pool`."""
    done = memo.get_many(keys)
    todo = [i for i, k in enumerate(keys) if k not in done]
    if todo:

        def keep(j: int, drawn: Drawn) -> None:
            value = drawn.model_dump()
            memo.put(keys[todo[j]], value)
            done[keys[todo[j]]] = value

        draw(
            client(),
            renderer,
            [prompts[i] for i in todo],
            [seeds[i] for i in todo],
            sampling,
            concurrency,
            keep,
            desc,
            stop,
        )
    return done, len(todo)
