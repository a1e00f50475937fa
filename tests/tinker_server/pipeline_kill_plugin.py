"""`SPAR_PLUGINS=tinker_server.pipeline_kill_plugin`: engine `tinker` that SIGKILLs its process
in the middle of the pipelined training loop.

The real `TinkerEngine`, except that with `SPAR_PIPELINE_KILL_AT=N` set, the training client's
N-th forward_backward of this process first waits until the server has answered the optim_step
submitted last (batch N-2, 0-based: applied on the server, its results not yet awaited by the
pipelined loop, so not journaled), then kills the process (SIGKILL: no cleanup, no flush).
Waiting on the server's answer rather than on time makes "the server applied a batch the journal
does not have" certain, not likely.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from spar.engines import register_engine
from spar.engines.tinker import TinkerEngine

_calls = 0


class _KillingClient:
    def __init__(self, client: Any) -> None:
        self._client = client
        self._last_optim: Any = None

    def forward_backward(self, data: list[Any], loss_fn: str) -> Any:
        global _calls
        _calls += 1
        if _calls == int(os.environ.get("SPAR_PIPELINE_KILL_AT", "0") or 0):
            if self._last_optim is not None:
                self._last_optim.result()  # the previous batch is applied on the server
            os.kill(os.getpid(), signal.SIGKILL)
        return self._client.forward_backward(data, loss_fn)

    def optim_step(self, adam_params: Any) -> Any:
        self._last_optim = self._client.optim_step(adam_params)
        return self._last_optim

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class KillingTinkerEngine(TinkerEngine):
    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)

    def create_lora_training_client(
        self, base_model: str, rank: int, seed: int | None = None
    ) -> Any:
        return _KillingClient(super().create_lora_training_client(base_model, rank, seed))

    def create_training_client_from_state_with_optimizer(
        self, path: str, base_model: str | None = None
    ) -> Any:
        return _KillingClient(
            super().create_training_client_from_state_with_optimizer(path, base_model)
        )


register_engine("tinker", KillingTinkerEngine)
