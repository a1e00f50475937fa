"""Run skyrl's Tinker-compatible API server (JAX backend, CPU) for spar's tests.

Runs inside the skyrl test venv (Python 3.12), never in spar's own. skyrl's files are used as
installed; this launcher only bridges what the tests need:

- binds 127.0.0.1 only;
- the API server starts its engine with `uv run`; here the engine runs on this venv's own
  interpreter, through this launcher (`launch.py engine ...`);
- torch and peft are not installed: skyrl imports torch for the image path of its renderer and
  peft for one `LoraConfig(...).save_pretrained(dir)` call (writing adapter_config.json); both are
  replaced by small stand-ins here;
- the `/api/v1/asample` reply gets one `sample_sequence_ids` entry per requested sample, which the
  tinker 0.38 SDK requires of every sample promise;
- `/api/v1/load_weights` also takes the one-request load of the Tinker service
  (`create_training_client_from_state[_with_optimizer]`: `session_id` + `model_seq_id`, no
  `model_id`; the server makes the model `<session_id>:train:<model_seq_id>` from the checkpoint's
  base model and LoRA config, then loads into it) — only when a test asks for it. By default the
  server answers that form as skyrl does (422: it wants a `model_id`), or with any status a test
  sets. `POST /spar-test/load-mode {"mode": "skyrl" | "one-request" | "<status>"}` sets the mode;
  `GET /spar-test/loads` lists every load received: `{"form": "one-request" | "model_id",
  "status", "model_id", "path"}`.

- `--backend null` (benchmarks only, never the tests' correctness checks): an engine backend that
  does no model compute (`_null_backend_classes`), so a benchmark measures spar's orchestration
  against a service whose only cost is its latency; `--backend jax` (the default everywhere) is
  skyrl's own, untouched.

    python launch.py api --port N --base-model NAME [skyrl EngineConfig options...]
    python launch.py engine [skyrl EngineConfig options...]     (started by the API server)
    python launch.py check                                      (the venv can run the server)
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import itertools
import json
import os
import random
import sys
import types
from pathlib import Path
from typing import Any

NULL_BACKEND = "null"


def _install_stand_ins() -> None:
    """`torch` and `peft` stand-ins, only where the real packages are missing."""
    if importlib.util.find_spec("torch") is None:
        torch = types.ModuleType("torch")
        # a spec but no version and no __file__: transformers then reports torch unavailable
        torch.__spec__ = importlib.machinery.ModuleSpec("torch", None)

        class Tensor:  # only ever used in isinstance checks on the (unused) image path
            pass

        torch.Tensor = Tensor  # type: ignore[attr-defined]
        sys.modules["torch"] = torch

    if importlib.util.find_spec("peft") is None:
        peft = types.ModuleType("peft")
        peft.__spec__ = importlib.machinery.ModuleSpec("peft", None)

        class LoraConfig:
            """Writes the adapter_config.json that peft would (the fields skyrl sets)."""

            def __init__(self, **fields: Any) -> None:
                self.fields = fields

            def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
                cfg = {
                    "peft_type": "LORA",
                    "task_type": "CAUSAL_LM",
                    "target_modules": "all-linear",
                    "bias": "none",
                    "lora_dropout": 0.0,
                    **self.fields,
                }
                Path(directory, "adapter_config.json").write_text(json.dumps(cfg, indent=2))

        peft.LoraConfig = LoraConfig  # type: ignore[attr-defined]
        sys.modules["peft"] = peft


def _patch_api(api: Any) -> None:
    from fastapi import Request
    from fastapi.routing import APIRoute

    def engine_cmd(parent_cmd: list[str], engine_config: Any) -> list[str]:
        del parent_cmd
        return [sys.executable, __file__, "engine", *api.config_to_argv(engine_config)]

    api._build_uv_run_cmd_engine = engine_cmd

    original = api.asample

    async def asample(request: Any, req: Request, session: Any) -> dict[str, Any]:
        reply = await original(request, req, session)
        ids = [f"{reply.request_id}-{i}" for i in range(request.num_samples)]
        return {**reply.model_dump(), "sample_sequence_ids": ids}

    # same parameters (and FastAPI dependencies) as skyrl's endpoint, without its response model
    asample.__signature__ = inspect.signature(original)  # type: ignore[attr-defined]
    api.app.router.routes = [
        r
        for r in api.app.router.routes
        if not (isinstance(r, APIRoute) and r.path == "/api/v1/asample")
    ]
    api.app.post("/api/v1/asample")(asample)
    _patch_load_weights(api)


def _patch_load_weights(api: Any) -> None:
    from fastapi import Depends, Request
    from fastapi.responses import JSONResponse
    from fastapi.routing import APIRoute
    from pydantic import ValidationError
    from sqlmodel.ext.asyncio.session import AsyncSession

    types = api.types
    original = api.load_weights
    state: dict[str, Any] = {"mode": "skyrl", "loads": []}
    db_session = Depends(api.get_session)

    async def load_weights(req: Request, session: AsyncSession = db_session) -> Any:
        body = await req.json()
        loads = state["loads"]
        if body.get("model_id"):  # skyrl's own form: a load into a model created before
            loads.append({"form": "model_id", "model_id": body["model_id"], "path": body["path"]})
            try:
                request = api.LoadWeightsRequest.model_validate(body)
            except ValidationError as e:
                raise api.FastAPIRequestValidationError(e.errors()) from None
            reply = await original(request, req, session)
            loads[-1]["status"] = 200
            return reply
        model_id = f"{body.get('session_id')}:train:{body.get('model_seq_id')}"
        entry = {"form": "one-request", "model_id": model_id, "path": body.get("path")}
        loads.append(entry)
        if state["mode"] != "one-request":
            entry["status"] = 422 if state["mode"] == "skyrl" else int(state["mode"])
            detail = "model_id: Field required" if state["mode"] == "skyrl" else "refused"
            return JSONResponse({"detail": detail}, status_code=entry["status"])
        path = types.TinkerPath.parse(body["path"])
        if path is None or path.kind != "weights":
            entry["status"] = 400
            return JSONResponse({"detail": "bad path"}, status_code=400)
        source = await api.get_model(session, path.primary_id)
        await api.validate_checkpoint(
            req, path.primary_id, path.secondary_id, types.CheckpointType.TRAINING, session
        )
        lora = types.LoraConfig.model_validate(source.lora_config)
        created = await api.create_future(
            session=session,
            request_type=types.RequestType.CREATE_MODEL,
            model_id=model_id,
            request_data=types.CreateModelInput(lora_config=lora),
        )
        session.add(
            api.ModelDB(
                model_id=model_id,
                base_model=body.get("base_model") or source.base_model,
                lora_config=lora.model_dump(),
                status="created",
                request_id=created,
                session_id=body["session_id"],
            )
        )
        request_id = await api.create_future(
            session=session,
            request_type=types.RequestType.LOAD_WEIGHTS,
            model_id=model_id,
            request_data=types.LoadWeightsInput(
                source_model_id=path.primary_id,
                checkpoint_id=path.secondary_id,
                load_optimizer=bool(body.get("optimizer", True)),
            ),
        )
        await session.commit()
        entry["status"] = 200
        return api.FutureResponse(future_id=str(request_id), request_id=str(request_id))

    async def set_mode(req: Request) -> dict[str, Any]:
        state["mode"] = str((await req.json())["mode"])
        return {"mode": state["mode"]}

    async def get_loads() -> list[dict[str, Any]]:
        return list(state["loads"])

    # this module's annotations are strings (PEP 563) that FastAPI resolves in the module's
    # globals, where these local imports are not: give it the real classes
    for fn in (load_weights, set_mode):
        sig = inspect.signature(fn)
        real = {"req": Request, "session": AsyncSession}
        fn.__signature__ = sig.replace(  # type: ignore[attr-defined]
            parameters=[
                q.replace(annotation=real.get(q.name, q.annotation))
                for q in sig.parameters.values()
            ],
            return_annotation=inspect.Signature.empty,
        )
    get_loads.__signature__ = inspect.Signature()  # type: ignore[attr-defined]
    api.app.router.routes = [
        r
        for r in api.app.router.routes
        if not (isinstance(r, APIRoute) and r.path == "/api/v1/load_weights")
    ]
    api.app.post("/api/v1/load_weights")(load_weights)
    api.app.post("/spar-test/load-mode")(set_mode)
    api.app.get("/spar-test/loads")(get_loads)


def run_api(argv: list[str]) -> None:
    import argparse

    import skyrl.tinker.api as api
    import uvicorn

    _patch_api(api)
    parser = argparse.ArgumentParser(description="skyrl Tinker API server on 127.0.0.1")
    api.add_model(parser, api.EngineConfig)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    fields = api.EngineConfig.model_fields
    api.app.state.engine_config = api.EngineConfig.model_validate(
        {k: v for k, v in vars(args).items() if k in fields}
    )
    uvicorn.run(
        api.app,
        host="127.0.0.1",
        port=args.port,
        log_config=api.get_uvicorn_log_config(),
        timeout_keep_alive=api.HTTP_KEEP_ALIVE_TIMEOUT_SECONDS,
    )


def _null_backend_classes() -> tuple[type, type]:
    """The `null` backend and its (empty) config class, as skyrl's `get_backend_classes` returns
    them for its own backends.

    A benchmark stand-in: no model and no compute, so the service's only cost is the latency a
    benchmark puts in front of it (tests/benchmarks/latency_proxy.py). Replies have the shapes
    skyrl's JAX backend gives (skyrl/backends/jax.py) and are deterministic: every token's
    logprob is -1.0, so a loss is finite; samples are `max_tokens` non-special token ids drawn
    from the request's seed and prompt. Checkpoints are small files where the real ones go, and
    carry each model's optimizer step count, so a saved state loads back. Never used by the
    tests' correctness checks.
    """
    from cloudpathlib import AnyPath
    from pydantic import BaseModel
    from skyrl.backends.backend import AbstractBackend
    from skyrl.backends.renderer import render_model_input
    from skyrl.tinker import types as t
    from skyrl.utils.storage import pack_and_upload
    from transformers import AutoTokenizer

    state_file = "null_checkpoint.json"  # inside the training checkpoint's directory

    class NullBackendConfig(BaseModel, extra="forbid"):
        """No options: there is nothing to size."""

    class NullBackend(AbstractBackend):
        def __init__(self, base_model: str, config: BaseModel) -> None:
            self.base_model = base_model
            self.config = config
            self.metrics = t.EngineMetrics()  # read through TinkerEngine.metrics
            tokenizer = AutoTokenizer.from_pretrained(base_model)
            special = set(tokenizer.all_special_ids)
            self.token_ids = [i for i in range(len(tokenizer)) if i not in special]
            self.models: dict[str, t.LoraConfig] = {}
            self.steps: dict[str, int] = {}  # optim_steps applied per model

        def create_model(
            self, model_id: str, lora_config: t.LoraConfig, model_role: str = "policy"
        ) -> None:
            self.models[model_id] = lora_config
            self.steps[model_id] = 0

        def has_model(self, model_id: str) -> bool:
            return model_id in self.models

        def delete_model(self, model_id: str) -> None:
            if model_id not in self.models:
                raise ValueError(f"Model {model_id} not found")
            del self.models[model_id], self.steps[model_id]

        def _model_pass(self, batch: t.PreparedModelPassBatch) -> dict[str, Any]:
            """Per datum, one logprob (-1.0) and one loss (-logprob x weight) per input token."""
            inputs = render_model_input(batch.all_model_inputs)
            results: dict[str, Any] = {}
            for request_id, _, start, end in batch.request_batch_slices:
                outputs = []
                for i in range(start, end):
                    n = len(inputs[i].prompt_ids)
                    weights = [*batch.all_token_weights[i][:n], *[0.0] * n][:n]
                    outputs.append(
                        {
                            "elementwise_loss": {"data": weights, "dtype": "float32", "shape": [n]},
                            "logprobs": {"data": [-1.0] * n, "dtype": "float32", "shape": [n]},
                        }
                    )
                results[request_id] = t.ForwardBackwardOutput(
                    loss_fn_output_type="scalar", loss_fn_outputs=outputs, metrics={}
                )
            return results

        def forward_backward(self, prepared_batch: t.PreparedModelPassBatch) -> dict[str, Any]:
            return self._model_pass(prepared_batch)

        def forward(self, prepared_batch: t.PreparedModelPassBatch) -> dict[str, Any]:
            return self._model_pass(prepared_batch)

        def optim_step(self, model_id: str, request_data: t.OptimStepInput) -> t.OptimStepOutput:
            self.steps[model_id] += 1
            lr = request_data.adam_params.learning_rate
            return t.OptimStepOutput(
                metrics={"skyrl.ai/grad_norm": 0.0, "skyrl.ai/learning_rate": lr}
            )

        def sample(self, prepared_batch: t.PreparedSampleBatch) -> dict[str, Any]:
            """`max_tokens` tokens per sample (stop reason "length"), logprob -1.0 each."""
            batch = prepared_batch
            prompts = [r.prompt_ids for r in render_model_input(batch.all_model_inputs)]
            sequences = []
            for prompt, params in zip(prompts, batch.all_sampling_params, strict=True):
                rng = random.Random(f"{params.seed}:{prompt}")
                tokens = [rng.choice(self.token_ids) for _ in range(params.max_tokens)]
                sequences.append(
                    t.GeneratedSequence(
                        stop_reason="length", tokens=tokens, logprobs=[-1.0] * len(tokens)
                    )
                )
            results: dict[str, Any] = {}
            for request_id, _, start, end, want_prompt, topk in batch.request_batch_slices:
                prompt = prompts[start]
                results[request_id] = t.SampleOutput(
                    sequences=sequences[start:end],
                    prompt_logprobs=[None, *[-1.0] * (len(prompt) - 1)] if want_prompt else None,
                    topk_prompt_logprobs=(
                        [None, *[self._topk(tok, topk) for tok in prompt[1:]]] if topk > 0 else None
                    ),
                )
            return results

        def _topk(self, token: int, k: int) -> list[tuple[int, float]]:
            """`k` distinct (token id, -1.0) pairs, the prompt's own token first."""
            others = (i for i in self.token_ids if i != token)
            return [(i, -1.0) for i in [token, *(next(others) for _ in range(k - 1))]]

        def save_checkpoint(self, output_path: AnyPath, model_id: str) -> None:
            # a directory, as the JAX backend's flax checkpoint is
            output_path.mkdir(parents=True, exist_ok=True)
            lora, step = self.models[model_id].model_dump(), self.steps[model_id]
            (output_path / state_file).write_text(json.dumps({"lora_config": lora, "step": step}))

        def load_checkpoint(
            self, checkpoint_path: AnyPath, model_id: str, load_optimizer: bool
        ) -> None:
            path = checkpoint_path / state_file
            if not path.exists():
                raise FileNotFoundError(f"Training checkpoint not found in {checkpoint_path}")
            state = json.loads(path.read_text())
            if state["lora_config"]["rank"] != self.models[model_id].rank:
                raise ValueError(
                    f"Rank mismatch: checkpoint has rank {state['lora_config']['rank']}, "
                    f"model configured with rank {self.models[model_id].rank}"
                )
            self.steps[model_id] = int(state["step"])

        def save_sampler_checkpoint(
            self, output_path: AnyPath, model_id: str, persist: bool = True
        ) -> None:
            # a tar.gz holding an adapter_config.json (no weights), as the JAX backend's does
            lora = self.models[model_id]
            with pack_and_upload(output_path) as directory:
                config = {
                    "peft_type": "LORA",
                    "base_model_name_or_path": self.base_model,
                    "r": lora.rank,
                    "lora_alpha": lora.alpha,
                    "null_backend_step": self.steps[model_id],
                }
                (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))

    return NullBackend, NullBackendConfig


