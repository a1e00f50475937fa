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
  tinker 0.38 SDK requires of every sample promise.

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
