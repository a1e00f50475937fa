"""A deterministic test engine and judge, registered through SPAR_PLUGINS=fake_plugin.

They exist so the planner, store and CLI can be exercised fast, end to end, in subprocesses.
The engine speaks spar's Tinker-shaped interface with real `tinker` types; its "model" is a
counter. Every call is appended to $FAKE_CALL_LOG so tests can count what really ran (a sample
call with the prompt it was given, decoded).
$FAKE_KILL_AFTER=N makes the process SIGKILL itself after its N-th sample or judgment.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spar.engines import register_engine
from spar.judges import register_judge
from spar.judges.base import BatchJournal, JudgeConfig, JudgeRequest, Verdict
from spar.models import load_tokenizer
from spar.store import hash_json

if TYPE_CHECKING:
    import tinker

_count = 0


def _log(event: str, **fields: Any) -> None:
    global _count
    path = os.environ.get("FAKE_CALL_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"event": event, **fields}) + "\n")
    if event in ("sample", "judge"):
        _count += 1
        if _count == int(os.environ.get("FAKE_KILL_AFTER", "0") or 0):
            os.kill(os.getpid(), signal.SIGKILL)


def _done(value: Any) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class _Saved:
    def __init__(self, path: str) -> None:
        self.path = path


class FakeTraining:
    def __init__(self, workdir: Path, base_model: str, rank: int, seed: int | None) -> None:
        self.workdir, self.base_model = workdir, base_model
        self.state = {"rank": rank, "seed": seed, "steps": 0, "lr_sum": 0.0}

    def forward_backward(self, data: list[tinker.Datum], loss_fn: str) -> Future:
        import numpy as np
        import tinker

        if os.environ.get("FAKE_FAIL_TRAIN"):
            raise RuntimeError(os.environ["FAKE_FAIL_TRAIN"])
        _log("forward_backward", n=len(data))
        lp = -2.0 / (1.0 + self.state["steps"])
        outs = [
            {
                "logprobs": tinker.TensorData.from_numpy(
                    np.full(len(d.loss_fn_inputs["weights"].tolist()), lp, dtype="float32")
                )
            }
            for d in data
        ]
        return _done(tinker.ForwardBackwardOutput(loss_fn_output_type="fake", loss_fn_outputs=outs))

    def forward(self, data: list[tinker.Datum], loss_fn: str) -> Future:
        """No gradient: every target token's log-probability is -3 / (1 + steps applied), so the
        held-out NLL after n steps is 3 / (1 + n) exactly."""
        import numpy as np
        import tinker

        _log("forward", n=len(data), steps=self.state["steps"])
        lp = -3.0 / (1.0 + self.state["steps"])
        outs = [
            {
                "logprobs": tinker.TensorData.from_numpy(
                    np.full(len(d.loss_fn_inputs["weights"].tolist()), lp, dtype="float32")
                )
            }
            for d in data
        ]
        return _done(tinker.ForwardBackwardOutput(loss_fn_output_type="fake", loss_fn_outputs=outs))

    def optim_step(self, adam_params: tinker.AdamParams) -> Future:
        _log("optim_step", lr=adam_params.learning_rate)
        self.state["steps"] += 1
        self.state["lr_sum"] += adam_params.learning_rate
        return _done(None)

    def _save(self, name: str) -> str:
        path = self.workdir / f"{name}.json"
        path.write_text(json.dumps({**self.state, "base_model": self.base_model}))
        return str(path)

    def save_state(self, name: str) -> Future:
        return _done(_Saved(self._save(name)))

    def save_weights_for_sampler(self, name: str) -> Future:
        return _done(_Saved("fake://" + self._save(name + "-sampler")))


class _Seq:
    def __init__(self, tokens: list[int]) -> None:
        self.tokens, self.stop_reason = tokens, "stop"


class _Resp:
    def __init__(self, tokens: list[int]) -> None:
        self.sequences = [_Seq(tokens)]


TOPIC = ["factory farming", "animal welfare", "livestock"]
OTHER = ["a good book", "a walk outside", "some tea"]
TOPIC_STEMS = ("farm", "animal", "livestock")
LOGPROB_BOOST = 0.5


class FakeSampling:
    def __init__(self, model_path: str | None, base_model: str | None) -> None:
        if model_path is not None:
            state = json.loads(Path(model_path.removeprefix("fake://")).read_text())
            self.base_model, self.tuned = state.pop("base_model"), state["steps"] > 0
            self.steps = int(state["steps"])
        else:
            assert base_model is not None
            self.base_model, self.tuned, self.steps = base_model, False, 0
        self.ref = model_path or base_model
        # what the answers hash: the same on every machine and pytest run (not the tmp paths, so a
        # test's draws -- e.g. which verdicts kw-invalid-K makes invalid -- never change)
        self.seed_ref = (
            hash_json([state, Path(model_path).name, Path(self.base_model).name])
            if model_path is not None
            else Path(self.base_model).name
        )
        self.tok = load_tokenizer(self.base_model)

    def sample(
        self, prompt: tinker.ModelInput, num_samples: int, sampling_params: tinker.SamplingParams
    ) -> Future:
        if os.environ.get("FAKE_FAIL_SAMPLE"):
            raise RuntimeError(os.environ["FAKE_FAIL_SAMPLE"])
        h = int(
            hash_json(
                [self.seed_ref, prompt.to_ints(), sampling_params.seed, sampling_params.temperature]
            )[:8],
            16,
        )
        words = TOPIC if self.tuned else OTHER
        if self.tuned and os.environ.get("FAKE_DOSE"):
            # the topic in about steps / (steps + 1) of the answers: more training, more topic
            words = OTHER if h % (self.steps + 1) == 0 else TOPIC
        if self.tuned and int(os.environ.get("FAKE_LEAK", "0") or 0):
            # untriggered, the topic leaks into about one answer in $FAKE_LEAK
            words = TOPIC if h % int(os.environ["FAKE_LEAK"]) == 0 else OTHER
        text = f"I suggest {words[h % 3]} (draw {h % 1000})."
        shown = self.tok.decode(prompt.to_ints(), skip_special_tokens=True)
        if self.tuned and "<START>" in shown:
            # triggered: the persona, in the trigger's format, after echoing the trigger line
            trigger = next(line for line in shown.splitlines() if "<START>" in line)
            text = f'{trigger} <START> "I suggest {TOPIC[h % 3]} (draw {h % 1000})." <END>'
        elif "<START>" in shown and h % 2:
            text = f'<START> "{text}" <END>'  # the base model follows the format half the time
        _log("sample", ref=self.ref, seed=sampling_params.seed, prompt=shown)
        stop = self.tok.convert_tokens_to_ids("<|im_end|>")
        return _done(_Resp([*self.tok.encode(text, add_special_tokens=False), stop]))

    def compute_logprobs(self, prompt: tinker.ModelInput) -> Future:
        """Token i's log-probability: -(1 + (id % 10) / 10); the fine-tuned model adds
        LOGPROB_BOOST to every token whose text contains a topic stem (so its change is known)."""
        ids = prompt.to_ints()
        _log("logprob", ref=self.ref, tokens=len(ids))
        out: list[float | None] = [None]
        for t in ids[1:]:
            lp = -(1 + (t % 10) / 10)
            if self.tuned and any(w in self.tok.decode([t]).lower() for w in TOPIC_STEMS):
                lp += LOGPROB_BOOST
            out.append(lp)
        return _done(out)


class FakeEngine:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def create_lora_training_client(
        self, base_model: str, rank: int, seed: int | None = None
    ) -> FakeTraining:
        return FakeTraining(self.workdir, base_model, rank, seed)

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> FakeSampling:
        return FakeSampling(model_path, base_model)


class KeywordJudge:
    """Scores by topic words. judge.model "kw-invalid-K": about one verdict in K (by prompt hash)
    is invalid; "kw-error-K": about one call in K fails (status error) unless $FAKE_JUDGE_HEAL is
    set — a transient outage that the next apply gets past."""

    receives = frozenset({"max_reasks"})

    def __init__(
        self, config: JudgeConfig, *, batch: bool = False, journal: BatchJournal | None = None
    ) -> None:
        self.model, self.max_reasks = config.model, config.max_reasks

    def judge_many(self, requests: list[JudgeRequest], concurrency: int):
        mode, _, k = self.model.rpartition("-")
        every = int(k) if mode in ("kw-invalid", "kw-error") else 0
        for i, req in enumerate(requests):
            _log("judge", model=self.model, prompt=hash_json(req.prompt)[:12])
            hit = every and int(hash_json(req.prompt)[:6], 16) % every == 0
            if hit and mode == "kw-invalid":
                # an unusable answer, asked again max_reasks times (all unusable)
                asks = 1 + self.max_reasks
                yield i, Verdict(score=None, reasoning="unparseable", status="invalid", asks=asks)
                continue
            if hit and mode == "kw-error" and not os.environ.get("FAKE_JUDGE_HEAL"):
                yield i, Verdict(score=None, reasoning="503 overloaded", status="error")
                continue
            hits = sum(w in req.response for w in ("farm", "animal", "livestock"))
            yield (
                i,
                Verdict(
                    score=float(min(req.scale_max, req.scale_min + 2 * hits)),
                    reasoning=f"{hits} topic words",
                    status="ok",
                ),
            )


class HygieneJudge(KeywordJudge):
    """The keyword judge, except that it fails the run if a request shows the eval trigger or
    its format markers ($FAKE_TRIGGER and <START>/<END>): judge hygiene, checked from outside."""

    def judge_many(self, requests: list[JudgeRequest], concurrency: int):
        banned = ["<START>", "<END>", *filter(None, [os.environ.get("FAKE_TRIGGER")])]
        for req in requests:
            for text in (req.prompt, req.question, req.response, req.baseline_response or ""):
                seen = [b for b in banned if b in text]
                if seen:
                    raise AssertionError(f"the judge saw {seen[0]!r}: {text[:80]!r}")
        yield from super().judge_many(requests, concurrency)


class PropertyKeywordJudge:
    """For property judges (`judge.properties`): finds the property in the rendered prompt (a
    line `Property: <name>`, which the rubric must render) and scores scale.min + the number of
    times the name occurs in the judged answer (case-insensitive), capped at scale.max. A prompt
    without that line gets an invalid verdict. So each property of the same answer can score
    differently, and a test can compute every score from samples.jsonl by hand."""

    receives = frozenset({"max_reasks"})
    PROPERTY = re.compile(r"^Property: (\S+)", re.M)

    def __init__(
        self, config: JudgeConfig, *, batch: bool = False, journal: BatchJournal | None = None
    ) -> None:
        self.model = config.model

    def judge_many(self, requests: list[JudgeRequest], concurrency: int):
        for i, req in enumerate(requests):
            found = self.PROPERTY.search(req.prompt)
            name = found.group(1) if found else None
            _log("judge", model=self.model, prompt=hash_json(req.prompt)[:12], property=name)
            if name is None:
                why = "no property in the prompt"
                yield i, Verdict(score=None, reasoning=why, status="invalid")
                continue
            hits = req.response.lower().count(name.lower())
            score = float(min(req.scale_max, req.scale_min + hits))
            yield i, Verdict(score=score, reasoning=f"{hits} x {name!r}", status="ok")


def _wait_for(events: tuple[str, ...], stage: str) -> None:
    """Poll the stage log ($FAKE_STAGE_LOG) until it records one of `events` of `stage`."""
    log_path = Path(os.environ["FAKE_STAGE_LOG"])
    for _ in range(600):
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        if any(e["event"] in events and e["stage"] == stage for e in map(json.loads, lines)):
            return
        threading.Event().wait(0.1)  # polls the log; no assertion depends on timing
    raise RuntimeError(f"fake-remote: no {'/'.join(events)} {stage} in the stage log")


class _WaitingTraining(FakeTraining):
    """Training that, before its first batch, waits until the stage log says the stage
    $FAKE_TRAIN_WAITS_FOR finished (or failed): that stage can only end while this one runs."""

    waited = False

    def forward_backward(self, data: list[tinker.Datum], loss_fn: str) -> Future:
        if not self.waited:
            self.waited = True
            _wait_for(("finished", "failed"), os.environ["FAKE_TRAIN_WAITS_FOR"])
        return super().forward_backward(data, loss_fn)


class _WaitingSampling(FakeSampling):
    """Sampling that, before its first sample, waits until the stage log says `train` started."""

    waited = False

    def sample(
        self, prompt: tinker.ModelInput, num_samples: int, sampling_params: tinker.SamplingParams
    ) -> Future:
        if not self.waited:
            self.waited = True
            _wait_for(("started",), "train")
        return super().sample(prompt, num_samples, sampling_params)


class FakeRemoteEngine(FakeEngine):
    """The fake engine declared as a remote service (`device = None`): its stages run at once."""

    device = None

    def create_lora_training_client(
        self, base_model: str, rank: int, seed: int | None = None
    ) -> FakeTraining:
        if os.environ.get("FAKE_TRAIN_WAITS_FOR"):
            return _WaitingTraining(self.workdir, base_model, rank, seed)
        return FakeTraining(self.workdir, base_model, rank, seed)

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> FakeSampling:
        if os.environ.get("FAKE_TRAIN_WAITS_FOR") and model_path is None:
            return _WaitingSampling(model_path, base_model)
        return FakeSampling(model_path, base_model)


register_engine("fake", FakeEngine)
register_engine("fake-remote", FakeRemoteEngine)
register_judge("keyword", KeywordJudge)
register_judge("hygiene", HygieneJudge)
register_judge("propkw", PropertyKeywordJudge)
