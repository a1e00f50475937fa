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

    python launch.py api --port N --base-model NAME [skyrl EngineConfig options...]
    python launch.py engine [skyrl EngineConfig options...]     (started by the API server)
    python launch.py check                                      (the venv can run the server)
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import json
import os
import sys
import types
from pathlib import Path
from typing import Any


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


def run_engine(argv: list[str]) -> None:
    import runpy

    sys.argv = ["skyrl.tinker.engine", *argv]
    runpy.run_module("skyrl.tinker.engine", run_name="__main__", alter_sys=True)


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
    else:
        raise SystemExit(f"usage: {sys.argv[0]} api|engine|check ...")


if __name__ == "__main__":
    main()