def _backend_arg(argv: list[str]) -> str | None:
    """The value of `--backend` in an engine command line (as skyrl's `config_to_argv` writes
    it: `--backend NAME`)."""
    for flag, value in itertools.pairwise(argv):
        if flag == "--backend":
            return value
    return None


def run_engine(argv: list[str]) -> None:
    import runpy

    sys.argv = ["skyrl.tinker.engine", *argv]
    if _backend_arg(argv) != NULL_BACKEND:
        runpy.run_module("skyrl.tinker.engine", run_name="__main__", alter_sys=True)
        return
    # skyrl's `get_backend_classes` knows jax, fsdp and megatron only. runpy would run a fresh
    # copy of the module, out of reach of a patch, so the imported module is patched and its
    # `main()` called: all its `__main__` block does. The API server takes any `--backend` name
    # (EngineConfig.backend is a plain str); for "null" it routes samples through the engine
    # (only fsdp/megatron forward them elsewhere), and the engine's `backend == "jax"` checks
    # (single-role runtimes, the sample batch cap) do not apply: no other patch is needed.
    import skyrl.tinker.engine as engine

    skyrl_classes = engine.get_backend_classes

    def get_backend_classes(backend_name: str, use_ray: bool = False) -> tuple[type, type]:
        if backend_name == NULL_BACKEND:
            return _null_backend_classes()
        return skyrl_classes(backend_name, use_ray)

    engine.get_backend_classes = get_backend_classes
    engine.main()


def main() -> None:
    _install_stand_ins()
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "api":
        run_api(rest)
    elif mode == "engine":
        run_engine(rest)
    elif mode == "check":  # the venv is complete: every module the server runs imports
        import skyrl.backends.jax
        import skyrl.tinker.api
        import skyrl.tinker.engine

        _patch_api(skyrl.tinker.api)
        _null_backend_classes()
    else:
        raise SystemExit(f"usage: {sys.argv[0]} api|engine|check ...")


if __name__ == "__main__":
    main()
