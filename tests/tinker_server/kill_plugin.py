"""`SPAR_PLUGINS=tinker_server.kill_plugin`: engine `tinker` that SIGKILLs its own process.

The real `TinkerEngine`, except that with `SPAR_KILL_AT_FORWARD_BACKWARD=N` set, the process
kills itself (SIGKILL: no cleanup, no flush) when a training client is asked for its N-th
forward_backward of this process, i.e. after N-1 batches were applied. Before it dies it waits
until the server has answered the optim_step sent last: in the pipelined loop that batch is
applied on the server but its results are not awaited, so not journaled — certain, not likely.
For crash/resume tests of `spar apply` that must not depend on timing.
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
        if _calls == int(os.environ.get("SPAR_KILL_AT_FORWARD_BACKWARD", "0") or 0):
            if self._last_optim is not None:
                self._last_optim.result()  # the batch sent before is applied on the server
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
